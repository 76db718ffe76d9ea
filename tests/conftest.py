"""Shared helpers: tiny configs and a reference model (transformers) holding the same weights as ours."""

from __future__ import annotations

import os

# Before torch is imported (its OpenMP library reads it when loaded), and inherited by the subprocesses
# tests start: idle OpenMP threads sleep instead of spinning. `make test` runs two test processes side by
# side; on a 2-core machine their spinning threads starved each other (a test of many tiny generations took
# 235 s instead of 36).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from stablelm import StableLmConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

# Plans are made afresh in every test and its subprocesses, as tests patch what they depend on; the disk
# cache of plans (stablelm.kernels.plan_cache) is tested on its own, in a folder of its test.
os.environ["STABLELM_PLAN_CACHE"] = "0"

TINY = dict(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=16,
)


@pytest.fixture(scope="session")
def _plans_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("plans")


@pytest.fixture
def plans_of_the_session(_plans_folder, monkeypatch):
    """For tests of user-level commands (the CLI, the README's and docs' commands, servers, benchmarks):
    their processes keep the kernels' plans in a folder of the session, as a user's later runs keep them
    in their cache, instead of timing every layer again in each (~1 s a process on a 2-core Zen 3)."""
    monkeypatch.setenv("STABLELM_PLAN_CACHE", str(_plans_folder))


@pytest.fixture(scope="session", autouse=True)
def _token_cache_of_the_session(tmp_path_factory):
    """Training data tokenized by tests goes to a folder of the session, not the user's cache (torchrun's ranks
    and worker processes inherit the variable)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STABLELM_DATA_CACHE", str(tmp_path_factory.mktemp("token-cache")))
        yield


@pytest.fixture(autouse=True)
def _kernels_chosen_by_exactness_only(monkeypatch):
    """Tests check which kernel runs and what it computes: not timings. Production also times a
    half-precision kernel against torch's before using it (tested on its own in test_kernels.py)."""
    from stablelm.kernels import linear

    monkeypatch.setattr(linear, "SPEED_CHECK", False)
    monkeypatch.setattr(linear, "_PLANS", {})


def tiny_config(**overrides) -> StableLmConfig:
    return StableLmConfig(**{**TINY, **overrides})


def rope_scaling_for(rope_type: str, rotary_dim: int) -> dict | None:
    """Rope parameters that make each type differ from plain RoPE on sequences of ~24 positions."""
    half = rotary_dim // 2
    return {
        "default": None,
        "linear": {"rope_type": "linear", "factor": 2.0},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
        "longrope": {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.5 * i for i in range(half)],
            "original_max_position_embeddings": 8,
        },
        "llama3": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    }[rope_type]


def reference_config(config: StableLmConfig):
    return transformers.StableLmConfig.from_dict(config.to_dict())


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random values (LayerNorm weights away from 1, biases away from 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            scale = 0.2 if "norm" in name else 0.08
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def make_pair(
    config: StableLmConfig,
    *,
    ours_cls=None,
    ref_cls_name="StableLmForCausalLM",
    attn="sdpa",
    seed=0,
    kernels=False,
):
    """Our model and the reference, in eval mode, with the same random weights.

    Ours runs torch's kernels unless `kernels`: these pairs check the model's arithmetic against the
    reference's bit for bit, which stablelm's float32 kernels only match within rounding (the default
    path is checked on its own in test_fast.py and test_kernels.py).
    """
    import stablelm
    from stablelm.fast import set_kernels

    ours_cls = ours_cls or stablelm.StableLmForCausalLM
    ref_cls = getattr(transformers, ref_cls_name)
    torch.manual_seed(seed)
    ref = ref_cls._from_config(reference_config(config), attn_implementation=attn)
    randomize_(ref, seed)
    config.attn_implementation = attn
    ours = set_kernels(ours_cls(config), kernels)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref.eval()


# ---- training --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one thread: on a busy machine, threads waiting on each other cost far more than the tiny
    matrix products gain (a step takes 40 times longer on two busy cores than on one). Training test modules
    use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def training_tokenizer():
    """A byte-level BPE tokenizer of 300 tokens trained on 12 of Python's documentation topics."""
    from training_fixtures import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def torchrun_tmpdir(tmp_path, monkeypatch):
    """TMPDIR under the test's folder for the torchrun it starts: torchrun's agent makes a torchelastic_*
    folder in the temporary directory for every run and never removes it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder
