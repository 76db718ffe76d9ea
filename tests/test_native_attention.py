"""The native decode attention (`stablelm/kernels/attention.c`) gives torch's SDPA bits wherever it is
planned, is planned on a CPU whose torch runs its AVX2 or AVX-512 kernels, and steps aside on bad or
non-finite input."""

from __future__ import annotations

import pytest
import torch
from test_kernels import LEVELS, _run_isolated

from stablelm import kernels
from stablelm.kernels import attention

needs_kernels = pytest.mark.skipif(
    "avx2" not in LEVELS, reason="needs an x86-64 CPU with AVX2 and a C compiler"
)


def _sdpa(q, keys, values, length, mask, scale):
    return attention._sdpa(q, keys[:, :, :length], values[:, :, :length], mask, scale)


def _case(gen, B, H, Hkv, D, slots, spread):
    q = (torch.randn(B, H, 1, D, generator=gen) * spread).bfloat16()
    keys = (torch.randn(B, Hkv, slots, D, generator=gen) * spread).bfloat16()
    values = torch.randn(B, Hkv, slots, D, generator=gen).bfloat16()
    return q, keys, values


def _native(fn, q, keys, values, length, mask, scale):
    B, H, _, D = q.shape
    out = torch.full((B, H * D), float("nan"), dtype=torch.bfloat16)
    status = attention.run(fn, q, keys, values, length, mask, out, scale)
    return status, out


@needs_kernels
@pytest.mark.parametrize("H, Hkv, D", [(12, 12, 64), (32, 32, 80), (8, 2, 64), (4, 4, 128), (4, 1, 160)])
def test_where_planned_the_kernel_gives_sdpas_bits(H, Hkv, D):
    scale = D**-0.5
    fn = attention.plan(torch.bfloat16, H, Hkv, D, scale)
    if fn is None:
        pytest.skip(
            "no native attention on this CPU (Intel's MKL sums otherwise; or torch's SDPA is neither ATen's AVX2 "
            "nor its AVX-512 code)"
        )
    gen = torch.Generator().manual_seed(H * D)
    lengths = [1, 2, 5, 7, 8, 15, 16, 17, 31, 47, 100, 176, 255, 511, 512, 513, 515, 777, 1024, 1025, 1600]
    for length in lengths:
        for B, spread in ((1, 3.0), (2, 1.0), (2, 3.0)):
            q, keys, values = _case(
                gen, B, H, Hkv, D, length + int(torch.randint(0, 9, (1,), generator=gen)), spread
            )
            mask = torch.rand(B, length, generator=gen) > 0.4
            mask[:, -1] = True
            for m in (None, mask):
                status, got = _native(fn, q, keys, values, length, m, scale)
                assert status == 0
                assert torch.equal(got, _sdpa(q, keys, values, length, m, scale)), (
                    length,
                    B,
                    spread,
                    m is None,
                )


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_splits_the_heads_and_keeps_sdpas_bits(threads):
    """Each thread takes a run of consecutive (row, head) items and fetches the next one's keys and values
    while it computes one: runs of unequal lengths, rows and grouped heads crossing them."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for H, Hkv, D in ((8, 2, 64), (4, 1, 160), (12, 12, 64)):
            scale = D**-0.5
            fn = attention.plan(torch.bfloat16, H, Hkv, D, scale)
            if fn is None:
                pytest.skip(
                    "no native attention on this CPU (Intel's MKL sums otherwise; or torch's SDPA is neither ATen's AVX2 "
                    "nor its AVX-512 code)"
                )
            gen = torch.Generator().manual_seed(threads * H)
            for length in (1, 9, 176, 600):
                for B in (1, 2, 3):
                    q, keys, values = _case(gen, B, H, Hkv, D, length + 3, 2.0)
                    mask = torch.rand(B, length, generator=gen) > 0.4
                    mask[:, -1] = True
                    for m in (None, mask):
                        status, got = _native(fn, q, keys, values, length, m, scale)
                        assert status == 0
                        assert torch.equal(got, _sdpa(q, keys, values, length, m, scale)), (H, length, B)
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_a_query_strided_as_the_decode_step_keeps_it_and_a_sliced_mask_read_right():
    fn = attention.plan(torch.bfloat16, 8, 8, 64, 0.125)
    if fn is None:
        pytest.skip(
            "no native attention on this CPU (Intel's MKL sums otherwise; or torch's SDPA is neither ATen's AVX2 "
            "nor its AVX-512 code)"
        )
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 1, 8, 64, generator=gen).bfloat16().transpose(1, 2)  # (B, H, 1, D), heads D apart
    _, keys, values = _case(gen, 3, 8, 8, 64, 40, 2.0)
    full = torch.rand(3, 40, generator=gen) > 0.5
    full[:, :30] |= torch.eye(3, 30, dtype=torch.bool)  # some key in every row
    mask = full[:, :30]  # the step's key_mask[:, :length]: rows 40 apart
    status, got = _native(fn, q, keys, values, 30, mask, 0.125)
    assert status == 0 and torch.equal(got, _sdpa(q, keys, values, 30, mask, 0.125))


@needs_kernels
def test_a_row_that_may_see_no_key_gets_sdpas_zeros():
    fn = attention.kernel()
    gen = torch.Generator().manual_seed(2)
    q, keys, values = _case(gen, 2, 4, 4, 64, 20, 1.0)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    status, got = _native(fn, q, keys, values, 20, mask, 0.125)
    assert status == 0
    assert torch.equal(got[1], torch.zeros(4 * 64, dtype=torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_score_that_is_not_finite_is_left_to_torch(bad):
    fn = attention.kernel()
    gen = torch.Generator().manual_seed(3)
    q, keys, values = _case(gen, 1, 4, 4, 64, 20, 1.0)
    keys[0, 2, 5, 7] = bad
    status, _ = _native(fn, q, keys, values, 20, None, 0.125)
    assert status == 4


@needs_kernels
@pytest.mark.parametrize(
    "change",
    [
        dict(D=12),  # not a multiple of 8
        dict(D=1024),  # wider than the kernel's buffers
        dict(length=0),
        dict(length=41),  # beyond the cache's 40 slots
        dict(Hkv=3),  # 8 heads do not share 3 kv heads evenly
        dict(lanes=4),  # a softmax width that is neither AVX2's nor AVX-512's
        dict(order=3),  # an MKL order the kernel does not know
    ],
)
def test_bad_arguments_are_refused_with_nothing_written(change, monkeypatch):
    fn = attention.kernel()
    p = {"B": 1, "H": 8, "Hkv": 8, "D": 64, "length": 10, "lanes": 8, **change}
    monkeypatch.setattr(attention, "softmax_lanes", lambda: p["lanes"])
    monkeypatch.setattr(attention, "mkl_order", lambda: p.get("order", 0))
    D, Hkv = p["D"], p["Hkv"]
    q = torch.zeros(1, 8, 1, D, dtype=torch.bfloat16)
    keys = torch.zeros(1, Hkv, 40, D, dtype=torch.bfloat16)
    out = torch.full((1, 8 * D), 7.0, dtype=torch.bfloat16)
    assert attention.run(fn, q, keys, keys, p["length"], None, out, 0.125) == 2
    assert torch.equal(out, torch.full((1, 8 * D), 7.0, dtype=torch.bfloat16))


def test_no_plan_for_other_dtypes_or_layouts():
    assert attention.plan(torch.float16, 8, 8, 64, 0.125) is None
    assert attention.plan(torch.float32, 8, 8, 64, 0.125) is None
    assert attention.plan(torch.bfloat16, 8, 8, 12, 12**-0.5) is None


# MKL's order as the kernel computes it: its AVX2 code, on AMD's CPUs (order 0) or Intel's (order 1); see
# `attention.mkl_order`
_AMD = kernels.cpu_vendor() == "AuthenticAMD"
_INTEL = kernels.cpu_vendor() == "GenuineIntel"

_PLANNED = """
import torch
from stablelm import kernels
from stablelm.kernels import attention
print("capability", torch.backends.cpu.get_cpu_capability(), "isa", kernels.selected_isa())
print("lanes", attention.softmax_lanes(), "order", attention.mkl_order())
print("planned", all(attention.plan(torch.bfloat16, *layout, layout[2] ** -0.5) is not None
                     for layout in [(32, 32, 80), (12, 12, 64), (32, 8, 64)]))
"""


@needs_kernels
def test_a_cpu_whose_torch_runs_avx2_kernels_gets_the_native_attention():
    # torch as it runs on an AVX2-only CPU (8-lane softmax), with our AVX2 build; on an Intel CPU with
    # AVX-512 MKL runs its AVX-512 code (no native attention) unless capped at AVX2, as on Intel's AVX2 CPUs
    uncapped = {"MKL_ENABLE_INSTRUCTIONS": ""}  # MKL's best code for the CPU, whatever the caller's setting
    out = _run_isolated(_PLANNED, {"STABLELM_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", **uncapped})
    avx512 = "avx512f" in kernels.cpu_flags()
    assert "capability AVX2 isa avx2" in out and "lanes 8" in out, out
    assert f"planned {_AMD or (_INTEL and not avx512)}" in out, out
    if _AMD or _INTEL:
        env = {"STABLELM_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
        out = _run_isolated(_PLANNED, env)
        assert f"order {0 if _AMD else 1}" in out and "planned True" in out, out


@pytest.mark.skipif("avx512" not in LEVELS, reason="needs an x86-64 CPU with AVX-512 and a C compiler")
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_a_cpu_whose_torch_runs_avx512_kernels_gets_the_native_attention(isa):
    # torch's own AVX-512 kernels (16-lane softmax; MKL's products as on AVX2 CPUs), with either build of
    # ours: the best one for the machine and the forced lower one
    out = _run_isolated(_PLANNED, {"STABLELM_ISA": isa, "MKL_ENABLE_INSTRUCTIONS": ""})
    assert f"capability AVX512 isa {isa}" in out and "lanes 16" in out and f"planned {_AMD}" in out, out


_INTEL_BITS = """
import torch
from stablelm.kernels import attention
torch.set_num_threads(THREADS)
assert attention.mkl_order() == ORDER, attention.mkl_order()
fn = attention.kernel()
gen = torch.Generator().manual_seed(THREADS)
bad = total = 0
for H, Hkv, D in [(12, 12, 64), (32, 32, 80), (8, 2, 64), (4, 1, 160)]:
    for length in [1, 3, 5, 8, 13, 37, 176, 511, 512, 513, 515, 1025]:
        for spread in (3.0, 1.0):
            q = (torch.randn(2, H, 1, D, generator=gen) * spread).bfloat16()
            keys = (torch.randn(2, Hkv, length, D, generator=gen) * spread).bfloat16()
            values = torch.randn(2, Hkv, length, D, generator=gen).bfloat16()
            mask = torch.rand(2, length, generator=gen) > 0.3
            mask[:, -1] = True
            for m in (None, mask):
                want = attention._sdpa(q, keys, values, m, D**-0.5)
                got = torch.empty(2, H * D, dtype=torch.bfloat16)
                assert attention.run(fn, q, keys, values, length, m, got, D**-0.5) == 0
                bad += int((got != want).view(2, H, D).any(-1).sum())
                total += 2 * H
print("differing", bad, "of", total)
"""


@needs_kernels
@pytest.mark.skipif(not _INTEL, reason="MKL's code as it runs on Intel's CPUs")
@pytest.mark.parametrize(
    "mkl, order, threads, capability",
    [
        ("AVX2", 1, 1, "avx2"),
        ("AVX2", 1, 2, "default"),
        ("AVX512", 2, 1, "default"),
        ("AVX512_E1", 2, 2, "default"),
    ],
)
def test_on_intel_cpus_with_mkls_avx2_or_avx512_code_the_kernel_gives_sdpas_bits(
    mkl, order, threads, capability
):
    # MKL capped at AVX2 (or AVX-512 without BF16) runs the code it runs on Intel's AVX2 CPUs (on Intel's
    # AVX-512 CPUs before Cooper Lake). The other orders differ from it in ~0.3% of these heads (about 15
    # of the 5,000 here), so the count below tells them apart.
    if mkl.startswith("AVX512") and "avx512f" not in kernels.cpu_flags():
        pytest.skip("MKL's AVX-512 code needs an AVX-512 CPU")
    env = {"STABLELM_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": mkl}
    if capability == "avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    code = _INTEL_BITS.replace("THREADS", str(threads)).replace("ORDER", str(order))
    out = _run_isolated(code, env)
    assert "differing 0 of" in out, out


def test_which_order_each_cpu_gets(monkeypatch):
    # AMD: MKL's AVX2 code as on AMD (0). Intel: its AVX2 code as on Intel (1) where MKL runs that (no
    # AVX-512, or MKL_ENABLE_INSTRUCTIONS=AVX2), its AVX-512 code (2) on AVX-512 CPUs without BF16 (or
    # capped so); with AVX512-BF16 or AMX it runs other code: SDPA there, whatever the probes say (a Xeon
    # with AMX: 1-5% of random cases one ulp away, some passing the probes)
    cases = [
        ("AuthenticAMD", {"avx2", "fma", "avx512f"}, None, 0),
        ("AuthenticAMD", {"avx2", "fma"}, None, 0),
        ("GenuineIntel", {"avx2", "fma"}, None, 1),
        ("GenuineIntel", {"avx2", "fma", "avx512f"}, None, 2),
        ("GenuineIntel", {"avx2", "fma", "avx512f", "avx512_bf16"}, None, None),
        ("GenuineIntel", {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}, None, None),
        ("GenuineIntel", {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}, "avx2", 1),
        ("GenuineIntel", {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512_E1", 2),
        ("GenuineIntel", {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512_E3", None),
        ("GenuineIntel", {"avx"}, None, None),
        ("", {"avx2", "fma"}, None, None),
    ]
    monkeypatch.setattr(attention, "_reproduces_torch", lambda *args: True)
    try:
        for vendor, flags, mkl, order in cases:
            monkeypatch.setattr(attention, "cpu_vendor", lambda v=vendor: v)
            monkeypatch.setattr(attention, "cpu_flags", lambda f=flags: frozenset(f))
            if mkl is None:
                monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
            else:
                monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", mkl)
            attention.mkl_order.cache_clear()
            attention._PLANS.clear()
            assert attention.mkl_order() == order, (vendor, flags, mkl)
            planned = attention.plan(torch.bfloat16, 12, 12, 64, 0.125) is not None
            if order is None:
                assert not planned
            elif attention.kernel() is not None and attention.softmax_lanes() is not None:
                assert planned
    finally:
        monkeypatch.undo()
        attention.mkl_order.cache_clear()
        attention._PLANS.clear()


def test_the_softmax_width_follows_torchs_capability(monkeypatch):
    attention.softmax_lanes.cache_clear()
    try:
        for capability, lanes in (("AVX2", 8), ("AVX512", 16), ("DEFAULT", None), ("ZVECTOR", None)):
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            attention.softmax_lanes.cache_clear()
            assert attention.softmax_lanes() == lanes
            if lanes is None:  # no native attention where torch's vectors are of another width
                attention._PLANS.clear()
                assert attention.plan(torch.bfloat16, 8, 8, 64, 0.125) is None
    finally:
        monkeypatch.undo()
        attention.softmax_lanes.cache_clear()
        attention._PLANS.clear()


def test_the_decode_step_falls_back_to_sdpa_on_a_score_that_is_not_finite(monkeypatch):
    from conftest import randomize_, tiny_config

    from stablelm import StableLmForCausalLM

    torch.manual_seed(0)
    model = StableLmForCausalLM(tiny_config(max_position_embeddings=64)).bfloat16().eval()
    randomize_(model)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    calls = []

    def not_finite(*args):  # the kernel reports a non-finite score: torch's SDPA must answer instead
        calls.append(args[4])
        return 4

    monkeypatch.setattr(attention, "run", not_finite)
    got = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    if not calls:
        pytest.skip("the native attention is not planned here")
    assert torch.equal(got, want)


@needs_kernels
def test_the_modules_attention_takes_the_kernel_for_one_query_with_sdpas_bits(monkeypatch):
    from stablelm.attention import AttentionMask
    from stablelm.attention import attention as modules_attention

    if attention.plan(torch.bfloat16, 8, 2, 64, 0.125) is None:
        pytest.skip(
            "no native attention on this CPU (Intel's MKL sums otherwise; or torch's SDPA is neither ATen's AVX2 "
            "nor its AVX-512 code)"
        )
    calls = []
    real = attention.run
    monkeypatch.setattr(attention, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(4)
    q, keys, values = _case(gen, 2, 8, 2, 64, 50, 2.0)
    allowed = torch.rand(2, 1, 1, 37, generator=gen) > 0.3
    allowed[..., -1] = True
    for m, length in ((None, 50), (allowed, 37)):
        mask = AttentionMask(allowed=m, is_causal=False, key_length=length)
        got = modules_attention(q, keys, values, mask, implementation="sdpa", scale=0.125)  # (B, 1, H, D)
        rows = None if m is None else m[:, 0, 0]
        assert torch.equal(got.reshape(2, -1), _sdpa(q, keys, values, length, rows, 0.125))
    assert len(calls) == 2
