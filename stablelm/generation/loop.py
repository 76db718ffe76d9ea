"""The decode loop on token ids: prefill, then one token per step over a KV cache, with stopping rules.

No tokenizer and no printing here: text enters only through the optional stop-string checker and
leaves through the streamer, both duck-typed. `stream_tokens` yields each step as it is made;
`generate` collects it into the reference's return value (prompt followed by new tokens).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..cache import Cache, DynamicCache, StaticCache
from ..decode import DecodeStep
from ..sampling import SamplingParams, select_tokens
from .config import DEFAULT_NEW_TOKENS, GenerationConfig, check_integer
from .inputs import check_attention_mask, check_input_ids, check_inputs_embeds
from .outputs import GenerateDecoderOnlyOutput
from .processors import apply_processors, build_processors

COMPILE_LENGTH_BUCKET = 256  # compiled static caches are sized in these steps
CACHE_GROW_MIN = 256  # a static cache past the model's context grows by at least this many slots
GPU_SYNC_EVERY = 8  # greedy generate on a GPU reads the stopping state back once per this many tokens
_EXTENDING_ROPE_TYPES = ("dynamic", "yarn", "longrope", "llama3")


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
    """

    tokens: torch.Tensor
    finish_reasons: list[str | None]
    scores: torch.Tensor | None = None
    logits: torch.Tensor | None = None


Criterion = Callable[[torch.Tensor, Any], Any]


@dataclass
class _Plan:
    """Everything the loop needs, resolved and validated once."""

    params: SamplingParams
    max_new_tokens: int
    eos: torch.Tensor | None
    pad_token_id: int
    cache_implementation: str
    compile: bool
    config: GenerationConfig  # resolved, max_length set to the prompt plus max_new_tokens
    use_cache: bool = True
    pad_finished: bool = True  # finished rows get the pad token (the reference: when EOS is set)
    processors: list = field(default_factory=list)
    criteria: list = field(default_factory=list)  # the caller's stopping criteria
    record: bool = False  # the caller asked for scores/logits: keep them in each Step
    deadline: float | None = None  # time.time() past which every row stops (max_time)


def _plan(
    model: Any,
    config: GenerationConfig,
    batch: int,
    prompt_length: int,
    stops: bool,
    *,
    criteria: Sequence[Criterion] = (),
) -> _Plan:
    """Check every setting against the prompt (`batch` rows of `prompt_length`; `stops` says a stop
    checker may end rows) and the model, and resolve them. Raises before any work is done. The processors
    are built later, by `_with_processors`, once the prompt's padding is known."""
    config.validate()
    # None switches a processor off, as in the reference.
    params = SamplingParams(
        do_sample=bool(config.do_sample),
        temperature=1.0 if config.temperature is None else config.temperature,
        top_k=config.top_k,
        top_p=1.0 if config.top_p is None else config.top_p,
        min_p=config.min_p,
        repetition_penalty=1.0 if config.repetition_penalty is None else config.repetition_penalty,
    )
    params.validate()
    if config.max_new_tokens is not None:
        max_new = int(config.max_new_tokens)
    else:
        max_length = config.max_length
        if max_length is None:
            max_length = min(prompt_length + DEFAULT_NEW_TOKENS, model.config.max_position_embeddings)
        max_length = int(max_length)
        if max_length <= prompt_length:
            raise ValueError(
                f"max_length ({max_length}) counts the prompt, which already has {prompt_length} tokens: "
                "raise max_length or pass max_new_tokens instead."
            )
        max_new = max_length - prompt_length
    eos_ids = config.eos_token_id
    eos_list = [] if eos_ids is None else list(eos_ids) if isinstance(eos_ids, (list, tuple)) else [eos_ids]
    eos_list = [int(e) for e in eos_list]
    device = model.device
    eos = torch.tensor(eos_list, dtype=torch.long, device=device) if eos_list else None
    pad = int(config.pad_token_id) if config.pad_token_id is not None else (eos_list[0] if eos_list else 0)
    pad_finished = bool(eos_list) or any(hasattr(c, "eos_token_id") for c in criteria)
    vocab = _vocab_size(model)
    if batch > 1 and pad_finished and not 0 <= pad < vocab:
        raise ValueError(
            f"pad_token_id ({pad}{'' if config.pad_token_id is not None else ', the first eos_token_id'}) is "
            f"outside the model's vocabulary of {vocab} tokens: rows that finish early are fed it. Pass a "
            "pad_token_id in the vocabulary (e.g. the tokenizer's)."
        )
    _check_length(model.config, prompt_length, max_new)
    cache_impl = config.cache_implementation or "static"
    if cache_impl not in ("static", "dynamic"):
        raise ValueError(f"cache_implementation must be 'static' or 'dynamic', got {cache_impl!r}.")
    if config.compile and cache_impl != "static":
        raise ValueError(
            "compile=True needs the static cache (fixed shapes): drop cache_implementation='dynamic'."
        )
    use_cache = config.use_cache is not False
    if config.compile and not use_cache:
        raise ValueError("compile=True needs the cache: drop use_cache=False.")
    if config.max_time is not None and (
        isinstance(config.max_time, bool) or not isinstance(config.max_time, (int, float))
    ):
        raise TypeError(f"max_time must be a number of seconds, got {config.max_time!r}.")
    resolved = config.updated(max_length=prompt_length + max_new)
    record = bool(config.return_dict_in_generate and (config.output_scores or config.output_logits))
    for i, criterion in enumerate(criteria):
        if not callable(criterion):
            raise TypeError(
                f"stopping_criteria[{i}] is a {type(criterion).__name__}, not a callable "
                "(input_ids, scores) -> bool tensor."
            )
    return _Plan(
        params,
        max_new,
        eos,
        pad,
        cache_impl,
        bool(config.compile),
        resolved,
        use_cache=use_cache,
        pad_finished=pad_finished,
        criteria=list(criteria),
        record=record,
        deadline=None if config.max_time is None else time.time() + float(config.max_time),
    )


def padding_lengths(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's left padding (the reference's `(mask != 0).argmax(1)`), None when nothing is padded."""
    if mask is None or bool(mask.all()):
        return None
    return (mask != 0).int().argmax(dim=1)


def with_processors(
    plan: _Plan,
    *,
    prompt_length: int,
    mask: torch.Tensor | None,
    device: torch.device,
    custom: Sequence[Callable] = (),
) -> _Plan:
    """`plan` with its logits processors built (they need the prompt's length and padding)."""
    for i, processor in enumerate(custom):
        if not callable(processor):
            raise TypeError(
                f"logits_processor[{i}] is a {type(processor).__name__}, not a callable "
                "(input_ids, scores) -> scores."
            )
    eos = [] if plan.eos is None else plan.eos.tolist()
    plan.processors = build_processors(
        plan.config,
        prompt_length=prompt_length,
        eos=eos,
        padding_lengths=padding_lengths(mask),
        device=device,
        custom=list(custom),
    )
    return plan


def _vocab_size(model: Any) -> int:
    """Rows of the input embedding table (the ids the model accepts)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    return embedding.num_embeddings if embedding is not None else model.config.vocab_size


def _check_length(config: Any, prompt_length: int, max_new: int) -> None:
    limit = config.max_position_embeddings
    if config.rope_type in _EXTENDING_ROPE_TYPES:
        return
    if prompt_length > limit:
        raise ValueError(
            f"The prompt has {prompt_length} tokens, more than the model's max_position_embeddings ({limit}), "
            f"and its rope type {config.rope_type!r} cannot extend past it. Shorten the prompt (e.g. "
            "truncation=True, max_length=... in the tokenizer)."
        )
    if prompt_length + max_new > limit:
        warnings.warn(
            f"Generating up to {prompt_length + max_new} positions, past max_position_embeddings ({limit}); "
            "the text after that point may degrade.",
            stacklevel=3,
        )


def _cache_length(config: Any, plan: _Plan, prompt_length: int, length: int | None = None) -> int:
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


def _make_cache(model: Any, plan: _Plan, batch: int, prompt_length: int) -> Cache:
    if plan.cache_implementation == "dynamic":
        return DynamicCache()
    return StaticCache.for_model(
        model.config,
        batch_size=batch,
        max_cache_len=_cache_length(model.config, plan, prompt_length),
        dtype=getattr(model, "kv_cache_dtype", None) or model.dtype,
        device=model.device,
        zeroed=plan.compile,  # eager decoding never reads an unwritten slot
    )


class _Stepper:
    """Owns the cache and the positions; turns each step's tokens into the next fp32 logits (B, V).

    With a static cache (and an attention backend that can take a mask over its slots) the steps run
    through `DecodeStep`, whose inputs are preallocated tensors updated in place, so nothing is allocated
    per token and the step can be compiled. Otherwise each step is a plain forward over a growing mask.
    The static cache holds the whole generation when it fits the model's context, else grows when full
    (see `_cache_length`). `cache` continues from a cache holding the first positions of the prompt (the
    caller's `past_key_values`); without the cache (`plan.use_cache` False) every step recomputes the
    whole sequence, as the reference does.

    Args:
        mask: (B, L) 1 for real tokens over every position so far, cached ones included.
    """

    def __init__(self, model: Any, plan: _Plan, mask: torch.Tensor, cache: Cache | None = None) -> None:
        B, L = mask.shape
        self.model, self.mask, self.plan, self.prompt_length = model, mask, plan, L
        self.padded = not bool(mask.all())
        self.past = 0 if cache is None else cache.get_seq_length()
        self.ids: torch.Tensor | None = None  # the whole sequence, when recomputing without a cache
        self.cache = (
            None if not plan.use_cache else cache if cache is not None else _make_cache(model, plan, B, L)
        )
        if isinstance(self.cache, StaticCache):
            self.cache.grow(_cache_length(model.config, plan, L))
        self.position_ids = mask.sum(-1, keepdim=True)  # (B, 1) next position, as the reference's cumsum
        self.step_fn: DecodeStep | None = None
        if isinstance(self.cache, StaticCache) and model.config.attn_implementation != "flash_attention_2":
            self.step_fn = DecodeStep.for_model(model, compile=plan.compile)
            # Slots each new token may see: the prompt's real tokens now, each step's own slot as it comes.
            self.key_mask = torch.zeros(B, self.cache.max_cache_len, dtype=torch.bool, device=mask.device)
            self.key_mask[:, :L] = mask.bool()
            self.cache_position = torch.tensor([L], device=mask.device)

    def prefill(self, **model_inputs: Any) -> torch.Tensor:
        """Logits after the prompt; `model_inputs` holds the positions the cache does not (all of them
        without a cache)."""
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        if self.cache is None:
            self.ids = model_inputs["input_ids"]
            return self._recompute()
        out = self.model(
            **model_inputs,
            attention_mask=self.mask if self.padded else None,
            position_ids=positions[:, self.past :],
            past_key_values=self.cache,
            logits_to_keep=1,
        )
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _recompute(self) -> torch.Tensor:
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask if self.padded else None,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=1,
        )
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _grow(self) -> None:
        """Make room for more positions in a full static cache (and its key mask)."""
        old = self.cache.max_cache_len
        new = _cache_length(self.model.config, self.plan, self.prompt_length, old)
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

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
            return self._recompute()
        if isinstance(self.cache, StaticCache) and self.cache.get_seq_length() >= self.cache.max_cache_len:
            self._grow()
        if self.step_fn is not None:
            self.key_mask.index_fill_(1, self.cache_position, True)
            logits = self.step_fn(
                self.cache,
                tokens[:, None],
                self.position_ids,
                self.cache_position,
                self.key_mask,
                padded=self.padded,
            )
            self.cache_position += 1
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=self.mask if self.padded else None,
                position_ids=self.position_ids,
                past_key_values=self.cache,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
        self.position_ids += 1
        return logits


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
) -> Iterator[Step]:
    """Generate token by token, yielding a `Step` each time.

    Args:
        model: A StableLmForCausalLM.
        input_ids: Prompt (B, T), left-padded when rows differ in length.
        attention_mask: (B, T) 1 for real tokens; required when the batch is padded.
        config: Resolved generation settings (see `resolve_config`).
        inputs_embeds: (B, T, C) in place of `input_ids`.
        generator: Random generator for sampling (default: torch's global one, as `set_seed` seeds).
        stop_checker: Called with (rows, tokens) of running rows after each step; returns a bool (len(rows),)
            marking rows whose text now ends a stop string.
        sync_every: Read the stopping state back from the device once per this many steps (one host-device
            sync each), yielding the steps in between together. The steps and their finish reasons are the
            same for every value; above 1, up to `sync_every - 1` forward passes past the end are computed
            and dropped. Worth it on a GPU, where each readback stalls the queue; a stop checker or a
            stopping criterion reads every step's tokens anyway, so it implies 1.
        logits_processor: Callables `(input_ids, scores) -> scores` added to the settings' processors, as
            the reference merges them (see `processors.build_processors`).
        stopping_criteria: Callables `(input_ids, scores) -> bool` or a bool tensor per row; a row stops
            when one says so. `scores` is the tuple of the steps' scores when the config asks to return
            them, else None (as the reference passes them).
        past_key_values: A cache holding the first positions of the prompt (fewer than T): only the rest
            is computed, and the cache is extended in place.

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
) -> Iterator[Step]:
    """`stream_tokens` on a checked prompt: check the settings, then return the steps' generator."""
    check_integer("sync_every", sync_every, 1)
    plan = start_plan(
        model,
        config,
        input_ids,
        attention_mask,
        inputs_embeds,
        stops=stop_checker is not None,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        past_key_values=past_key_values,
    )
    if stop_checker is not None or plan.criteria or plan.deadline is not None:
        sync_every = 1
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
    )


def start_plan(
    model: Any,
    config: GenerationConfig,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    *,
    stops: bool,
    logits_processor: Sequence[Callable],
    stopping_criteria: Sequence[Criterion],
    past_key_values: Cache | None,
) -> _Plan:
    """The plan of a checked prompt, processors included (shared by sampling and beam search)."""
    source = input_ids if input_ids is not None else inputs_embeds
    B, T = source.shape[:2]
    check_past(past_key_values, B, T, config)
    plan = _plan(model, config, B, T, stops, criteria=list(stopping_criteria))
    if input_ids is None:  # the reference counts only ids in max_length then (the new tokens)
        plan.config.max_length = plan.max_new_tokens
    return with_processors(
        plan,
        prompt_length=T if input_ids is not None else 0,
        mask=attention_mask,
        device=model.device,
        custom=list(logits_processor),
    )


def check_past(cache: Any, batch: int, length: int, config: GenerationConfig) -> None:
    """`past_key_values` must be one of stablelm's caches, of `batch` rows, holding fewer positions than
    the prompt's `length` (the prompt repeats the cached tokens, as the reference takes it)."""
    if cache is None:
        return
    if not isinstance(cache, Cache):
        raise TypeError(
            f"past_key_values must be a stablelm cache (DynamicCache or StaticCache, e.g. the past_key_values "
            f"a previous generate or forward returned), got {type(cache).__name__}."
        )
    past = cache.get_seq_length()
    rows = cache.keys[0].shape[0] if getattr(cache, "keys", None) else batch
    if rows != batch:
        raise ValueError(
            f"past_key_values holds {rows} rows but the prompt has {batch} (after num_return_sequences/num_beams)."
        )
    if past >= length:
        raise ValueError(
            f"past_key_values already holds {past} positions and input_ids has {length}: pass the whole "
            "sequence (the cached tokens followed by at least one new token) as input_ids."
        )
    if config.compile:
        raise ValueError("compile=True cannot continue from past_key_values; drop one of them.")


def _criteria_hit(criteria: Sequence[Criterion], seq: torch.Tensor, scores: Any) -> torch.Tensor:
    """The rows (B,) that one of the caller's stopping criteria ends (each returns a bool or a bool per row)."""
    hit = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for criterion in criteria:
        hit = hit | torch.as_tensor(criterion(seq, scores), device=seq.device).bool()
    return hit


@torch.no_grad()
def _steps(
    model: Any,
    plan: _Plan,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    generator: torch.Generator | None,
    stop_checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    sync_every: int,
    past_key_values: Cache | None = None,
    kept: dict[str, Any] | None = None,
) -> Iterator[Step]:
    """The decode loop of `stream_tokens`, over checked arguments. `kept` receives the cache."""
    B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    device = model.device
    mask = torch.ones(B, T, dtype=torch.long) if attention_mask is None else attention_mask
    stepper = _Stepper(model, plan, mask.to(device).long(), cache=past_key_values)
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
    for step in range(plan.max_new_tokens):
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
            stopped |= running & _criteria_hit(plan.criteria, seq, history)
        if plan.deadline is not None and time.time() > plan.deadline:
            stopped |= running
        running = running & ~stopped
        recorded = Step(tokens, [], scores, logits) if plan.record else Step(tokens, [])
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
        logits = stepper.step(tokens)


def check_prompt(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
) -> None:
    """Check the prompt tensors: exactly one of `input_ids` (integer ids within the model's vocabulary)
    and `inputs_embeds` (B, T, hidden_size), at least one row and one position, and an `attention_mask`
    of 0 and 1 of the same (B, T). TypeError/ValueError naming the argument. With `model` None, the
    checks that need the model (vocabulary, hidden size) are left out."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids and inputs_embeds to generate.")
    if input_ids is not None:
        check_input_ids(input_ids, None if model is None else _vocab_size(model))
        B, T = input_ids.shape
    else:
        check_inputs_embeds(inputs_embeds, None if model is None else model.config.hidden_size)
        B, T = inputs_embeds.shape[:2]
    if attention_mask is not None:
        check_attention_mask(attention_mask, B, T)


def prepare_inputs(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    config: GenerationConfig,
    *,
    model: Any = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Check the settings and the prompt tensors (`check_prompt`; a 1-D `input_ids` is one row), and
    repeat them for `num_return_sequences` (`num_beams` with beam search)."""
    config.validate()
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_prompt(model, input_ids, attention_mask, inputs_embeds)
    if input_ids is not None:
        _check_padding(input_ids, attention_mask, config)
    # Beam search starts every beam from the prompt (the reference repeats it num_beams times).
    n = max(int(config.num_return_sequences or 1), int(config.num_beams or 1))
    if n > 1:
        input_ids, attention_mask, inputs_embeds = (
            None if t is None else t.repeat_interleave(n, dim=0)
            for t in (input_ids, attention_mask, inputs_embeds)
        )
    return input_ids, attention_mask, inputs_embeds


def _check_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig
) -> None:
    pad = config.pad_token_id
    if attention_mask is None:
        eos = config.eos_token_id
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        if (
            input_ids.shape[0] > 1
            and pad is not None
            and pad not in eos_list
            and bool((input_ids == pad).any())
        ):
            raise ValueError(
                "The batch holds pad tokens but no attention_mask was passed: pass the attention_mask the "
                "tokenizer returned (e.g. model.generate(**tokenizer(texts, padding=True, return_tensors='pt')))."
            )
        return
    if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn(
            "A decoder-only architecture is being used, but right-padding was detected! For correct generation "
            "results, please set `padding_side='left'` when initializing the tokenizer.",
            stacklevel=3,
        )


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
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Run `stream_tokens` to the end; return the prompt followed by the new tokens (B, T + n), or with
    `config.return_dict_in_generate` a `GenerateDecoderOnlyOutput` (scores, logits, cache).

    With `inputs_embeds` instead of ids, only the new tokens are returned (as the reference does).
    """
    input_ids, attention_mask, inputs_embeds = prepare_inputs(
        input_ids, attention_mask, inputs_embeds, config, model=model
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
    plan = start_plan(
        model,
        config,
        input_ids,
        attention_mask,
        inputs_embeds,
        stops=stop_checker is not None,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        past_key_values=past_key_values,
    )
    sync_every = GPU_SYNC_EVERY if batched_sync and not plan.criteria and plan.deadline is None else 1
    kept: dict[str, Any] = {}
    steps = _steps(
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
        cache=kept.get("cache"),
    )
