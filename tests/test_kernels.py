"""stablelm's native bf16 linear kernel: bit-identical to torch's F.linear wherever it is used, and a
clean fallback to torch's kernels wherever it cannot be built or cannot reproduce torch."""

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

AVAILABLE = native.linear_bf16() is not None
needs_kernel = pytest.mark.skipif(
    not AVAILABLE, reason="needs x86-64 Linux with AVX512-BF16 and a C compiler"
)


def _bf16(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(-4, 5, shape, generator=gen))).to(
        torch.bfloat16
    )


def test_the_kernel_builds_wherever_the_cpu_and_a_compiler_allow_it():
    # Guards the skips below: on a machine that can build the kernel, a broken build fails here.
    expected = native.cpu_has_avx512_bf16() and shutil.which("cc") is not None
    assert AVAILABLE == expected


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


@needs_kernel
def test_kernel_results_do_not_depend_on_the_thread_count():
    linear = nn.Linear(2560, 200, dtype=torch.bfloat16)
    fast_linear = KernelLinear.from_linear(linear)
    x = _bf16(3, 2560)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fast_linear(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, fast_linear(x)) and torch.equal(one, linear(x))


def test_packing_round_trips():
    for n, k in [(64, 768), (7, 5), (130, 1025)]:
        weight = _bf16(n, k)
        assert torch.equal(native.unpack_bf16(native.pack_bf16(weight), n, k), weight)


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
    native.linear_bf16.cache_clear()
    try:
        assert native.linear_bf16() is None
        assert KernelLinear.from_linear(nn.Linear(64, 64, dtype=torch.bfloat16)) is None
    finally:
        monkeypatch.delenv("STABLELM_KERNELS")
        native.linear_bf16.cache_clear()


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
    native.linear_bf16.cache_clear()
    try:
        assert native.linear_bf16() is None
    finally:
        monkeypatch.delenv("CC")
        native.linear_bf16.cache_clear()


@needs_kernel
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path))
    first = native.build(native.SOURCE)
    stamp = first.stat().st_mtime_ns
    assert native.build(native.SOURCE) == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "kernels"


@needs_kernel
def test_a_compiled_decode_step_calls_the_kernel(capsys, monkeypatch):
    import stablelm.decode

    monkeypatch.setattr(stablelm.decode, "_NOTICE_SHOWN", set())
    model, _ = make_pair(tiny_config(num_key_value_heads=2, max_position_embeddings=64))
    model = optimize_for_inference(model.to(torch.bfloat16))
    assert all(not isinstance(m, PackedLinear) for m in model.modules())
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=8)
    compiled = model.generate(ids, max_new_tokens=8, compile=True)
    assert capsys.readouterr().err == ""  # no fallback notice
    step = stablelm.decode.DecodeStep.for_model(model, compile=True)
    assert step.compile_seconds is not None  # it really compiled
    assert compiled.tolist() == eager.tolist()
