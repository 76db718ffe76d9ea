"""The model's forward as the server runs it: each row's numbers are the same whatever else is batched.

A request's tokens and logprobs must not depend on the other requests decoded beside it. So every
operation a row goes through computes that row the same way for any batch:

- linear layers: one kernel per weight for every number of rows, chosen once, whose sums run in a
  fixed order per (row, output) (`row_plan`): stablelm's `f32` kernel in float32, and in half precision
  the kernel that reproduces torch's result for one row (else the `bf16_dot`/`f16_dot` one). torch's
  own kernels (and stablelm's `Linear`, which picks a kernel per class of row counts) may sum in
  another order for another number of rows; weight-only quantized layers (`--quantize`) on their
  kernels of several rows, which sum each row alike for any count and position, a lone row included
  (`QuantizedLinear.batched`); where no such kernel serves (another device, dtype or
  a wrapped layer), each row is its own call (`_RowLinear`);
- attention: per row, over that row's own cache (`RowCache`), of its own length;
- activations: per row (elementwise kernels take vectorized or scalar paths by where an element lies
  in the whole tensor); norms and embeddings are per row already, rotary products are exact
  elementwise operations, and the cos/sin tables are computed once for every position;
- a prompt is prefilled alone, in chunks whose boundaries depend only on its own length (the model's
  own layers serve there: that computation depends on nothing but the request).

Sampling (per row, its own generator) is the engine's (`stablelm.serve.engine`).
"""

from __future__ import annotations

import torch

from ..attention import AttentionMask, attention, build_mask
from ..cache import Cache
from ..kernels import call, kernel
from ..kernels import linear as kernel_plans
from ..layers import Linear
from ..quantization.linear import KERNEL_MAX_ROWS, QuantizedLinear
from ..quantization.linear import check_status as check_quantized
from ..rope import apply_rotary
from ..rope_parameters import rope_original_length
from .planned import PlannedDecode

# Kernels whose arithmetic for a row does not depend on the other rows of the call (nor on the thread
# count), and the most rows one call of each takes.
_ROW_INVARIANT = {"f32": None, "bf16_dot": None, "f16_dot": None, "bf16_dpbf16": None, "bf16_amx": 16}
_PLANS: dict[tuple, tuple[str, int] | None] = {}


def row_plan(weight: torch.Tensor, has_bias: bool) -> tuple[str, int] | None:
    """The kernel (kind, block) that computes every row of `x @ weight.T` in one fixed order for any
    number of rows, or None where none serves (not on the CPU, another dtype, no kernels here).

    Half precision: the kernel that gives torch's bits for one row, as `stablelm.kernels.linear` finds
    it (so a lone request computes as `generate` decodes), else ATen's dot-product order.
    """
    if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return None
    dtype, (n, k) = weight.dtype, weight.shape
    key = (dtype, k, n, has_bias)
    if key not in _PLANS:
        found: tuple[str, int] | None = None
        if dtype == torch.float32:
            found = ("f32", 0)
        elif dtype in (torch.bfloat16, torch.float16):
            outputs = min(n, kernel_plans.PROBE_MAX_OUTPUTS)
            found = kernel_plans._half_plan(dtype, k, outputs, has_bias, 1)
            if found is None or found[0] not in _ROW_INVARIANT:
                found = ("bf16_dot" if dtype == torch.bfloat16 else "f16_dot", 0)
        if found is not None and kernel(found[0]) is None:
            found = None
        _PLANS[key] = found
    return _PLANS[key]


class _RowLinear:
    """Linear layers that read the same input (q/k/v, gate/up, or one), for any number of rows (B, K) ->
    (B, sum N), each row summed in the same order whatever B is."""

    def __init__(self, modules: tuple[torch.nn.Module, ...]) -> None:
        self.modules = modules
        self.calls: list[tuple[str, int, list[torch.Tensor], list[torch.Tensor | None]]] | None = []
        self.quantized = all(_quantized_on_kernels(m) for m in modules)
        for module in modules if not self.quantized else ():
            plain = type(module) is Linear or type(module) is torch.nn.Linear
            hooked = bool(
                getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None)
            )
            bias = getattr(module, "bias", None)
            found = row_plan(module.weight, bias is not None) if plain and not hooked else None
            if found is None or (bias is not None and bias.dtype != module.weight.dtype):
                self.calls = None  # one call per row, through the modules themselves
                break
            kind, block = found
            last = self.calls[-1] if self.calls else None
            if (
                last is not None
                and last[:2] == found
                and len(last[2]) < 3
                and (last[3][0] is None) == (bias is None)
            ):
                last[2].append(module.weight)
                last[3].append(bias)
            else:
                self.calls.append((kind, block, [module.weight], [bias]))
        # the kernel functions, looked up once (each lookup reads the environment)
        self.fns = None if self.calls is None else [kernel(kind) for kind, *_ in self.calls]
        self.widths = [m.out_features for m in modules] if self.quantized else None
        self._planned: dict[tuple, list[tuple]] = {}  # quantized: (rows, dtype, threads) -> the calls
        self._dtype_ok: dict[torch.dtype, bool] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized and self._takes(x.dtype):
            return self._quantized(x.contiguous())
        if self.calls is None or self.quantized:
            rows = [torch.cat([m(x[r : r + 1]) for m in self.modules], dim=-1) for r in range(x.shape[0])]
            return torch.cat(rows)
        x = x.contiguous()
        outs = []
        for fn, (kind, block, weights, biases) in zip(self.fns, self.calls, strict=True):
            most = _ROW_INVARIANT[kind] or x.shape[0]
            parts = [
                call(fn, kind, x[r : r + most], weights, biases, block) for r in range(0, x.shape[0], most)
            ]
            outs.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _takes(self, dtype: torch.dtype) -> bool:
        """`_quantized_dtype_ok` for these layers, found once per dtype (it reads the environment)."""
        found = self._dtype_ok.get(dtype)
        if found is None:
            found = self._dtype_ok[dtype] = _quantized_dtype_ok(self.modules, dtype)
        return found

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized layers on their kernels of several rows, KERNEL_MAX_ROWS rows a call, a lone row too
        (`QuantizedLinear.batched`): every row summed alike whatever the call holds."""
        if x.shape[0] <= KERNEL_MAX_ROWS:
            return self._quantized_planned(x)
        outs = []
        for module in self.modules:
            parts = []
            for r in range(0, x.shape[0], KERNEL_MAX_ROWS):
                y = module.batched(x[r : r + KERNEL_MAX_ROWS])
                if y is None:
                    raise RuntimeError("stablelm's quantized kernels refused rows they were planned for")
                parts.append(y)
            outs.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _quantized_planned(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, K) contiguous, 1 <= B <= KERNEL_MAX_ROWS: each layer's `batched` kernel call (the same
        call, so the same bits), its arguments made once per row count, dtype and thread count (each
        `kernel_call` reads the environment and the CPU's flags), the output's address put in per call."""
        B = x.shape[0]
        key = (B, x.dtype, torch.get_num_threads())
        calls = self._planned.get(key)
        if calls is None:
            calls = self._planned[key] = [_batched_call(m, B, x.dtype) for m in self.modules]
        if not all(m.use_kernels for m in self.modules):
            raise RuntimeError("stablelm's quantized kernels refused rows they were planned for")
        out = torch.empty(B, sum(self.widths), dtype=x.dtype)
        one = len(self.modules) == 1
        targets = [out] if one else out.split(self.widths, dim=1) if B == 1 else None
        if targets is None:
            targets = [torch.empty(B, n, dtype=x.dtype) for n in self.widths]
        xp = x.data_ptr()
        for (fn, head, tail), target, m in zip(calls, targets, self.modules, strict=True):
            status = fn(xp, *head, target.data_ptr(), *tail)
            if status:
                check_quantized(status, m.quant_type, B, m.in_features)
        if B > 1 and not one:
            torch.cat(targets, dim=1, out=out)
        return out


_Y_SENTINEL = 0x5EED_0F_0A7  # stands for the output's address in a planned call's arguments


def _batched_call(module: QuantizedLinear, rows: int, dtype: torch.dtype) -> tuple:
    """(fn, arguments before the output's address, arguments after it) of `module.batched`'s kernel call
    for `rows` rows of `dtype` (the output is the call's fifth argument, `kernel_call`'s `y`)."""
    fn, args = module.kernel_call(rows, module.in_features, _Y_SENTINEL, dtype, batch=True)
    at = args.index(_Y_SENTINEL)
    assert at == 4, "QuantizedLinear.kernel_call's arguments moved"
    return fn, args[:at], args[at + 1 :]


def _quantized_on_kernels(module: torch.nn.Module) -> bool:
    """A weight-only quantized layer (no hooks) whose calls of several rows run its native kernels."""
    return (
        type(module) is QuantizedLinear
        and module.use_kernels
        and module.weight.is_cpu
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


def _quantized_dtype_ok(modules: tuple[torch.nn.Module, ...], dtype: torch.dtype) -> bool:
    """Whether the quantized kernels take rows of `dtype` for these layers (else the layers dequantize,
    and each row is its own call)."""
    return all(m.kernels_take(dtype) for m in modules)


class RowCache:
    """One sequence's keys and values for every layer, (1, Hkv, capacity, D) each, grown as it fills.

    The capacity grows with the sequence's own length only (doubling, at most `limit` positions), so the
    tensors a row attends over are the same whatever else runs.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, limit: int
    ) -> None:
        self.shape = (1, kv_heads, 0, head_dim)
        self.dtype, self.device, self.limit = dtype, device, limit
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0
        self.capacity = 0

    def reserve(self, new: int) -> None:
        """Make room for `new` more positions."""
        need = self.length + new
        if need <= self.capacity:
            return
        capacity = max(need, min(self.limit, max(2 * self.capacity, 64)))
        _, h, _, d = self.shape
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = torch.empty(1, h, capacity, d, dtype=self.dtype, device=self.device)
                if old is not None and self.length:
                    grown[:, :, : self.length] = old[:, :, : self.length]
                store[i] = grown
        self.capacity = capacity

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (1, Hkv, T, D) at the next T positions (reserved); return the layer's keys and values so far."""
        end = self.length + key.shape[2]
        k, v = self.keys[layer], self.values[layer]
        k[:, :, self.length : end] = key
        v[:, :, self.length : end] = value
        return k[:, :, :end], v[:, :, :end]

    def advance(self, new: int) -> None:
        self.length += new

    def copy(self) -> RowCache:
        """An independent copy (the prompt's cache, for each of a request's `n` choices)."""
        other = RowCache(len(self.keys), self.shape[1], self.shape[3], self.dtype, self.device, self.limit)
        other.keys = [None if t is None else t.clone() for t in self.keys]
        other.values = [None if t is None else t.clone() for t in self.values]
        other.length, other.capacity = self.length, self.capacity
        return other

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)


class _PrefillCache(Cache):
    """`Cache` over one `RowCache`, for the model's own layers during a prefill chunk."""

    def __init__(self, row: RowCache) -> None:
        self.row = row

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.row.write(layer_idx, key, value)


class RowForward:
    """A causal LM's forward for the server: prefill chunks of one sequence, decode steps of many.

    Args:
        model: A StableLmForCausalLM in eval mode (run under `torch.inference_mode()`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.base = model.model
        config = model.config
        self.config = config
        # the model's dtype: the embedding's (a quantized head's weight holds int8 or packed int4)
        param = model.model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        self.context = config.max_position_embeddings
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.implementation = config.attn_implementation or "sdpa"
        self.layers = []
        for layer in self.base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    _RowLinear((attn.q_proj, attn.k_proj, attn.v_proj)),
                    _RowLinear((attn.o_proj,)),
                    _RowLinear((mlp.gate_proj, mlp.up_proj)),
                    _RowLinear((mlp.down_proj,)),
                )
            )
        self.head = _RowLinear((model.lm_head,))
        self._tables = self._rope_tables()
        # the decode step planned once (`stablelm.serve.planned`), or None: the modules run
        self.planned = PlannedDecode.build(self)

    @property
    def invariant_kernels(self) -> bool:
        """Whether every linear layer runs on a batched kernel (else some run a call per row)."""
        groups = [g for layer in self.layers for g in layer] + [self.head]
        return all(
            _quantized_dtype_ok(g.modules, self.dtype) if g.quantized else g.calls is not None for g in groups
        )

    def _rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin (context, rotary_dim) in the model's dtype for every position, computed as the rotary
        module computes them; longrope has a second pair for sequences past its original length."""
        rotary = self.base.rotary_emb
        positions = torch.arange(self.context, device=self.device)[None]
        tables = {}
        sources = {"short": rotary.inv_freq}
        if self.config.rope_type == "longrope":
            sources["long"] = rotary.long_inv_freq
        for name, inv_freq in sources.items():
            freqs = positions[..., None].float() * inv_freq.to(device=self.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * rotary.attention_scaling).to(self.dtype)[0]
            sin = (emb.sin() * rotary.attention_scaling).to(self.dtype)[0]
            tables[name] = (cos, sin)
        return tables

    def _table(self, sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin table a call over a sequence this long uses (the rotary module picks longrope's
        factors by the longest position of the call)."""
        if "long" in self._tables:
            if sequence_length > rope_original_length(self.config):
                return self._tables["long"]
        return self._tables["short"]

    def new_cache(self, limit: int) -> RowCache:
        """An empty cache for a sequence of at most `limit` positions."""
        return RowCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device, limit)

    def prefill(self, cache: RowCache, ids: list[int], *, prompt_length: int) -> torch.Tensor:
        """Run `ids` (a chunk of one prompt of `prompt_length` tokens) after what `cache` holds; return the
        final hidden state of the chunk's last position (1, C), before the final norm."""
        past, new = cache.length, len(ids)
        x = self.base.embed_tokens(torch.tensor([ids], device=self.device))
        cos, sin = self._table(prompt_length)  # the model prefills a prompt in one call: its length decides
        rope = (cos[past : past + new][None], sin[past : past + new][None])
        mask = build_mask(None, past=past, new=new, slots=past + new, device=self.device)
        cache.reserve(new)
        adapter = _PrefillCache(cache)
        cache_position = torch.arange(past, past + new, device=self.device)
        for layer in self.base.layers:
            x = layer(x, rope, mask, adapter, cache_position)
        cache.advance(new)
        return x[:, -1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 next-token logits (B, V) from final hidden states (B, C) before the norm."""
        return self.head(self.base.norm(hidden)).float()

    def decode(self, caches: list[RowCache], tokens: list[int]) -> torch.Tensor:
        """One step for many rows: row r feeds `tokens[r]` after what `caches[r]` holds; fp32 logits (B, V)."""
        if self.planned is not None and not torch.is_grad_enabled():
            return self.planned(caches, tokens)
        return self._decode_modules(caches, tokens)

    def _decode_modules(self, caches: list[RowCache], tokens: list[int]) -> torch.Tensor:
        """`decode` through the model's modules (what `planned` reproduces, and runs where it does not)."""
        B = len(caches)
        x = self.base.embed_tokens(torch.tensor(tokens, device=self.device)[:, None])  # (B, 1, C)
        cos, sin = [], []
        for cache in caches:
            table_cos, table_sin = self._table(cache.length + 1)
            cos.append(table_cos[cache.length])
            sin.append(table_sin[cache.length])
            cache.reserve(1)
        rope = (torch.stack(cos)[:, None], torch.stack(sin)[:, None])  # (B, 1, rotary_dim)
        for i, layer in enumerate(self.base.layers):
            qkv, o_proj, gate_up, down = self.layers[i]
            h = layer.input_layernorm(x)
            attn = self._attention(i, layer.self_attn, qkv, o_proj, h, rope, caches)
            if layer.use_parallel_residual:
                x = x + attn + self._mlp(layer.mlp, gate_up, down, h)
            else:
                x = x + attn
                x = x + self._mlp(layer.mlp, gate_up, down, layer.post_attention_layernorm(x))
        for cache in caches:
            cache.advance(1)
        return self.logits(x.view(B, -1))

    def _attention(self, i, module, qkv_proj, o_proj, h, rope, caches) -> torch.Tensor:  # noqa: ANN001
        B = h.shape[0]
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = rope
        native = getattr(module.q_proj, "use_kernels", False)
        qkv = qkv_proj(h.view(B, -1))
        if not self.config.qk_layernorm:
            qkv = qkv.view(B, 1, H + 2 * Hkv, D)
            qk = apply_rotary(qkv[:, :, : H + Hkv], cos, sin, heads_dim=2, native=native)
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = qkv[:, :, H + Hkv :].transpose(1, 2)
        else:
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = q.reshape(B, 1, H, D).transpose(1, 2)
            k = k.reshape(B, 1, Hkv, D).transpose(1, 2)
            v = v.reshape(B, 1, Hkv, D).transpose(1, 2)
            q, k = module.q_layernorm(q), module.k_layernorm(k)
            q, k = apply_rotary(q, cos, sin, native=native), apply_rotary(k, cos, sin, native=native)
        outs = []
        for r, cache in enumerate(caches):
            keys, values = cache.write(i, k[r : r + 1], v[r : r + 1])
            mask = AttentionMask(allowed=None, is_causal=False, key_length=keys.shape[2])
            outs.append(
                attention(q[r : r + 1], keys, values, mask, implementation=self.implementation, scale=D**-0.5)
            )
        y = torch.cat(outs).reshape(B, H * D)
        return o_proj(y)[:, None]

    @staticmethod
    def _mlp(module, gate_up, down, x) -> torch.Tensor:  # noqa: ANN001
        B = x.shape[0]
        gate, up = gate_up(x.view(B, -1)).chunk(2, dim=-1)
        act = torch.cat([module.act_fn(gate[r : r + 1]) for r in range(B)])
        return down(act * up)[:, None]
