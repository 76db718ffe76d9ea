"""The StableLM decoder: attention, MLP, decoder layer and StableLmModel. Modules compute; nothing else.

Shapes: B batch, T new positions, S key positions, C hidden_size, H query heads, Hkv key/value heads,
D head_dim, V vocab_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .activations import ACT_FNS
from .attention import AttentionMask, attention, build_mask, packed_mask, packed_segments
from .cache import Cache, DynamicCache, check_cache
from .config import StableLmConfig
from .layers import Linear, fused_linear
from .outputs import BaseModelOutput
from .pretrained import StableLmPreTrainedModel
from .rope import RotaryEmbedding, apply_rotary


class MLP(nn.Module):
    """SwiGLU (or another gated activation): down(act(gate(x)) * up(x))."""

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT_FNS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_linear(x, (self.gate_proj, self.up_proj))  # one kernel call, where one serves
        if gate_up is not None:
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act_fn(gate) * up)


class PerHeadLayerNorm(nn.Module):
    """A bias-free LayerNorm per head (StableLM 2 12B's q/k norm), computed for all heads at once.

    The weights stay one module per head so the parameter names are the checkpoint's
    (`norms.{h}.weight`).
    """

    def __init__(self, head_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.norms = nn.ModuleList([nn.LayerNorm(head_dim, eps=eps, bias=False) for _ in range(num_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, T, D)
        weight = torch.stack([norm.weight for norm in self.norms])[:, None, :]  # (H, 1, D)
        # Normalise and scale in fp32, rounding once, as the fused per-head kernel of the reference does.
        y = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * weight.float()
        return y.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads, partial rotary embedding and optional q/k LayerNorm."""

    def __init__(self, config: StableLmConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        C, bias = config.hidden_size, config.use_qkv_bias
        self.q_proj = Linear(C, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(C, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(C, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, C, bias=False)
        if config.qk_layernorm:
            self.q_layernorm = PerHeadLayerNorm(self.head_dim, self.num_heads, config.layer_norm_eps)
            self.k_layernorm = PerHeadLayerNorm(self.head_dim, self.num_kv_heads, config.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: Cache | None,
        cache_position: torch.Tensor,
        weights: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = rope
        qkv = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))  # one kernel call, where one serves
        native = getattr(self.q_proj, "use_kernels", False)  # a peft wrapper has none: torch's
        if qkv is not None and not self.config.qk_layernorm:
            # Rotate the query and key heads in one pass (the same arithmetic).
            qkv = qkv.view(B, T, H + 2 * Hkv, D)
            qk = apply_rotary(qkv[:, :, : H + Hkv], cos, sin, heads_dim=2, native=native)
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H|Hkv, T, D)
            v = qkv[:, :, H + Hkv :].transpose(1, 2)  # (B, Hkv, T, D)
        else:
            if qkv is not None:
                q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = k.reshape(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = v.reshape(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            if self.config.qk_layernorm:
                q, k = self.q_layernorm(q), self.k_layernorm(k)
            q, k = apply_rotary(q, cos, sin, native=native), apply_rotary(k, cos, sin, native=native)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)  # (B, Hkv, S, D)
        y = attention(
            q,
            k,
            v,
            mask,
            implementation=self.config.attn_implementation or "sdpa",
            scale=self.head_dim**-0.5,
            dropout=self.config.attention_dropout if self.training else 0.0,
            weights=weights,
        )  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: StableLmConfig, layer_idx: int) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not config.use_parallel_residual:
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: Cache | None,
        cache_position: torch.Tensor,
        weights: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One layer; a `weights` list receives the attention probabilities (an out-list, so that the
        layer returns one tensor to all its callers: the model, the decode step, the server's forward)."""
        h = self.input_layernorm(x)
        attn_out = self.self_attn(h, rope, mask, cache, cache_position, weights)
        if self.use_parallel_residual:  # x + attn(ln(x)) + mlp(ln(x))
            return x + attn_out + self.dropout(self.mlp(h))
        x = x + attn_out
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class StableLmModel(StableLmPreTrainedModel):
    """The decoder stack: embeddings, layers and final LayerNorm; returns the last hidden states."""

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict = {"use_reentrant": False}  # for torch.utils.checkpoint.checkpoint
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BaseModelOutput | tuple:
        """Run the decoder.

        Args:
            input_ids: Token ids (B, T). Give exactly one of `input_ids` and `inputs_embeds`.
            attention_mask: (B, past + T), 1 for real tokens and 0 for padding (left or right).
            position_ids: (B, T) rotary positions; by default past, past + 1, ... Without a cache and an
                `attention_mask`, positions that restart inside a row mark packed documents, which then
                attend only within themselves (as in the reference).
            cache: A `DynamicCache` or `StaticCache` to read and extend (`past_key_values` is the
                reference's older name of it).
            inputs_embeds: (B, T, C) embeddings in place of `input_ids`.
            use_cache: Create a `DynamicCache` when none is passed (default: `config.use_cache`).
            output_hidden_states: Also return the input of every layer and the final output (default:
                `config.output_hidden_states`).
            output_attentions: Also return every layer's attention probabilities (B, H, T, S), computed on
                the eager path whatever `attn_implementation` is (default: `config.output_attentions`).
            return_dict: False returns `to_tuple()` of the output (default: `config.return_dict`).
            cache_position: Accepted and ignored, as the reference does: the positions written are the
                cache's length onwards.
            token_type_ids: Accepted and ignored (tokenizer output passed straight in), as the reference.

        Returns:
            BaseModelOutput with `last_hidden_state` (B, T, C), `cache`, `hidden_states` and `attentions`.
        """
        past_key_values = pick_cache(cache, past_key_values)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must be 2-D (batch, sequence), got shape {tuple(input_ids.shape)}."
                )
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache, past_key_values = False, None  # recomputation would write the cache twice
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        slots = cache.key_length(T) if cache is not None else T
        if not torch.compiler.is_compiling():
            # Eager: attend over the written positions only (attention slices a static cache's keys), so a
            # static cache gives bit for bit the logits of a dynamic one. Compiled: keep every slot, for
            # fixed shapes.
            slots = past + T
        device = inputs_embeds.device
        cache_position = torch.arange(past, past + T, device=device)
        segments = None
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(B, T)
        elif attention_mask is None and cache is None:
            # Training on packed documents: positions restarting inside a row keep them apart (the
            # reference's padding-free packing, without a cache or a padding mask).
            position_ids = position_ids.expand(B, T)
            segments = packed_segments(position_ids)
        if segments is not None:
            mask = packed_mask(segments)
        else:
            mask = build_mask(attention_mask, past=past, new=T, slots=slots, device=device)
        rope = self.rotary_emb(inputs_embeds, position_ids)

        x = inputs_embeds
        hidden_states: list[torch.Tensor] = []
        weights: list[torch.Tensor] | None = [] if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, cache, cache_position, weights, **self.checkpoint_kwargs)
            else:
                x = layer(x, rope, mask, cache, cache_position, weights)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        out = BaseModelOutput(
            last_hidden_state=x,
            cache=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(weights) if output_attentions else None,
        )
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


def pick_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache passed as `cache` (5.24's name) or `past_key_values` (the older one), not both."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache once: as cache=... or as past_key_values=..., not both.")
    check_cache(cache, "cache")
    check_cache(past_key_values)
    return cache if cache is not None else past_key_values
