"""The server's decode step with each layer's work planned once (`stablelm.lean_step` does the same for
`generate`).

After a layer's weights have streamed through the caches, every small torch call around the kernels
(module dispatch, views, wrappers that pick an attention path, per-call checks) costs several times its
cached price; on a quantized 3B model, whose decode step is short, they made the server's step 1.2-1.4x
`generate`'s. `PlannedDecode` computes exactly what `RowForward._decode_modules` computes, operation for
operation, on the same kernels and in the same order (so every row keeps the bits it has alone and in any
batch), and drops the rest:

- the layer norms, embedding and activation are torch's functions called directly, with the modules'
  arguments read once;
- each row's q and k are rotated and its k and v written into its own cache in one native call
  (`stablelm_decode_qkv_*`, the rotary kernel's arithmetic: the bits of `apply_rotary`), at the row's own
  position and cache slot;
- each row attends over its own cache with the native kernel where it reproduces SDPA on this machine
  (`stablelm.kernels.attention.plan`, as `stablelm.attention` picks it), else SDPA called directly;
- the linear layers are `RowForward`'s own batch-invariant groups (`_RowLinear`), unchanged.

It serves models it reproduces exactly: exact stablelm module types without hooks, in eval mode, SDPA
attention without q/k norms, plain LayerNorms and embedding, on the CPU; anything else runs the modules.
The plan is made when the `RowForward` is made: a model changed under a running server (hooks added,
layers replaced) is not noticed. Tests compare its logits with the modules' bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import _SDPA_HAS_GQA
from ..kernels import attention as native_attention
from ..kernels.rotation import decode_qkv_kernel
from ..lean_step import _norm, _plain_modules


class PlannedDecode:
    """One decode step for many rows, each over its own `RowCache`; see the module docstring."""

    def __init__(self, forward, layers: list[tuple], final: tuple, qkv_fn) -> None:  # noqa: ANN001
        self.forward, self.layers, self.final, self.qkv_fn = forward, layers, final, qkv_fn
        self.embed = forward.base.embed_tokens
        self.H, self.Hkv, self.D = forward.heads, forward.kv_heads, forward.head_dim
        self.scale = self.D**-0.5
        self.gqa = self.H != self.Hkv
        self.esize = torch.empty((), dtype=forward.dtype).element_size()

    @classmethod
    def build(cls, forward) -> PlannedDecode | None:  # noqa: ANN001
        """The plan for a `RowForward`, or None where it does not apply (then the modules run)."""
        from ..model import Attention, DecoderLayer, StableLmModel

        model, base, config = forward.model, forward.base, forward.config
        if type(base) is not StableLmModel or not _plain_modules(model):
            return None
        if config.qk_layernorm or forward.implementation != "sdpa" or forward.device.type != "cpu":
            return None
        embed = base.embed_tokens
        if (
            type(embed) is not nn.Embedding
            or embed.max_norm is not None
            or embed.weight.dtype != forward.dtype
        ):
            return None
        qkv_fn = decode_qkv_kernel(forward.dtype)
        final = _norm(base.norm)
        if qkv_fn is None or final is None or (forward.heads != forward.kv_heads and not _SDPA_HAS_GQA):
            return None
        layers = []
        for layer, groups in zip(base.layers, forward.layers, strict=True):
            if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention:
                return None
            ln1 = _norm(layer.input_layernorm)
            ln2 = None if layer.use_parallel_residual else _norm(layer.post_attention_layernorm)
            if ln1 is None or (ln2 is None and not layer.use_parallel_residual):
                return None
            layers.append((ln1, ln2, layer.mlp.act_fn, *groups))
        return cls(forward, layers, final, qkv_fn)

    def __call__(self, caches: list, tokens: list[int]) -> torch.Tensor:
        """`RowForward.decode`: row r feeds `tokens[r]` after what `caches[r]` holds; fp32 logits (B, V)."""
        forward, H, Hkv, D, esize = self.forward, self.H, self.Hkv, self.D, self.esize
        B, dtype = len(caches), forward.dtype
        x = F.embedding(
            torch.tensor(tokens, device=forward.device), self.embed.weight, self.embed.padding_idx
        )
        rope = []  # each row's (cos, sin) addresses at its position, as the rotary tables give them
        for cache in caches:
            cos, sin = forward._table(cache.length + 1)
            at = cache.length * cos.shape[-1] * esize
            rope.append((cos.data_ptr() + at, sin.data_ptr() + at))
            cache.reserve(1)
        rot = cos.shape[-1]
        q = torch.empty(B, 1, H, D, dtype=dtype)
        q_heads = q.transpose(1, 2)  # (B, H, 1, D), as attention takes it
        q_ptr, q_row = q.data_ptr(), H * D * esize
        attn = native_attention.plan(dtype, H, Hkv, D, self.scale) if dtype == torch.bfloat16 else None
        fn = self.qkv_fn
        for i, (ln1, ln2, act, qkv_proj, o_proj, gate_up, down) in enumerate(self.layers):
            h = torch.layer_norm(x, *ln1)
            qkv = qkv_proj(h).contiguous()  # (B, (H + 2 Hkv) D)
            sq, qkv_ptr = qkv.shape[1], qkv.data_ptr()
            y = torch.empty(B, H * D, dtype=dtype)
            for r, cache in enumerate(caches):
                kc, vc = cache.keys[i], cache.values[i]
                slot = cache.length
                status = fn(
                    qkv_ptr + r * sq * esize, sq, *rope[r], q_ptr + r * q_row, kc.data_ptr(), vc.data_ptr(),
                    cache.capacity, slot, 1, H, Hkv, D, rot,
                )  # fmt: skip
                if status:
                    raise ValueError(f"bad arguments to stablelm's decode_qkv kernel (slot {slot})")
                length = slot + 1
                q_r = q_heads[r : r + 1]
                if (
                    attn is not None
                    and native_attention.run(attn, q_r, kc, vc, length, None, y[r : r + 1], self.scale) == 0
                ):
                    continue
                out = F.scaled_dot_product_attention(
                    q_r, kc[:, :, :length], vc[:, :, :length], scale=self.scale, enable_gqa=self.gqa
                )
                y[r] = out.transpose(1, 2).reshape(H * D)
            x = o_proj(y).add_(x)  # x + attn (a sum commutes)
            hm = h if ln2 is None else torch.layer_norm(x, *ln2)
            gu = gate_up(hm)
            inter = gu.shape[1] // 2
            gate, up = gu[:, :inter], gu[:, inter:]
            if act is F.silu:  # per row (elementwise kernels' paths depend on where an element lies)
                mid = torch.empty(B, inter, dtype=dtype)
                for r in range(B):
                    torch._C._nn.silu(gate[r : r + 1], out=mid[r : r + 1])
            else:
                mid = torch.cat([act(gate[r : r + 1]) for r in range(B)])
            x = down(torch.mul(mid, up, out=mid)).add_(x)
        for cache in caches:
            cache.advance(1)
        return forward.head(torch.layer_norm(x, *self.final)).float()
