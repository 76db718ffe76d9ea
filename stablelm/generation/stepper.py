"""The steps of a generation over the model: the prompt's forward, then one token at a time over a KV
cache (static or dynamic, the caller's when given), or the whole sequence again without one."""

from __future__ import annotations

from typing import Any

import torch

from ..cache import Cache, DynamicCache, StaticCache
from ..decode import DecodeStep
from .plan import Plan

COMPILE_LENGTH_BUCKET = 256  # compiled static caches are sized in these steps
CACHE_GROW_MIN = 256  # a static cache past the model's context grows by at least this many slots


def cache_length(config: Any, plan: Plan, prompt_length: int, length: int | None = None) -> int:
    """Slots of a static cache: the prompt plus every new token, but past the model's context
    (`max_position_embeddings`) only a first part: a generation that long, when it goes on, grows the
    cache as it goes (`length`, the current size, asks for the next size: about 1.5 times as many)."""
    needed = prompt_length + plan.max_new_tokens
    if length is None:
        context = config.max_position_embeddings
        slots = min(needed, context if prompt_length < context else prompt_length + CACHE_GROW_MIN)
    else:
        slots = min(needed, length + max(CACHE_GROW_MIN, length // 2))
    if plan.compile:  # round up so that nearby lengths share one compiled graph
        slots = -(-slots // COMPILE_LENGTH_BUCKET) * COMPILE_LENGTH_BUCKET
    return slots


def make_cache(model: Any, plan: Plan, batch: int, prompt_length: int) -> Cache:
    """A new cache of the plan's kind for `batch` rows of `prompt_length` (static: `cache_length` slots)."""
    if plan.cache_implementation == "dynamic":
        return DynamicCache()
    return StaticCache.for_model(
        model.config,
        batch_size=batch,
        max_cache_len=cache_length(model.config, plan, prompt_length),
        dtype=getattr(model, "kv_cache_dtype", None) or model.dtype,
        device=model.device,
        zeroed=plan.compile,  # eager decoding never reads an unwritten slot
    )


class Stepper:
    """Owns the cache and the positions; turns each step's tokens into the next fp32 logits (B, V).

    With a static cache (and an attention backend that can take a mask over its slots) the steps run
    through `DecodeStep`, whose inputs are preallocated tensors updated in place, so nothing is allocated
    per token and the step can be compiled. Otherwise each step is a plain forward over a growing mask.
    The static cache holds the whole generation when it fits the model's context, else grows when full
    (see `cache_length`). `cache` continues from a cache holding the first positions of the prompt (the
    caller's `past_key_values`); without the cache (`plan.use_cache` False) every step recomputes the
    whole sequence, as the reference does.

    Args:
        mask: (B, L) 1 for real tokens over every position so far, cached ones included.
        positions: (B, L) the rotary positions of those tokens (the caller's `position_ids`); by default
            counted over the real tokens (padding at 0), as the reference's. The new tokens continue from
            each row's last one.
    """

    def __init__(
        self,
        model: Any,
        plan: Plan,
        mask: torch.Tensor,
        cache: Cache | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        B, L = mask.shape
        self.model, self.mask, self.plan, self.prompt_length = model, mask, plan, L
        self.padded = not bool(mask.all())
        self.past = 0 if cache is None else cache.get_seq_length()
        self.ids: torch.Tensor | None = None  # the whole sequence, when recomputing without a cache
        self.cache = (
            None if not plan.use_cache else cache if cache is not None else make_cache(model, plan, B, L)
        )
        if cache is not None and isinstance(self.cache, StaticCache):  # the caller's: room for the prompt
            self.cache.grow(cache_length(model.config, plan, L))
        if positions is None:
            # Padding at position 0, as the reference's 5.x (its keys are masked out; this keeps the cache equal).
            self.positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            self.position_ids = mask.sum(-1, keepdim=True)  # (B, 1) next position, as the reference's cumsum
        else:
            self.positions = positions.to(mask.device)
            self.position_ids = self.positions[:, -1:] + 1  # the reference's `position_ids[..., -1:] + 1`
        self.step_fn: DecodeStep | None = None
        self.hidden: tuple | None = None  # the last forward's hidden states, when the plan keeps them
        self.attentions: tuple | None = None  # and its attention probabilities, per layer
        if (
            isinstance(self.cache, StaticCache)
            and model.config.attn_implementation != "flash_attention_2"
            # the one-token step returns logits only: a request for more runs the model's forward (whose
            # eager attention forms the probabilities), so the fast path is untouched by it
            and not plan.hidden_states
            and not plan.attentions
        ):
            self.step_fn = DecodeStep.for_model(model, compile=plan.compile)
            # Slots each new token may see: the prompt's real tokens now, each step's own slot as it comes.
            self.key_mask = torch.zeros(B, self.cache.max_cache_len, dtype=torch.bool, device=mask.device)
            self.key_mask[:, :L] = mask.bool()
            self.cache_position = torch.tensor([L], device=mask.device)

    def prefill(self, **model_inputs: Any) -> torch.Tensor:
        """Logits after the prompt; `model_inputs` holds the positions the cache does not (all of them
        without a cache)."""
        if self.cache is None:
            self.ids = model_inputs["input_ids"]
            return self._recompute()
        out = self.model(
            **model_inputs,
            attention_mask=self.mask if self.padded else None,
            position_ids=self.positions[:, self.past :],
            past_key_values=self.cache,
            logits_to_keep=1,
            output_hidden_states=self.plan.hidden_states,
            output_attentions=self.plan.attentions,
        )
        self.hidden, self.attentions = out.hidden_states, out.attentions
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _recompute(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask if self.padded else None,
            position_ids=self.positions,
            use_cache=False,
            logits_to_keep=1,
            output_hidden_states=self.plan.hidden_states,
            output_attentions=self.plan.attentions,
        )
        self.hidden, self.attentions = out.hidden_states, out.attentions
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _grow(self) -> None:
        """Make room for more positions in a full static cache (and its key mask)."""
        old = self.cache.max_cache_len
        new = cache_length(self.model.config, self.plan, self.prompt_length, old)
        self.cache.grow(new)
        if self.step_fn is not None:
            self.key_mask = torch.nn.functional.pad(self.key_mask, (0, new - old), value=False)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) the cache's batch rows `rows` (beam search moves beams between rows of one
        prompt, whose masks and positions are the same)."""
        if self.cache is not None:
            self.cache.select_batch(rows)
        if self.ids is not None:
            self.ids = self.ids.index_select(0, rows)
            self.positions = self.positions.index_select(0, rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
            self.positions = torch.cat([self.positions, self.position_ids], dim=-1)
            self.position_ids += 1
            return self._recompute()
        if isinstance(self.cache, StaticCache) and self.cache.get_seq_length() >= self.cache.max_cache_len:
            self._grow()
        if self.step_fn is not None:
            return self._planned(tokens)[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask if self.padded else None,
            position_ids=self.position_ids,
            past_key_values=self.cache,
            logits_to_keep=1,
            output_hidden_states=self.plan.hidden_states,
            output_attentions=self.plan.attentions,
        )
        self.hidden, self.attentions = out.hidden_states, out.attentions
        logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
        self.position_ids += 1
        return logits

    def greedy_step(
        self, tokens: torch.Tensor, banned: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`step` for a greedy generation of one row that keeps no scores: (the next token (1,), None)
        where the decode step's head screen picks it (the argmax of the logits, the `banned` ids
        excluded), else (None, the logits)."""
        if self.step_fn is None or self.cache is None:
            return None, self.step(tokens)
        if self.cache.get_seq_length() >= self.cache.max_cache_len:
            self._grow()
        return self._planned(tokens, banned=banned, greedy=True)

    def _planned(
        self, tokens: torch.Tensor, *, banned: torch.Tensor | None = None, greedy: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One step through `DecodeStep` (a static cache with room for it): (token, None) or (None, logits)."""
        self.key_mask.index_fill_(1, self.cache_position, True)
        args = (self.cache, tokens[:, None], self.position_ids, self.cache_position, self.key_mask)
        if greedy:
            chosen, logits = self.step_fn.greedy(*args, padded=self.padded, banned=banned)
        else:
            chosen, logits = None, self.step_fn(*args, padded=self.padded)
        self.cache_position += 1
        self.position_ids += 1
        return chosen, logits
