"""The ARM64 (NEON) build of the linear kernels, checked on this machine under qemu-user.

The kernels' source is compiled for ARM64 with the package's own flags for the `neon` level, together
with `tests/native/linear_driver.c`, and run by `qemu-aarch64` on inputs written here. The expected
bits come from `aten_order` below: torch's `dot_with_fp32_arith` (ATen's bf16/fp16 matrix-vector
product on CPUs without BF16 instructions) written out in float32 tensor operations, lanes summed as
ATen sums them on each architecture. That reading of torch's source is itself checked against torch's
own F.linear on this x86-64 CPU (its AVX2 kernels: 8 lanes summed by halves). Speed on ARM cannot be
measured here; whether the kernel serves on a real ARM machine is decided there, as on x86-64, by
`stablelm.kernels.linear.plan` comparing it bit for bit with that machine's torch.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablelm import kernels
from stablelm.kernels.linear import _cancelling_weight, _wide

CROSS, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", Path("/usr/aarch64-linux-gnu")
ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "native" / "linear_driver.c"
needs_cross = pytest.mark.skipif(
    not (shutil.which(CROSS) and shutil.which(QEMU) and SYSROOT.is_dir()),
    reason="needs an ARM64 cross compiler and qemu-user (Debian: apt install gcc-aarch64-linux-gnu qemu-user)",
)
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def aten_order(x: torch.Tensor, w: torch.Tensor, lanes: int, pairwise: bool) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T in float32, summed in ATen's `dot_with_fp32_arith` order with `lanes`-float
    vectors: 8 registers over blocks of 8 * lanes k (register r takes lanes r * lanes ..), reduced
    r[i] += r[i + 4], r[i] += r[i + 2], r[0] += r[1], then its lanes (pairwise (l0 + l1) + (l2 + l3) as
    ARM64's vaddvq_f32, or by halves as x86-64's vec_reduce_all); one register over the chunks of
    2 * lanes k left, its lanes summed and added; the last k one product at a time.

    Inputs are bf16 or fp16 values, so every product is exact in float32 and an FMA equals the product
    added: one rounding per addition, as the tensor additions below round."""
    x, w = x.float(), w.float()
    m, k = x.shape
    n = w.shape[0]
    prod = x[:, None, :] * w[None, :, :]  # (M, N, K), exact

    def lane_sum(v: torch.Tensor) -> torch.Tensor:  # (lanes, M, N) -> (M, N)
        while v.shape[0] > 1:
            half = v.shape[0] // 2
            v = v[0::2] + v[1::2] if pairwise else v[:half] + v[half:]
        return v[0]

    block, k_blocks = 8 * lanes, k // (8 * lanes) * (8 * lanes)
    k_chunks = k // (2 * lanes) * (2 * lanes)
    regs = torch.zeros(8, lanes, m, n)
    for j in range(0, k_blocks, block):
        regs = regs + prod[:, :, j : j + block].reshape(m, n, 8, lanes).permute(2, 3, 0, 1)
    regs = regs[:4] + regs[4:]
    regs = regs[:2] + regs[2:]
    total = lane_sum(regs[0] + regs[1])
    tail = torch.zeros(lanes, m, n)
    for j in range(k_blocks, k_chunks, 2 * lanes):
        tail = tail + prod[:, :, j : j + lanes].permute(2, 0, 1)
        tail = tail + prod[:, :, j + lanes : j + 2 * lanes].permute(2, 0, 1)
    total = total + lane_sum(tail)
    for j in range(k_chunks, k):
        total = total + prod[:, :, j]
    return total


def expected(x, weights, biases, lanes: int, pairwise: bool) -> torch.Tensor:
    """What F.linear gives for the groups side by side, in ATen's order (bias in fp32, one rounding)."""
    outs = []
    for w, b in zip(weights, biases, strict=True):
        y = aten_order(x, w, lanes, pairwise)
        outs.append((y + b.float() if b is not None else y).to(x.dtype))
    return torch.cat(outs, dim=1)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    """The driver and the kernels, built for ARM64 with the package's flags for the `neon` level."""
    out = tmp_path_factory.mktemp("arm64") / "linear_driver"
    flags = [f for f in kernels.COMMON_FLAGS if f not in ("-shared", "-fPIC")] + kernels.ISA_FLAGS["neon"][0]
    subprocess.run(
        [CROSS, *flags, "-I", str(ROOT / "stablelm" / "kernels"), str(DRIVER), "-o", str(out), "-lm"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def run_on_arm64(driver: Path, tmp: Path, cases: list[tuple]) -> list[tuple[int, torch.Tensor]]:
    """Each case (x, weights, biases, threads) run by the ARM64 build under qemu: (status, y)."""
    blob = bytearray()
    for x, weights, biases, threads in cases:
        ns = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
        has = [int(b is not None) for b in biases] + [0] * (3 - len(biases))
        blob += struct.pack("<11i", KINDS[x.dtype], x.shape[0], x.shape[1], len(weights), threads, *ns, *has)
        for t in [x, *[p for w, b in zip(weights, biases, strict=True) for p in (w, b) if p is not None]]:
            blob += t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    (tmp / "in").write_bytes(bytes(blob))
    env = {**os.environ, "QEMU_LD_PREFIX": str(SYSROOT)}
    subprocess.run([QEMU, str(driver), str(tmp / "in"), str(tmp / "out")], check=True, env=env, timeout=600)
    data, at, results = (tmp / "out").read_bytes(), 0, []
    for x, weights, _, _ in cases:
        (status,) = struct.unpack_from("<i", data, at)
        n = sum(w.shape[0] for w in weights)
        size = x.shape[0] * n * x.element_size()
        y = torch.frombuffer(bytearray(data[at + 4 : at + 4 + size]), dtype=x.dtype).view(x.shape[0], n)
        results.append((status, y.clone()))
        at += 4 + size
    assert at == len(data)
    return results


# K: the scalar tail only, one chunk, whole blocks, every part; rows: decoding's path (1-2) and the
# blocked one (3+); sizes that exercise each tile of the blocked path.
SHAPES = [
    (1, 1, 3),
    (1, 7, 5),
    (1, 8, 17),
    (2, 31, 16),
    (1, 32, 20),
    (3, 100, 9),
    (5, 300, 16),
    (9, 1061, 21),
]


def _cancelling_wide(n: int, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Rows of widely spread values whose halves cancel exactly: against inputs of ones the result is
    only the rounding of the partial sums, which shows almost any change of order."""
    half = _wide((n, k // 2), gen, dtype) if k > 1 else torch.zeros(n, 0, dtype=dtype)
    return torch.cat(
        [half, -half[:, torch.randperm(k // 2, generator=gen)], torch.zeros(n, k % 2, dtype=dtype)], 1
    )


def _cases(dtype: torch.dtype, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for m, k, n in SHAPES:
        ones = torch.exp2(torch.arange(m) % 5 - 2.0)[:, None].expand(m, k).to(dtype)
        cases.append((ones, [_cancelling_weight(n, k, gen, dtype)], [None], 1))
        cases.append((ones, [_cancelling_wide(n, k, gen, dtype)], [None], 2))
        x = _wide((m, k), gen, dtype)
        weights = [_wide((n, k), gen, dtype), _wide((n + 3, k), gen, dtype), _wide((5, k), gen, dtype)]
        biases = [_wide((n,), gen, dtype), None, _wide((5,), gen, dtype)]
        cases.append((x, weights[:1], biases[:1], 2))
        cases.append((x, weights, biases, 2))
    return cases


@needs_cross
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_arm64_dot_kernels_sum_in_atens_arm64_order(driver, tmp_path, dtype):
    cases = _cases(dtype)
    results = run_on_arm64(driver, tmp_path, cases)
    for (x, weights, biases, threads), (status, y) in zip(cases, results, strict=True):
        want = expected(x, weights, biases, lanes=4, pairwise=True)
        assert status == 0
        assert torch.equal(y, want), (tuple(x.shape), [tuple(w.shape) for w in weights], threads)
    # the probes tell the orders apart: summing the lanes by halves (x86-64's way) would have failed
    differs = [
        not torch.equal(y, expected(x, w, b, 4, pairwise=False))
        for (x, w, b, _), (_, y) in zip(cases, results, strict=True)
    ]
    assert sum(differs) >= 4, sum(differs)


@needs_cross
def test_the_arm64_float32_kernel_is_accurate_and_the_same_for_any_rows_or_threads(driver, tmp_path):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 333, generator=gen)
    w, b = torch.randn(19, 333, generator=gen), torch.randn(19, generator=gen)
    cases = [(x, [w], [b], 1), (x, [w], [b], 2)] + [(x[i : i + 1], [w], [b], 1) for i in range(7)]
    results = run_on_arm64(driver, tmp_path, cases)
    assert all(status == 0 for status, _ in results)
    exact = (x.double() @ w.double().T + b.double()).float()
    ours = results[0][1]
    assert (ours - exact).abs().max() <= (torch.nn.functional.linear(x, w, b) - exact).abs().max() * 4 + 1e-5
    assert torch.equal(results[1][1], ours)
    assert torch.equal(torch.cat([y for _, y in results[2:]]), ours)


@needs_cross
def test_the_arm64_kernels_refuse_bad_arguments(driver, tmp_path):
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    bad_threads = (x, [torch.ones(3, 8, dtype=torch.bfloat16)], [None], 0)
    [(status, _)] = run_on_arm64(driver, tmp_path, [bad_threads])
    assert status == 2


@pytest.mark.skipif(
    "avx2" not in kernels.cpu_flags(),
    reason="checks the reading of ATen's order against torch on an x86-64 CPU",
)
def test_the_reference_order_is_torchs_own_on_x86(tmp_path):
    """`aten_order` with 8 lanes summed by halves equals torch's F.linear as an AVX2 CPU's torch runs it
    (fresh interpreter, ATen's AVX2 kernels): the reading of torch's source the ARM64 test relies on."""
    cases = _cases(torch.bfloat16, seed=1) + _cases(torch.float16, seed=2)
    torch.save([(x, w, b) for x, w, b, _ in cases], tmp_path / "cases.pt")
    script = (
        "import sys, torch\n"
        "cases = torch.load(sys.argv[1])\n"
        "torch.save([torch.cat([torch.nn.functional.linear(x, wi, bi) for wi, bi in zip(w, b)], 1)"
        " for x, w, b in cases], sys.argv[2])\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        timeout=300,
    )
    torch_out = torch.load(tmp_path / "out.pt")
    for (x, weights, biases, _), got in zip(cases, torch_out, strict=True):
        assert torch.equal(got, expected(x, weights, biases, lanes=8, pairwise=False))


def test_arm64_linux_reads_its_features_and_chooses_neon(monkeypatch):
    cpuinfo = (
        "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics"
        " fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n\nprocessor\t: 1\n"
    )
    flags = kernels.parse_cpu_flags(cpuinfo, "aarch64")
    assert {"fp", "asimd", "fphp", "asimddp"} <= flags
    assert kernels.parse_cpu_flags(cpuinfo, "x86_64") == frozenset()
    assert kernels.parse_cpu_flags("flags\t\t: fpu avx2 fma\n", "riscv64") == frozenset()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    assert kernels.best_isa() == "neon"
    kernels._selected.cache_clear()
    try:
        monkeypatch.setenv(kernels.ISA_ENV, "avx2")
        with pytest.raises(ValueError, match=r"lacks \(avx2, f16c, fma\): set it to neon"):
            kernels.selected_isa()
        monkeypatch.setenv(kernels.ISA_ENV, "neon")
        assert kernels.selected_isa() == "neon"
    finally:
        kernels._selected.cache_clear()


@pytest.mark.parametrize(
    "features, bf16_dot, f16_dot",
    [
        ("fp asimd aes pmull sha1 sha2 crc32 cpuid", True, True),  # Cortex-A72 (Raspberry Pi 4, Graviton 1)
        ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimddp", True, False),  # N1
        ("fp asimd fphp asimdhp cpuid asimddp sve bf16 i8mm", False, False),  # Neoverse V1 (Graviton 3)
    ],
)
def test_on_arm64_the_dot_kernels_are_tried_only_where_torch_runs_atens_dot_products(
    monkeypatch, features, bf16_dot, f16_dot
):
    # torch 2.13 on aarch64 (under qemu-user, its aarch64 wheel): bf16 / fp16 F.linear is ATen's dot
    # products on a Cortex-A72 (bit for bit the order of `aten_order(lanes=4, pairwise=True)`, bias added
    # in float32), oneDNN's where the CPU has BF16 / FP16 arithmetic (`max`), whose order our bf16 kernel
    # matched on the probes of a layer yet missed on 12 of 30,720 outputs
    from stablelm.kernels import linear

    flags = kernels.parse_cpu_flags(f"processor\t: 0\nFeatures\t: {features}\n", "aarch64")
    monkeypatch.setattr(linear, "cpu_flags", lambda: flags)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert linear.onednn_half(torch.bfloat16) is not bf16_dot
    assert linear.onednn_half(torch.float16) is not f16_dot
    monkeypatch.setattr(linear, "_PLANS", {})
    monkeypatch.setattr(linear, "SPEED_CHECK", False)
    monkeypatch.setattr(linear, "has_dpbf16", lambda: False)  # ARM64 has no vdpbf16ps / AMX kernels
    monkeypatch.setattr(linear, "kernel", lambda kind: object() if kind in ("bf16_dot", "f16_dot") else None)
    monkeypatch.setattr(linear, "_reproduces_torch", lambda *args: True)
    for dtype, expected in ((torch.bfloat16, bf16_dot), (torch.float16, f16_dot)):
        dot = "bf16_dot" if dtype == torch.bfloat16 else "f16_dot"
        assert linear.plan(dtype, 256, 64, False, 1) == ((dot, 0) if expected else None)


def test_x86_only_sources_are_not_built_for_arm64(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("attention.c and quant.c are not to be compiled for ARM64")

    monkeypatch.setattr(kernels, "build", no_build)
    assert kernels.load(kernels.QUANT_SOURCE, "neon", kernels.X86_LEVELS) is None
    from stablelm.kernels import attention

    assert kernels.load(attention.SOURCE, "neon", kernels.X86_LEVELS) is None


@needs_cross
def test_the_package_builds_its_arm64_library(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_CACHE", str(tmp_path))
    built = kernels.build(kernels.SOURCE, isa="neon", compiler=CROSS)
    header = built.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and struct.unpack_from("<H", header, 18)[0] == 183  # EM_AARCH64
