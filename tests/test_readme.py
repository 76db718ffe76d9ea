"""Every code block of README.md runs as written, offline, the way a reader would run it.

- ```python blocks run in a fresh interpreter. The StableLM documentation's snippet names the hub id
  `stabilityai/stablelm-3b-4e1t`: it runs through the real hub code (`huggingface_hub`), offline, on a
  Hugging Face cache made here that holds a small random-weight checkpoint under that id.
- ```console blocks: every `$ command` line runs in bash with the package's `stablelm` on PATH, in one
  working folder per block (so a block's files persist from one command to the next); each must exit 0,
  and those that generate or describe must print something on stdout.
- A block that talks to `http://127.0.0.1:8000` runs against `stablelm serve` on the demo model,
  started here on a free port (the block's address rewritten to it).
- ```bash blocks are the set-up (clone, make) and the server's start: the only ones not run here, listed
  in NOT_RUN with the reason, and the test fails if another block appears unrun.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, transformers

from stablelm.cli.generate import EMPTY_NOTE

pytestmark = pytest.mark.usefixtures("plans_of_the_session")  # see conftest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FIXTURES = Path(__file__).parent / "fixtures"
HUB_ID = "stabilityai/stablelm-3b-4e1t"
REVISION = "0" * 40

# Blocks not run by this test: (a string that identifies the block, why).
NOT_RUN = [
    ("git clone", "the set-up itself: clones the repository and runs make (CI runs it on a fresh clone)"),
    (
        "--node-rank $NODE_RANK",
        "needs two machines: tests/test_training_distributed.py runs it as two nodes on 127.0.0.1",
    ),
    (
        "stablelm serve",
        "starts the server, which runs until stopped: started here for the blocks that use it",
    ),
]
SERVER_URL = "http://127.0.0.1:8000"


def blocks() -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block of README.md."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        line = text.count("\n", 0, match.start()) + 1
        found.append((match.group(1), match.group(2), line))
    return found


def block_id(block: tuple[str, str, int]) -> str:
    return f"{block[0] or 'text'}-line{block[2]}"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding a random-weight checkpoint as `stabilityai/stablelm-3b-4e1t`."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    config = tiny_config(vocab_size=50304, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    config.max_position_embeddings = 4096
    torch.manual_seed(0)
    ref = transformers.StableLmForCausalLM(transformers.StableLmConfig.from_dict(config.to_dict()))
    ref.to(torch.bfloat16).save_pretrained(snapshot)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "gpt-neox-20b" / name, snapshot / name)
    return cache


def environment(hub_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_CACHE=str(hub_cache),
        HF_HUB_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
    )
    return env


def test_every_block_is_run_or_listed():
    kinds = {block[0] for block in blocks()}
    assert kinds <= {"python", "console", "bash"}, f"a README block of an unknown kind: {kinds}"
    for language, code, line in blocks():
        if language == "bash":
            assert any(key in code for key, _ in NOT_RUN), (
                f"README.md:{line}: a bash block this test does not run"
            )
    for key, _ in NOT_RUN:
        assert any(key in code for _, code, _ in blocks()), f"NOT_RUN names {key!r}, which no block holds"


class served:
    """`stablelm serve` on the demo model for a block that talks to SERVER_URL (rewritten to the server's
    address), nothing for the others."""

    def __init__(self, code: str) -> None:
        self.code, self.server = code, None

    def __enter__(self) -> str:
        if SERVER_URL not in self.code:
            return self.code
        from test_serve import Server  # the test extra's httpx and openai

        self.server = Server(None)  # the demo model, as the README's `stablelm serve`
        return self.code.replace(SERVER_URL, self.server.url)

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            assert self.server.stop() == 0, self.server.stderr


@pytest.mark.parametrize("block", [b for b in blocks() if b[0] == "python"], ids=block_id)
def test_python_block_runs(block, hub_cache, tmp_path):
    _, code, line = block
    with served(code) as code:
        _run_python_block(code, line, hub_cache, tmp_path)


def _run_python_block(code: str, line: int, hub_cache: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=environment(hub_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"README.md:{line} failed:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"README.md:{line} prints nothing"


@pytest.mark.parametrize("block", [b for b in blocks() if b[0] == "console"], ids=block_id)
def test_console_block_runs(block, hub_cache, tmp_path):
    _, code, line = block
    with served(code) as code:
        _run_console_block(code, line, hub_cache, tmp_path)


def _run_console_block(code: str, line: int, hub_cache: Path, tmp_path: Path) -> None:
    commands = [text[2:] for text in code.splitlines() if text.startswith("$ ")]
    assert commands, f"README.md:{line}: a console block without a '$ ' command"
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", "set -o pipefail; " + command],
            cwd=tmp_path,
            env={**environment(hub_cache), "TMPDIR": str(tmp_path)},  # torchrun's folders go there
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"README.md:{line}: {command!r} failed:\n{result.stderr[-3000:]}"
        if re.search(r"(^|\| )(stablelm (generate|chat|info|bench)|curl)\b", command):
            # A sampled run may draw the model's end token first (the demo model's first README prompt: ~0.5%);
            # then the command says so on stderr, and that is the command working, not a silent failure.
            explained = command.startswith("stablelm generate") and EMPTY_NOTE in result.stderr
            assert result.stdout.strip() or explained, f"README.md:{line}: {command!r} printed nothing"
        if command.startswith("curl "):
            assert '"choices"' in result.stdout, f"README.md:{line}: {command!r} got {result.stdout[:500]}"
