"""Speed transforms for inference, applied explicitly after loading: `optimize_for_inference(model)`.

Batch-1 decoding reads every weight once per token, so its speed is the speed of matrix-vector
products. Three transforms raise it:

- Fusion (bit-identical): q/k/v become one `qkv_proj`, gate/up one `gate_up_proj` (fewer, larger
  products).
- Packing (CPU): weights are reordered once into a blocked layout for a faster kernel. stablelm's own
  kernels (`stablelm/kernels/linear.c`, built on first use, x86-64 CPUs with AVX-512) read the
  weights at batch 1 about as fast as plain loads read memory (31-48 GB/s on a 2-core Zen 4, whose
  bandwidth varies). For bfloat16 (AVX512-BF16) the kernel sums in the order oneDNN does, verified per
  weight shape: bit-identical to `F.linear`. For float32 it is within float32 rounding of `F.linear`
  (~1e-7 relative), as oneDNN's packed kernel is, and as torch's own kernels are of each other
  (`F.linear` gives a row different bits alone and in a batch). Elsewhere oneDNN's packed kernel,
  ~25-30 GB/s (bf16 bit-identical), instead of the ~16 GB/s (bf16) or ~17 GB/s (fp32) of `F.linear`
  on plain weights.
- Opt-in, a float32 KV cache (CPU, half-precision models): PyTorch's CPU attention kernel is 3-6x
  slower in bfloat16 than in float32 for one query over a cache, which dominates batched decoding. The
  cache holds the same (bf16-exact) values in float32; prefill attends in the model's dtype as before,
  each decoded token attends in float32 and rounds once. The one transform that changes bf16 bits:
  about a third of decoding's attention outputs differ from the bf16 kernel's by one unit in the last
  place (the fp32 result is the more accurate), so greedy text can part from the reference's at a
  near-tie.

The transformed model's `state_dict()` still has the checkpoint's keys and dense tensors, so
`save_pretrained` and the parity tests see the original layout. Packed weights serve inference only:
train the untransformed model.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .kernels.linear import KernelLinear, PackedLinearBase
from .model import MLP, Attention


class PackedLinear(PackedLinearBase):
    """`nn.Linear` for inference on CPU over a oneDNN-packed weight (bf16: bit-identical outputs; fp32:
    within rounding).

    Saves and loads as a plain Linear (`weight`, `bias` keys, dense tensors). Moved or cast where oneDNN
    cannot serve the weight (another device or dtype), it keeps it dense and runs `F.linear`.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self._set(linear.weight.detach())

    def _set(self, weight: torch.Tensor) -> None:
        """Keep `weight` packed for oneDNN where it can serve it, else dense (`packed` None)."""
        packable = weight.device.type == "cpu" and (
            weight.dtype == torch.float32
            or (weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        )
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if packable else None
        self.dense = None if packable else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.dtype != self.packed.dtype or not x.is_cpu or x.requires_grad:
            return self._dense_linear(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (a copy while packed), for code that reads it."""
        return self.dense if self.packed is None else self.packed.to_dense()

    def _pack_loaded(self, weight: torch.Tensor) -> None:
        held = self.dense if self.packed is None else self.packed
        self._set(weight.to(held.dtype))

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - torch's signature
        """`.to()`, `.float()`, `.cuda()` ...: the weight (held outside the module's buffers) goes too."""
        weight = self.weight
        super()._apply(fn, recurse)
        self._set(fn(weight))
        return self

    def __getstate__(self) -> dict:
        # oneDNN's packed layout is opaque (no storage to copy or pickle): travel dense, repack on arrival
        state = self.__dict__.copy()
        state.update(packed=None, dense=self.weight, _repack=self.packed is not None)
        return state

    def __setstate__(self, state: dict) -> None:
        repack = state.pop("_repack", False)
        super().__setstate__(state)
        if repack:
            self._set(self.dense)

    def extra_repr(self) -> str:
        how = "packed" if self.packed is not None else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}"


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    bias = parts[0].bias is not None
    out = sum(p.out_features for p in parts)
    fused = nn.Linear(
        parts[0].in_features, out, bias=bias, device=parts[0].weight.device, dtype=parts[0].weight.dtype
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


def _split_fused(fused_name, names, sizes, module, state_dict, prefix, local_metadata):  # noqa: ANN001, ANN202
    """A state_dict hook (bound with functools.partial, so that the model still pickles) that writes a
    fused projection back as the checkpoint's separate ones."""
    for suffix in ("weight", "bias"):
        key = f"{prefix}{fused_name}.{suffix}"
        if key in state_dict:
            for name, part in zip(names, state_dict.pop(key).split(sizes), strict=True):
                state_dict[f"{prefix}{name}.{suffix}"] = part.clone()
    return state_dict


def _fuse_loaded(fused_name, names, state_dict, prefix, *args):  # noqa: ANN001, ANN002, ANN202
    """A load_state_dict pre-hook (bound with functools.partial) that fuses the checkpoint's separate
    projections."""
    for suffix in ("weight", "bias"):
        keys = [f"{prefix}{name}.{suffix}" for name in names]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{fused_name}.{suffix}"] = torch.cat([state_dict.pop(k) for k in keys])


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, in place; keys stay the checkpoint's."""
    for module in model.modules():
        if isinstance(module, Attention) and module.qkv_proj is None:
            parts = [module.q_proj, module.k_proj, module.v_proj]
            names, sizes = ["q_proj", "k_proj", "v_proj"], [p.out_features for p in parts]
            module.qkv_proj = _fused_linear(parts)
            del module.q_proj, module.k_proj, module.v_proj
            module._register_state_dict_hook(partial(_split_fused, "qkv_proj", names, sizes))
            module._register_load_state_dict_pre_hook(partial(_fuse_loaded, "qkv_proj", names))
        elif isinstance(module, MLP) and module.gate_up_proj is None:
            parts = [module.gate_proj, module.up_proj]
            sizes = [p.out_features for p in parts]
            module.gate_up_proj = _fused_linear(parts)
            del module.gate_proj, module.up_proj
            names = ["gate_proj", "up_proj"]
            module._register_state_dict_hook(partial(_split_fused, "gate_up_proj", names, sizes))
            module._register_load_state_dict_pre_hook(partial(_fuse_loaded, "gate_up_proj", names))
    return model


def can_pack(model: nn.Module) -> bool:
    """Whether oneDNN packing applies: CPU weights in fp32, or bf16 on a CPU with bf16 support."""
    param = next(model.parameters())
    if param.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if param.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return param.dtype == torch.float32


def pack_linears(model: nn.Module, *, kernels: bool = True) -> nn.Module:
    """Replace every Linear by a KernelLinear (when `kernels` and it serves here) or else a
    PackedLinear, in place (tied LM heads stay: packing would copy them)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Hold no reference to a Linear beyond its own replacement, so each plain weight is freed as soon as
    # its packed copy exists: the peak stays at the weights plus one layer.
    parents = [m for m in model.modules() if any(isinstance(c, nn.Linear) for c in m.children())]
    for parent in parents:
        names = [name for name, child in parent.named_children() if isinstance(child, nn.Linear)]
        for name in names:
            linear = getattr(parent, name)
            if id(linear.weight) not in tied:
                fast = KernelLinear.from_linear(linear) if kernels else None
                setattr(parent, name, fast or PackedLinear(linear))
                del linear, fast
    return model


def optimize_for_inference(
    model: nn.Module,
    *,
    fuse: bool = True,
    pack: bool | None = None,
    kernels: bool = True,
    fp32_cache: bool = False,
) -> nn.Module:
    """Apply the speed transforms in place and return the model (in eval mode).

    Args:
        model: A loaded StableLM model, already on its device and in its dtype.
        fuse: Fuse the q/k/v and gate/up projections.
        pack: Pack weights (default: when `can_pack`). Packed models are for inference only.
        kernels: When packing, use stablelm's own linear kernels (`KernelLinear`; x86-64 CPUs with
            AVX-512 and a C compiler): float32 everywhere they build, bfloat16 for each weight shape
            where the kernel reproduces torch's results bit for bit on this machine (AVX512-BF16);
            oneDNN's packed kernel elsewhere.
        fp32_cache: Keep `generate`'s KV cache in float32, for a bfloat16/float16 model on the CPU: faster
            decoding, above all in batches, at twice the cache's memory and within rounding of the
            reference rather than bit-identical (see the module's docstring). Off by default.
    """
    model.eval()
    if fp32_cache:
        param = next(model.parameters())
        if param.device.type != "cpu" or param.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"fp32_cache is for bfloat16/float16 models on the CPU; this one is {param.dtype} on "
                f"{param.device.type}. Drop fp32_cache=True."
            )
        model.kv_cache_dtype = torch.float32
    if fuse:
        fuse_projections(model)
    if pack if pack is not None else can_pack(model):
        if not can_pack(model):
            raise ValueError(
                "Packing needs the model on the CPU in float32 or bfloat16 (with CPU bf16 support)."
            )
        pack_linears(model, kernels=kernels)
    model.requires_grad_(False)
    return model
