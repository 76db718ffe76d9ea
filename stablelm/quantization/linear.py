"""`QuantizedLinear`: a linear layer whose weight is stored int8 or int4 (see `formats`).

Its state dict holds the quantized tensors (`weight`, `weight_scale`, `weight_min` for int4, `bias` in
the model's dtype): what `save_pretrained` writes and a quantized checkpoint loads back. A call on the
CPU with float32 or bfloat16 activations runs on stablelm's native kernels (`stablelm/kernels/quant.c`):
up to `KERNEL_MAX_ROWS` rows (decoding) on the quantized weight itself (on the avx2 level up to
`CHUNKED_MAX_ROWS` rows, in calls of `KERNEL_MAX_ROWS`), more rows (prefill) by dequantizing the weight (whole, or in tiles of `SCRATCH_BYTES`) into a scratch buffer the thread keeps
and multiplying with torch's kernel. Elsewhere
(other devices or dtypes, no kernels: `STABLELM_ISA=none`, autograd on) the weight is dequantized with
torch and `F.linear` runs; gradients flow to the input, never to the frozen quantized weight.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import call, kernel, quant_library, selected_isa
from ..kernels.linear import plan
from ..kernels.prefetch import quant_prefetch_mode
from ..layers import linear_in_check, one_row_active
from . import formats
from .modes import amx_prefill, amx_tiles, float32_products, int4_mode

KERNEL_MAX_ROWS = 8  # the most rows one call of the kernels takes
# On the avx2 level, up to this many rows run as calls of KERNEL_MAX_ROWS rows (and the rest) on the
# quantized weight; beyond it the dequantized weight and a matrix product are faster. 3B shape's 2560 x
# 6912 layer, cold, 2 threads, a Zen 3: int8 at 9 / 12 / 16 rows 4.2 / 4.8 / 6.0 ms in calls of 8 rows
# against 8.2 / 10.4 / 11.8 dequantized (and 5.1 / 7.3 / 8.1 for the bf16 layer); int4 6.5 / 6.7 / 9.5
# against 9.5 / 9.3 / 11.9; at 20 rows int4's calls were slower (14.7 against 12.8). Not measured on the
# AVX-512 levels, which keep the dequantized product past KERNEL_MAX_ROWS.
CHUNKED_MAX_ROWS = 16
# Prefill: the weight is dequantized into a scratch buffer of at most this many bytes (the whole layer for
# every layer of the 3B shape; tiles of this size for larger ones), kept and reused by every layer and call
# of the thread, and multiplied in one call of torch's kernel per tile. Small tiles kept the buffer in the cache, but each matrix product of a
# tile's few hundred rows ran at a third of the whole layer's speed.
SCRATCH_BYTES = 64 << 20
_scratch = threading.local()
_TYPES = {torch.float32: 0, torch.bfloat16: 1}
BATCH_ROWS = 4  # or-ed into the kernel's type: XBATCH in quant.c
AMX_ROWS = 8  # or-ed into the kernel's type: XAMX in quant.c (2-16 rows on AMX tiles; not for batches)
LONE_ROWS = 16  # or-ed into the kernel's type: XLONE in quant.c (int8, 2-8 rows each summed as a lone row)
# The most rows the AMX-BF16 prefill kernel takes: it does the same work per row at any row count, torch's
# product gains with more rows (3B shape, 2 threads: 1.04-1.20x of bf16's prefill at 128 rows, 0.95-1.10x
# at 256, 0.80-0.86x at 512, where dequantizing the layer and torch's product gave 0.89-0.99x).
AMX_PREFILL_MAX_ROWS = 256


QUANTIZED = ("weight", "weight_scale", "weight_min")  # the buffers in the format's own dtypes


class QuantizedLinear(nn.Module):
    """y = x @ dequant(weight)^T + bias, with the weight stored in `quant_type` ("int8" or "int4")."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quant_type: str,
        group_size: int = 128,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.group_size = quant_type, group_size
        self.use_kernels = True
        if quant_type == "int8":
            self.register_buffer(
                "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
            )
            self.register_buffer(
                "weight_scale", torch.empty(out_features, dtype=torch.float32, device=device)
            )
            self.weight_min = None
        else:
            g = in_features // group_size
            self.register_buffer(
                "weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
            )
            self.register_buffer(
                "weight_scale", torch.empty(out_features, g, dtype=torch.bfloat16, device=device)
            )
            self.register_buffer(
                "weight_min", torch.empty(out_features, g, dtype=torch.bfloat16, device=device)
            )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, *, quant_type: str, group_size: int = 128
    ) -> QuantizedLinear:
        """Quantize a dense [N, K] weight (and keep its bias in its dtype)."""
        n, k = weight.shape
        layer = cls(
            k,
            n,
            quant_type=quant_type,
            group_size=group_size,
            bias=bias is not None,
            dtype=weight.dtype,
            device="meta",
        )
        layer.set_quantized(
            *(
                formats.quantize_int8(weight)
                if quant_type == "int8"
                else formats.quantize_int4(weight, group_size)
            )
        )
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to("cpu"), requires_grad=False)
        return layer.to(weight.device) if weight.device.type != "cpu" else layer

    def set_quantized(
        self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None
    ) -> None:
        self.weight, self.weight_scale = q, scale
        if minimum is not None:
            self.weight_min = minimum

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        """`model.to(dtype)`, `.half()`, `.bfloat16()` cast the bias only: the quantized tensors keep their
        format's dtypes (int8 / uint8 levels, float32 or bfloat16 scales, as the kernels read them), moved
        to the new device if there is one. (Cast too, the kernels read a bfloat16 scale buffer as float32.)"""
        kept = {name: self._buffers[name] for name in QUANTIZED if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.quant_type == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, quant_type={self.quant_type}{group}"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight this layer computes with, [N, K] in `dtype` (computed in float32)."""
        if self.quant_type == "int8":
            w = formats.dequantize_int8(self.weight, self.weight_scale)
        else:
            w = formats.dequantize_int4(self.weight, self.weight_scale, self.weight_min)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.use_kernels and not torch.is_grad_enabled() and x.is_cpu and self.weight.is_cpu:
            y = self._native(x)
        if y is None:
            w, b = self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
            y = linear_in_check(x, w, b)  # see `layers.one_row_bits`
            if y is None:
                y = F.linear(x, w, b)
        return y

    # ---- native kernels ------------------------------------------------------------------------------
    def kernels_take(self, dtype: torch.dtype) -> bool:
        """Whether the native kernels take rows of `dtype` for this layer: float32 or bfloat16, the bias's
        dtype, and the kernels built here."""
        return (
            dtype in _TYPES
            and (self.bias is None or self.bias.dtype == dtype)
            and quant_library() is not None
        )

    def _native(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.shape[-1] != self.in_features or not self.kernels_take(x.dtype):
            return None
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < self.in_features):
            rows = rows.contiguous()
        m = rows.shape[0]
        if m == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        if m > 1 and one_row_active():  # speculative decoding's check: each row as the one-row kernel sums it
            y = self.as_lone_rows(rows)
        elif m > KERNEL_MAX_ROWS and (m > CHUNKED_MAX_ROWS or selected_isa() != "avx2"):
            y = self._tiled(rows)
        elif m > KERNEL_MAX_ROWS:  # a few more rows: calls of KERNEL_MAX_ROWS rows
            y = self._in_calls(rows, KERNEL_MAX_ROWS, lone=False)
        else:
            y = torch.empty(m, self.out_features, dtype=x.dtype)
            fn, args = self.kernel_call(
                m, rows.stride(0) if m > 1 else self.in_features, y.data_ptr(), x.dtype
            )
            check_status(fn(rows.data_ptr(), *args), self.quant_type, m, self.in_features)
        return y.view(*x.shape[:-1], self.out_features)

    def lone_row_chunk(self, dtype: torch.dtype) -> int:
        """How many rows of `dtype` one kernel call may take and still give each the bits of the kernel of
        one row (the decoding step's), with `kernel_call(..., lone=True)`: `KERNEL_MAX_ROWS` for int4 on its
        VNNI kernels and, for bfloat16 rows in groups of up to 256, on the avx2 level's integer kernel, whose
        forms for several rows compute each output as the one-row form does (not on AMX tiles), and for
        int8 where its one-row kernel sums in float32 (the avx512 level; float32 rows on avx2), through a
        kernel of several rows in that order (XLONE); else 1 (the kernels of several rows sum in another
        order)."""
        if self.quant_type == "int4":
            lone = bool(int4_mode(dtype) & 2) and not amx_tiles(dtype)
            # AVX2: 2-8 bfloat16 rows by the one-row kernel's integer sums (groups of up to 256)
            lone = lone or (selected_isa() == "avx2" and dtype == torch.bfloat16 and self.group_size <= 256)
        else:
            lone = selected_isa() == "avx512" or dtype == torch.float32
        return KERNEL_MAX_ROWS if lone else 1

    def lone_row_calls(
        self, m: int, ldx: int, y: int, dtype: torch.dtype, threads: int | None = None
    ) -> list[tuple[int, object, tuple]]:
        """(first row, fn, args) of the kernel calls that give each of `m` rows (`ldx` elements apart) the
        bits a call on that row alone gives it (see `layers.one_row_bits`): `lone_row_chunk` rows a call,
        their outputs at address `y` (m rows of out_features, contiguous). `fn(x + first row's offset,
        *args)` runs one."""
        return self._row_calls(m, ldx, y, dtype, self.lone_row_chunk(dtype), threads, lone=True)

    def _row_calls(
        self, m: int, ldx: int, y: int, dtype: torch.dtype, step: int, threads: int | None, *, lone: bool
    ) -> list[tuple[int, object, tuple]]:
        """(first row, fn, args) of the kernel calls of `step` rows (the last fewer) over `m` rows, their
        outputs at address `y` (m rows of out_features, contiguous); `lone` as in `kernel_call`."""
        size = torch.empty(0, dtype=dtype).element_size()
        return [
            (
                r0,
                *self.kernel_call(
                    min(step, m - r0), ldx, y + r0 * self.out_features * size, dtype, threads, lone=lone
                ),
            )
            for r0 in range(0, m, step)
        ]

    def _in_calls(self, rows: torch.Tensor, step: int, *, lone: bool) -> torch.Tensor:
        """rows (M, K) through the native kernels in calls of `step` rows (see `_row_calls`)."""
        m, k = rows.shape
        y = torch.empty(m, self.out_features, dtype=rows.dtype)
        for r0, fn, args in self._row_calls(
            m, max(rows.stride(0), k), y.data_ptr(), rows.dtype, step, None, lone=lone
        ):
            check_status(fn(rows[r0].data_ptr(), *args), self.quant_type, min(step, m - r0), k)
        return y

    def as_lone_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) through the native kernels, each row as a call on it alone sums it (see
        `lone_row_calls`). The kernels must serve (`_native`)."""
        return self._in_calls(rows, self.lone_row_chunk(rows.dtype), lone=True)

    def batched(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (B, K) with 1 <= B <= KERNEL_MAX_ROWS through the native kernels of several rows, which sum a
        row alike for any such B and at any place among them (a lone row included: the decoding kernel of
        one row, which `forward` runs, sums it in another order): what a server that gives a row the same
        bits alone and in a batch needs. None where the kernels do not serve (then `forward` computes it)."""
        if not (
            self.use_kernels
            and x.is_cpu
            and self.weight.is_cpu
            and x.dim() == 2
            and 1 <= x.shape[0] <= KERNEL_MAX_ROWS
            and x.shape[1] == self.in_features
            and self.kernels_take(x.dtype)
        ):
            return None
        x = x.contiguous()
        m = x.shape[0]
        y = torch.empty(m, self.out_features, dtype=x.dtype)
        fn, args = self.kernel_call(m, self.in_features, y.data_ptr(), x.dtype, batch=True)
        check_status(fn(x.data_ptr(), *args), self.quant_type, m, self.in_features)
        return y

    def kernel_call(
        self,
        m: int,
        ldx: int,
        y: int,
        dtype: torch.dtype,
        threads: int | None = None,
        *,
        batch: bool = False,
        lone: bool = False,
    ) -> tuple:
        """(fn, args): `fn(x, *args)` runs this layer's native kernel on `m` (1..KERNEL_MAX_ROWS) rows of
        `dtype` (float32 or bfloat16, the bias's dtype) at address x, `ldx` elements apart, writing
        (m, out_features) contiguous at address `y`; returns the kernel's status (`check_status`). The caller
        holds the library (`quant_library()` not None) and keeps x and y alive; `stablelm.lean_step`
        makes these once per generation. `batch`: one row, too, through the kernels of several rows (see
        `batched`). `lone`: each of up to `lone_row_chunk(dtype)` rows summed as a lone row (see there)."""
        quant_prefetch_mode()  # how the kernels prefetch here: timed once per process
        lib, kind = quant_library(), _TYPES[dtype] | (BATCH_ROWS if batch else 0)
        if lone and m > 1:
            if m > self.lone_row_chunk(dtype) or batch:
                raise ValueError(
                    f"{m} rows cannot each be summed as a lone row in one {self.quant_type} call"
                )
            kind |= LONE_ROWS if self.quant_type == "int8" else 0
        elif not batch and amx_tiles(dtype):
            kind |= AMX_ROWS
        b = None if self.bias is None else self.bias.data_ptr()
        threads = torch.get_num_threads() if threads is None else threads
        k, n = self.in_features, self.out_features
        if self.quant_type == "int8":
            return lib.stablelm_q8_linear, (
                kind, m, k, ldx, y, n, self.weight.data_ptr(), self.weight_scale.data_ptr(), b, threads,
            )  # fmt: skip
        return lib.stablelm_q4_linear, (
            kind, m, k, ldx, y, n, self.weight.data_ptr(), self.weight_scale.data_ptr(),
            self.weight_min.data_ptr(), self.group_size, b, int4_mode(dtype), threads,
        )  # fmt: skip

    def _tiled(self, rows: torch.Tensor) -> torch.Tensor:
        """Many rows: the weight dequantized (whole, or in tiles of SCRATCH_BYTES) into the thread's scratch
        buffer and multiplied with torch's kernel; in float32 for bfloat16 rows where the CPU has no
        bfloat16 products (`float32_products`), the result rounded once at the end."""
        lib = quant_library()
        k, n = self.in_features, self.out_features
        out_dtype = rows.dtype
        if out_dtype == torch.bfloat16 and float32_products():
            rows = rows.float()
        elif out_dtype == torch.bfloat16 and rows.shape[0] <= AMX_PREFILL_MAX_ROWS and amx_prefill():
            y = self._amx_prefill(lib, rows)
            if y is not None:
                return y
        tile = min(n, max(16, SCRATCH_BYTES // (rows.element_size() * k) // 16 * 16))
        kind = _TYPES[rows.dtype]
        buffer = _scratch_buffer(tile * k, rows.dtype)
        y = torch.empty(rows.shape[0], n, dtype=rows.dtype) if tile < n else None
        threads = torch.get_num_threads()
        for n0 in range(0, n, tile):
            n1 = min(n, n0 + tile)
            w = buffer[: (n1 - n0) * k].view(n1 - n0, k)
            if self.quant_type == "int8":
                status = lib.stablelm_q8_dequant(
                    self.weight.data_ptr(), self.weight_scale.data_ptr(), k, n0, n1, w.data_ptr(), kind, threads
                )  # fmt: skip
            else:
                status = lib.stablelm_q4_dequant(
                    self.weight.data_ptr(), self.weight_scale.data_ptr(), self.weight_min.data_ptr(),
                    self.group_size, k, n0, n1, w.data_ptr(), kind, threads,
                )  # fmt: skip
            check_status(status, self.quant_type, n1 - n0, k)
            part = _product(rows, w)
            if y is None:
                y = part
            else:
                y[:, n0:n1] = part
        if self.bias is not None:
            y += self.bias
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _amx_prefill(self, lib, rows: torch.Tensor) -> torch.Tensor | None:  # noqa: ANN001
        """bfloat16 rows on AMX-BF16 tiles, the weight dequantized 32 outputs at a time in the cache
        (`stablelm_quant_prefill`); None where the kernel cannot run (then `_tiled` dequantizes the layer)."""
        m, k, n = rows.shape[0], self.in_features, self.out_features
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        y = torch.empty(m, n, dtype=torch.bfloat16)
        b = None if self.bias is None else self.bias.data_ptr()
        if self.quant_type == "int8":
            args = (self.weight.data_ptr(), self.weight_scale.data_ptr(), None, None, 0)
        else:
            args = (
                self.weight.data_ptr(),
                None,
                self.weight_scale.data_ptr(),
                self.weight_min.data_ptr(),
                self.group_size,
            )
        status = lib.stablelm_quant_prefill(
            rows.data_ptr(), m, k, rows.stride(0), y.data_ptr(), n, *args, b, torch.get_num_threads()
        )
        if status == -1:
            return None
        check_status(status, self.quant_type, m, k)
        return y


def _product(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows @ w.T with stablelm's dense kernel where its plan for this shape gives torch's bits faster
    (on CPUs without AVX512-BF16, torch's bfloat16 product is ATen's slow one), else torch's."""
    found = plan(w.dtype, w.shape[1], w.shape[0], False, rows.shape[0])
    fn = None if found is None else kernel(found[0])
    if fn is None:
        return torch.mm(rows, w.t())
    return call(fn, found[0], rows, [w], [None], found[1])


def _scratch_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's scratch buffer of `dtype`, at least `numel` elements (grown as layers need)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffers[dtype] = buffer = None  # the old one freed before the new one is made
        buffers[dtype] = buffer = torch.empty(numel, dtype=dtype)
    return buffer


def check_status(status: int, quant_type: str, m: int, k: int) -> None:
    if status == 1:
        raise MemoryError(
            f"stablelm's {quant_type} kernel could not allocate its work buffers ({m} rows of {k})"
        )
    if status:
        raise ValueError(f"bad arguments to stablelm's {quant_type} kernel: {m}x{k}")
