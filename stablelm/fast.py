"""Inference speed: on by default, switched per model here.

Every StableLM model's linear layers are `stablelm.layers.Linear`: in inference (autograd off) on the
CPU they run on stablelm's native kernels where one serves, q/k/v and gate/up fused into one call
each, over the weights as they are (no packing, no second copy). Half-precision results are
bit-identical to torch's (a kernel is used only where it reproduces them, see
`stablelm.kernels.linear`); float32 ones, where a kernel serves them, within float32 rounding (~1e-7
relative, as torch's own kernels are of each other). Training, autograd, GPUs and other dtypes run
torch's kernels unchanged.

`from_pretrained(..., optimize=False)`, `STABLELM_OPTIMIZE=0` or `set_kernels(model, False)` keep
torch's kernels everywhere. `optimize_for_inference` prepares a model for inference only (eval mode,
parameters frozen) and adds what is not on by default: a float32 KV cache, opt-in.

The float32 KV cache (CPU, half-precision models): PyTorch's CPU attention kernel is 3-6x slower in
bfloat16 than in float32 for one query over a cache, which dominates batched decoding. The cache holds
the same (bf16-exact) values in float32; prefill attends in the model's dtype as before, each decoded
token attends in float32 and rounds once. The one transform that changes bf16 bits: about a third of
decoding's attention outputs differ from the bf16 kernel's by one unit in the last place (the fp32
result is the more accurate), so greedy text can part from the reference's at a near-tie.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Linear


def set_kernels(model: nn.Module, enabled: bool) -> nn.Module:
    """Let the model's linear layers use stablelm's kernels (True, the default) or keep torch's."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.use_kernels = enabled
    return model


def optimize_for_inference(model: nn.Module, *, kernels: bool = True, fp32_cache: bool = False) -> nn.Module:
    """Prepare a model for inference only, in place: eval mode, parameters frozen; return it.

    Args:
        model: A StableLM model, already on its device and in its dtype.
        kernels: Use stablelm's kernels (the default for every model); False keeps torch's.
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
    set_kernels(model, kernels)
    model.requires_grad_(False)
    return model
