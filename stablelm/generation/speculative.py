"""Speculative decoding, lossless: draft a few tokens cheaply, check them all in one forward of the model.

Two drafters, as the reference's `generate(prompt_lookup_num_tokens=...)` and `generate(assistant_model=...)`:
`PromptLookup` copies what followed an earlier occurrence of the sequence's last n-gram (prompt and output),
`AssistantDraft` lets a smaller model with the same vocabulary generate them. Each round the model runs once
over its uncached tokens and the k draft tokens (`logits_to_keep=k + 1`), so it scores the token after the
sequence and after each draft prefix at once. Greedy keeps the draft up to the first token the model would
not have picked, then the model's own pick; sampling keeps draft tokens by the speculative-sampling rule
(Leviathan et al. 2023, the reference's `_speculative_sampling`) and draws the next from the residual, so
the tokens are distributed as plain sampling's. The cache is then cropped back to the kept positions: the
rejected slots of a static cache are never read again, and the next round overwrites them.

One sequence at a time (batch 1), as in the reference. Stopping (EOS, stop strings, `max_new_tokens`,
`min_new_tokens`) is decided token by token, as plain decoding decides it: a draft that runs past an end is cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..attention import AttentionMask
from ..cache import Cache, StaticCache
from ..sampling import process_logits
from .config import GenerationConfig, check_integer
from .loop import Step, _cache_length, _make_cache, _Plan, _Stepper

DEFAULT_NGRAM = 2  # the reference's max_matching_ngram_size default
DEFAULT_ASSISTANT_TOKENS = 20  # the reference's num_assistant_tokens default
DEFAULT_CONFIDENCE = 0.4  # the reference's assistant_confidence_threshold default


@dataclass
class DraftStats:
    """How the last generation's drafts fared.

    Attributes:
        drafted: Draft tokens proposed to the model.
        accepted: Draft tokens the model kept.
        passes: Forward passes of the model (the prompt's included).
        tokens: New tokens made.
    """

    drafted: int = 0
    accepted: int = 0
    passes: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        """Share of the draft tokens that were kept (0 when none was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class _Sequence:
    """The tokens so far: `ids[:length]` (prompt and accepted tokens), the round's draft after them."""

    ids: torch.Tensor  # (capacity,) long
    length: int
    produced: int  # new tokens among the `length`
    mask: torch.Tensor | None  # (1, capacity) the prompt's attention mask then ones; None without padding


@dataclass
class _Draft:
    tokens: torch.Tensor  # (k,) long
    probs: torch.Tensor | None  # (k, V) the distributions they were drawn from; None for a fixed draft


class Drafter:
    """Proposes draft tokens; `steps` runs speculative decoding with them (what `generate(draft=...)` calls)."""

    overshoot = 0  # how far past the last new token a draft may reach (it is checked, then cut)

    def __init__(self) -> None:
        self.stats = DraftStats()

    def start(self, plan: _Plan, seq: _Sequence) -> None:
        """Set up for a new generation."""

    def propose(self, seq: _Sequence, limit: int, plan: _Plan, generator: torch.Generator | None) -> _Draft:
        """Tokens to follow `seq.ids[:seq.length]`: at most `limit` (the room left before the last new
        token) plus `overshoot`, none when `limit` is 0."""
        raise NotImplementedError

    def steps(
        self,
        model: Any,
        plan: _Plan,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        generator: torch.Generator | None,
        stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    ) -> Iterator[Step]:
        """Check that speculative decoding applies (ValueError naming what to change), then return its steps."""
        if inputs_embeds is not None:
            raise ValueError(f"{self.name} drafts token ids: pass input_ids, not inputs_embeds.")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"{self.name} generates one sequence at a time (as the reference's assisted generation), "
                f"got {input_ids.shape[0]} rows (prompts times num_return_sequences): call generate per "
                "prompt, with num_return_sequences=1."
            )
        if plan.compile:
            raise ValueError(
                f"compile=True compiles the one-token step, which {self.name} does not use: drop one."
            )
        self.stats = DraftStats()
        return _run(self, model, plan, input_ids, attention_mask, generator, stop_checker)

    name = "speculative decoding"


class PromptLookup(Drafter):
    """Drafts by prompt lookup, as the reference's `PromptLookupCandidateGenerator`: find the first
    (leftmost) earlier occurrence of the sequence's last n tokens, n from `max_ngram` down to 1, and
    propose the up to `num_tokens` tokens that followed it, cut before the first EOS. As there, a draft
    is not shortened near `max_new_tokens` (the tokens past it are checked and dropped): the random draws
    of sampling then follow the reference's, and a seeded run gives its tokens.

    Args:
        num_tokens: Most tokens per draft (`prompt_lookup_num_tokens`).
        max_ngram: Longest n-gram matched (`max_matching_ngram_size`, default 2).
    """

    name = "prompt_lookup_num_tokens"

    def __init__(self, *, num_tokens: int, max_ngram: int = DEFAULT_NGRAM) -> None:
        super().__init__()
        check_integer("prompt_lookup_num_tokens", num_tokens, 1)
        check_integer("max_matching_ngram_size", max_ngram, 1)
        self.num_tokens, self.max_ngram = int(num_tokens), int(max_ngram)
        self.overshoot = self.num_tokens

    def propose(self, seq: _Sequence, limit: int, plan: _Plan, generator: torch.Generator | None) -> _Draft:
        ids, length = seq.ids[: seq.length], seq.length
        if limit <= 0:
            return _Draft(ids[:0], None)
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            starts = (ids.unfold(0, n, 1) == ids[-n:]).all(dim=1).nonzero().flatten()[:2].tolist()
            # The last window is the n-gram itself, with nothing after it to copy.
            start = next((s + n for s in starts if s + n < length), None)
            if start is None:
                continue
            tokens = ids[start : start + self.num_tokens]
            if plan.eos is not None:
                hits = torch.isin(tokens, plan.eos).nonzero()
                if hits.numel():  # the reference drafts nothing past (or at) an EOS
                    tokens = tokens[: int(hits[0])]
            return _Draft(tokens, None)
        return _Draft(ids[:0], None)


class AssistantDraft(Drafter):
    """Drafts with a smaller model of the same vocabulary, as the reference's `AssistedCandidateGenerator`:
    it generates up to `num_tokens` tokens with the same settings (greedy, or sampling with the same
    processors), stopping early at EOS or after a token it gave less than `confidence` probability.

    The assistant keeps its own KV cache across rounds, cropped to the prefix the model accepted.

    Args:
        assistant: A StableLmForCausalLM (or any causal LM taking `past_key_values` and `logits_to_keep`).
        num_tokens: Most tokens per draft (`num_assistant_tokens`, default 20).
        confidence: End a draft after a token below this probability (`assistant_confidence_threshold`,
            default 0.4; 0 turns it off).
    """

    name = "assistant_model"

    def __init__(
        self,
        assistant: Any,
        *,
        num_tokens: int = DEFAULT_ASSISTANT_TOKENS,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> None:
        super().__init__()
        check_integer("num_assistant_tokens", num_tokens, 1)
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, (int, float))
            or not 0 <= confidence <= 1
        ):
            raise ValueError(
                f"assistant_confidence_threshold must be a number in [0, 1], got {confidence!r}."
            )
        self.assistant, self.num_tokens, self.confidence = assistant, int(num_tokens), float(confidence)

    def start(self, plan: _Plan, seq: _Sequence) -> None:
        self.cache = _make_cache(self.assistant, plan, 1, seq.length)
        self.fed = torch.empty_like(seq.ids)  # the tokens the assistant's cache holds, by position
        self.held = 0  # positions in its cache
        self.base = 0  # where the last draft began: positions before it hold accepted tokens

    def propose(self, seq: _Sequence, limit: int, plan: _Plan, generator: torch.Generator | None) -> _Draft:
        start = min(self.held, seq.length - 1)
        differ = (self.fed[self.base : start] != seq.ids[self.base : start]).nonzero()
        if differ.numel():  # a rejected draft token: recompute from there
            start = self.base + int(differ[0])
        self.cache.crop(start)
        self.base = seq.length
        tokens, probs = [], []
        for j in range(min(self.num_tokens, limit)):
            end = seq.length + j
            self.fed[start:end] = seq.ids[start:end]
            logits = _forward(self.assistant, self.cache, seq, start, end, keep=1, plan=plan)
            self.held = start = end
            scores = _processed(plan, logits, seq, rows=1, offset=j)
            dist = torch.softmax(scores, dim=-1)
            if plan.params.greedy:
                token = scores.argmax(-1)
            else:
                token = torch.multinomial(dist, 1, generator=generator).squeeze(1)
                probs.append(dist)
            seq.ids[end] = token[0]
            tokens.append(token)
            if (plan.eos is not None and bool(torch.isin(token, plan.eos))) or float(
                dist[0, token[0]]
            ) < self.confidence:
                break
        if not tokens:
            return _Draft(seq.ids[:0], None)
        return _Draft(torch.cat(tokens), torch.cat(probs) if probs else None)


def make_draft(model: Any, config: GenerationConfig, assistant_model: Any = None) -> Drafter | None:
    """The drafter `config` and `assistant_model` ask for (None: plain decoding). ValueError/TypeError
    naming the setting when it cannot be used."""
    lookup = config.prompt_lookup_num_tokens
    if lookup is not None and assistant_model is not None:
        raise ValueError(
            "Pass one of prompt_lookup_num_tokens and assistant_model: both draft tokens for speculative "
            "decoding (the reference would ignore the assistant)."
        )
    if lookup is not None:
        ngram = config.max_matching_ngram_size
        return PromptLookup(num_tokens=lookup, max_ngram=DEFAULT_NGRAM if ngram is None else ngram)
    if assistant_model is None:
        return None
    _check_assistant(model, assistant_model)
    own = getattr(assistant_model, "generation_config", None)

    def setting(name: str, default: Any) -> Any:  # generate's, else the assistant's own, else the default
        value = getattr(config, name)
        if value is None:
            value = own.get(name) if isinstance(own, dict) else getattr(own, name, None)
        return default if value is None else value

    return AssistantDraft(
        assistant_model,
        num_tokens=setting("num_assistant_tokens", DEFAULT_ASSISTANT_TOKENS),
        confidence=setting("assistant_confidence_threshold", DEFAULT_CONFIDENCE),
    )


def _check_assistant(model: Any, assistant: Any) -> None:
    if not isinstance(assistant, torch.nn.Module) or not hasattr(assistant, "config"):
        raise TypeError(
            f"assistant_model must be a causal language model (e.g. a StableLmForCausalLM), got "
            f"{type(assistant).__name__}."
        )
    ours, theirs = model.config.vocab_size, getattr(assistant.config, "vocab_size", None)
    if ours != theirs:
        raise ValueError(
            f"assistant_model has a vocabulary of {theirs} tokens and the model {ours}: the assistant must "
            "share the model's tokenizer (drafting across tokenizers, the reference's assistant_tokenizer=, "
            "is not supported)."
        )
    device = next(assistant.parameters()).device
    if device != model.device:
        raise ValueError(
            f"assistant_model is on {device} and the model on {model.device}: move the assistant to the "
            "model's device (assistant_model.to(model.device))."
        )


@torch.no_grad()
def _run(
    drafter: Drafter,
    model: Any,
    plan: _Plan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    generator: torch.Generator | None,
    stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> Iterator[Step]:
    """Speculative decoding of one sequence, a `Step` per new token."""
    device = model.device
    T = input_ids.shape[1]
    capacity = T + plan.max_new_tokens + drafter.overshoot
    ids = torch.empty(capacity, dtype=torch.long, device=device)
    ids[:T] = input_ids[0]
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = torch.ones(1, capacity, dtype=torch.long, device=device)
        mask[:, :T] = attention_mask
    seq = _Sequence(ids, T, 0, mask)
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    stepper = _Stepper(model, replace(plan, max_new_tokens=capacity - T), prompt_mask.to(device).long())
    cache = stepper.cache
    drafter.start(plan, seq)
    eos = set() if plan.eos is None else set(plan.eos.tolist())
    first_row = torch.zeros(1, dtype=torch.long)
    first = None  # the first draft is proposed before the prompt runs, as in the reference
    while True:
        # Room for the draft and the model's own token after it, within max_new_tokens.
        draft = drafter.propose(seq, plan.max_new_tokens - seq.produced - 1, plan, generator)
        k = len(draft.tokens)
        seq.ids[seq.length : seq.length + k] = draft.tokens
        if first is None:  # the prompt as plain decoding runs it, then the draft after it
            first = stepper.prefill(input_ids=input_ids)
            logits = torch.cat([first, _verify(model, cache, seq, T, T + k, plan)]) if k else first
        else:  # the last token (not yet in the cache) and the draft
            logits = _verify(model, cache, seq, seq.length - 1, seq.length + k, plan)
        new = _accept(_processed(plan, logits, seq, rows=k + 1), draft, plan, generator)
        new = new[: plan.max_new_tokens - seq.produced]
        kept = len(new) - 1
        cache.crop(seq.length + kept)  # keep the sequence and the kept draft, roll the rest back
        stats = drafter.stats
        stats.drafted, stats.accepted, stats.passes = (
            stats.drafted + k,
            stats.accepted + kept,
            stats.passes + 1,
        )
        for token in new:
            seq.ids[seq.length] = token
            seq.length += 1
            seq.produced += 1
            stats.tokens += 1
            tokens = seq.ids[seq.length - 1 : seq.length].clone()
            stopped = token in eos
            if not stopped and stop_checker is not None:
                stopped = bool(stop_checker(first_row, tokens.cpu())[0])
            reason = "stop" if stopped else "length" if seq.produced == plan.max_new_tokens else None
            yield Step(tokens=tokens, finish_reasons=[reason])
            if reason is not None:
                return


def _verify(model: Any, cache: Cache, seq: _Sequence, start: int, end: int, plan: _Plan) -> torch.Tensor:
    """fp32 logits (end - start, V) after each of positions [start, end), over a cache holding [0, start).

    The decode step (`stablelm.decode`) over several tokens, attending query by query: each row is bit
    for bit what decoding the tokens one at a time gives, so greedy speculative decoding makes exactly
    plain decoding's tokens in every dtype.
    """
    _make_room(model, cache, end, plan, seq)
    base = model.model
    x = base.embed_tokens(seq.ids[None, start:end])  # (1, T, C)
    device = x.device
    allowed = None
    if seq.mask is None:
        positions = torch.arange(start, end, device=device)[None]
    else:
        keys = seq.mask[:, :end]
        positions = (keys.cumsum(-1) - 1)[:, start:end]
        causal = torch.arange(end, device=device)[None] <= torch.arange(start, end, device=device)[:, None]
        allowed = (causal[None] & keys[:, None].bool())[:, None]  # (1, 1, T, S)
    mask = AttentionMask(allowed=allowed, is_causal=False, key_length=end, per_query=True)
    cache_position = torch.arange(start, end, device=device)
    rope = base.rotary_emb(positions, x.dtype)
    for layer in base.layers:
        x = layer(x, rope, mask, cache, cache_position)
    cache.advance(end - start)
    return model.lm_head(base.norm(x)[0]).float()


def _make_room(model: Any, cache: Cache, end: int, plan: _Plan, seq: _Sequence) -> None:
    """Grow a static cache that cannot hold `end` positions (past the model's context, see loop.py)."""
    if isinstance(cache, StaticCache) and end > cache.max_cache_len:
        cache.grow(max(end, _cache_length(model.config, plan, seq.length, cache.max_cache_len)))


def _forward(
    model: Any, cache: Cache, seq: _Sequence, start: int, end: int, *, keep: int, plan: _Plan
) -> torch.Tensor:
    """fp32 logits (keep, V) of the last `keep` of positions [start, end), run over a cache holding
    [0, start) by the model's forward (the assistant's: any causal LM)."""
    _make_room(model, cache, end, plan, seq)
    inputs: dict[str, Any] = {}
    if seq.mask is not None:
        mask = seq.mask[:, :end]
        inputs["attention_mask"] = mask
        inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, start:end]
    out = model(
        input_ids=seq.ids[None, start:end],
        past_key_values=cache,
        logits_to_keep=keep,
        use_cache=True,
        **inputs,
    )
    return out.logits[0].float()


def _processed(
    plan: _Plan, logits: torch.Tensor, seq: _Sequence, *, rows: int, offset: int = 0
) -> torch.Tensor:
    """Scores (rows, V) as plain decoding processes them: row i for the step after `seq` and `offset + i`
    draft tokens (the repetition penalty sees them, EOS is banned while below `min_new_tokens`)."""
    first, length = seq.produced + offset, seq.length + offset
    banned = [plan.eos if first + i < plan.min_new_tokens else None for i in range(rows)]
    if plan.params.repetition_penalty == 1.0 and all(b is banned[0] for b in banned):
        return process_logits(logits, seq.ids[None, :length], plan.params, banned_ids=banned[0])
    return torch.cat(
        [
            process_logits(logits[i : i + 1], seq.ids[None, : length + i], plan.params, banned_ids=banned[i])
            for i in range(rows)
        ]
    )


def _accept(scores: torch.Tensor, draft: _Draft, plan: _Plan, generator: torch.Generator | None) -> list[int]:
    """The new tokens of a round: the kept draft tokens, then one token of the model's."""
    if plan.params.greedy:
        return _agreeing(draft.tokens, scores.argmax(-1))
    probs = torch.softmax(scores, dim=-1)
    if draft.probs is None:  # a fixed draft: sample every position, keep while the samples agree
        return _agreeing(draft.tokens, torch.multinomial(probs, 1, generator=generator).squeeze(1))
    return _speculative_sampling(draft, probs, generator)


def _agreeing(draft: torch.Tensor, picked: torch.Tensor) -> list[int]:
    """The model's picks up to and including the first that differs from the draft (or the one after it)."""
    drafted, picks = draft.tolist(), picked.tolist()
    n = 0
    while n < len(drafted) and drafted[n] == picks[n]:
        n += 1
    return picks[: n + 1]


def _speculative_sampling(draft: _Draft, p: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """Keep draft token i with probability min(1, p_i / q_i) until the first refusal, then draw the next
    token from the residual max(p - q, 0) (or from p after a fully kept draft): each token is then
    distributed as p, the model's own (Leviathan et al. 2023, algorithm 1; the reference's rule)."""
    tokens, q = draft.tokens, draft.probs
    k = len(tokens)
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, tokens] / q[rows, tokens]
    keep = (torch.rand(k, generator=generator, device=p.device) <= ratio).tolist()
    n = keep.index(False) if False in keep else k
    dist = p[n]
    if n < k:
        residual = (p[n] - q[n]).clamp(min=0)
        total = residual.sum()
        if total > 0:  # zero only when p equals q there, where a refusal has probability 0
            dist = residual / total
    token = int(torch.multinomial(dist, 1, generator=generator))
    return [*tokens[:n].tolist(), token]
