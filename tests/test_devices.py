"""Half-precision parity and the fast decode paths on every device at hand: the CPU always, CUDA when
there is one (marked `gpu`, skipped without one). The CPU runs keep these checks themselves tested, so that
a machine with a GPU runs code that is known to work: `pytest -m gpu` there, or
`benchmarks/gpu_check.sh`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair, tiny_config

from stablelm.fast import optimize_for_inference

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
CONFIG = dict(num_key_value_heads=2, qk_layernorm=True, use_qkv_bias=True, max_position_embeddings=64)


def _ids(device: str, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(3)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_and_greedy_tokens_match_the_reference(device, dtype):
    ours, ref = make_pair(tiny_config(**CONFIG))
    ours, ref = ours.to(device, dtype), ref.to(device, dtype)
    ids = _ids(device)
    with torch.no_grad():
        got, want = ours(ids).logits.float(), ref(ids).logits.float()
    # within the dtype's rounding: a few units in the last place of the largest logit
    assert (got - want).abs().max().item() <= 8 * torch.finfo(dtype).eps * want.abs().max().item()
    expected = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert ours.generate(ids, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()


def assert_same_or_parted_at_a_near_tie(model, expected: torch.Tensor, got: torch.Tensor) -> None:
    """Greedy tokens equal, or parting only where the expected run's top two logits were within bf16
    rounding of each other (two units in the last place of the largest logit)."""
    for row in range(expected.shape[0]):
        differ = (expected[row] != got[row]).nonzero()
        if differ.numel() == 0:
            continue
        at = int(differ[0])
        with torch.no_grad():
            logits = model(expected[row : row + 1, :at]).logits[0, -1].float()
        top = logits.topk(2).values
        margin, scale = (top[0] - top[1]).item(), logits.abs().max().item()
        assert margin <= 2**-6 * scale, f"row {row} parted at {at} where the margin was {margin:.4f}"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decoding_gives_the_eager_greedy_tokens(device):
    ours, _ = make_pair(tiny_config(**CONFIG))
    ours = optimize_for_inference(ours.to(device, torch.bfloat16))
    ids = _ids(device)
    eager = ours.generate(ids, max_new_tokens=12, do_sample=False)
    compiled = ours.generate(ids, max_new_tokens=12, do_sample=False, compile=True)
    # compiled kernels fuse and round differently: within rounding, not bit for bit
    assert_same_or_parted_at_a_near_tie(ours, eager, compiled)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_batches_decode_as_each_row_alone(device):
    ours, _ = make_pair(tiny_config(**CONFIG))
    ours = optimize_for_inference(ours.to(device, torch.bfloat16))
    short, long = _ids(device, 1, 5), _ids(device, 1, 9)
    batch = torch.cat([torch.cat([short.new_zeros(1, 4), short], 1), long])
    mask = torch.cat([torch.cat([short.new_zeros(1, 4), torch.ones_like(short)], 1), torch.ones_like(long)])
    out = ours.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for row, alone in enumerate([short, long]):
        single = ours.generate(alone, max_new_tokens=8, do_sample=False)
        # within bf16 rounding the padded row may part at a near-tie; these weights have none
        assert out[row, -8:].tolist() == single[0, -8:].tolist(), row
