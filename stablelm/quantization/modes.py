"""Which of the quantized kernels this CPU runs: the choices `QuantizedLinear` makes from the CPU's flags
and the kernels built here, each with a switch that overrides it (`FORCE_*`, `FLOAT32_PRODUCTS`: None
picks; tests and benchmarks set them to run every path a CPU can)."""

from __future__ import annotations

import torch

from ..kernels import cpu_flags, quant_library, selected_isa

# mode of the int4 kernel (bits, see `int4_mode`): 1 = AVX512-BF16 sums, 2 = one row by VNNI integer
# sums (bfloat16 activations); 0 = float32 sums. None: pick.
FORCE_INT4_MODE: int | None = None
# whether 2-8 rows run on AMX tiles (`amx_tiles`). None: pick.
FORCE_AMX: bool | None = None
# whether prefill's bfloat16 rows run on AMX-BF16 tiles (`amx_prefill`). None: pick.
FORCE_AMX_PREFILL: bool | None = None
# prefill's product of bfloat16 rows: True float32 (dequantized to float32), False bfloat16. None: pick.
FLOAT32_PRODUCTS: bool | None = None


def float32_products() -> bool:
    """Whether prefill multiplies bfloat16 rows by float32 dequantized weights (torch's float32 product),
    not bfloat16 ones: on CPUs without AVX512-BF16 or AMX, where a bfloat16 product is float32
    arithmetic plus conversions (on a 2-core AMD EPYC, Zen 1: 1.1-1.3x faster, measured in
    docs/quantization.md), except at the avx2 level, whose many-row `bf16_dot` kernel (broadcast chains)
    outruns torch's float32 product (Zen 3, the 3B layers at 128 rows, 2 threads, dequantizing included:
    86-94 GFLOP/s against 62). `FLOAT32_PRODUCTS` overrides (tests)."""
    if FLOAT32_PRODUCTS is not None:
        return FLOAT32_PRODUCTS
    return not ({"avx512_bf16", "amx_bf16"} & cpu_flags()) and selected_isa() != "avx2"


def amx_tiles(dtype: torch.dtype) -> bool:
    """Whether 2-8 rows of `dtype` run on AMX tiles (quant.c's `quant_amx`, int8 and int4; not `batched`
    rows, whose lone rows must sum alike): bfloat16 activations at the avx512 level, on a CPU with
    AMX-INT8, the kernels built with it. (Where Linux refuses a process the tiles, the kernel runs its
    others.)"""
    if FORCE_AMX is not None:
        return FORCE_AMX
    lib = quant_library()
    return (
        lib is not None
        and dtype == torch.bfloat16
        and selected_isa() == "avx512"
        and "amx_int8" in cpu_flags()
        and bool(lib.stablelm_quant_has_amx())
    )


def amx_prefill() -> bool:
    """Whether many bfloat16 rows (prefill) run on AMX-BF16 tiles (quant.c's `quant_prefill_amx`): the avx512
    level, a CPU with AMX-BF16, the kernel built with it. (Where Linux refuses the tiles, the layer is
    dequantized and torch multiplies.)"""
    if FORCE_AMX_PREFILL is not None:
        return FORCE_AMX_PREFILL
    lib = quant_library()
    return (
        lib is not None
        and selected_isa() == "avx512"
        and "amx_bf16" in cpu_flags()
        and bool(lib.stablelm_quant_has_amx_bf16())
    )


def int4_mode(dtype: torch.dtype) -> int:
    """The int4 kernels the CPU runs for `dtype` activations, as bits (`stablelm_q4_linear`'s `mode`):
    1 for AVX512-BF16 sums of 2-8 rows (avx512 level), 2 for one row by VNNI integer sums (AVX512-VNNI at
    the avx512 level, AVX-VNNI at avx2); bfloat16 activations only, else 0 (float32 sums)."""
    if FORCE_INT4_MODE is not None:
        return FORCE_INT4_MODE
    lib = quant_library()
    isa = selected_isa()
    if lib is None or dtype != torch.bfloat16 or isa not in ("avx512", "avx2"):
        return 0
    flags = cpu_flags()
    bf16 = isa == "avx512" and bool(lib.stablelm_q4_has_bf16()) and "avx512_bf16" in flags
    vnni_flag = "avx512_vnni" if isa == "avx512" else "avx_vnni"
    vnni = bool(lib.stablelm_q4_has_vnni()) and vnni_flag in flags
    return int(bf16) | 2 * int(vnni)
