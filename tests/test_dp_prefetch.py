"""The bf16_dpbf16 kernel's two ways of prefetching weights (non-temporal, or the next block into L2):
the same bits either way, and the one used is the one timed faster here by a clear margin."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from stablelm import kernels as native
from stablelm.kernels import linear as kernel_linear

needs_dpbf16 = pytest.mark.skipif(
    native.kernel("bf16_dpbf16") is None or not native.has_dpbf16(),
    reason="needs an x86-64 CPU with AVX512-BF16 and a C compiler",
)


def _bf16(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-4, 5, shape, generator=gen).float())
    return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)


@pytest.fixture
def restore_mode():
    before = native.library().stablelm_dp_prefetch() if native.library() is not None else 0
    yield
    kernel_linear.set_dp_prefetch(before)


@needs_dpbf16
@pytest.mark.parametrize("n,k", [(48, 2048), (130, 1025), (2304, 768), (7, 5), (33, 4096)])
def test_both_modes_give_the_same_bits(n, k, restore_mode):
    # K = 2048 and 4096: rows 4 KB apart (one L1 set); 1025 and 5: edges of k; 7, 33 and 130: of rows
    weight, bias = _bf16(n, k, seed=1), _bf16(n, seed=2)
    for rows in (1, 2, 3, 8):
        x = _bf16(rows, k, seed=rows)
        for block in (512, 1024):
            got = []
            for mode in (0, 1):
                kernel_linear.set_dp_prefetch(mode)
                assert native.library().stablelm_dp_prefetch() == mode
                got.append(native.run_linear("bf16_dpbf16", x, [weight, weight[:5]], [bias, None], block))
            assert torch.equal(got[0], got[1]), (rows, block)
            # and each output is that row's product, summed in float32 apart (not a transposed neighbour)
            exact = nn.functional.linear(x.float(), weight.float(), bias.float())
            torch.testing.assert_close(got[0][:, :n].float(), exact, rtol=0.02, atol=0.02 * exact.abs().max())


@needs_dpbf16
@pytest.mark.parametrize("ratio,expected", [(0.5, 1), (0.79, 1), (0.9, 0), (1.05, 0)])
def test_the_mode_is_the_one_timed_faster_by_a_clear_margin(monkeypatch, ratio, expected, restore_mode):
    # a kernel whose mode 1 takes `ratio` of mode 0's time: mode 1 only where it saves >= 20%
    lib = native.library()

    def fake(kind, x, weights, biases, block):
        time.sleep(0.002 * (ratio if lib.stablelm_dp_prefetch() == 1 else 1.0))

    monkeypatch.setattr(kernel_linear, "run_linear", fake)
    monkeypatch.setattr(kernel_linear, "COLD_BYTES", 2 * 1024 * 2048 * 2)  # two weights a round
    monkeypatch.setattr(kernel_linear, "_DP_PREFETCH", {})
    assert kernel_linear.dp_prefetch() == expected
    assert lib.stablelm_dp_prefetch() == expected  # set in the library
    monkeypatch.setattr(kernel_linear, "run_linear", None)  # timed once per process: not again
    assert kernel_linear.dp_prefetch() == expected


def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match="prefetch mode is 0 or 1"):
        kernel_linear.set_dp_prefetch(2)


@needs_dpbf16
def test_the_mode_is_timed_again_after_the_caches_are_cleared(monkeypatch, restore_mode):
    monkeypatch.setattr(kernel_linear, "_DP_PREFETCH", {native.selected_isa(): 1})
    assert kernel_linear.dp_prefetch() == 1
    native.clear_caches()
    assert kernel_linear._DP_PREFETCH == {}
