"""Kernels whose weight prefetches suit some CPUs and not others (bf16_dpbf16: non-temporal or into L2;
bf16_dot / f16_dot: into L1, into L2, or twice as far into L2; the int8 / int4 kernels: into L1 or into
L2): the same bits in every mode, and the mode used is the one
timed fastest here (by a clear margin where the first has gains a kernel's timing does not show), else
the first."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from stablelm import kernels as native
from stablelm.kernels import prefetch
from stablelm.quantization import QuantizedLinear

needs_dpbf16 = pytest.mark.skipif(
    native.kernel("bf16_dpbf16") is None or not native.has_dpbf16(),
    reason="needs an x86-64 CPU with AVX512-BF16 and a C compiler",
)
needs_dot = pytest.mark.skipif(native.kernel("bf16_dot") is None, reason="needs stablelm's kernels")


def _half(*shape, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-4, 5, shape, generator=gen).float())
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.fixture
def restore_modes():
    lib = native.library()
    if lib is None:
        yield
        return
    before = {kind: lib.stablelm_prefetch(which) for kind, (which, *_) in prefetch.PREFETCH.items()}
    quant = native.quant_library()
    quant_before = quant.stablelm_quant_prefetch() if quant is not None else 0
    yield
    for kind, mode in before.items():
        prefetch.set_prefetch(kind, mode)
    if quant is not None:
        quant.stablelm_quant_set_prefetch(quant_before)


def _mode(kind):
    return native.library().stablelm_prefetch(prefetch.PREFETCH[kind][0])


SHAPES = [(48, 2048), (130, 1025), (2304, 768), (7, 5), (33, 4096)]
# K = 2048 and 4096: rows 4 KB apart (one L1 set); 1025 and 5: edges of k; 7, 33 and 130: of rows


def _same_in_every_mode(kind, mode_kind, dtype, n, k, blocks):
    weight, bias = _half(n, k, seed=1, dtype=dtype), _half(n, seed=2, dtype=dtype)
    for rows in (1, 2, 3, 8):
        x = _half(rows, k, seed=rows, dtype=dtype)
        for block in blocks:
            got = []
            for mode in prefetch.PREFETCH[mode_kind][1]:
                prefetch.set_prefetch(mode_kind, mode)
                assert _mode(mode_kind) == mode
                got.append(native.run_linear(kind, x, [weight, weight[:5]], [bias, None], block))
            assert all(torch.equal(got[0], g) for g in got[1:]), (rows, block)
            # and each output is its own row's product (not a neighbour's): close to the float32 one
            exact = nn.functional.linear(x.float(), weight.float(), bias.float())
            torch.testing.assert_close(got[0][:, :n].float(), exact, rtol=0.02, atol=0.02 * exact.abs().max())


@needs_dpbf16
@pytest.mark.parametrize("n,k", SHAPES)
def test_the_dpbf16_kernel_gives_the_same_bits_in_every_mode(n, k, restore_modes):
    _same_in_every_mode("bf16_dpbf16", "bf16_dpbf16", torch.bfloat16, n, k, (512, 1024))


@needs_dot
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("kind,dtype", [("bf16_dot", torch.bfloat16), ("f16_dot", torch.float16)])
def test_the_dot_kernels_give_the_same_bits_in_every_mode(kind, dtype, n, k, restore_modes):
    _same_in_every_mode(kind, "bf16_dot", dtype, n, k, (0,))


@pytest.mark.parametrize(
    "kind,times,expected",
    [
        ("bf16_dpbf16", {0: 1.0, 1: 0.5}, 1),
        ("bf16_dpbf16", {0: 1.0, 1: 0.7}, 1),
        ("bf16_dpbf16", {0: 1.0, 1: 0.9}, 0),  # faster, but not by a clear margin: the first mode stays
        ("bf16_dpbf16", {0: 1.0, 1: 1.05}, 0),
        ("bf16_dot", {0: 1.0, 1: 0.88, 2: 0.95}, 1),  # the same data cached either way: the fastest
        ("bf16_dot", {0: 1.0, 1: 0.88, 2: 0.8}, 2),
        ("bf16_dot", {0: 1.0, 1: 1.1, 2: 0.99}, 0),
    ],
)
def test_the_mode_is_the_one_timed_fastest(monkeypatch, kind, times, expected, restore_modes):
    if native.kernel(kind) is None:
        pytest.skip(f"no {kind} kernel here")

    def fake(kind_, x, weights, biases, block):
        time.sleep(0.01 * times[_mode(kind)])  # sleeps: a few % off at most

    monkeypatch.setattr(prefetch, "run_linear", fake)
    monkeypatch.setattr(prefetch, "COLD_BYTES", 2 * 1024 * 2560 * 2)  # two weights a round
    monkeypatch.setattr(prefetch, "_PREFETCH", {})
    assert prefetch.prefetch_mode(kind) == expected
    assert _mode(kind) == expected  # set in the library
    monkeypatch.setattr(prefetch, "run_linear", None)  # timed once per process: not again
    assert prefetch.prefetch_mode(kind) == expected


def test_a_bad_mode_or_kind_is_refused():
    with pytest.raises(ValueError, match="prefetch mode of bf16_dot is one of"):
        prefetch.set_prefetch("bf16_dot", 3)
    with pytest.raises(ValueError, match="no prefetch modes for 'f32'"):
        prefetch.set_prefetch("f32", 0)


@needs_dot
def test_the_modes_are_timed_again_after_the_caches_are_cleared(monkeypatch, restore_modes):
    monkeypatch.setattr(prefetch, "_PREFETCH", {(native.selected_isa(), "bf16_dot"): 1})
    assert prefetch.prefetch_mode("bf16_dot") == 1
    native.clear_caches()
    assert prefetch._PREFETCH == {}


needs_quant = pytest.mark.skipif(
    native.quant_library() is None, reason="needs the quantized kernels (x86-64)"
)


@needs_quant
@pytest.mark.parametrize("quant_type,group", [("int8", 128), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("n,k", [(40, 2048), (130, 1024), (2304, 768)])
def test_the_quantized_kernels_give_the_same_bits_in_both_modes(quant_type, group, n, k, restore_modes):
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    layer = QuantizedLinear.from_dense(weight, torch.randn(n, generator=gen).bfloat16(), quant_type=quant_type,
                                       group_size=group)  # fmt: skip
    prefetch.quant_prefetch_mode()  # timed first (the layer's first call would time it)
    lib = native.quant_library()
    for rows in (1, 2, 5):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        got = []
        for mode in prefetch.QUANT_MODES:
            lib.stablelm_quant_set_prefetch(mode)
            with torch.no_grad():
                got.append(layer(x))
        assert torch.equal(got[0], got[1]), rows
        # and each output is its own row's product: close to the dequantized weights' in float32
        exact = nn.functional.linear(x.float(), layer.dequantized(torch.float32), layer.bias.float())
        torch.testing.assert_close(got[0].float(), exact, rtol=0.02, atol=0.02 * exact.abs().max())


@needs_quant
@pytest.mark.parametrize("times,expected", [({0: 1.0, 1: 0.88}, 1), ({0: 1.0, 1: 1.1}, 0)])
def test_the_quantized_kernels_mode_is_the_one_timed_fastest(monkeypatch, times, expected, restore_modes):
    lib = native.quant_library()
    real = lib.stablelm_q8_linear

    class Lib:  # the library, its int8 kernel replaced by a clock that says how each mode went
        def __getattr__(self, name):
            return getattr(lib, name)

        def stablelm_q8_linear(self, *args):
            time.sleep(0.01 * times[lib.stablelm_quant_prefetch()])
            return 0

    monkeypatch.setattr(prefetch, "quant_library", Lib)
    monkeypatch.setattr(prefetch, "COLD_BYTES", 2 * 1024 * 2560)  # two weights a round
    monkeypatch.setattr(prefetch, "_QUANT_PREFETCH", {})
    assert prefetch.quant_prefetch_mode() == expected
    assert lib.stablelm_quant_prefetch() == expected  # set in the library
    monkeypatch.setattr(prefetch, "quant_library", None)  # timed once per process: not again
    assert prefetch.quant_prefetch_mode() == expected
    assert real is lib.stablelm_q8_linear


@needs_quant
def test_a_failing_kernel_while_timing_is_an_error_not_a_silent_choice(monkeypatch, restore_modes):
    lib = native.quant_library()

    class Lib:
        def __getattr__(self, name):
            return getattr(lib, name)

        def stablelm_q8_linear(self, *args):
            return 2

    monkeypatch.setattr(prefetch, "quant_library", Lib)
    monkeypatch.setattr(prefetch, "COLD_BYTES", 2 * 1024 * 2560)
    monkeypatch.setattr(prefetch, "_QUANT_PREFETCH", {})
    with pytest.raises(RuntimeError, match="int8 kernel failed while timing its prefetches"):
        prefetch.quant_prefetch_mode()


@needs_quant
def test_the_quantized_mode_is_timed_again_after_the_caches_are_cleared(monkeypatch, restore_modes):
    monkeypatch.setattr(prefetch, "_QUANT_PREFETCH", {native.selected_isa(): 1})
    assert prefetch.quant_prefetch_mode() == 1
    native.clear_caches()
    assert prefetch._QUANT_PREFETCH == {}
