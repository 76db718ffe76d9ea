"""stablelm's native linear kernels: bf16 bit-identical to torch's F.linear wherever it is used, fp32
within rounding of it, and a clean fallback to torch's kernels wherever they cannot be built (or, bf16,
cannot reproduce torch)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_pair, tiny_config
from torch import nn

from stablelm import fast
from stablelm import kernels as native
from stablelm.fast import KernelLinear, PackedLinear, optimize_for_inference
from stablelm.kernels import linear as kernel_linear

AVAILABLE = native.library() is not None
BF16 = native.supports(torch.bfloat16)
needs_kernel = pytest.mark.skipif(not BF16, reason="needs x86-64 Linux with AVX512-BF16 and a C compiler")
needs_f32_kernel = pytest.mark.skipif(
    not AVAILABLE, reason="needs x86-64 Linux with AVX-512 and a C compiler"
)


def _skip_without_a_kernel_for(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not BF16:
        pytest.skip("needs AVX512-BF16")


def _bf16(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(-4, 5, shape, generator=gen))).to(
        torch.bfloat16
    )


def test_the_kernels_build_wherever_the_cpu_and_a_compiler_allow_it():
    # Guards the skips below: on a machine that can build the kernels, a broken build fails here.
    compiler = shutil.which("cc") is not None
    assert AVAILABLE == (native.cpu_has_avx512() and compiler)
    assert BF16 == (native.cpu_has_avx512_bf16() and compiler)
    assert native.supports(torch.float32) == AVAILABLE
    assert not native.supports(torch.float16)


@needs_kernel
@pytest.mark.parametrize("n,k", [(64, 768), (2304, 768), (1000, 2560), (96, 4608), (7, 5), (130, 1025)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_linear_is_bit_identical_to_f_linear(n, k, bias):
    linear = nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(_bf16(n, k, seed=1))
        if bias:
            linear.bias.copy_(_bf16(n, seed=2))
    fast_linear = KernelLinear.from_linear(linear)
    assert fast_linear is not None
    for rows in (1, 2, 5, 6, 7, 13, 64):
        x = _bf16(rows, k, seed=rows)
        assert torch.equal(fast_linear(x), linear(x)), rows
    x = _bf16(2, 3, k, seed=9)  # any leading shape
    assert torch.equal(fast_linear(x), linear(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packing_round_trips(dtype):
    for n, k in [(64, 768), (7, 5), (130, 1025)]:
        weight = _bf16(n, k).to(dtype)
        assert torch.equal(native.unpack(native.pack(weight), n, k), weight)


@needs_kernel
def test_calibration_finds_the_block_size_and_rejects_wrong_ones(monkeypatch):
    # oneDNN here sums one row in blocks of 512 and several rows in blocks of 1024: whichever is tried
    # first, the probes reject it where it is wrong.
    for order in [(1024, 512), (512, 1024)]:
        monkeypatch.setattr(kernel_linear, "_BLOCKS", order)
        monkeypatch.setattr(kernel_linear, "_CALIBRATED", {})
        assert kernel_linear.calibrate(64, 2560, False) == (512, 1024)
    monkeypatch.setattr(kernel_linear, "_BLOCKS", (256,))
    monkeypatch.setattr(kernel_linear, "_CALIBRATED", {})
    assert kernel_linear.calibrate(64, 2560, False) is None
    assert KernelLinear.from_linear(nn.Linear(2560, 64, dtype=torch.bfloat16)) is None


def test_without_a_bit_identical_kernel_the_model_keeps_onednn(monkeypatch):
    model, _ = make_pair(tiny_config())
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    monkeypatch.setattr(kernel_linear, "calibrate", lambda *args: None)
    optimize_for_inference(model)
    assert not any(isinstance(m, KernelLinear) for m in model.modules())
    assert any(isinstance(m, PackedLinear) for m in model.modules()) == fast.can_pack(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@needs_kernel
def test_kernel_linear_saves_loads_and_serves_other_inputs():
    linear = nn.Linear(300, 70, dtype=torch.bfloat16)
    fast_linear = KernelLinear.from_linear(linear)
    assert set(fast_linear.state_dict()) == {"weight", "bias"}
    assert torch.equal(fast_linear.state_dict()["weight"], linear.weight)
    other = nn.Linear(300, 70, dtype=torch.bfloat16)
    fast_linear.load_state_dict(other.state_dict())
    x = _bf16(4, 300)
    assert torch.equal(fast_linear(x), other(x))
    with torch.no_grad():  # float32 inputs, or inputs needing grad: torch's F.linear on the dense weight
        assert torch.equal(
            fast_linear(x.float()), nn.functional.linear(x.float(), other.weight.float(), other.bias.float())
        )
    with pytest.raises(ValueError, match="got inputs of 299 features"):
        fast_linear(_bf16(4, 299))
    assert fast_linear(_bf16(0, 300)).shape == (0, 70)
    fast_linear.float()  # the packed weights are now float32: never handed to the bf16 kernel
    assert torch.equal(fast_linear(x), nn.functional.linear(x, other.weight.float().bfloat16(), other.bias))


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("STABLELM_KERNELS", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.supports(torch.bfloat16)
        assert KernelLinear.from_linear(nn.Linear(64, 64, dtype=torch.bfloat16)) is None
        assert KernelLinear.from_linear(nn.Linear(64, 64)) is None
    finally:
        monkeypatch.delenv("STABLELM_KERNELS")
        native.library.cache_clear()


def test_a_missing_or_failing_compiler_is_a_clear_error_and_a_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        native.build(native.SOURCE, compiler="/nonexistent/cc")
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    with pytest.raises(RuntimeError, match="failed"):
        native.build(broken, compiler="cc" if shutil.which("cc") else "false")
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        monkeypatch.delenv("CC")
        native.library.cache_clear()


@needs_kernel
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path))
    first = native.build(native.SOURCE)
    stamp = first.stat().st_mtime_ns
    assert native.build(native.SOURCE) == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "kernels"


@needs_f32_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_decode_step_calls_the_kernel(capsys, monkeypatch, dtype):
    import stablelm.decode

    _skip_without_a_kernel_for(dtype)
    monkeypatch.setattr(stablelm.decode, "_NOTICE_SHOWN", set())
    model, _ = make_pair(tiny_config(num_key_value_heads=2, max_position_embeddings=64))
    model = optimize_for_inference(model.to(dtype))
    assert all(not isinstance(m, PackedLinear) for m in model.modules())
    from stablelm.kernels import op

    calls = {"eager": [], "compiled": []}
    run = kernel_linear.run_linear
    for module, kind in [(kernel_linear, "eager"), (op, "compiled")]:
        monkeypatch.setattr(
            module, "run_linear", lambda *a, kind=kind: calls[kind].append(a[1].dtype) or run(*a)
        )
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=8)
    compiled = model.generate(ids, max_new_tokens=8, compile=True)
    assert capsys.readouterr().err == ""  # no fallback notice
    step = stablelm.decode.DecodeStep.for_model(model, compile=True)
    assert step.compile_seconds is not None  # it really compiled
    assert compiled.tolist() == eager.tolist()
    assert set(calls["eager"]) == set(calls["compiled"]) == {dtype}  # both called the kernel


def _truth_error(y: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> float:
    """Largest error of `y` against the float64 product, relative to the largest output."""
    truth = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    return ((y.double() - truth).abs().max() / truth.abs().max()).item()


@needs_f32_kernel
@pytest.mark.parametrize("n,k", [(64, 768), (2304, 768), (7, 5), (130, 1025), (300, 2560)])
def test_float32_kernel_is_as_accurate_as_f_linear(n, k):
    linear = nn.Linear(k, n)
    fast_linear = KernelLinear.from_linear(linear)
    assert fast_linear is not None and "linear_f32" in repr(fast_linear)
    with torch.no_grad():
        for rows in (1, 2, 6, 7, 64):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            ours, torchs = fast_linear(x), linear(x)
            # torch's own error (MKL's summation order) bounds ours, with room for another order
            assert _truth_error(ours, x, linear) <= max(4 * _truth_error(torchs, x, linear), 1e-7), rows
            torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-5)


@needs_f32_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_results_do_not_depend_on_the_thread_count_or_the_batch(dtype):
    _skip_without_a_kernel_for(dtype)
    linear = nn.Linear(2560, 200, dtype=dtype)
    fast_linear = KernelLinear.from_linear(linear)
    x = _bf16(7, 2560).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fast_linear(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, fast_linear(x))
    if dtype == torch.bfloat16:  # and equal torch's, as everywhere
        assert torch.equal(one, linear(x))
    else:  # a row gets the same bits alone or in a batch (F.linear's do not)
        assert torch.equal(fast_linear(x[3:4]), one[3:4])


@needs_f32_kernel
def test_the_kernel_reports_bad_arguments_and_failed_allocations():
    x = torch.ones(2, 64)
    packed = native.pack(torch.ones(64, 64))
    with pytest.raises(ValueError, match="bad arguments"):
        native.run_linear(x, packed, None, 64, 0)  # block 0
    with pytest.raises(ValueError, match="do not fit"):
        native.run_linear(x, packed, None, 0, 256)  # no outputs
    with pytest.raises(ValueError, match="do not fit"):
        native.run_linear(torch.ones(2, 65), packed, None, 64, 256)  # wider inputs than the weight
    with pytest.raises(ValueError, match="do not fit"):
        native.run_linear(x, packed, torch.ones(63), 64, 256)  # a short bias
    with pytest.raises(ValueError, match="do not fit"):
        native.run_linear(x, packed[:, :32], None, 64, 256)  # a weight cut short
    with pytest.raises(ValueError, match="no stablelm kernel"):
        native.run_linear(x.double(), packed, None, 64, 256)
    if BF16:  # bf16 takes k in pairs: an odd block is refused
        half = torch.ones(2, 64, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="bad arguments"):
            native.run_linear(half, native.pack(half), None, 64, 3)
    # A work buffer of 2**31 rows x 64 floats cannot be had: the kernel stops before reading x.
    lib = native.library()
    y = torch.zeros(1)
    status = lib.stablelm_linear_f32(
        x.data_ptr(), packed.data_ptr(), None, y.data_ptr(), 2**31 - 1, 64, 64, 256, 2
    )
    assert status == 1 and y.item() == 0


@needs_f32_kernel
def test_a_failed_allocation_is_a_memory_error(monkeypatch):
    class Lib:
        def __getattr__(self, name):
            return lambda *args: 1

    monkeypatch.setattr(native, "library", lambda: Lib())
    monkeypatch.setattr(native, "supports", lambda dtype: True)
    with pytest.raises(MemoryError, match="could not allocate"):
        native.run_linear(torch.ones(1, 64), native.pack(torch.ones(64, 64)), None, 64, 256)


@needs_f32_kernel
def test_float32_kernel_linear_saves_loads_and_falls_back():
    linear = nn.Linear(300, 70)
    fast_linear = KernelLinear.from_linear(linear)
    assert torch.equal(fast_linear.state_dict()["weight"], linear.weight)
    other = nn.Linear(300, 70)
    fast_linear.load_state_dict(other.state_dict())
    x = torch.randn(4, 300)
    with torch.no_grad():
        torch.testing.assert_close(fast_linear(x), other(x), rtol=1e-5, atol=1e-5)
        # float64 inputs, or a half-precision copy: torch's F.linear on the dense weight
        assert torch.equal(
            fast_linear(x.double()),
            nn.functional.linear(x.double(), other.weight.double(), other.bias.double()),
        )
        half = fast_linear.half()
        assert torch.equal(
            half(x.half()), nn.functional.linear(x.half(), other.weight.half(), other.bias.half())
        )


@needs_f32_kernel
@pytest.mark.parametrize("start", [torch.float32, torch.bfloat16])
def test_a_kernel_linear_converted_to_another_dtype_computes_in_it(start):
    _skip_without_a_kernel_for(start)
    linear = nn.Linear(300, 70, dtype=start)
    x = _bf16(5, 300, seed=4)
    for dtype in [torch.float32, torch.bfloat16, torch.float16, torch.float64]:
        # repacked for that dtype's kernel, or served by F.linear
        fast_linear = KernelLinear.from_linear(linear).to(dtype)
        expected = nn.functional.linear(x.to(dtype), linear.weight.to(dtype), linear.bias.to(dtype))
        with torch.no_grad():
            got = fast_linear(x.to(dtype))
        assert got.dtype == dtype and torch.equal(fast_linear.weight, linear.weight.to(dtype))
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        else:  # bf16 bit for bit (kernel or oneDNN), fp16/fp64 through F.linear
            assert torch.equal(got, expected), dtype
        on_kernel = dtype in (torch.float32, torch.bfloat16)
        assert (fast_linear.blocks is not None) == on_kernel, dtype
        if on_kernel:  # in the layout of its own dtype's kernel
            assert fast_linear.packed.shape[-1] == (2 if dtype == torch.bfloat16 else 1)
