"""The StableLM decoder: attention, MLP, decoder layer and StableLmModel. Modules compute; nothing else.

Shapes: B batch, T new positions, S key positions, C hidden_size, H query heads, Hkv key/value heads,
D head_dim, V vocab_size.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .activations import ACT_FNS
from .attention import AttentionMask, attention, build_mask, check_flash_attention_available
from .cache import Cache, DynamicCache
from .config import StableLmConfig
from .layers import Linear, fused_linear
from .outputs import BaseModelOutput
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
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn_out = self.self_attn(h, rope, mask, cache, cache_position)
        if self.use_parallel_residual:  # x + attn(ln(x)) + mlp(ln(x))
            return x + attn_out + self.dropout(self.mlp(h))
        x = x + attn_out
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class StableLmPreTrainedModel(nn.Module):
    """Shared behaviour of the four model classes: initialisation, sizes, checkpointing, loading."""

    config_class = StableLmConfig
    base_model_prefix = "model"

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__()
        if not isinstance(config, StableLmConfig):
            raise TypeError(
                f"Expected a StableLmConfig, got {type(config).__name__}; build one with StableLmConfig(...)."
            )
        if config.attn_implementation == "flash_attention_2":
            check_flash_attention_available()
        self.config = config

    def post_init(self, *new_modules: nn.Module) -> None:
        """Initialise weights as the reference does (all of them, or only `new_modules`), then tie."""
        for module in new_modules or (self,):
            module.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when `tie_word_embeddings` is set."""
        head = self.get_output_embeddings()
        if head is not None and self.config.tie_word_embeddings:
            head.weight = self.get_input_embeddings().weight

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self, self.base_model_prefix, self).embed_tokens

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        getattr(self, self.base_model_prefix, self).embed_tokens = embedding

    def get_output_embeddings(self) -> nn.Linear | None:
        return None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, *, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        excluded = (
            {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
            if exclude_embeddings
            else set()
        )
        unique = {id(p): p for p in self.parameters() if id(p) not in excluded}
        return sum(p.numel() for p in unique.values() if p.requires_grad or not only_trainable)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in the backward pass instead of storing its activations."""
        self._base_model().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._base_model().gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._base_model().gradient_checkpointing

    def _base_model(self) -> StableLmModel:
        return getattr(self, self.base_model_prefix, self)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        config: StableLmConfig | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | int | None = None,
        device_map: torch.device | str | int | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        trust_remote_code: bool | None = None,
        optimize: bool | None = None,
        **config_overrides: object,
    ) -> StableLmPreTrainedModel:
        """Load a model from a checkpoint folder or a Hugging Face hub repo id, in eval mode.

        Reads `config.json`, `generation_config.json` (as the dict `model.generation_config`) and the weights:
        `model.safetensors`, sharded safetensors with their index, or legacy `pytorch_model*.bin` through
        `torch.load(weights_only=True)`. Each tensor is read once, straight into `dtype` on `device`. A
        classification model loads a causal LM's backbone and initialises its head, with one warning.

        Args:
            name_or_path: A local folder, or a hub repo id (only the needed files are fetched, into the hub cache).
            config: Use this config instead of the checkpoint's `config.json`.
            dtype: "auto" or None (the checkpoint's `torch_dtype`, as the reference), a torch dtype or its name.
            torch_dtype: The reference's older spelling of `dtype`.
            device: Where the weights go: None (CPU), "auto" (CUDA when available), "cuda:0", ...
            device_map: The reference's spelling of `device`; only a single device is supported.
            attn_implementation: "sdpa" (default), "eager" or "flash_attention_2".
            revision, cache_dir, local_files_only, token: For the hub (`HF_HUB_OFFLINE=1` is honoured).
            trust_remote_code: Accepted for the reference's snippets and ignored: no file's code ever runs.
            optimize: Run inference on stablelm's kernels where they serve (the default; bfloat16
                bit-identical to torch, float32 within rounding; see `stablelm.fast`). False keeps
                torch's kernels; None follows `STABLELM_OPTIMIZE` (0 turns them off).
            **config_overrides: Config fields to change, such as `num_labels=3`.

        Raises:
            FileNotFoundError: The model is neither a local folder nor on the hub, or files are missing.
            stablelm.checkpoint.CheckpointError: A file is damaged or does not fit the config; the message
                names the file and what to do.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(
            cls,
            name_or_path,
            config=config,
            dtype=dtype,
            torch_dtype=torch_dtype,
            device=device,
            device_map=device_map,
            attn_implementation=attn_implementation,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            trust_remote_code=trust_remote_code,
            optimize=optimize,
            **config_overrides,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
    ) -> None:
        """Write `config.json`, `generation_config.json` (when set) and the weights to `save_directory`.

        Safetensors (or `pytorch_model.bin` with `safe_serialization=False`) in shards of at most
        `max_shard_size` ("5GB", "500MB", "2GiB" or bytes) with an index when there are several. A tied LM
        head is left out, as the reference does. Each file is written under a temporary name and renamed.
        """
        from .checkpoint import save_pretrained

        save_pretrained(
            self, save_directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization
        )

    # ---- vocabulary size ---------------------------------------------------------------------------------
    def set_output_embeddings(self, head: nn.Linear) -> None:
        """Replace the LM head (only models that have one, such as `StableLmForCausalLM`)."""
        old = self.get_output_embeddings()
        if old is None:
            raise AttributeError(f"{type(self).__name__} has no output embeddings (LM head) to replace.")
        name = next(name for name, module in self.named_children() if module is old)
        setattr(self, name, head)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        *,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Give the input embedding (and the LM head, if any) `new_num_tokens` rows, as the reference does.

        Rows of the kept ids are unchanged, so the logits of old ids stay the same. New rows are drawn
        around the mean of the old ones (`mean_resizing=True`, the reference's default: a new token's logit
        starts at the mean of the old tokens' logits), or from N(0, initializer_range) otherwise. Shrinking
        drops the last rows. A tied LM head stays tied, and `config.vocab_size` follows, so the model
        saves and reloads at its new size.

        Args:
            new_num_tokens: The new vocabulary size, usually `len(tokenizer)` after adding tokens. None keeps
                the size (and only pads it, with `pad_to_multiple_of`).
            pad_to_multiple_of: Round the size up to a multiple of this (64 or 128 suit GPU kernels).
            mean_resizing: Initialise new rows from the old rows' mean and covariance (else from the
                config's normal initialisation).

        Returns:
            The input embedding module.
        """
        from .resize import resize_token_embeddings

        return resize_token_embeddings(
            self, new_num_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=mean_resizing
        )


class StableLmModel(StableLmPreTrainedModel):
    """The decoder stack: embeddings, layers and final LayerNorm; returns the last hidden states."""

    def __init__(self, config: StableLmConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        """Run the decoder.

        Args:
            input_ids: Token ids (B, T). Give exactly one of `input_ids` and `inputs_embeds`.
            attention_mask: (B, past + T), 1 for real tokens and 0 for padding (left or right).
            position_ids: (B, T) rotary positions; by default past, past + 1, ...
            past_key_values: A `DynamicCache` or `StaticCache` to read and extend.
            inputs_embeds: (B, T, C) embeddings in place of `input_ids`.
            use_cache: Create a `DynamicCache` when none is passed (default: `config.use_cache`).
            output_hidden_states: Also return the input of every layer and the final output.

        Returns:
            BaseModelOutput with `last_hidden_state` (B, T, C), `past_key_values` and `hidden_states`.
        """
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
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(B, T)
        mask = build_mask(attention_mask, past=past, new=T, slots=slots, device=device)
        rope = self.rotary_emb(position_ids, inputs_embeds.dtype)

        x = inputs_embeds
        hidden_states: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, cache, cache_position, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache, cache_position)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return BaseModelOutput(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )
