"""The decode loop on token ids: prefill, then one token per step over a KV cache, with stopping rules.

No tokenizer and no printing here: text enters only through the optional stop-string checker and
leaves through the streamer, both duck-typed. `stream_tokens` yields each step as it is made;
`generate` collects it into the reference's return value (prompt followed by new tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..cache import Cache
from ..sampling import select_tokens
from .config import GenerationConfig, check_integer
from .outputs import GenerateDecoderOnlyOutput
from .plan import Criterion, Plan, apply_processors, start_plan, vocab_size
from .processors import banned_ids, only_bans
from .prompt import check_prompt, prepare_inputs
from .stepper import Stepper

GPU_SYNC_EVERY = 8  # greedy generate on a GPU reads the stopping state back once per this many tokens


class TokenStreamer(Protocol):
    """What `generate` feeds a streamer: the prompt ids (B, T) once, then each step's tokens (B,)."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class Step:
    """One decoding step.

    Attributes:
        tokens: (B,) the token appended to each row; rows that finished get the pad token when EOS is
            set (as the reference pads them), else keep drawing tokens.
        finish_reasons: Per row, None while the row runs, then "stop" (EOS, a stop string or a stopping
            criterion) or "length".
        scores: (B, V) the processed scores the token was chosen from, when the plan records them.
        logits: (B, V) the model's raw fp32 logits, when the plan records them.
        hidden_states: The forward's hidden states (embeddings, then each layer's output), when the
            plan keeps them.
        attentions: The forward's attention probabilities, per layer (B, H, new positions, keys), when
            the plan keeps them.
    """

    tokens: torch.Tensor
    finish_reasons: list[str | None]
    scores: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def stream_tokens(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    *,
    config: GenerationConfig,
    inputs_embeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    sync_every: int = 1,
    logits_processor: Sequence[Callable] = (),
    stopping_criteria: Sequence[Criterion] = (),
    past_key_values: Cache | None = None,
    draft: Any = None,
) -> Iterator[Step]:
    """Generate token by token, yielding a `Step` each time.

    Args:
        model: A StableLmForCausalLM.
        input_ids: Prompt (B, T), left-padded when rows differ in length.
        attention_mask: (B, T) 1 for real tokens; required when the batch is padded.
        config: Resolved generation settings (see `resolve_config`).
        inputs_embeds: (B, T, C) read in place of `input_ids` (which, when given too, start the sequences).
        generator: Random generator for sampling (default: torch's global one, as `set_seed` seeds).
        stop_checker: Called with (rows, tokens) of running rows after each step; returns a bool (len(rows),)
            marking rows whose text now ends a stop string.
        sync_every: Read the stopping state back from the device once per this many steps (one host-device
            sync each), yielding the steps in between together. The steps and their finish reasons are the
            same for every value; above 1, up to `sync_every - 1` forward passes past the end are computed
            and dropped. Worth it on a GPU, where each readback stalls the queue; a stop checker or a
            stopping criterion reads every step's tokens anyway, so it implies 1.
        logits_processor: Callables `(input_ids, scores) -> scores` added to the settings' processors, as
            the reference merges them (see `plan.build_processors`).
        stopping_criteria: Callables `(input_ids, scores) -> bool` or a bool tensor per row; a row stops
            when one says so. `scores` is the tuple of the steps' scores when the config asks to return
            them, else None (as the reference passes them).
        past_key_values: A cache holding the first positions of the prompt (fewer than T): only the rest
            is computed, and the cache is extended in place.
        draft: A drafter of `stablelm.generation.drafts` (one row): speculative decoding, with the same
            steps at greedy and the same distribution when sampling. None decodes token by token.

    Every argument is checked when this is called (TypeError/ValueError naming it), before any work.
    """
    check_prompt(model, input_ids, attention_mask, inputs_embeds)
    return _start(
        model,
        input_ids,
        attention_mask,
        config=config,
        inputs_embeds=inputs_embeds,
        generator=generator,
        stop_checker=stop_checker,
        sync_every=sync_every,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        past_key_values=past_key_values,
        draft=draft,
    )


def _start(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    config: GenerationConfig,
    inputs_embeds: torch.Tensor | None,
    generator: torch.Generator | None,
    stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    sync_every: int,
    logits_processor: Sequence[Callable] = (),
    stopping_criteria: Sequence[Criterion] = (),
    past_key_values: Cache | None = None,
    prefix_allowed_tokens_fn: Callable | None = None,
    position_ids: torch.Tensor | None = None,
    draft: Any = None,
    kept: dict[str, Any] | None = None,
) -> Iterator[Step]:
    """The steps of a checked prompt (`stream_tokens` and `generate` both start here): check the settings,
    plan, then return the steps' generator (`kept` receives the cache)."""
    check_integer("sync_every", sync_every, 1)
    plan = start_plan(
        model,
        config,
        input_ids,
        attention_mask,
        inputs_embeds,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        past_key_values=past_key_values,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
    )
    rows = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    _check_pad_fed(plan, rows, vocab_size(model), stops_rows=stop_checker is not None)
    if draft is not None:
        if position_ids is not None:
            raise ValueError(
                f"{draft.name} (speculative decoding) does not take position_ids: drop one of them."
            )
        return draft.steps(
            model,
            plan,
            input_ids,
            attention_mask,
            inputs_embeds,
            generator,
            stop_checker,
            past_key_values,
            kept,
        )
    if stop_checker is not None or plan.criteria or plan.deadline is not None:
        sync_every = 1  # each step's tokens are read anyway
    return _steps(
        model,
        plan,
        input_ids,
        attention_mask,
        inputs_embeds,
        generator,
        stop_checker,
        sync_every,
        past_key_values,
        kept,
        position_ids,
    )


def _check_pad_fed(plan: Plan, batch: int, vocab: int, *, stops_rows: bool = False) -> None:
    """Refuse a pad token outside the vocabulary when decoding `batch` rows would feed it to the model: a
    row that finishes before the others is padded (`plan.pad_finished`) and the pad token is its next
    input. Rows finish early on an EOS id of the vocabulary, a stopping criterion or (`stops_rows`) a stop
    string. An EOS outside the vocabulary (the reference's tests set `eos_token_id=pad_token_id=-1` to
    generate to the full length) never ends a row, so such a pad is never fed and is accepted, as the
    reference accepts it. (Beam search never feeds the pad: finished beams leave the running ones.)"""
    pad = plan.pad_token_id
    if batch <= 1 or not plan.pad_finished or 0 <= pad < vocab:
        return
    eos = [] if plan.eos is None else plan.eos.tolist()
    if any(0 <= e < vocab for e in eos) or plan.criteria or stops_rows:
        given = "" if plan.config.pad_token_id is not None else ", the first eos_token_id"
        raise ValueError(
            f"pad_token_id ({pad}{given}) is outside the model's vocabulary of {vocab} tokens: rows that "
            "finish early are fed it. Pass a pad_token_id in the vocabulary (e.g. the tokenizer's)."
        )


def criteria_hit(criteria: Sequence[Criterion], seq: torch.Tensor, scores: Any) -> torch.Tensor:
    """The rows (B,) that one of the caller's stopping criteria ends (each returns a bool or a bool per row)."""
    hit = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for criterion in criteria:
        hit = hit | torch.as_tensor(criterion(seq, scores), device=seq.device).bool()
    return hit


@torch.no_grad()
def _steps(
    model: Any,
    plan: Plan,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    generator: torch.Generator | None,
    stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    sync_every: int,
    past_key_values: Cache | None = None,
    kept: dict[str, Any] | None = None,
    position_ids: torch.Tensor | None = None,
) -> Iterator[Step]:
    """The decode loop of `stream_tokens`, over checked arguments. `kept` receives the cache."""
    B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    device = model.device
    mask = torch.ones(B, T, dtype=torch.long) if attention_mask is None else attention_mask
    stepper = Stepper(model, plan, mask.to(device).long(), cache=past_key_values, positions=position_ids)
    past = stepper.past
    if kept is not None:
        kept["cache"] = stepper.cache
    if inputs_embeds is not None:
        model_inputs = {"inputs_embeds": inputs_embeds[:, past:]}
    else:
        model_inputs = {"input_ids": input_ids[:, past:] if stepper.cache is not None else input_ids}
    logits = stepper.prefill(**model_inputs)
    seq = input_ids if input_ids is not None else torch.zeros(B, 0, dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)
    reasons: list[str | None] = [None] * B
    pending: list[tuple[Step, torch.Tensor]] = []  # (step, rows stopped) not yet read back
    history: tuple | None = () if plan.config.return_dict_in_generate and plan.config.output_scores else None
    # Greedy over one row, keeping no scores: each step may pick its token from the head's int8 screen
    # (`stablelm.greedy_head`: torch.argmax's token over the processed scores, without every logit).
    screened = B == 1 and plan.params.greedy and not plan.record and only_bans(plan.processors)
    chosen: torch.Tensor | None = None
    for step in range(plan.max_new_tokens):
        if chosen is not None:
            scores, tokens = None, chosen
        else:
            scores = apply_processors(plan.processors, seq, logits) if plan.processors else logits
            tokens = select_tokens(scores, plan.params, generator=generator)
        if plan.pad_finished:
            tokens = torch.where(running, tokens, plan.pad_token_id)
        seq = torch.cat([seq, tokens[:, None]], dim=-1)
        stopped = (
            running & torch.isin(tokens, plan.eos) if plan.eos is not None else torch.zeros_like(running)
        )
        if stop_checker is not None:
            rows = running.nonzero().flatten()
            stopped[rows] |= stop_checker(rows, tokens[rows]).to(device)
        if plan.criteria:
            if history is not None:
                history += (scores,)
            stopped |= running & criteria_hit(plan.criteria, seq, history)
        if plan.deadline is not None and time.time() > plan.deadline:
            stopped |= running
        running = running & ~stopped
        recorded = (
            Step(tokens, [], scores, logits, stepper.hidden, stepper.attentions)
            if plan.record
            else Step(tokens, [])
        )
        pending.append((recorded, stopped))
        last = step == plan.max_new_tokens - 1
        if last or len(pending) >= sync_every:
            flags = torch.stack([rows for _, rows in pending]).tolist()  # the one readback
            for i, ((done, _), stopped_rows) in enumerate(zip(pending, flags, strict=True)):
                for row, row_stopped in enumerate(stopped_rows):
                    if row_stopped:
                        reasons[row] = "stop"
                if last and i == len(pending) - 1:
                    reasons = [r if r is not None else "length" for r in reasons]
                done.finish_reasons = list(reasons)
                yield done
                if all(r is not None for r in reasons):  # every row is done
                    return
            pending.clear()
        if screened:
            chosen, logits = stepper.greedy_step(tokens, banned_ids(plan.processors, seq))
        else:
            logits = stepper.step(tokens)


def generate(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    *,
    config: GenerationConfig,
    inputs_embeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    streamer: TokenStreamer | None = None,
    stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    logits_processor: Sequence[Callable] = (),
    stopping_criteria: Sequence[Criterion] = (),
    past_key_values: Cache | None = None,
    prefix_allowed_tokens_fn: Callable | None = None,
    position_ids: torch.Tensor | None = None,
    draft: Any = None,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Run `stream_tokens` to the end; return the prompt followed by the new tokens (B, T + n), or with
    `config.return_dict_in_generate` a `GenerateDecoderOnlyOutput` (scores, logits, hidden states,
    attentions, cache).

    With `inputs_embeds` alone, only the new tokens are returned (as the reference does); with ids too,
    the model reads the embeddings and the ids start the sequences. `position_ids` (B, T) are the prompt's
    rotary positions (default: counted over the mask). With
    a `draft` (see `stream_tokens`), the steps are speculative decoding's.
    """
    input_ids, attention_mask, inputs_embeds, position_ids = prepare_inputs(
        input_ids, attention_mask, inputs_embeds, config, model=model, position_ids=position_ids
    )
    # On a GPU, reading the stopping state back each token stalls the queue. Without a streamer (which
    # wants each token as it comes) read it every GPU_SYNC_EVERY tokens. Greedy only: the steps computed
    # past the end would draw from the random generator, leaving it where the reference does not; and not
    # when the cache is returned, which would hold those steps.
    batched_sync = (
        model.device.type == "cuda"
        and streamer is None
        and not config.do_sample
        and not config.return_dict_in_generate
    )
    kept: dict[str, Any] = {}
    steps = _start(
        model,
        input_ids,
        attention_mask,
        config=config,
        inputs_embeds=inputs_embeds,
        generator=generator,
        stop_checker=stop_checker,
        sync_every=GPU_SYNC_EVERY if batched_sync else 1,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        past_key_values=past_key_values,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        position_ids=position_ids,
        draft=draft,
        kept=kept,
    )
    if streamer is not None and input_ids is not None:
        streamer.put(input_ids.cpu())
    done: list[Step] = []
    for step in steps:
        done.append(step)
        if streamer is not None:
            streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    new = torch.stack([s.tokens for s in done], dim=1) if done else None
    if input_ids is None:
        sequences = new
    else:
        sequences = input_ids if new is None else torch.cat([input_ids.to(new.device), new], dim=1)
    if not config.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=tuple(s.scores for s in done) if config.output_scores else None,
        logits=tuple(s.logits for s in done) if config.output_logits else None,
        hidden_states=tuple(s.hidden_states for s in done) if config.output_hidden_states else None,
        attentions=tuple(s.attentions for s in done) if config.output_attentions else None,
        cache=kept.get("cache"),
    )
