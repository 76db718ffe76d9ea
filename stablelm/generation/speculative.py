"""Speculative decoding, lossless: draft a few tokens cheaply, check them all in one forward of the model.

The drafters (`drafts`: `PromptLookup` copies what followed an earlier occurrence of the sequence's last
n-gram, `AssistantDraft` lets a smaller model with the same vocabulary generate them) propose; this module
checks, keeps and rolls back. Each round the model runs once
over its uncached tokens and the k draft tokens (`logits_to_keep=k + 1`), so it scores the token after the
sequence and after each draft prefix at once. Greedy keeps the draft up to the first token the model would
not have picked, then the model's own pick; sampling keeps draft tokens by the speculative-sampling rule
(Leviathan et al. 2023, the reference's `_speculative_sampling`) and draws the next from the residual, so
the tokens are distributed as plain sampling's. The cache is then cropped back to the kept positions: the
rejected slots of a static cache are never read again, and the next round overwrites them.

One sequence at a time (batch 1), as in the reference. The settings' logits processors and the caller's
`logits_processor` score each draft position over the tokens before it, as plain decoding scores that step.
Stopping (EOS, stop strings, `max_new_tokens`, `stopping_criteria`, `max_time`) is decided token by token,
as plain decoding decides it: a draft that runs past an end is cut. `return_dict_in_generate` gets each
token's scores and logits and the cache. `check_settings` refuses what does not combine with drafting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..attention import AttentionMask
from ..cache import Cache, StaticCache
from ..greedy_head import screen_for
from ..layers import one_row_bits
from ..lean_step import LeanStep
from .config import GenerationConfig
from .loop import Step, criteria_hit
from .plan import Plan, apply_processors
from .processors import banned_ids, only_bans
from .stepper import Stepper, cache_length


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
class Tokens:
    """The tokens so far: `ids[:length]` (prompt and accepted tokens), the round's draft after them."""

    ids: torch.Tensor  # (capacity,) long
    length: int
    produced: int  # new tokens among the `length`
    mask: torch.Tensor | None  # (1, capacity) the prompt's attention mask then ones; None without padding


@dataclass
class Draft:
    """A drafter's proposal."""

    tokens: torch.Tensor  # (k,) long
    probs: torch.Tensor | None  # (k, V) the distributions they were drawn from; None for a fixed draft


class Drafter:
    """Proposes draft tokens; `steps` runs speculative decoding with them (what `generate(draft=...)` calls)."""

    overshoot = 0  # how far past the last new token a draft may reach (it is checked, then cut)

    def __init__(self) -> None:
        self.stats = DraftStats()

    def start(self, plan: Plan, seq: Tokens) -> None:
        """Set up for a new generation."""

    def observe(self, drafted: int, accepted: int) -> None:
        """How the last round's draft fared: `accepted` of its `drafted` tokens kept."""

    def propose(self, seq: Tokens, limit: int, plan: Plan, generator: torch.Generator | None) -> Draft:
        """Tokens to follow `seq.ids[:seq.length]`: at most `limit` (the room left before the last new
        token) plus `overshoot`, none when `limit` is 0."""
        raise NotImplementedError

    def steps(
        self,
        model: Any,
        plan: Plan,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        generator: torch.Generator | None,
        stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        past_key_values: Cache | None = None,
        kept: dict[str, Any] | None = None,
    ) -> Iterator[Step]:
        """Check that speculative decoding applies (ValueError naming what to change), then return its
        steps (`kept` receives the model's cache)."""
        check_settings(self.name, plan.config)
        if past_key_values is not None:
            raise ValueError(
                f"{self.name} (speculative decoding) cannot continue from past_key_values: drop one of them."
            )
        if inputs_embeds is not None:
            raise ValueError(f"{self.name} drafts token ids: pass input_ids, not inputs_embeds.")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"{self.name} generates one sequence at a time (as the reference's assisted generation), "
                f"got {input_ids.shape[0]} rows (prompts times num_return_sequences): call generate per "
                "prompt, with num_return_sequences=1."
            )
        self.stats = DraftStats()
        return _run(self, model, plan, input_ids, attention_mask, generator, stop_checker, kept)

    name = "speculative decoding"


def check_settings(name: str, config: GenerationConfig) -> None:
    """Refuse the resolved settings that speculative decoding (asked for by the setting `name`) does not
    combine with, naming both (ValueError)."""
    refused = [
        (
            (config.num_beams or 1) > 1,
            f"num_beams={config.num_beams}",
            "beam search keeps several sequences; the reference would drop the drafting with a warning",
        ),
        (
            config.use_cache is False,
            "use_cache=False",
            "the drafts are checked over the cache, as in the reference",
        ),
        (bool(config.compile), "compile=True", "it compiles the one-token step, which drafting does not use"),
    ]
    for hit, setting, why in refused:
        if hit:
            raise ValueError(
                f"{name} (speculative decoding) cannot be combined with {setting} ({why}): drop one of them."
            )


@torch.no_grad()
def _run(
    drafter: Drafter,
    model: Any,
    plan: Plan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    generator: torch.Generator | None,
    stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    kept: dict[str, Any] | None,
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
    seq = Tokens(ids, T, 0, mask)
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    stepper = Stepper(model, replace(plan, max_new_tokens=capacity - T), prompt_mask.to(device).long())
    cache = stepper.cache
    if kept is not None:
        kept["cache"] = cache
    # The stopping criteria see the steps' scores when they are returned, as in plain decoding.
    history: tuple | None = () if plan.config.return_dict_in_generate and plan.config.output_scores else None
    drafter.start(plan, seq)
    wanted = plan.hidden_states or plan.attentions
    eos = set() if plan.eos is None else set(plan.eos.tolist())
    first_row = torch.zeros(1, dtype=torch.long)
    first = None  # the first draft is proposed before the prompt runs, as in the reference
    lean: dict[int, LeanStep | None] = {}  # the checks' plans by row count (see verify_logits)
    # a round without a draft may pick its token from the head's int8 screen, as plain greedy steps do
    screened = plan.params.greedy and not plan.record and only_bans(plan.processors)
    picked: int | None = None  # a round's token from the screen
    while True:
        # Room for the draft and the model's own token after it, within max_new_tokens.
        draft = drafter.propose(seq, plan.max_new_tokens - seq.produced - 1, plan, generator)
        k = len(draft.tokens)
        seq.ids[seq.length : seq.length + k] = draft.tokens
        checked: dict[str, Any] | None = {} if wanted else None  # the check's hidden states, attentions
        if first is None:  # the prompt as plain decoding runs it, then the draft after it
            first = stepper.prefill(input_ids=input_ids)
            prompt = (stepper.hidden, stepper.attentions)
            shift = 1  # the check's row i - 1 is the round's token i (token 0's: the prompt's forward)
            if k:
                logits = torch.cat(
                    [first, verify_logits(model, cache, seq, T, T + k, plan, kept=checked, lean=lean)]
                )
            else:
                logits = first
        else:  # the last token (not yet in the cache) and the draft
            prompt, shift = None, 0  # the check's row i is the round's token i
            picked, logits = (
                (None, None) if k or not screened else _screened_round(model, stepper, cache, seq, plan, lean)
            )
            if picked is None and logits is None:
                logits = verify_logits(
                    model, cache, seq, seq.length - 1, seq.length + k, plan, kept=checked, lean=lean
                )
        keys = seq.length  # the round's token i attends to keys + i positions
        if picked is not None:  # by the head's screen: no scores (none are kept)
            scores, new = None, [picked]
        else:
            scores = processed_scores(plan, logits, seq, rows=k + 1)
            new = _accept(scores, draft, plan, generator)
        new = new[: plan.max_new_tokens - seq.produced]
        accepted = len(new) - 1
        cache.crop(seq.length + accepted)  # keep the sequence and the kept draft, roll the rest back
        stats = drafter.stats
        stats.drafted, stats.accepted, stats.passes = (
            stats.drafted + k,
            stats.accepted + accepted,
            stats.passes + 1,
        )
        drafter.observe(k, accepted)
        for i, token in enumerate(new):
            seq.ids[seq.length] = token
            seq.length += 1
            seq.produced += 1
            stats.tokens += 1
            tokens = seq.ids[seq.length - 1 : seq.length].clone()
            stopped = token in eos
            if not stopped and stop_checker is not None:
                stopped = bool(stop_checker(first_row, tokens.cpu())[0])
            if plan.criteria:
                if history is not None:
                    history += (scores[i : i + 1],)
                stopped = (
                    bool(criteria_hit(plan.criteria, seq.ids[None, : seq.length], history)[0]) or stopped
                )
            if plan.deadline is not None and time.time() > plan.deadline:
                stopped = True
            reason = "stop" if stopped else "length" if seq.produced == plan.max_new_tokens else None
            if plan.record:
                if i == 0 and prompt is not None:
                    hidden, attentions = prompt
                else:
                    hidden, attentions = _row(checked, i - shift, keys + i)
                yield Step(tokens, [reason], scores[i : i + 1], logits[i : i + 1], hidden, attentions)
            else:
                yield Step(tokens, [reason])
            if reason is not None:
                return


def _row(checked: dict[str, Any] | None, row: int, keys: int) -> tuple[tuple | None, tuple | None]:
    """Row `row` of a round's check, as plain decoding's step gives it for that token: hidden states
    (1, 1, C) and attentions (1, H, 1, keys); the reference splits its check the same way."""
    if checked is None:
        return None, None
    hidden, attentions = checked["hidden_states"], checked["attentions"]
    return (
        None if hidden is None else tuple(h[:, row : row + 1] for h in hidden),
        None if attentions is None else tuple(a[:, :, row : row + 1, :keys] for a in attentions),
    )


def verify_logits(
    model: Any,
    cache: Cache,
    seq: Tokens,
    start: int,
    end: int,
    plan: Plan,
    *,
    kept: dict[str, Any] | None = None,
    lean: dict[int, LeanStep | None] | None = None,
) -> torch.Tensor:
    """fp32 logits (end - start, V) after each of positions [start, end), over a cache holding [0, start).

    The decode step (`stablelm.decode`) over several tokens, attending query by query: each row is bit
    for bit what decoding the tokens one at a time gives, so greedy speculative decoding makes exactly
    plain decoding's tokens in every dtype. With `kept`, it receives, as the plan asks for them, the
    `hidden_states` (embeddings, each layer's output; (1, end - start, C) each) and the
    `attentions` (per layer (1, H, end - start, end), zero past each query's own position), computed on
    eager attention, as plain decoding computes them when they are asked for.

    With `lean` (a generation's plans by row count, filled here), a check without `kept` and without
    padding runs `LeanStep.check_hidden` where the planned step serves the model: one row's kernels over
    all the rows, so each row has the one-token step's bits even where torch's product over several rows
    rounds otherwise (oneDNN on an AVX512-BF16 Zen 4 for K = 2560, the 3B shape's width, from 4 rows on),
    and without the modules' overhead. Elsewhere the modules run over all the rows at once, their linear
    layers on one row's plans too (`layers.one_row_bits`).
    """
    make_room(model, cache, end, plan, seq)
    if kept is None:
        planned = _planned_check(model, cache, seq, start, end, lean)
        if planned is not None:
            step, x = planned
            return step.logits(x)
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
    rope = base.rotary_emb(x, positions)
    hidden: list[torch.Tensor] | None = [] if kept is not None and plan.hidden_states else None
    weights: list[torch.Tensor] | None = [] if kept is not None and plan.attentions else None
    with one_row_bits():  # each row's linear products as one row alone gets them
        for layer in base.layers:
            if hidden is not None:
                hidden.append(x)
            x = layer(x, rope, mask, cache, cache_position, weights)
        cache.advance(end - start)
        x = base.norm(x)
        if kept is not None:
            kept["hidden_states"] = None if hidden is None else (*hidden, x)
            kept["attentions"] = None if weights is None else tuple(weights)
        return model.lm_head(x[0]).float()


def _planned_check(
    model: Any, cache: Cache, seq: Tokens, start: int, end: int, lean: dict[int, LeanStep | None] | None
) -> tuple[LeanStep, torch.Tensor] | None:
    """The check of positions [start, end) on the planned step (`LeanStep.check_hidden`, see
    `verify_logits`), the cache written and advanced: (the plan, the final norm's output (T, C)), or None
    where it does not serve (then the modules run). `lean` holds the generation's plans by row count."""
    T = end - start
    if lean is None or T <= 0 or seq.mask is not None or torch.is_grad_enabled():
        return None
    if T not in lean:
        lean[T] = LeanStep.build(model, cache, T, check=True)
    step = lean[T]
    if step is None or step.threads != torch.get_num_threads() or cache.get_seq_length() != start:
        return None
    x = step.check_hidden(cache, seq.ids[start:end], start)
    cache.advance(T)
    return step, x


def _screened_round(
    model: Any, stepper: Stepper, cache: Cache, seq: Tokens, plan: Plan, lean: dict[int, LeanStep | None]
) -> tuple[int | None, torch.Tensor | None]:
    """A round without a draft in a greedy generation that keeps no scores: the last token through the
    planned step and its successor picked by the head's int8 screen, as plain greedy decoding's steps pick
    it (`stablelm.greedy_head`: the argmax of the processed scores, the processors only banning ids).
    (token, None); (None, the row's fp32 logits (1, V)) where the screen does not serve or decide;
    (None, None) where the planned step does not serve (nothing done: `verify_logits` then)."""
    make_room(model, cache, seq.length, plan, seq)
    planned = _planned_check(model, cache, seq, seq.length - 1, seq.length, lean)
    if planned is None:
        return None, None
    step, x = planned
    found = step.head_kernel()
    screen = None if found is None or stepper.step_fn is None else screen_for(stepper.step_fn._screen, *found)
    if screen is not None:
        token = screen.choose(x, banned_ids(plan.processors, seq.ids[None, : seq.length]))
        if token is not None:
            return int(token), None
    return None, step.logits(x)


def make_room(model: Any, cache: Cache, end: int, plan: Plan, seq: Tokens) -> None:
    """Grow a static cache that cannot hold `end` positions (past the model's context, see stepper.py)."""
    if isinstance(cache, StaticCache) and end > cache.max_cache_len:
        cache.grow(max(end, cache_length(model.config, plan, seq.length, cache.max_cache_len)))


def processed_scores(
    plan: Plan, logits: torch.Tensor, seq: Tokens, *, rows: int, offset: int = 0
) -> torch.Tensor:
    """Scores (rows, V) as plain decoding processes them: row i by the plan's processors over the sequence
    and its first `offset + i` draft tokens (the repetition penalty sees them, EOS is banned while below
    `min_new_tokens`, a caller's processor gets the ids it would get at that step)."""
    if not plan.processors:
        return logits
    length = seq.length + offset
    return torch.cat(
        [
            apply_processors(plan.processors, seq.ids[None, : length + i], logits[i : i + 1])
            for i in range(rows)
        ]
    )


def _accept(scores: torch.Tensor, draft: Draft, plan: Plan, generator: torch.Generator | None) -> list[int]:
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


def _speculative_sampling(draft: Draft, p: torch.Tensor, generator: torch.Generator | None) -> list[int]:
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
