"""`KernelLinear`: `nn.Linear` on the native kernels (bfloat16 only where it is bit-identical to torch).

The bf16 kernel sums in the order oneDNN sums on AVX512-BF16 CPUs (see `linear.c`). That order is
oneDNN's choice for this CPU, shape, row count and thread count, so `calibrate` checks it before use.
The float32 kernel sums each block of `FLOAT32_BLOCK` k in order: within float32 rounding of torch.
"""

from __future__ import annotations

import torch
from torch import nn

from . import layout_matches, pack, run_linear, supports, unpack
from . import op as _op  # noqa: F401 - registers torch.ops.stablelm.linear

# Block sizes to try, most likely first: oneDNN (avx512_core_bf16) sums K in blocks of 512 for one row
# and 1024 for several.
_BLOCKS = (512, 1024, 256, 2048, 128, 4096, 64)
_CALIBRATED: dict[tuple[int, int, bool, int], tuple[int, int] | None] = {}
# float32: partial sums over blocks of 256 k keep the rounding error of long rows near torch's own.
FLOAT32_BLOCK = 256


class PackedLinearBase(nn.Module):
    """An inference-only `nn.Linear` whose weight is kept packed for a kernel (`packed`); the bias stays
    a plain parameter. Saves and loads as a plain Linear (`weight`, `bias` keys, dense tensors).

    Subclasses pack in `_pack_loaded` and unpack in the `weight` property.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)  # None too, as nn.Linear does

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (a copy), for code that reads it."""
        raise NotImplementedError

    def _pack_loaded(self, weight: torch.Tensor) -> None:
        """Replace the packed weight by `weight` (dense, from a state dict), packed."""
        raise NotImplementedError

    def _dense_linear(self, x: torch.Tensor) -> torch.Tensor:
        """`F.linear` on the dense weight in `x`'s dtype: where the packed kernel cannot serve `x`."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - torch's signature
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args):  # noqa: ANN001 - torch's signature
        self._pack_loaded(state_dict[prefix + "weight"])
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])


class KernelLinear(PackedLinearBase):
    """`nn.Linear` for inference on x86-64 CPUs with AVX-512, through `stablelm.kernels`.

    bfloat16 (AVX512-BF16): the kernel sums in the order torch's own (oneDNN's) kernel does, found per
    weight shape by `calibrate`, so outputs are bit-identical to `F.linear`'s. float32: within float32
    rounding of `F.linear` (as torch's own packed and unpacked kernels are of each other). Batch-1
    products read the weights 1.4-1.7x faster than oneDNN's packed kernels. Build one with
    `KernelLinear.from_linear`, which returns None where the kernel cannot serve (or, for bf16, cannot
    reproduce torch). Saves and loads as a plain Linear (`weight`, `bias` keys, dense tensors).
    """

    def __init__(self, linear: nn.Linear, blocks: tuple[int, int]) -> None:
        super().__init__(linear)
        # For a compiled graph, which cannot call `calibrate`; None: no kernel for this dtype here.
        self.blocks: tuple[int, int] | None = blocks
        self.register_buffer("packed", pack(linear.weight.detach()), persistent=False)

    @staticmethod
    def serves(dtype: torch.dtype, device: torch.device | str) -> bool:
        """Whether weights of `dtype` on `device` can run on a kernel here (before calibration)."""
        return torch.device(device).type == "cpu" and supports(dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> KernelLinear | None:
        """The kernel-backed copy of `linear`, or None (no kernel here, or bf16 not bit-identical here)."""
        if not cls.serves(linear.weight.dtype, linear.weight.device):
            return None
        blocks = _blocks(
            linear.weight.dtype, linear.out_features, linear.in_features, linear.bias is not None
        )
        return None if blocks is None else cls(linear, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The hot path of decoding, ~49-129 calls per token: the module's tensors are read from its
        # dicts directly (nn.Module.__getattr__ costs a microsecond each time).
        packed, bias = self._buffers["packed"], self._parameters["bias"]
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.extra_repr()}: got inputs of {x.shape[-1]} features (shape {tuple(x.shape)})"
            )
        rows = x.reshape(-1, self.in_features)
        compiling = torch.compiler.is_compiling()
        # A graph cannot call `calibrate`: it uses the blocks found when the module was built (or moved
        # to this dtype). Eager looks them up per call (a dict lookup): a new thread count is
        # calibrated anew.
        dtype = packed.dtype
        blocks = (
            self.blocks
            if compiling
            else _blocks(dtype, self.out_features, self.in_features, bias is not None)
        )
        if (
            blocks is None
            or x.dtype != dtype
            or not (x.is_cpu and packed.is_cpu)
            or x.requires_grad
            or not (compiling or supports(dtype))
        ):  # e.g. after .half() or .cuda(), or with a bf16 shape calibrated away for this thread count
            return self._dense_linear(x)
        block = blocks[0] if rows.shape[0] == 1 else blocks[1]
        if compiling:  # the kernel as an operator torch.compile can call
            y = torch.ops.stablelm.linear(rows, packed, bias, self.out_features, block)
        else:
            y = run_linear(rows, packed, bias, self.out_features, block)
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (a copy), for code that reads it."""
        return unpack(self.packed, self.out_features, self.in_features)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - torch's signature
        """`.to()`, `.float()`, `.bfloat16()` ...: a new dtype gets its own kernel's layout and blocks."""
        super()._apply(fn, recurse)
        packed = self._buffers["packed"]
        if not layout_matches(packed):
            self._buffers["packed"] = pack(unpack(packed, self.out_features, self.in_features))
        self.blocks = _blocks(packed.dtype, self.out_features, self.in_features, self.bias is not None)
        return self

    def _pack_loaded(self, weight: torch.Tensor) -> None:
        self.packed = pack(weight.to(self.packed.dtype))

    def extra_repr(self) -> str:
        kind = "bf16" if self.packed.dtype == torch.bfloat16 else "f32"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=linear_{kind}"


def _blocks(dtype: torch.dtype, out_features: int, in_features: int, bias: bool) -> tuple[int, int] | None:
    """The kernel's block sizes (one row, several rows) for a weight of this dtype and shape; None where
    no kernel serves it (another dtype, or a bf16 shape where the kernel would not be bit-identical)."""
    if dtype == torch.bfloat16:
        return calibrate(out_features, in_features, bias)
    return (FLOAT32_BLOCK, FLOAT32_BLOCK) if dtype == torch.float32 else None


def _cancelling_weight(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Rows whose halves cancel exactly (v, then -v shuffled): summed against ones, what is left is
    the rounding of the partial sums, which differs with almost any change of order or blocking."""
    half = cols // 2
    v = torch.randn(rows, half, generator=generator).to(torch.bfloat16)
    weight = torch.cat([v, -v[:, torch.randperm(half, generator=generator)]], 1)
    return nn.functional.pad(weight, (0, cols - 2 * half))


def calibrate(out_features: int, in_features: int, bias: bool) -> tuple[int, int] | None:
    """The kernel's block sizes (one row, several rows) that reproduce `F.linear` bit for bit for this
    shape, on this machine and thread count, or None. Found once per shape and thread count on weights
    that make any other summation order show (see `_cancelling_weight`): one row, then 2, 3, 5, 8, 13,
    17 and 40 rows, which must agree on one block size; then the bias, on random inputs."""
    # The order depends on the number of rows and K, not on N (checked up to 50304): a cap spares
    # large LM heads a large probe.
    out_features = min(out_features, 1024)
    key = (out_features, in_features, bias, torch.get_num_threads())
    if key not in _CALIBRATED:
        gen = torch.Generator().manual_seed(0)
        weight = _cancelling_weight(out_features, in_features, gen)
        packed = pack(weight)

        def exact(rows: list[int], block: int, b: torch.Tensor | None = None, random: bool = False) -> bool:
            for m in rows:
                if random:
                    x = torch.randn(m, in_features, generator=gen).to(torch.bfloat16)
                else:  # ones, scaled by a power of two per row: exact products, the order shows
                    x = (
                        torch.exp2(torch.arange(m) % 5 - 2.0)[:, None]
                        .expand(m, in_features)
                        .to(torch.bfloat16)
                    )
                got = run_linear(x, packed, b, out_features, block)
                if not torch.equal(got, nn.functional.linear(x, weight, b)):
                    return False
            return True

        one = next((k for k in _BLOCKS if exact([1], k)), None)
        many = next((k for k in _BLOCKS if exact([2, 3, 5, 8, 13, 17, 40], k)), None)
        blocks = None if one is None or many is None else (one, many)
        if blocks is not None and bias:
            b = torch.randn(out_features, generator=gen).to(torch.bfloat16)
            if not (exact([1], one, b, random=True) and exact([3], many, b, random=True)):
                blocks = None
        _CALIBRATED[key] = blocks
    return _CALIBRATED[key]
