"""Weight-only int8/int4: formats, kernels against a dequantized reference, loading/saving, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

import stablelm
from stablelm.checkpoint import CheckpointError
from stablelm.heads import StableLmForCausalLM
from stablelm.quantization import QuantizationConfig, QuantizedLinear, formats
from stablelm.quantization import linear as qlinear
from stablelm.quantization import modes as qmodes

ROOT = Path(__file__).resolve().parents[1]
# in_features multiples of 64 so int4 (group 64) quantizes every linear layer
CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)


def _model(seed: int = 0, **overrides) -> StableLmForCausalLM:
    torch.manual_seed(seed)
    model = StableLmForCausalLM(tiny_config(**{**CONFIG, **overrides})).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _saved(tmp_path: Path, **overrides) -> Path:
    folder = tmp_path / "dense"
    _model(**overrides).save_pretrained(folder)
    return folder


QTYPES = [("int8", 128), ("int4", 64), ("int4", 128)]


@pytest.mark.parametrize(("qtype", "group"), QTYPES)
def test_formats_round_trip_and_error_bound(qtype, group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    if qtype == "int8":
        q, s = formats.quantize_int8(w)
        deq = formats.dequantize_int8(q, s)
        step = s[:, None]
    else:
        q, s, m = formats.quantize_int4(w, group)
        assert torch.equal(formats.pack_int4(formats.unpack_int4(q)), q)
        deq = formats.dequantize_int4(q, s, m)
        step = s.float().repeat_interleave(group, 1)
    # every weight within half a step (plus the bf16 rounding of the scale and minimum)
    assert ((deq - w.float()).abs() <= step * 0.5 + 1e-2 * w.float().abs().amax()).all()


def _reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ layer.dequantized().double().t()
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("float32_products", [False, True])
@pytest.mark.parametrize("isa", ["auto", "avx2", "none"])
@pytest.mark.parametrize(("qtype", "group"), QTYPES)
def test_kernels_match_dequantized_reference(qtype, group, isa, float32_products, monkeypatch):
    from stablelm.kernels import best_isa, clear_caches, selected_isa

    if isa == "avx2" and best_isa() is None:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setattr(qmodes, "FLOAT32_PRODUCTS", float32_products)
    monkeypatch.setenv("STABLELM_ISA", isa)
    clear_caches()
    try:
        gen = torch.Generator().manual_seed(1)
        w = (torch.randn(40, 256, generator=gen) * 0.05).bfloat16()
        layer = QuantizedLinear.from_dense(
            w, torch.randn(40, generator=gen).bfloat16(), quant_type=qtype, group_size=group
        )
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
            layer.bias.data = layer.bias.data.to(dtype)
            # 20 rows: the prefill path, the whole weight at once, then in tiles of 16 of its 40 rows
            # 12 rows: on the avx2 level, calls of 8 rows and of 4 on the quantized weight
            for rows, scratch in ((1, None), (3, None), (8, None), (12, None), (20, None), (20, 1)):
                default, qlinear.SCRATCH_BYTES = qlinear.SCRATCH_BYTES, scratch or qlinear.SCRATCH_BYTES
                try:
                    x = torch.randn(rows, 256, generator=gen).to(dtype)
                    with torch.no_grad():
                        y = layer(x)
                finally:
                    qlinear.SCRATCH_BYTES = default
                ref = _reference(layer, x)
                assert y.dtype == dtype
                assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol, (dtype, rows, scratch)
                if rows == 12 and selected_isa() == "avx2":  # each call's rows as that call alone gives them
                    with torch.no_grad():
                        assert torch.equal(y, torch.cat([layer(x[:8]), layer(x[8:])])), dtype
                if float32_products and rows > qlinear.CHUNKED_MAX_ROWS and isa != "none":
                    # prefill in float32, one rounding to bfloat16 at the end: within half its ulp
                    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-30).all(), (dtype, scratch)
    finally:
        monkeypatch.delenv("STABLELM_ISA")
        clear_caches()


# The one-row int4 kernels for bfloat16 x, each forced where this CPU can run it: AVX2's (vpmaddubsw),
# AVX-VNNI's (256-bit vpdpbusd, at the avx2 level), AVX512-VNNI's; "auto" is whatever the CPU gets.
PATHS = ["auto", "avx2", "avx-vnni", "avx512-vnni"]


def _use_path(path: str, qtype: str, monkeypatch) -> None:
    """Select `path` (STABLELM_ISA and the int4 mode), or skip where this CPU cannot run it."""
    from stablelm.kernels import best_isa, clear_caches

    if path == "auto":
        monkeypatch.setenv("STABLELM_ISA", "auto")
        clear_caches()
        return
    isa = "avx512" if path in ("avx512-vnni", "amx") else "avx2"
    if best_isa() not in ("avx512", "avx2") or (isa == "avx512" and best_isa() != "avx512"):
        pytest.skip(f"no {isa} on this CPU")
    monkeypatch.setenv("STABLELM_ISA", isa)
    clear_caches()
    if path == "avx2":
        monkeypatch.setattr(qmodes, "FORCE_INT4_MODE", 0)
        return
    if path == "amx":
        if not qmodes.amx_tiles(torch.bfloat16):
            pytest.skip("no AMX-INT8 on this CPU")
        return
    if qtype == "int8":
        pytest.skip("int8 has no VNNI kernel")
    if not qmodes.int4_mode(torch.bfloat16) & 2:
        pytest.skip(f"no {path} on this CPU")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("qtype", "group", "k"),
    [("int8", 128, 328), ("int4", 64, 320), ("int4", 128, 384), ("int4", 64, 2240), ("int4", 192, 2112)],
)
def test_one_row_kernels_match_dequantized_reference(qtype, group, k, path, monkeypatch):
    """The decoding kernels (one row of x: rows of W streamed several at once, in chunks of 1024 outputs,
    split over threads) on shapes with leftovers: 2181 outputs (two whole chunks and part of one on one
    thread; a chunk and part of one on each of two), inputs not a multiple of the vector, groups of an
    odd number of 64-input runs, inputs ending in half a 128-input block, more than 16 groups (35, 11 of
    192: the VNNI kernel takes its scales 16 groups at a time); 1 and 2 threads; on each one-row path."""
    from stablelm.kernels import clear_caches

    _use_path(path, qtype, monkeypatch)
    threads = torch.get_num_threads()
    try:
        gen = torch.Generator().manual_seed(3)
        w = (torch.randn(2181, k, generator=gen) * 0.05).bfloat16()
        layer = QuantizedLinear.from_dense(
            w, torch.randn(2181, generator=gen).bfloat16(), quant_type=qtype, group_size=group
        )
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
            layer.bias.data = layer.bias.data.to(dtype)
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                x = torch.randn(1, k, generator=gen).to(dtype)
                with torch.no_grad():
                    y = layer(x)
                ref = _reference(layer, x)
                err = ((y.double() - ref).abs() / ref.abs().max()).max(dim=0).values
                assert err.max().item() < tol, (dtype, n_threads, err.argmax().item())
    finally:
        torch.set_num_threads(threads)
        monkeypatch.delenv("STABLELM_ISA")
        clear_caches()


@pytest.mark.parametrize(("qtype", "group"), [("int8", 128), ("int4", 64)])
def test_one_row_bits_do_not_depend_on_the_threads(qtype, group):
    """Decoding's outputs are dealt to the threads in spans as each comes free (kernels/spans.h), so which
    thread and span computes an output changes from call to call: its bits must not. 2181 outputs at 1
    to 5 threads (spans of every size down to the smallest and the last partial one) give the same bits
    as at one thread, and cover every output (against the float64 reference)."""
    threads = torch.get_num_threads()
    try:
        gen = torch.Generator().manual_seed(11)
        w = (torch.randn(2181, 2240, generator=gen) * 0.05).bfloat16()
        layer = QuantizedLinear.from_dense(w, None, quant_type=qtype, group_size=group)
        x = torch.randn(1, 2240, generator=gen).bfloat16()
        outs = []
        for n_threads in (1, 2, 3, 5):
            torch.set_num_threads(n_threads)
            with torch.no_grad():
                outs.append(layer(x))
        ref = _reference(layer, x)
        assert ((outs[0].double() - ref).abs().max() / ref.abs().max()).item() < 8e-3
        for n_threads, y in zip((2, 3, 5), outs[1:], strict=True):
            assert torch.equal(y, outs[0]), n_threads
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", [*PATHS[1:], "amx"])
@pytest.mark.parametrize(("qtype", "group"), [("int8", 128), ("int4", 64), ("int4", 128), ("int4", 256)])
def test_integer_kernels_extreme_inputs(qtype, group, path, monkeypatch):
    """The kernels for bfloat16 x that make x int16 per block with a power-of-two scale and sum in
    integers (one row: AVX2's, int4's AVX-VNNI and AVX512-VNNI ones; 3 rows: AMX tiles): the largest sums
    the formats allow (every weight at its largest level, every x at the value whose int8 digits are the
    largest), a block of tiny x beside a block of huge ones (each block its own scale), and Inf / NaN in
    x (then the float32 kernels run: no finite output from a non-finite sum)."""
    from stablelm.kernels import clear_caches

    _use_path(path, qtype, monkeypatch)
    rows = 3 if path == "amx" else 1
    try:
        k = 512
        w = torch.ones(70, k)
        w[:, ::64] = 0.0  # int4: each group's minimum 0, the other weights at level 15; int8: at 127
        w[1::2] *= -1
        layer = QuantizedLinear.from_dense(w.bfloat16(), None, quant_type=qtype, group_size=group)
        levels = formats.unpack_int4(layer.weight) if qtype == "int4" else layer.weight.abs()
        assert levels.max().item() == (15 if qtype == "int4" else 127)
        cases = []
        for value in (1.984375, -1.984375, 1.9921875):  # int16 digits -128 / 64, 128 / -64, -64 / 64
            cases.append(torch.full((1, k), value))
        tiny = torch.randn(1, k, generator=torch.Generator().manual_seed(5)) * 1e-3
        tiny[0, :256] = 1e4  # the first blocks huge, their weights zero below: the result is the tiny x's
        cases.append(tiny)
        for x in cases:
            x = x.bfloat16().expand(rows, k) * torch.tensor([1.0, -1.0, 1.0][:rows]).bfloat16()[:, None]
            lw = layer
            if x.abs().max() > 1e3:
                dense = torch.randn(70, k, generator=torch.Generator().manual_seed(6)) * 0.05
                dense[:, :256] = 0.0
                lw = QuantizedLinear.from_dense(dense.bfloat16(), None, quant_type=qtype, group_size=group)
            with torch.no_grad():
                y = lw(x)
            ref = _reference(lw, x)
            assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 8e-3, (x[0, -1].item(), qtype)
        for bad in (float("nan"), float("inf")):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(7)).bfloat16()
            x[-1, 100] = bad
            with torch.no_grad():
                y = layer(x).double()
            ref = _reference(layer, x)
            # not finite where the reference is not (int4's float32 kernel gives NaN for inf * w + 0 * inf)
            assert ref.isfinite().sum() < ref.numel() and torch.equal(y.isfinite(), ref.isfinite()), bad
    finally:
        monkeypatch.delenv("STABLELM_ISA")
        clear_caches()


@pytest.mark.parametrize(
    ("qtype", "group", "k"), [("int8", 128, 328), ("int4", 64, 320), ("int4", 192, 2112)]
)
def test_several_rows_match_the_reference_and_sum_each_row_alone(qtype, group, k):
    """2 to 8 rows, on whatever kernels this CPU runs them (AMX tiles for int8, and for int4 beyond 3 rows
    where the CPU has AMX-INT8; int4's VNNI kernel; the kernels of several rows): within the output's
    rounding of the dequantized reference, on 37 outputs (a block of 16 and a part of one), inputs ending
    in part of a 64-input tile (int8), groups of three tiles (int4 192); and each output computed alone: a
    row's bits are the same in any call of 4-8 rows (one kernel) and at any place."""
    gen = torch.Generator().manual_seed(11)
    layer = QuantizedLinear.from_dense(
        (torch.randn(37, k, generator=gen) * 0.05).bfloat16(),
        torch.randn(37, generator=gen).bfloat16(),
        quant_type=qtype,
        group_size=group,
    )
    x = torch.randn(8, k, generator=gen).bfloat16()
    with torch.no_grad():
        whole = layer(x)
        for m in range(2, 9):
            ref = _reference(layer, x[:m])
            assert ((layer(x[:m]).double() - ref).abs().max() / ref.abs().max()).item() < 8e-3, m
        for m in range(4, 8):
            assert torch.equal(layer(x[:m]), whole[:m]), m
            assert torch.equal(layer(x[8 - m :]), whole[8 - m :]), m


@pytest.mark.parametrize("path", ["avx512-vnni", "avx-vnni"])
@pytest.mark.parametrize(("group", "k"), [(64, 320), (128, 2560), (192, 2112)])
def test_int4_vnni_rows_equal_the_one_row_kernel(group, k, path, monkeypatch):
    """With VNNI (AVX512-VNNI, or AVX-VNNI at the avx2 level), int4's kernel of 2-8 rows computes each row
    as the one-row kernel does, bit for bit: 2-3 rows (4-8 take AMX's tiles where the CPU has them), and
    every batch of the server's (`batched`, any row count, a lone row included); a row holding NaN takes
    the float32 kernel as it would alone, and the others keep their bits."""
    from stablelm.kernels import clear_caches

    _use_path(path, "int4", monkeypatch)
    try:
        gen = torch.Generator().manual_seed(12)
        layer = QuantizedLinear.from_dense(
            (torch.randn(301, k, generator=gen) * 0.05).bfloat16(),
            torch.randn(301, generator=gen).bfloat16(),
            quant_type="int4",
            group_size=group,
        )
        x = torch.randn(8, k, generator=gen).bfloat16()
        x[5, 7] = float("nan")
        with torch.no_grad():
            alone = torch.cat([layer(x[i : i + 1]) for i in range(8)])
            assert alone[5].isnan().all() and alone[[0, 1, 2, 3, 4, 6, 7]].isfinite().all()
            ref = _reference(layer, x[:5])
            assert ((alone[:5].double() - ref).abs().max() / ref.abs().max()).item() < 8e-3
            rows = (2, 3) if qmodes.amx_tiles(torch.bfloat16) else range(2, 9)
            for m in rows:
                assert torch.equal(layer(x[:m]).nan_to_num(), alone[:m].nan_to_num()), m
                assert torch.equal(layer(x[8 - m :]).nan_to_num(), alone[8 - m :].nan_to_num()), m
            for m in range(1, 9):
                assert torch.equal(layer.batched(x[:m]).nan_to_num(), alone[:m].nan_to_num()), m
    finally:
        monkeypatch.delenv("STABLELM_ISA")
        clear_caches()


def test_amx_tiles_follow_the_cpu_flags_and_never_serve_batches(monkeypatch):
    """AMX tiles for 2-8 bfloat16 rows only where the CPU has AMX-INT8 at the avx512 level and the kernels
    have them; never for float32 rows, and `batched` (whose lone rows must sum as in any batch) never asks
    for them."""
    from stablelm.kernels import quant_library, selected_isa

    lib = quant_library()
    if lib is None or selected_isa() != "avx512":
        pytest.skip("no AVX-512 quantized kernels on this CPU")
    base = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}
    has = bool(lib.stablelm_quant_has_amx())
    for flags, expected in (
        (base, False),
        (base | {"amx_bf16", "amx_tile"}, False),
        (base | {"amx_int8"}, has),
    ):
        monkeypatch.setattr(qmodes, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert qmodes.amx_tiles(torch.bfloat16) is expected, flags
        assert not qmodes.amx_tiles(torch.float32)
    layer = QuantizedLinear.from_dense(torch.randn(16, 128).bfloat16(), None, quant_type="int8")
    monkeypatch.setattr(qmodes, "FORCE_AMX", True)
    assert layer.kernel_call(3, 128, 0, torch.bfloat16)[1][0] & qlinear.AMX_ROWS
    assert not layer.kernel_call(3, 128, 0, torch.bfloat16, batch=True)[1][0] & qlinear.AMX_ROWS


def test_prefill_multiplies_in_float32_where_the_cpu_has_no_bfloat16_products(monkeypatch):
    monkeypatch.setattr(qmodes, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    for level in (None, "avx512"):  # no kernels (torch's bfloat16 product), or AVX-512 without BF16
        monkeypatch.setattr(qmodes, "selected_isa", lambda level=level: level)
        assert qmodes.float32_products(), level
    # the AVX2 build's many-row bf16_dot kernel outruns torch's float32 product
    monkeypatch.setattr(qmodes, "selected_isa", lambda: "avx2")
    assert not qmodes.float32_products()
    for flags in ({"avx512f", "avx512_bf16"}, {"avx512f", "amx_bf16"}):
        monkeypatch.setattr(qmodes, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert not qmodes.float32_products()
    monkeypatch.setattr(qmodes, "FLOAT32_PRODUCTS", True)
    assert qmodes.float32_products()


def test_int4_kernel_modes_each_match_the_reference():
    """Every int4 kernel mode this CPU can run (bits of `int4_mode`: AVX512-BF16 for 2-8 rows, VNNI for
    one), forced one by one, against the dequantized reference: one row and three rows."""
    full = qmodes.int4_mode(torch.bfloat16)
    if full == 0:
        pytest.skip("neither AVX512-BF16 nor AVX512-VNNI int4 kernels on this CPU")
    gen = torch.Generator().manual_seed(2)
    layer = QuantizedLinear.from_dense(
        (torch.randn(70, 704, generator=gen) * 0.05).bfloat16(), None, quant_type="int4", group_size=64
    )
    for mode in range(4):
        if mode & ~full:
            continue
        qmodes.FORCE_INT4_MODE = mode
        try:
            for rows in (1, 3):
                x = torch.randn(rows, 704, generator=gen).bfloat16()
                with torch.no_grad():
                    y = layer(x).double()
                ref = _reference(layer, x)
                assert ((y - ref).abs().max() / ref.abs().max()).item() < 8e-3, (mode, rows)
        finally:
            qmodes.FORCE_INT4_MODE = None


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_int4_mode_follows_the_cpu_flags(isa, monkeypatch):
    """The int4 kernels chosen for bfloat16 activations are the best the CPU's flags allow at the level
    the kernels run: one row by VNNI where the CPU has AVX512-VNNI (avx512) or AVX-VNNI (avx2), 2-8 rows
    by AVX512-BF16 sums where it has AVX512-BF16 (avx512 only); neither for float32 activations. Here
    and on whatever CPU runs the tests."""
    from stablelm.kernels import best_isa, clear_caches, cpu_flags, quant_library

    if best_isa() not in ("avx512", "avx2") or (isa == "avx512" and best_isa() != "avx512"):
        pytest.skip(f"no {isa} on this CPU")
    monkeypatch.setenv("STABLELM_ISA", isa)
    clear_caches()
    try:
        if quant_library() is None:
            pytest.skip("no quantized kernels built here")
        vnni = "avx512_vnni" if isa == "avx512" else "avx_vnni"
        flags = cpu_flags()
        expected = int(isa == "avx512" and "avx512_bf16" in flags) | 2 * int(vnni in flags)
        assert qmodes.int4_mode(torch.bfloat16) == expected
        base = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
        for extra, mode in (
            (set(), 0),
            ({vnni}, 2),
            ({"avx512_bf16"}, int(isa == "avx512")),
            ({"avx512_bf16", vnni}, 2 | int(isa == "avx512")),
            ({"avx512_vnni" if isa == "avx2" else "avx_vnni"}, 0),  # the other level's VNNI
        ):
            monkeypatch.setattr(qmodes, "cpu_flags", lambda extra=extra: frozenset(base | extra))
            assert qmodes.int4_mode(torch.bfloat16) == mode, extra
            assert qmodes.int4_mode(torch.float32) == 0
    finally:
        monkeypatch.delenv("STABLELM_ISA")
        clear_caches()


def test_int4_kernel_refuses_modes_it_cannot_run():
    """A mode outside 0-3, or one for float32 x: status 2 and nothing written."""
    from stablelm.kernels import quant_library

    lib = quant_library()
    if lib is None:
        pytest.skip("no quantized kernels on this CPU")
    layer = QuantizedLinear.from_dense(
        torch.randn(16, 128).bfloat16(), None, quant_type="int4", group_size=64
    )
    for dtype, mode in ((torch.bfloat16, 4), (torch.bfloat16, -1), (torch.float32, 2), (torch.float32, 1)):
        x = torch.randn(1, 128).to(dtype)
        y = torch.full((1, 16), 7.0, dtype=dtype)
        status = lib.stablelm_q4_linear(
            x.data_ptr(), qlinear._TYPES[dtype], 1, 128, 128, y.data_ptr(), 16, layer.weight.data_ptr(),
            layer.weight_scale.data_ptr(), layer.weight_min.data_ptr(), 64, None, mode, 1,
        )  # fmt: skip
        assert status == 2 and (y == 7.0).all(), (dtype, mode)


@pytest.mark.parametrize(("qtype", "group"), QTYPES)
def test_greedy_generation_equals_dequantized_reference(qtype, group):
    model = _model()
    stablelm.quantize(model, QuantizationConfig(qtype, group_size=group))
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    # the reference: the same model with dense float32 weights equal to the dequantized ones
    ref = _model().float()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            ref.get_submodule(name).weight.data = module.dequantized()
    ids = torch.tensor([[3, 17, 5, 99, 42]])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    # float32 activations (the cast leaves the quantized tensors as they are): the kernels' sums are
    # within float32 rounding of the reference's
    model.float()
    with torch.no_grad():
        assert torch.allclose(model(out).logits, ref(out).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(
        model.generate(ids, max_new_tokens=12, do_sample=False),
        ref.generate(ids, max_new_tokens=12, do_sample=False),
    )


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_casts_keep_the_quantized_tensors_as_they_are(qtype):
    """`.to(dtype)`, `.half()`, `.bfloat16()`, `.float()` on a quantized model cast its other tensors (and
    biases) only: the levels and scales keep their format's dtypes and values (cast, a bfloat16 scale
    buffer read as float32 by the kernels gave NaN logits), and greedy decoding after a round of casts
    gives the tokens it gave before."""
    model = _model().float()
    stablelm.quantize(model, QuantizationConfig(qtype, group_size=64))
    quantized = {
        k: v.clone() for k, v in model.state_dict().items() if k.endswith(("weight_scale", "weight_min"))
    }
    quantized |= {k: v.clone() for k, v in model.state_dict().items() if v.dtype in (torch.int8, torch.uint8)}
    assert len(quantized) >= 2 * 7 * model.config.num_hidden_layers
    ids = torch.tensor([[3, 17, 5, 99, 42]])
    before = model.generate(ids, max_new_tokens=8, do_sample=False)
    for cast, dtype in (
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
        (lambda m: m.float(), torch.float32),
    ):
        cast(model)
        state = model.state_dict()
        for name, value in quantized.items():
            assert state[name].dtype == value.dtype and torch.equal(state[name], value), (name, dtype)
        assert model.lm_head.bias is None or model.lm_head.bias.dtype == dtype
        assert model.model.embed_tokens.weight.dtype == dtype
        out = model.generate(
            ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        assert all(bool(step.isfinite().all()) for step in out.logits), dtype
    assert torch.equal(out.sequences, before)  # back in float32: the same tokens


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_save_load_round_trip_bit_exact(tmp_path, qtype):
    dense = _saved(tmp_path)
    model = StableLmForCausalLM.from_pretrained(
        dense, quantization_config={"quant_type": qtype, "group_size": 64}
    )
    direct = stablelm.quantize(_model(), QuantizationConfig(qtype, group_size=64))
    for (k, a), (k2, b) in zip(model.state_dict().items(), direct.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_type"] == qtype
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == (
        torch.int8 if qtype == "int8" else torch.uint8
    )
    back = StableLmForCausalLM.from_pretrained(tmp_path / "q")
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(
        back.generate(ids, max_new_tokens=5, do_sample=False),
        model.generate(ids, max_new_tokens=5, do_sample=False),
    )


def test_quantized_checkpoint_with_wrong_description_refused(tmp_path):
    model = StableLmForCausalLM.from_pretrained(_saved(tmp_path), quantization_config="int8")
    model.save_pretrained(tmp_path / "q")
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    # int8 tensors described as int4: shapes and names do not fit
    config["quantization_config"] = {**config["quantization_config"], "quant_type": "int4", "group_size": 64}
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight_min|shape"):
        StableLmForCausalLM.from_pretrained(tmp_path / "q")
    # the same names and shapes, but bf16 values where int8 is described
    config["quantization_config"] = {**config["quantization_config"], "quant_type": "int8"}
    config_path.write_text(json.dumps(config))
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].to(torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}.*bfloat16.*int8"):
        StableLmForCausalLM.from_pretrained(tmp_path / "q")
    # another method's config, and a request that differs from the stored one
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method 'bitsandbytes'"):
        StableLmForCausalLM.from_pretrained(tmp_path / "q")


def test_bad_configs_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="quant_type 'int3'"):
        QuantizationConfig("int3")
    with pytest.raises(ValueError, match="group_size 48"):
        QuantizationConfig("int4", group_size=48)
    with pytest.raises(TypeError, match="quantization_config must be"):
        StableLmForCausalLM.from_pretrained(_saved(tmp_path), quantization_config=4)
    model = StableLmForCausalLM.from_pretrained(tmp_path / "dense", quantization_config="int8")
    model.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="differs from the checkpoint's own"):
        StableLmForCausalLM.from_pretrained(tmp_path / "q", quantization_config="int4")
    with pytest.raises(ValueError, match="already quantized"):
        stablelm.quantize(model, "int4")


def test_quantize_refuses_a_transformers_model_before_changing_it():
    from conftest import reference_config, transformers

    ref = transformers.StableLmForCausalLM(reference_config(tiny_config()))
    before = {name: type(m) for name, m in ref.named_modules()}
    with pytest.raises(
        TypeError, match=r"quantize\(\) takes a stablelm model, got transformers\..*from_pretrained"
    ):
        stablelm.quantize(ref, "int8")
    assert {name: type(m) for name, m in ref.named_modules()} == before
    with pytest.raises(TypeError, match="takes a stablelm model, got builtins.str"):
        stablelm.quantize("model", "int8")


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from stablelm.heads import StableLmForCausalLM
    from stablelm.bench import peak_rss_gb
    import stablelm.checkpoint.load, stablelm.quantization.apply, safetensors.torch  # imports are not weights
    from stablelm.quantization import formats
    # Code is not weights either: the first call of each op pages in ~25 MB of libtorch's code, which RSS
    # counts. Quantize a small tensor both ways before taking the base.
    formats.quantize_int4(torch.randn(256, 1024, dtype=torch.bfloat16), 128)
    formats.quantize_int8(torch.randn(256, 1024, dtype=torch.bfloat16))
    base = peak_rss_gb()
    model = StableLmForCausalLM.from_pretrained(sys.argv[1], quantization_config=sys.argv[2])
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps({"base": base, "peak": peak_rss_gb(), "size": size / 1e9}))
    """
)


def test_peak_rss_while_quantizing_on_load(tmp_path):
    # ~200 MB of bf16 linear weights in 8 layers of 25 MB: a full bf16 materialisation would add ~200 MB
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
    model = StableLmForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "big")
    del model
    layer = 4096 * 1024 * 2 / 1e9  # the largest layer in bf16
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big"), "int4"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout)
    assert got["peak"] - got["base"] <= 1.2 * got["size"] + layer + 0.02, got


def test_cli_quantize(tmp_path):
    dense = _saved(tmp_path, vocab_size=4096)  # the demo tokenizer's
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = ROOT / "stablelm" / "assets" / "demo" / name
        if src.exists():
            (dense / name).write_bytes(src.read_bytes())
    run = [sys.executable, "-m", "stablelm"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    info = subprocess.run(
        [*run, "info", "-m", str(dense), "--quantize", "int4", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["quantization"]["quant_type"] == "int4"
    gen = subprocess.run(
        [*run, "generate", "-m", str(dense), "--quantize", "int8", "--max-new-tokens", "3", "hello"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    bad = subprocess.run(
        [*run, "info", "-m", str(dense), "--quantize", "int3"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "--quantize" in bad.stderr


# Prefill's AMX-BF16 kernel (`stablelm_quant_prefill`): the weight made bfloat16 32 outputs at a time in
# the cache (int4 dequantized as `dequantized` makes it, int8 as q itself, its scale applied to the sums),
# every (output, row) summed in float32 and rounded once.
AMX_SHAPES = [(9, 40, 256), (20, 33, 128), (37, 100, 256), (130, 48, 192), (256, 17, 64)]  # rows, N, K


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("qtype", "group"), [("int8", 128), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=str)
def test_amx_prefill_sums_the_products_in_float32_and_rounds_once(shape, qtype, group, bias, monkeypatch):
    if not qmodes.amx_prefill():
        pytest.skip("no AMX-BF16 prefill kernel on this CPU (it needs AMX-BF16 at the avx512 level)")
    rows, n, k = shape
    if qtype == "int4" and k % group:
        group = 64
    gen = torch.Generator().manual_seed(rows * n + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    layer = QuantizedLinear.from_dense(w, b, quant_type=qtype, group_size=group)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    ran = []
    real = QuantizedLinear._amx_prefill

    def spy(self, lib, r):  # noqa: ANN001, ANN202
        ran.append(real(self, lib, r))
        return ran[-1]

    monkeypatch.setattr(QuantizedLinear, "_amx_prefill", spy)
    with torch.no_grad():
        y = layer(x)
    assert len(ran) == 1 and ran[0] is not None and y.dtype == torch.bfloat16 and y.shape == (rows, n)
    if qtype == "int8":  # q x summed exactly, times the scale
        weight = layer.weight.double() * layer.weight_scale.double()[:, None]
    else:
        weight = layer.dequantized(torch.bfloat16).double()
    ref = x.double() @ weight.T + (0 if b is None else b.double())
    spread = x.double().abs() @ weight.abs().T  # bounds float32's summation error
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + spread * 2**-20).all()


def test_amx_prefill_leaves_other_shapes_to_the_dequantized_product(monkeypatch):
    """K not a multiple of 64 (the kernel declines) and more than AMX_PREFILL_MAX_ROWS rows (torch's product
    is faster) take the dequantized weight and torch's product; so do float32 rows."""
    if not qmodes.amx_prefill():
        pytest.skip("no AMX-BF16 prefill kernel on this CPU (it needs AMX-BF16 at the avx512 level)")
    gen = torch.Generator().manual_seed(3)
    ran = []
    real = QuantizedLinear._amx_prefill
    monkeypatch.setattr(QuantizedLinear, "_amx_prefill", lambda self, lib, r: ran.append(real(self, lib, r)))
    for k, rows, dtype in ((96, 20, torch.bfloat16), (128, qlinear.AMX_PREFILL_MAX_ROWS + 1, torch.bfloat16)):
        layer = QuantizedLinear.from_dense(
            torch.randn(24, k, generator=gen).bfloat16(), None, quant_type="int8"
        )
        x = torch.randn(rows, k, generator=gen).to(dtype)
        ran.clear()
        with torch.no_grad():
            y = layer(x)
        assert ran == ([None] if k % 64 else [])
        ref = _reference(layer, x)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 8e-3


def _lone_calls(layer: QuantizedLinear, x: torch.Tensor, *, lone: bool) -> torch.Tensor:
    """x (M, K) through one kernel call (`lone`: each row summed as a lone row) and row by row."""
    m, k = x.shape
    together = torch.empty(m, layer.out_features, dtype=x.dtype)
    fn, args = layer.kernel_call(m, k, together.data_ptr(), x.dtype, lone=lone)
    qlinear.check_status(fn(x.data_ptr(), *args), layer.quant_type, m, k)
    return together


@pytest.mark.parametrize("qtype", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lone_rows_get_the_one_row_kernels_bits(qtype, dtype):
    """Speculative decoding's check: a call of up to `lone_row_chunk` rows with `lone` gives each row what
    the one-row kernel gives it alone, bit for bit (float32 outputs show any other order of the sums:
    inputs spread over 2^-12..2^12, K = 2560 and odd sizes, a bias). Where the chunk is 1 such calls of
    several rows are refused."""
    gen = torch.Generator().manual_seed(5)
    for k, n in [(2560, 200), (832, 67)]:
        weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
        bias = torch.randn(n, generator=gen).to(dtype)
        layer = QuantizedLinear.from_dense(weight, bias, quant_type=qtype, group_size=64)
        chunk = layer.lone_row_chunk(dtype)
        x = torch.randn(8, k, generator=gen) * torch.pow(2.0, torch.randint(-12, 13, (8, k), generator=gen))
        x = x.to(dtype)
        with torch.no_grad():
            alone = torch.cat([layer(x[i : i + 1]) for i in range(8)])
        if chunk == 1:
            with pytest.raises(ValueError, match="cannot each be summed as a lone row"):
                _lone_calls(layer, x[:2], lone=True)
            continue
        for m in (2, 3, 8):
            assert torch.equal(_lone_calls(layer, x[:m], lone=True), alone[:m]), (k, m)
        with pytest.raises(ValueError, match="9 rows cannot each be summed as a lone row"):
            _lone_calls(layer, torch.cat([x, x[:1]]), lone=True)  # past a call's chunk
        if qtype == "int8":  # the kernel itself refuses a lone-row call of one row or of more than 8
            fn, args = layer.kernel_call(2, k, alone.data_ptr(), dtype, lone=True)
            for rows in (1, 9):
                assert fn(x.data_ptr(), args[0], rows, *args[2:]) == 2, rows
        with torch.no_grad(), stablelm.layers.one_row_bits():  # the module under the check's context
            assert torch.equal(layer(x), alone)
        if qtype == "int8" and dtype == torch.float32:  # the kernel of several rows sums otherwise
            assert not torch.equal(_lone_calls(layer, x, lone=False), alone)
