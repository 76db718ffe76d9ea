"""The eager one-token decode step with each layer's work planned once per generation.

A decoded token of a small model is mostly small operations: after every linear kernel has streamed
megabytes of weights through the caches, each torch call around it (a view, a check, an allocation)
finds its code and data evicted and costs 10-40 us instead of 1-3 (measured on a 2-core Xeon). So the
step here computes exactly what `stablelm.decode._decode_step` computes over a static cache, with the
same kernels and torch operations in the same order, and drops everything else:

- the linear layers' kernel choice (`stablelm.kernels.linear.plan`), their checks and the ctypes
  arguments are resolved when the plan is made, not per call; quantized layers (int8/int4,
  `stablelm.quantization`) are called on their own kernels the same way, each layer of a group writing
  its columns of one output;
- q and k are rotated and k and v written into the cache's slot in one native call
  (`stablelm_decode_qkv_*`: the rotary kernel's arithmetic, the same bits as `apply_rotary`), with no
  views, `index_copy_` or temporaries;
- the layer norms, attention and activation are torch's own functions called directly (no module
  dispatch, no identity dropout), the residual sums added in place into fresh kernel outputs.

The plan is made only for models it reproduces exactly: exact stablelm module types without hooks, in
eval mode, every linear layer a plain one (on a native kernel for this row count where one serves, else
torch's `F.linear` as the module would call it) or a quantized one on its kernels (up to
`KERNEL_MAX_ROWS` rows), SDPA attention without q/k norms, and a static cache in the model's dtype on
the CPU; anything else (or autograd on) runs the modules (`DecodeStep` falls back). Tests compare its logits with the modules' bit for bit.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .attention import _SDPA_HAS_GQA
from .cache import StaticCache
from .kernels import attention as native_attention
from .kernels import check_status, kernel, planned_args, planned_linear, quant_library
from .kernels.linear import plan as kernel_plan
from .kernels.rotation import decode_qkv_kernel
from .layers import Linear, linear_by_row
from .quantization.linear import KERNEL_MAX_ROWS, QuantizedLinear
from .quantization.linear import check_status as check_quantized
from .rope import RotaryEmbedding


class _Kernel:
    """One planned native linear call: out (B, sum N) = x (B, K) @ cat(weights)^T (+ biases), x's rows
    contiguous, written into `out`, a buffer of its own kept for the plan's life. Every argument but
    the input lies in a struct made once (`stablelm_linear_planned`)."""

    __slots__ = ("fn", "kind", "k", "n", "out", "args", "ref", "tensors")

    def __init__(
        self, fn, kind: str, weights: list, biases: list, block: int, rows: int, threads: int
    ) -> None:  # noqa: ANN001
        self.fn, self.kind, self.tensors = planned_linear(), kind, (*weights, *biases)  # kept alive
        self.k, self.n = weights[0].shape[1], sum(w.shape[0] for w in weights)
        self.out = torch.empty(rows, self.n, dtype=weights[0].dtype)
        self.args = planned_args(fn, self.out, weights, biases, block, threads)
        self.ref = ctypes.addressof(self.args)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        status = self.fn(self.ref, x.data_ptr())
        if status:
            check_status(status, self.kind, x.shape[0], self.k, self.args.kb)
        return self.out


def _kernel_for(
    linears: tuple[nn.Module, ...], rows: int, threads: int, one_row: bool = False
) -> _Kernel | _TorchLinear | None:
    """The planned call for these layers fused (as `stablelm.layers.fused_linear` would make it), torch's
    F.linear where no kernel serves them alike, or None (not plain layers: the modules run). With
    `one_row`, every row gets one row's bits: the kernel planned for one row, called on all `rows` (each
    row's sums are the same whatever the row count: see linear.c), else torch's F.linear row by row
    (torch's own product over several rows can round otherwise: oneDNN on an AVX512-BF16 Zen 4 did for
    K = 2560 from 4 rows on)."""
    if any(type(m) is not Linear for m in linears):  # quantized layers, peft's wrappers, ...: the modules run
        return None
    weights = [m._parameters["weight"] for m in linears]
    biases = [m._parameters["bias"] for m in linears]
    dtype, k = weights[0].dtype, weights[0].shape[1]
    has_bias = biases[0] is not None
    for m, w, b in zip(linears, weights, biases, strict=True):
        if not (type(m) is Linear and m.use_kernels and w.is_cpu and w.dtype == dtype and w.is_contiguous()):
            return None
        if w.shape[1] != k or (b is None) == has_bias or (b is not None and b.dtype != dtype):
            return None
    planned_rows = 1 if one_row else rows
    found = kernel_plan(dtype, k, weights[0].shape[0], has_bias, planned_rows)
    fn = None if found is None else kernel(found[0])
    if (
        fn is None
        or planned_linear() is None
        or any(kernel_plan(dtype, k, w.shape[0], has_bias, planned_rows) != found for w in weights[1:])
    ):
        return _TorchLinear(weights, biases, rows, by_row=one_row and rows > 1)
    return _Kernel(fn, found[0], weights, biases, found[1], rows, threads)


class _TorchLinear:
    """torch's `F.linear` for plain layers of one input that no native kernel serves here (none gives
    torch's bits for the shape, or torch's kernel is as fast: `stablelm.kernels.linear.plan`): the call
    each module makes then, so the same bits; the outputs copied side by side into `out` (B, sum N). The
    rest of the step stays planned: the layers' module overhead is what it saves, not their arithmetic."""

    __slots__ = ("layers", "out", "parts", "by_row")

    def __init__(self, weights: list, biases: list, rows: int, *, by_row: bool = False) -> None:
        self.layers = list(zip(weights, biases, strict=True))
        self.out = torch.empty(rows, sum(w.shape[0] for w in weights), dtype=weights[0].dtype)
        self.parts = self.out.split([w.shape[0] for w in weights], dim=1)
        self.by_row = by_row  # one F.linear call per row (one row's bits for each)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for (weight, bias), part in zip(self.layers, self.parts, strict=True):
            part.copy_(linear_by_row(x, weight, bias) if self.by_row else F.linear(x, weight, bias))
        return self.out


class _Quantized:
    """The planned calls of quantized layers of one input (`stablelm.quantization.QuantizedLinear`: q/k/v,
    gate/up, or one layer), each its own kernel call (the call `QuantizedLinear.forward` makes for these
    rows, so the same bits), their outputs side by side in `out` (B, sum N): written in place for one row,
    joined after the calls for more. With `one_row` (a check's rows, any number), each row gets the
    one-row kernel's bits: calls of as many rows as give them (`QuantizedLinear.as_lone_rows`)."""

    __slots__ = ("calls", "out", "parts", "kind", "k", "tensors")

    def __init__(
        self,
        layers: tuple[nn.Module, ...],
        rows: int,
        threads: int,
        dtype: torch.dtype,
        one_row: bool = False,
    ) -> None:
        self.kind, self.k = layers[0].quant_type, layers[0].in_features
        self.out = torch.empty(rows, sum(m.out_features for m in layers), dtype=dtype)
        if rows == 1:  # each layer's columns of the one row: contiguous within `out`
            self.parts = None
            targets = self.out.split([m.out_features for m in layers], dim=1)
        else:
            self.parts = targets = [torch.empty(rows, m.out_features, dtype=dtype) for m in layers]
        row_bytes = self.k * self.out.element_size()  # x's rows are contiguous
        self.calls = []  # (fn, x's byte offset, args)
        for m, t in zip(layers, targets, strict=True):
            if one_row:
                calls = m.lone_row_calls(rows, self.k, t.data_ptr(), dtype, threads)
            else:
                calls = [(0, *m.kernel_call(rows, self.k, t.data_ptr(), dtype, threads))]
            self.calls += [(fn, r0 * row_bytes, args) for r0, fn, args in calls]
        self.tensors = layers  # their buffers stay alive as long as the plan

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = x.data_ptr()
        for fn, offset, args in self.calls:
            status = fn(p + offset, *args)
            if status:
                check_quantized(status, self.kind, x.shape[0], self.k)
        if self.parts is not None:
            torch.cat(self.parts, dim=1, out=self.out)
        return self.out


def _calls_for(  # noqa: ANN202
    linears: tuple[nn.Module, ...], rows: int, threads: int, dtype: torch.dtype, one_row: bool = False
):
    """The planned call for these layers of one input: fused native kernel (plain layers), the quantized
    kernels (quantized layers; a row's sums do not depend on the batch there), or None (anything else:
    the modules run). `one_row`: see `_kernel_for`."""
    if all(type(m) is Linear for m in linears):
        return _kernel_for(linears, rows, threads, one_row)
    if not all(type(m) is QuantizedLinear for m in linears) or dtype not in (torch.bfloat16, torch.float32):
        return None
    if (rows > KERNEL_MAX_ROWS and not one_row) or quant_library() is None:
        return None  # many rows: the module dequantizes tiles (see QuantizedLinear._tiled)
    for m in linears:
        if not (m.use_kernels and m.weight.is_cpu and m.in_features == linears[0].in_features):
            return None
        if (m.bias is not None and m.bias.dtype != dtype) or m.quant_type != linears[0].quant_type:
            return None
    return _Quantized(linears, rows, threads, dtype, one_row)


class _Layer:
    """One decoder layer's planned work (see the module docstring)."""

    __slots__ = ("ln1", "ln2", "qkv", "o", "gate_up", "down", "act", "parallel", "gate", "up", "mlp_in")

    def __init__(self, layer: nn.Module, rows: int, threads: int, dtype: torch.dtype, one_row: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1 = _norm(layer.input_layernorm)
        self.parallel = layer.use_parallel_residual
        self.ln2 = None if self.parallel else _norm(layer.post_attention_layernorm)
        self.qkv = _calls_for((attn.q_proj, attn.k_proj, attn.v_proj), rows, threads, dtype, one_row)
        self.o = _calls_for((attn.o_proj,), rows, threads, dtype, one_row)
        self.gate_up = _calls_for((mlp.gate_proj, mlp.up_proj), rows, threads, dtype, one_row)
        self.down = _calls_for((mlp.down_proj,), rows, threads, dtype, one_row)
        self.act = mlp.act_fn
        if self.complete():
            # Each call writes its own buffer, kept for the generation: no allocation per call, and no
            # two of them alias (the residual stream passes from the o buffer to the down buffer and
            # back). gate_up's halves and act(gate) * up are views and buffers made once.
            inter = mlp.gate_proj.out_features
            self.gate, self.up = self.gate_up.out[:, :inter], self.gate_up.out[:, inter:]
            # silu into a buffer (the out= form of the same kernel); another activation allocates
            self.mlp_in = torch.empty(rows, inter, dtype=dtype) if self.act is F.silu else None

    def complete(self) -> bool:
        return None not in (self.qkv, self.o, self.gate_up, self.down) and (self.parallel or self.ln2)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) for the layer's MLP input x (B, C), before the residual sum."""
        self.gate_up(x)
        if self.mlp_in is None:
            return self.down(self.act(self.gate) * self.up)
        torch._C._nn.silu(self.gate, out=self.mlp_in)
        return self.down(torch.mul(self.mlp_in, self.up, out=self.mlp_in))


def _norm(module: nn.Module) -> tuple | None:
    """(normalized_shape, weight, bias, eps) of a plain nn.LayerNorm, for torch.layer_norm; else None."""
    if type(module) is not nn.LayerNorm:
        return None
    return (module.normalized_shape, module.weight, module.bias, module.eps)


def _plain_modules(model: nn.Module) -> bool:
    """No module is in training mode or carries a hook, and no global module hook is set."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return not any(m.training or m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class LeanStep:
    """The planned step for a model, a row count and a thread count; see `LeanStep.build`."""

    def __init__(
        self, model: nn.Module, layers: list[_Layer], rows: int, threads: int, one_row: bool
    ) -> None:
        base = model.model
        config = model.config
        self.model, self.layers, self.rows, self.threads = model, layers, rows, threads
        self.embed = base.embed_tokens
        self.norm = _norm(base.norm)
        self.rotary_emb = base.rotary_emb
        self.H, self.Hkv, self.D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = self.D**-0.5
        self.gqa = self.H != self.Hkv
        self.dtype = base.embed_tokens.weight.dtype
        self.qkv_fn = decode_qkv_kernel(self.dtype)
        head = model.lm_head  # its own kernel call where one serves, else the module (torch's F.linear)
        self.head = _calls_for((head,), rows, threads, self.dtype, one_row)
        self.q = torch.empty(rows, 1, self.H, self.D, dtype=self.dtype)  # (B, 1, H, D), reused every layer
        self.q_heads = self.q.transpose(1, 2)  # (B, H, 1, D), as attention takes it
        # attention in torch's bits by the native kernel where it reproduces SDPA here (AVX2 CPUs), else SDPA
        self.attn = native_attention.plan(self.dtype, self.H, self.Hkv, self.D, self.scale)
        self.attn_out = (  # the native kernel's output; a check's rows gather torch's there too
            torch.empty(rows, self.H * self.D, dtype=self.dtype) if self.attn is not None or one_row else None
        )

    @classmethod
    def build(cls, model: nn.Module, cache: object, rows: int, *, check: bool = False) -> LeanStep | None:
        """The plan for `model` decoding `rows` rows over `cache`, or None where it does not apply (see the
        module docstring): then the modules run. With `check`, the plan is for `rows` consecutive tokens
        of the one sequence in `cache` instead (speculative decoding's check: `check_hidden`)."""
        from .model import Attention, DecoderLayer, StableLmModel

        config, base = model.config, getattr(model, "model", None)
        if type(base) is not StableLmModel or type(cache) is not StaticCache or not _plain_modules(model):
            return None
        if config.qk_layernorm or (config.attn_implementation or "sdpa") != "sdpa":
            return None
        dtype = base.embed_tokens.weight.dtype
        if type(base.embed_tokens) is not nn.Embedding or type(base.rotary_emb) is not RotaryEmbedding:
            return None
        if cache.keys[0].dtype != dtype or not cache.keys[0].is_cpu or decode_qkv_kernel(dtype) is None:
            return None
        if config.num_attention_heads != config.num_key_value_heads and not _SDPA_HAS_GQA:
            return None
        if _norm(base.norm) is None or base.embed_tokens.max_norm is not None:
            return None
        shape = (1 if check else rows, config.num_key_value_heads, cache.max_cache_len, config.head_dim)
        if any(t.shape != shape or not t.is_contiguous() for t in (*cache.keys, *cache.values)):
            return None
        threads = torch.get_num_threads()
        layers = []
        for layer in base.layers:
            if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention:
                return None
            if _norm(layer.input_layernorm) is None:
                return None
            planned = _Layer(layer, rows, threads, dtype, check)
            if not planned.complete():
                return None
            layers.append(planned)
        return cls(model, layers, rows, threads, check)

    def fits(self, cache: object, tokens: torch.Tensor) -> bool:
        """Whether this plan serves this step (checked every step: cheap)."""
        return (
            tokens.shape == (self.rows, 1)
            and torch.get_num_threads() == self.threads
            and not torch.is_grad_enabled()
            and type(cache) is StaticCache
            and cache.keys[0].dtype == self.dtype
            and not torch.compiler.is_compiling()
        )

    def __call__(
        self,
        cache: StaticCache,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """fp32 logits (B, V) after `tokens` (B, 1) at rotary positions (B, 1), written at the cache's next
        slot; `key_mask` (B, slots so far + 1) marks the keys each row may see, or is None for all."""
        return self.logits(self.hidden(cache, tokens, position_ids, key_mask))

    def check_hidden(self, cache: StaticCache, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """The final layer norm's output (T, C) after the T = `rows` tokens (T,) of the cache's one sequence
        at positions start.., their keys and values written at slots start.. (the caller advances the
        cache): each row what the one-token step computes for its token. The linear layers run one row's
        plan over all T rows (a kernel's sums per row do not depend on the row count; torch's product, where
        no kernel serves, row by row), the norms over all rows (row by row in torch's kernel), rotary, the
        cache writes and attention row by row, each query over the keys up to its own position."""
        T, H, Hkv, D = self.rows, self.H, self.Hkv, self.D
        if tokens.shape != (T,) or cache.keys[0].shape[0] != 1:
            raise ValueError(f"a check of {T} tokens of one sequence; got tokens {tuple(tokens.shape)}")
        slots = cache.max_cache_len
        if start + T > slots:
            raise ValueError(f"a check of {T} tokens from slot {start} needs {start + T} slots, not {slots}")
        x = F.embedding(tokens, self.embed.weight, self.embed.padding_idx)  # (T, C)
        cos, sin = self.rotary_emb(x[None], torch.arange(start, start + T)[None])  # (1, T, rot)
        rot = cos.shape[-1]
        cos, sin = cos.contiguous(), sin.contiguous()
        q, q_heads, fn = self.q, self.q_heads, self.qkv_fn
        es, cs = q.element_size(), cos.element_size()
        out = self.attn_out
        for i, layer in enumerate(self.layers):
            kc, vc = cache.keys[i], cache.values[i]
            h = torch.layer_norm(x, *layer.ln1)
            qkv = layer.qkv(h)  # (T, (H + 2 Hkv) D)
            sq = qkv.shape[1]
            for t in range(T):
                status = fn(
                    qkv.data_ptr() + t * sq * es, sq, cos.data_ptr() + t * rot * cs, sin.data_ptr() + t * rot * cs,
                    q.data_ptr() + t * H * D * es, kc.data_ptr(), vc.data_ptr(), slots, start + t, 1, H, Hkv, D,
                    rot,
                )  # fmt: skip
                if status:
                    raise ValueError(
                        f"bad arguments to stablelm's decode_qkv kernel (slot {start + t} of {slots})"
                    )
            for t in range(T):
                length, qt, ot = start + t + 1, q_heads[t : t + 1], out[t : t + 1]
                status = 4
                if self.attn is not None:
                    status = native_attention.run(self.attn, qt, kc, vc, length, None, ot, self.scale)
                    if status == 2:
                        raise ValueError(
                            f"bad arguments to stablelm's attention kernel ({length} of {slots} slots)"
                        )
                if status:  # no native kernel here, or a score not finite: torch's kernel decides
                    y = F.scaled_dot_product_attention(
                        qt, kc[:, :, :length], vc[:, :, :length], scale=self.scale, enable_gqa=self.gqa
                    )
                    ot.copy_(y.transpose(1, 2).reshape(1, H * D))
            x = layer.o(out).add_(x)  # x + attn(ln(x)) (a sum commutes)
            x = layer.mlp(h if layer.parallel else torch.layer_norm(x, *layer.ln2)).add_(x)
        return torch.layer_norm(x, *self.norm)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, V) of the final layer norm's output x (B, C)."""
        logits = self.model.lm_head(x) if self.head is None else self.head(x)
        return logits.to(torch.float32, copy=True)  # a copy: the head's buffer is reused next step

    def head_kernel(self) -> tuple[torch.Tensor, str, int] | None:
        """(weight, kernel kind, K block) where one native kernel computes the head, else None."""
        if type(self.head) is not _Kernel or len(self.head.tensors) != 2 or self.head.tensors[1] is not None:
            return None
        return self.head.tensors[0], self.head.kind, self.head.args.kb

    def hidden(
        self,
        cache: StaticCache,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The final layer norm's output (B, C) after `tokens`, the cache written (see `__call__`)."""
        B, H, Hkv, D = self.rows, self.H, self.Hkv, self.D
        slot = cache.get_seq_length()
        length, slots = slot + 1, cache.max_cache_len
        x = F.embedding(tokens, self.embed.weight, self.embed.padding_idx).view(B, -1)  # (B, C)
        cos, sin = self.rotary_emb(x, position_ids)  # (B, 1, rot)
        rot = cos.shape[-1]
        cos, sin = cos.contiguous(), sin.contiguous()
        allowed = None if key_mask is None else key_mask[:, None, None, :]
        native_mask = None  # the native attention kernel reads a bool mask's rows as bytes
        if key_mask is not None and key_mask.dtype == torch.bool and key_mask.stride(-1) == 1:
            native_mask = key_mask
        q, q_heads, fn = self.q, self.q_heads, self.qkv_fn
        cos_p, sin_p, q_p = cos.data_ptr(), sin.data_ptr(), q.data_ptr()
        for i, layer in enumerate(self.layers):
            kc, vc = cache.keys[i], cache.values[i]
            h = torch.layer_norm(x, *layer.ln1)
            qkv = layer.qkv(h)  # (B, (H + 2 Hkv) D)
            status = fn(
                qkv.data_ptr(), qkv.shape[1], cos_p, sin_p, q_p, kc.data_ptr(), vc.data_ptr(), slots, slot,
                B, H, Hkv, D, rot,
            )  # fmt: skip
            if status:
                raise ValueError(f"bad arguments to stablelm's decode_qkv kernel (slot {slot} of {slots})")
            y = None
            if self.attn is not None and (key_mask is None or native_mask is not None):
                status = native_attention.run(
                    self.attn, q_heads, kc, vc, length, native_mask, self.attn_out, self.scale
                )
                if status == 2:
                    raise ValueError(
                        f"bad arguments to stablelm's attention kernel ({length} of {slots} slots)"
                    )
                y = self.attn_out if status == 0 else None  # 4: a score not finite: torch's kernel decides
            if y is None:
                y = F.scaled_dot_product_attention(
                    q_heads, kc[:, :, :length], vc[:, :, :length], attn_mask=allowed, scale=self.scale,
                    enable_gqa=self.gqa,
                )  # fmt: skip
                y = y.transpose(1, 2).reshape(B, H * D)
            x = layer.o(y if B == 1 else y.contiguous()).add_(x)  # x + attn(ln(x)) (a sum commutes)
            x = layer.mlp(h if layer.parallel else torch.layer_norm(x, *layer.ln2)).add_(x)
        return torch.layer_norm(x, *self.norm)
