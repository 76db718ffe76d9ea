"""stablelm's native linear kernels: each instruction-set level this CPU has is built and tested (a lower
one forced with STABLELM_ISA); bf16 bit-identical to torch's F.linear wherever a kernel is used for it,
fp32 within rounding; the best level and kernel for this machine's flags are the ones chosen; a clean
fallback to torch wherever they cannot be built or cannot reproduce torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from stablelm import kernels as native
from stablelm.kernels import linear as kernel_linear
from stablelm.kernels import prefetch, rotation

COMPILER = shutil.which(os.environ.get("CC") or "cc") is not None
LEVELS = [isa for isa, needs in native.ISA_NEEDS.items() if needs <= native.cpu_flags()] if COMPILER else []
needs_a_level = pytest.mark.skipif(
    not LEVELS, reason="needs x86-64 Linux with AVX2 and FMA, and a C compiler"
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=LEVELS or [None])
def isa(request, monkeypatch):
    """Each level this CPU has, forced as a user would (STABLELM_ISA), with fresh plans."""
    if request.param is None:
        pytest.skip("no instruction-set level of the kernels runs here")
    monkeypatch.setenv("STABLELM_ISA", request.param)
    monkeypatch.setattr(kernel_linear, "_PLANS", {})
    return request.param


def _bf16(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-4, 5, shape, generator=gen).float())
    return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)


def test_the_best_level_for_this_cpu_is_the_one_chosen(monkeypatch):
    flags = native.cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        best = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        best = "avx2"
    else:
        best = None
    monkeypatch.delenv("STABLELM_ISA", raising=False)
    assert native.best_isa() == native.selected_isa() == best
    # and it builds wherever there is a compiler (a broken build fails here, not as a silent fallback)
    assert (native.library() is not None) == (best is not None and COMPILER)


def test_a_bad_or_unavailable_level_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("STABLELM_ISA", "avx3")
    with pytest.raises(ValueError, match="STABLELM_ISA='avx3' is not a level"):
        native.selected_isa()
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setenv("STABLELM_ISA", "avx512")
    native.clear_caches()
    try:
        with pytest.raises(ValueError, match="lacks .*avx512f.*set it to avx2"):
            native.selected_isa()
    finally:
        native.clear_caches()
    monkeypatch.setenv("STABLELM_ISA", "none")
    assert native.selected_isa() is None and native.library() is None


def test_from_pretrained_refuses_a_bad_level_before_reading_anything(monkeypatch, tmp_path):
    from stablelm import StableLmForCausalLM

    monkeypatch.setenv("STABLELM_ISA", "sse")
    with pytest.raises(ValueError, match="STABLELM_ISA='sse'"):
        StableLmForCausalLM.from_pretrained(tmp_path)


@needs_a_level
@pytest.mark.parametrize("n,k", [(64, 768), (2304, 768), (7, 5), (130, 1025), (300, 2560), (33, 100)])
def test_float32_kernel_is_as_accurate_as_f_linear(isa, n, k):
    linear = nn.Linear(k, n)
    for rows in (1, 2, 5, 8, 13, 64):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            ours = native.run_linear("f32", x, [linear.weight], [linear.bias])
            torchs = linear(x)
        truth = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())

        def error(y, truth=truth):
            return ((y.double() - truth).abs().max() / truth.abs().max()).item()

        # torch's own error (MKL's order) bounds ours, with room for another order
        assert error(ours) <= max(4 * error(torchs), 2e-7), (rows, error(ours), error(torchs))


@needs_a_level
def test_float32_results_do_not_depend_on_threads_batch_or_fusion(isa):
    w, b = torch.randn(200, 2560), torch.randn(200)
    x = torch.randn(7, 2560)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.run_linear("f32", x, [w], [b])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, native.run_linear("f32", x, [w], [b]))
    assert torch.equal(native.run_linear("f32", x[3:4], [w], [b]), one[3:4])  # alone as in a batch
    fused = native.run_linear("f32", x, [w[:50], w[50:130], w[130:]], [b[:50], b[50:130], b[130:]])
    assert torch.equal(fused, one)  # q/k/v in one call: the same bits as each alone


def _bf16_candidates():
    out = [("bf16_dot", 0)] if native.kernel("bf16_dot") is not None else []
    if native.has_dpbf16():
        out += [("bf16_dpbf16", block) for block in kernel_linear._BLOCKS]
    return out


@needs_a_level
@pytest.mark.parametrize("n,k", [(64, 768), (2304, 768), (1000, 2560), (96, 4608), (7, 5), (130, 1025)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_bf16_kernel_is_used_only_where_it_gives_torchs_bits(isa, n, k, bias):
    weight, b = _bf16(n, k, seed=1), (_bf16(n, seed=2) if bias else None)
    for rows in (1, 2, 5, 8, 13, 64):
        x = _bf16(rows, k, seed=rows)
        found = kernel_linear.plan(torch.bfloat16, k, n, bias, rows)
        if found is not None:
            got = native.run_linear(found[0], x, [weight], [b], found[1])
            assert torch.equal(got, nn.functional.linear(x, weight, b)), (found, rows)


def _run_isolated(code: str, env: dict[str, str]) -> str:
    """Run `code` in a fresh interpreter (torch reads its CPU settings once, at start)."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


_SAME_BITS_AS_TORCH = """
import torch
from stablelm import kernels as native
from stablelm.kernels import linear
from stablelm.kernels.linear import plan
linear.SPEED_CHECK = False  # which kernels reproduce torch, whatever their speed
print(native.selected_isa(), torch.backends.cpu.get_cpu_capability())
torch.manual_seed(0)
for dtype in DTYPES:
    for n, k in [(64, 768), (2304, 768), (1000, 2560), (96, 4608), (7, 5), (130, 1025), (300, 6912), (200, 2048)]:
        w = (torch.randn(n, k) * 4).to(dtype)
        for bias in (None, torch.randn(n).to(dtype)):
            for rows in (1, 2, 3, 4, 5, 8, 9, 12, 13, 17, 64, 128):
                x = torch.randn(rows, k).to(dtype)
                found = plan(dtype, k, n, bias is not None, rows)
                print("plan", str(dtype)[6:], n, k, bias is not None, rows, found)
                if found is not None:
                    got = native.run_linear(found[0], x, [w], [bias], found[1])
                    assert torch.equal(got, torch.nn.functional.linear(x, w, bias)), (n, k, rows, found)
                    if n >= 3:  # q/k/v fused in one call, blocks of outputs cut short: the same bits
                        cut = [slice(0, n // 3), slice(n // 3, n // 3 + 1), slice(n // 3 + 1, n)]
                        parts = [None if bias is None else bias[c] for c in cut]
                        fused = native.run_linear(found[0], x, [w[c] for c in cut], parts, found[1])
                        assert torch.equal(fused, got), (n, k, rows, found, "fused")
                    if rows <= 2:  # decoding's shares of the outputs, split by thread and read side by side
                        threads = torch.get_num_threads()
                        for t in (1, 3, 5):
                            torch.set_num_threads(t)
                            alone = native.run_linear(found[0], x, [w], [bias], found[1])
                            assert torch.equal(alone, got), (n, k, rows, found, t)
                            if n >= 3:
                                fused = native.run_linear(found[0], x, [w[c] for c in cut], parts, found[1])
                                assert torch.equal(fused, got), (n, k, rows, found, t, "fused")
                        torch.set_num_threads(threads)
"""


def _plans(stdout: str) -> dict[tuple[str, int], set[str]]:
    """The plans printed by `_SAME_BITS_AS_TORCH`, by dtype and row count."""
    plans: dict[tuple[str, int], set[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("plan"):
            _, dtype, _, _, _, rows, found = line.split(" ", 6)
            plans.setdefault((dtype, int(rows)), set()).add(found)
    return plans


@pytest.mark.skipif("avx2" not in LEVELS, reason="needs an x86-64 CPU with AVX2 and FMA, and a C compiler")
def test_on_a_cpu_without_avx512_torch_is_reproduced_by_the_avx2_kernel():
    # torch as it runs on an AVX2-only CPU (ATen's AVX2 kernels, oneDNN without bf16), our AVX2 build
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "STABLELM_ISA": "avx2"}
    out = _run_isolated("import torch\nDTYPES = [torch.bfloat16, torch.float16]" + _SAME_BITS_AS_TORCH, env)
    assert out.startswith("avx2 AVX2")
    for (dtype, rows), found in _plans(out).items():  # every shape and row count on the kernel
        assert found == {f"('{'bf16' if dtype == 'bfloat16' else 'f16'}_dot', 0)"}, (dtype, rows, found)


@pytest.mark.skipif(
    "avx512" not in LEVELS or "avx512_bf16" not in native.cpu_flags(),
    reason="needs an x86-64 CPU with AVX512-BF16 and a C compiler",
)
def test_on_an_avx512_bf16_cpu_without_amx_torch_is_reproduced_by_the_dpbf16_kernel():
    # oneDNN as it runs on a Zen 4 (AVX512-BF16, no AMX)
    env = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "STABLELM_ISA": "avx512"}
    out = _run_isolated("import torch\nDTYPES = [torch.bfloat16]" + _SAME_BITS_AS_TORCH, env)
    for (_, rows), found in _plans(out).items():  # decoding's rows on a vdpbf16ps kernel (prefill: oneDNN's)
        assert rows > 8 or all("bf16_dpbf16" in p or "bf16_amx" in p for p in found), (rows, found)


_WITHOUT_BF16 = """import torch
from stablelm import kernels as _native
from stablelm.kernels import linear as _linear
_flags = _native.cpu_flags() - {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
_native.cpu_flags = _linear.cpu_flags = lambda: _flags
DTYPES = [torch.bfloat16]
"""


@pytest.mark.skipif("avx512" not in LEVELS, reason="needs an x86-64 CPU with AVX-512 and a C compiler")
def test_on_an_avx512_cpu_without_bf16_one_row_is_reproduced_by_the_avx512_kernel():
    # oneDNN as it runs on Intel's AVX-512 CPUs without AVX512-BF16 (Skylake to Ice Lake and Tiger Lake:
    # bf16 emulated), the CPU's bf16 and AMX flags hidden from the planner: one row on the kernel of
    # oneDNN's emulated order for every shape (tails of K and N, bias or not, torch's bits asserted in the
    # script); more rows are oneDNN's gemm, another order (torch's kernel, or ATen's where it runs)
    env = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "STABLELM_ISA": "avx512"}
    out = _run_isolated(_WITHOUT_BF16 + _SAME_BITS_AS_TORCH, env)
    plans = _plans(out)
    assert plans[("bfloat16", 1)] == {"('bf16_avx512', 0)"}, plans
    for (_, rows), found in plans.items():
        assert rows == 1 or "('bf16_avx512', 0)" not in found, (rows, found)


def test_float16_keeps_torchs_kernel_where_torch_runs_onednns_avx512_fp16_code(monkeypatch):
    # On an Intel Xeon with AVX512-FP16 the dot kernel passed the probes of a (3 x 128) @ (128 x 32)
    # layer and still missed torch's bits on real activations: there float16 is torch's by rule.
    monkeypatch.setattr(kernel_linear, "_PLANS", {})
    monkeypatch.setattr(kernel_linear, "_reproduces_torch", lambda *args: True)
    monkeypatch.setattr(kernel_linear, "SPEED_CHECK", False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def half_plan(dtype):
        kernel_linear._PLANS.clear()
        return kernel_linear.plan(dtype, 128, 32, True, 3)

    flags = native.cpu_flags()
    for extra in ({"avx512_fp16"}, {"amx_fp16"}):
        monkeypatch.setattr(kernel_linear, "cpu_flags", lambda extra=extra: flags | extra)
        assert kernel_linear.onednn_half(torch.float16) and not kernel_linear.onednn_half(torch.bfloat16)
        assert half_plan(torch.float16) is None
        assert (
            half_plan(torch.bfloat16) is not None or not COMPILER or native.best_isa() is None
        )  # bfloat16 unaffected
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN capped below AVX512-FP16
        assert not kernel_linear.onednn_half(torch.float16)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(kernel_linear, "cpu_flags", lambda: flags - {"avx512_fp16", "amx_fp16"})
    assert not kernel_linear.onednn_half(torch.float16)
    if COMPILER and native.kernel("f16_dot") is not None:
        assert half_plan(torch.float16) == ("f16_dot", 0)


def test_the_best_bf16_kernel_for_this_machine_is_chosen(monkeypatch):
    """What torch runs for bf16 on this CPU decides which kernel can reproduce it."""
    monkeypatch.delenv("STABLELM_ISA", raising=False)
    monkeypatch.setattr(kernel_linear, "_PLANS", {})
    monkeypatch.setattr(kernel_linear, "SPEED_CHECK", False)  # which kernel gives torch's bits
    flags = native.cpu_flags()
    one, few = (kernel_linear.plan(torch.bfloat16, 2560, 2560, False, rows) for rows in (1, 4))
    if not COMPILER or native.best_isa() is None:
        expected = None
    elif native.best_isa() == "avx512" and "amx_bf16" in flags:  # oneDNN on AMX tiles
        expected = "bf16_amx"
    elif native.best_isa() == "avx512" and "avx512_bf16" in flags:
        expected = "bf16_dpbf16"
    elif native.best_isa() == "avx2":
        expected = "bf16_dot"
    else:  # AVX-512 without bf16: oneDNN emulates bf16 in its own order, reproduced for one row
        expected = None
        assert one is not None and one[0] == "bf16_avx512"
        one = None
    assert (one and one[0]) == expected and (few and few[0]) == expected


@needs_a_level
def test_the_kernels_refuse_what_does_not_fit_them(isa):
    x, w = torch.ones(2, 64), torch.ones(64, 64)
    with pytest.raises(ValueError, match="takes torch.float32 inputs"):
        native.run_linear("f32", torch.ones(2, 65), [w], [None])  # wider inputs than the weight
    with pytest.raises(ValueError, match="takes torch.float32 inputs"):
        native.run_linear("f32", x, [w], [torch.ones(63)])  # a short bias
    with pytest.raises(ValueError, match="takes torch.float32 inputs"):
        native.run_linear("f32", x, [torch.ones(64, 128)[:, ::2]], [None])  # a strided weight
    with pytest.raises(ValueError, match="takes torch.float32 inputs"):
        native.run_linear("f32", x.double(), [w], [None])
    with pytest.raises(ValueError, match="one to three weights"):
        native.run_linear("f32", x, [w] * 4, [None] * 4)
    with pytest.raises(ValueError, match="no stablelm kernel 'f16'"):
        native.run_linear("f16", x, [w], [None])
    assert native.run_linear("f32", torch.ones(0, 64), [w], [None]).shape == (0, 64)
    # the C code itself refuses bad sizes, writing nothing
    y = torch.zeros(1)
    args = [x.data_ptr(), 2, 0, 64, y.data_ptr(), 64, 1, w.data_ptr(), None, 64, None, None, 0, None, None, 0]
    status = native.kernel("f32")(*args, 0, 1)  # K = 0
    assert status == 2 and y.item() == 0
    if native.kernel("bf16_avx512") is not None:
        xb, wb, yb = x.bfloat16(), w.bfloat16(), torch.zeros(1, dtype=torch.bfloat16)
        args = [
            xb.data_ptr(),
            2,
            0,
            64,
            yb.data_ptr(),
            64,
            1,
            wb.data_ptr(),
            None,
            64,
            None,
            None,
            0,
            None,
            None,
            0,
        ]
        assert native.kernel("bf16_avx512")(*args, 0, 1) == 2 and yb.item() == 0


def test_without_a_compiler_the_kernels_are_off_and_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        native.build(native.SOURCE, compiler="/nonexistent/cc")
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    with pytest.raises(RuntimeError, match="failed"):
        native.build(broken, compiler="cc" if COMPILER else "false")
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.clear_caches()
    try:
        assert native.library() is None and native.kernel("f32") is None
    finally:
        monkeypatch.delenv("CC")
        native.clear_caches()


@needs_a_level
def test_each_level_is_built_once_into_the_cache(isa, monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path))
    first = native.build(native.SOURCE, isa=isa)
    stamp = first.stat().st_mtime_ns
    assert native.build(native.SOURCE, isa=isa) == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "kernels" and isa in first.name


@needs_a_level
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_rotary_kernel_gives_torchs_bits(isa, dtype):
    from stablelm.rope import apply_rotary

    gen = torch.Generator().manual_seed(0)
    for b, t, h, d, rot in [(1, 1, 24, 64, 16), (2, 7, 5, 32, 8), (1, 33, 6, 80, 80), (3, 4, 2, 16, 2)]:
        for heads_dim in (1, 2):
            base = (torch.randn(b, t, h + 3, d, generator=gen) * 8).to(dtype)  # strided, as q/k of qkv
            x = base[:, :, :h] if heads_dim == 2 else base[:, :, :h].transpose(1, 2)
            cos, sin = (torch.randn(b, t, rot, generator=gen).to(dtype) for _ in range(2))
            with torch.no_grad():
                ours = rotation.rotary(x, cos, sin, heads_dim)
                torchs = apply_rotary(x, cos, sin, heads_dim=heads_dim)
            assert ours is not None  # it ran
            assert torch.equal(ours, torchs) and ours.stride() == torchs.stride(), (b, t, h, d, rot)
    assert rotation.rotary(x, cos, sin, 2) is None  # autograd on: torch's computes it


@pytest.mark.skipif(not COMPILER, reason="needs a C compiler")
def test_a_compiler_without_amx_still_builds_the_rest(monkeypatch, tmp_path):
    import ctypes

    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path))
    old_cc = tmp_path / "old-cc"  # refuses AMX's flags, as GCC before 11 does
    real = shutil.which(os.environ.get("CC") or "cc")
    old_cc.write_text(
        f'#!/bin/sh\ncase "$*" in *-mamx*) echo "unrecognized -mamx-tile" >&2; exit 1;; esac\nexec {real} "$@"\n'
    )
    old_cc.chmod(0o755)
    lib = ctypes.CDLL(str(native.build(native.SOURCE, isa="avx512", compiler=str(old_cc))))
    assert hasattr(lib, "stablelm_linear_bf16_dpbf16") and not hasattr(lib, "stablelm_linear_bf16_amx")


def test_a_half_precision_kernel_is_used_only_where_it_beats_torchs(monkeypatch):
    """Timed on the layer's shape (here with a clock that says how each call went)."""
    if native.kernel("bf16_dot") is None:
        pytest.skip("needs a level of the kernels")
    monkeypatch.setattr(kernel_linear, "SPEED_CHECK", True)
    monkeypatch.setattr(kernel_linear, "_half_plan", lambda *args: ("bf16_dot", 0))
    # its prefetch mode already timed (that timing would read this clock too)
    monkeypatch.setattr(prefetch, "_PREFETCH", {(native.selected_isa(), "bf16_dot"): 0})
    # one row (decoding): kept unless clearly slower (PAYS_ONE_ROW, 1.10); more rows: faster (PAYS, 0.95)
    for rows, ours, torchs, used in [(1, 0.5, 1.0, True), (1, 1.05, 1.0, True), (1, 1.2, 1.0, False),
                                     (1, 2.0, 1.0, False), (4, 0.5, 1.0, True), (4, 0.97, 1.0, False),
                                     (64, 0.97, 1.0, False), (64, 0.9, 1.0, True)]:  # fmt: skip
        clock = iter([0.0, ours, ours + torchs] * 6)  # per run: start, after ours, after torch's
        monkeypatch.setattr(kernel_linear.time, "perf_counter", lambda clock=clock: next(clock))
        monkeypatch.setattr(kernel_linear, "_PLANS", {})
        found = kernel_linear.plan(torch.bfloat16, 64, 64, False, rows)
        assert (found is not None) == used, (rows, ours, torchs)


def test_the_speed_check_stops_early_only_where_the_answer_is_clear(monkeypatch):
    """Up to ROUNDS turns; after CLEAR_AFTER, stopped where the best times are further than CLEAR from the
    limit either way (the timings were most of a first `generate`'s time on a small model)."""
    if native.kernel("bf16_dot") is None:
        pytest.skip("needs a level of the kernels")
    monkeypatch.setattr(kernel_linear, "SPEED_CHECK", True)
    monkeypatch.setattr(kernel_linear, "_half_plan", lambda *args: ("bf16_dot", 0))
    monkeypatch.setattr(prefetch, "_PREFETCH", {(native.selected_isa(), "bf16_dot"): 0})
    rounds, after = kernel_linear.ROUNDS, kernel_linear.CLEAR_AFTER
    # (rows, ours, torch's, used, rounds timed): 0.95 * 0.7 = 0.665 and 0.95 / 0.7 = 1.357 bound "clear"
    for rows, ours, torchs, used, timed in [(64, 0.3, 1.0, True, after), (64, 2.0, 1.0, False, after),
                                            (64, 0.9, 1.0, True, rounds), (64, 1.2, 1.0, False, rounds),
                                            (1, 0.5, 1.0, True, after), (1, 1.0, 1.0, True, rounds)]:  # fmt: skip
        ticks: list[int] = []
        values = iter([0.0, ours, ours + torchs] * rounds)  # per run: start, after ours, after torch's

        def clock(values=values, ticks=ticks):  # noqa: ANN001, ANN202
            ticks.append(1)
            return next(values)

        monkeypatch.setattr(kernel_linear.time, "perf_counter", clock)
        monkeypatch.setattr(kernel_linear, "_PLANS", {})
        found = kernel_linear.plan(torch.bfloat16, 64, 64, False, rows)
        assert (found is not None) == used, (rows, ours, torchs)
        assert len(ticks) == 3 * timed, (rows, ours, torchs, len(ticks))


def test_float32_kernels_are_a_fixed_choice(monkeypatch):
    """float32's kernel is within rounding of MKL's, not equal: chosen by rule (never on Intel CPUs,
    whose MKL reads at the memory's speed, nor for prefill's many rows), never by a timing."""
    if native.kernel("f32") is None:
        pytest.skip("needs a level of the kernels")
    for vendor, rows, used in [("AuthenticAMD", 1, True), ("AuthenticAMD", 5, True), ("AuthenticAMD", 64, False),
                               ("GenuineIntel", 1, False)]:  # fmt: skip
        monkeypatch.setattr(kernel_linear, "cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(kernel_linear, "_PLANS", {})
        assert (kernel_linear.plan(torch.float32, 768, 768, False, rows) is not None) == used, (vendor, rows)


@pytest.mark.parametrize(
    "status,error,match",
    [(1, MemoryError, "could not allocate its work buffers"), (2, ValueError, "bad arguments"),
     (3, RuntimeError, "refused the AMX tiles")],
)  # fmt: skip
def test_a_kernels_failure_is_a_clear_error(status, error, match):
    x, w = torch.ones(2, 64, dtype=torch.bfloat16), torch.ones(64, 64, dtype=torch.bfloat16)
    with pytest.raises(error, match=match):
        native.call(lambda *args: status, "bf16_amx", x, [w], [None], 64)


def test_a_kernel_the_os_refuses_is_not_chosen(monkeypatch):
    """AMX tiles need the OS's permission: refused, the kernel is skipped, torch's runs."""

    def refused(kind, *args):
        raise RuntimeError("stablelm's bf16_amx kernel cannot run here: the OS refused the AMX tiles' state")

    monkeypatch.setattr(kernel_linear, "run_linear", refused)
    probes = kernel_linear._probes(torch.bfloat16, 64, 64, False, (1,))
    assert not kernel_linear._reproduces_torch(("bf16_amx", 64), probes)


def test_the_speed_check_reads_weights_from_memory_but_bounds_its_calls(monkeypatch):
    # a few KB layer: capped copies (was ~12,000: a tiny model's first generate took 20 s, minutes on a
    # busy CPU); a large one: copies worth COLD_BYTES, so the timing reads them from memory
    calls = []

    def planned(kind, block, x, weights):  # noqa: ANN001, ANN202 - the planned calls, each recording its weight
        return (lambda weight, ptr: calls.append(weight) and 0), weights, x.data_ptr(), None

    monkeypatch.setattr(kernel_linear, "_planned_calls", planned)
    monkeypatch.setattr(kernel_linear, "CLEAR", 1e-9)  # every round (an instant kernel is a clear answer)
    for k, n, expected in (
        (64, 64, kernel_linear.MAX_COPIES),
        (1024, 2048, -(-kernel_linear.COLD_BYTES // (1024 * 2048 * 2))),
    ):
        calls.clear()
        assert kernel_linear._pays(("bf16_dot", 0), torch.bfloat16, k, n, 1) in (True, False)
        assert len(calls) == 6 * expected  # six rounds (the first warms up), each over every copy
        assert len({w.data_ptr() for w in calls}) == expected  # distinct copies, not one weight again
    calls.clear()
    kernel_linear._pays(("bf16_dot", 0), torch.bfloat16, 64, 64, 64)  # prefill's rows: one copy
    assert len(calls) == 6


@needs_a_level
def test_the_speed_check_times_the_kernel_as_the_planned_step_calls_it(isa, monkeypatch):
    # not through run_linear (its checks and 18 ctypes arguments cost what the step does not pay)
    def refuse(*args: object) -> None:
        raise AssertionError("run_linear timed")

    found = kernel_linear.plan(torch.bfloat16, 256, 512, False, 1)  # its probes run run_linear
    if found is None:
        pytest.skip("no kernel gives torch's bits for this shape here")
    monkeypatch.setattr(kernel_linear, "run_linear", refuse)
    x, w = _bf16(1, 256, seed=3), _bf16(512, 256, seed=4)  # alive while the calls run (they hold pointers)
    fn, refs, ptr, (structs, out) = kernel_linear._planned_calls(found[0], found[1], x, [w])
    assert fn(refs[0], ptr) == 0 and torch.equal(
        out, nn.functional.linear(x, w)
    )  # the timed call computes the layer
    assert kernel_linear._pays(found, torch.bfloat16, 256, 512, 1) in (True, False)


def test_one_row_and_many_rows_are_held_to_their_own_share_of_torchs_time(monkeypatch):
    monkeypatch.setattr(
        kernel_linear,
        "_planned_calls",
        lambda kind, block, x, weights: (lambda ref, ptr: 0, weights, 0, None),
    )
    monkeypatch.setattr(kernel_linear, "COLD_BYTES", 1)  # one copy: a quick timing
    monkeypatch.setattr(kernel_linear, "PAYS_ONE_ROW", 1e9)
    monkeypatch.setattr(kernel_linear, "PAYS", 0.0)
    assert kernel_linear._pays(("bf16_dot", 0), torch.bfloat16, 64, 64, 1)
    assert not kernel_linear._pays(("bf16_dot", 0), torch.bfloat16, 64, 64, 64)
    monkeypatch.setattr(kernel_linear, "PAYS_ONE_ROW", 0.0)
    monkeypatch.setattr(kernel_linear, "PAYS", 1e9)
    assert not kernel_linear._pays(("bf16_dot", 0), torch.bfloat16, 64, 64, 1)
    assert kernel_linear._pays(("bf16_dot", 0), torch.bfloat16, 64, 64, 64)


def test_a_timed_kernel_that_cannot_run_does_not_pay(monkeypatch):
    monkeypatch.setattr(
        kernel_linear,
        "_planned_calls",
        lambda kind, block, x, weights: (lambda ref, ptr: 1, weights, 0, None),
    )
    monkeypatch.setattr(kernel_linear, "PAYS_ONE_ROW", 1e9)
    assert not kernel_linear._pays(("bf16_dot", 0), torch.bfloat16, 64, 64, 1)


@pytest.mark.skipif(not COMPILER, reason="needs a C compiler")
def test_a_build_keeps_the_newest_builds_of_other_sources_and_removes_older_ones(monkeypatch, tmp_path):
    # two checkouts (or compilers) sharing the cache must not delete each other's library at each build
    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path / "cache"))
    built = []
    for i in range(native.KEEP_BUILDS + 2):
        source = tmp_path / "demo.c"
        source.write_text(f"int demo_version(void) {{ return {i}; }}\n")
        built.append(native.build(source, isa="avx2"))
        os.utime(built[-1], (1_000_000 + i, 1_000_000 + i))  # build order, whatever the clock's resolution
    left = sorted((tmp_path / "cache" / "kernels").glob("demo-avx2-*.so"))
    assert set(left) == set(built[-native.KEEP_BUILDS :])  # the newest, the last one built among them
    assert native.build(tmp_path / "demo.c", isa="avx2") == built[-1]  # cached: not built again


@pytest.mark.skipif(not COMPILER, reason="needs a C compiler")
def test_a_changed_local_header_is_a_new_build(monkeypatch, tmp_path):
    """A source's local headers (`#include "part.h"`, as quant.c includes its parts) count in the build's
    digest: a changed header builds again, with its new code; a missing one is the compiler's error."""
    import ctypes

    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "demo.c"
    source.write_text('#include <stdint.h>\n#include "part.h"\nint demo(void) { return PART; }\n')
    (tmp_path / "part.h").write_text("#define PART 1\n")
    first = native.build(source, isa="avx2")
    assert native.build(source, isa="avx2") == first
    (tmp_path / "part.h").write_text("#define PART 2\n")
    second = native.build(source, isa="avx2")
    assert second != first and ctypes.CDLL(str(second)).demo() == 2
    (tmp_path / "part.h").unlink()
    with pytest.raises(RuntimeError, match="part.h"):
        native.build(source, isa="avx2")


def test_the_cpu_is_read_from_proc_cpuinfo(monkeypatch):
    from stablelm.kernels import cpu

    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma f16c\n\nprocessor\t: 1\n"
    assert cpu._field(text, "vendor_id") == "AuthenticAMD" and cpu._field(text, "model name") is None
    assert cpu.parse_cpu_flags(text, "x86_64") == {"fpu", "avx2", "fma", "f16c"}
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: text)
    for fn in (cpu.cpu_vendor, cpu.cpu_flags):
        fn.cache_clear()
    try:
        assert cpu.cpu_vendor() == "AuthenticAMD"
        assert cpu.cpu_flags() == {"fpu", "avx2", "fma", "f16c"} or cpu.platform.machine() != "x86_64"
    finally:
        for fn in (cpu.cpu_vendor, cpu.cpu_flags):
            fn.cache_clear()
    assert native.cpu_flags is cpu.cpu_flags and native.cpu_vendor is cpu.cpu_vendor  # the package's names
