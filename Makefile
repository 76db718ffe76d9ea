VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# PyTorch's CPU wheels. A bare `pip install torch` from PyPI pulls the CUDA build (several GB of CUDA
# libraries) on Linux; this index serves the CPU build. Where it cannot be reached, torch comes from the
# indexes pip is configured with. Override: `make TORCH_INDEX=https://download.pytorch.org/whl/cu128 test`,
# or `make TORCH_INDEX= test` for pip's own choice.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: test run serve lint format clean

# `make run` installs what the package needs; `make test` adds the test tools (pytest, ruff, and
# transformers + peft as the numerical reference).
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ] && $(PY) scripts/reachable.py "$(TORCH_INDEX)/torch/"; then \
		echo "installing torch $(TORCH_VERSION) from $(TORCH_INDEX)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)" --extra-index-url "$(TORCH_INDEX)"; \
	else \
		[ -z "$(TORCH_INDEX)" ] || echo "note: $(TORCH_INDEX) cannot be reached; torch comes from pip's configured indexes"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install -q -e .
	touch $@

$(VENV)/.serve: $(VENV)/.runtime
	$(PIP) install -q -e ".[serve]"
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -q -e ".[test]"
	touch $@

# Two test processes side by side (pytest-xdist): a 2-core Zen 3 ran the suite in 12.7 min against 20.7
# in one process, most tests being single-threaded or waiting on the subprocesses they start. Their
# OpenMP threads sleep when idle instead of spinning (tests/conftest.py sets OMP_WAIT_POLICY), else the two
# processes' spinning threads starve each other. `make test PYTEST_WORKERS=0` runs them in one process.
PYTEST_WORKERS ?= 2

test: $(VENV)/.test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist load

run: $(VENV)/.runtime
	$(VENV)/bin/stablelm generate "The for statement"

serve: $(VENV)/.serve
	$(VENV)/bin/stablelm serve $(ARGS)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV)
