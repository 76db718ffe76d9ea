"""The plan of one generation: every setting checked against the prompt and the model, resolved once
(lengths, EOS and padding, cache kind, the logits processors in the reference's order, the caller's
stopping criteria), before any work is done."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache import Cache, check_cache
from ..sampling import SamplingParams
from .config import DEFAULT_NEW_TOKENS, GenerationConfig
from .processors import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    Processor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

_EXTENDING_ROPE_TYPES = ("dynamic", "yarn", "longrope", "llama3")
Criterion = Callable[[torch.Tensor, Any], Any]


@dataclass
class Plan:
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
    record: bool = (
        False  # the caller asked for scores/logits/hidden states/attentions: keep them in each Step
    )
    hidden_states: bool = False  # and for the hidden states: each step runs the model's forward
    attentions: bool = False  # and for the attention probabilities: the forward, on eager attention
    deadline: float | None = None  # time.time() past which every row stops (max_time)


def make_plan(
    model: Any,
    config: GenerationConfig,
    prompt_length: int,
    *,
    criteria: Sequence[Criterion] = (),
) -> Plan:
    """Check every setting against the prompt (of `prompt_length` positions) and the model, and
    resolve them. Raises before any work is done. The processors are built later, by `with_processors`,
    once the prompt's padding is known."""
    config.validate()
    params = sampling_params(config)
    max_new = _max_new_tokens(model, config, prompt_length)
    eos_ids = config.eos_token_id
    eos_list = [] if eos_ids is None else list(eos_ids) if isinstance(eos_ids, (list, tuple)) else [eos_ids]
    eos_list = [int(e) for e in eos_list]
    device = model.device
    eos = torch.tensor(eos_list, dtype=torch.long, device=device) if eos_list else None
    pad = int(config.pad_token_id) if config.pad_token_id is not None else (eos_list[0] if eos_list else 0)
    pad_finished = bool(eos_list) or any(hasattr(c, "eos_token_id") for c in criteria)
    _check_length(model.config, prompt_length, max_new)
    cache_impl, use_cache = _check_cache_and_numbers(config)
    resolved = config.updated(max_length=prompt_length + max_new)
    record = bool(
        config.return_dict_in_generate
        and (
            config.output_scores
            or config.output_logits
            or config.output_hidden_states
            or config.output_attentions
        )
    )
    for i, criterion in enumerate(criteria):
        if not callable(criterion):
            raise TypeError(
                f"stopping_criteria[{i}] is a {type(criterion).__name__}, not a callable "
                "(input_ids, scores) -> bool tensor."
            )
    return Plan(
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
        hidden_states=bool(config.return_dict_in_generate and config.output_hidden_states),
        attentions=bool(config.return_dict_in_generate and config.output_attentions),
        deadline=None if config.max_time is None else time.time() + float(config.max_time),
    )


def _max_new_tokens(model: Any, config: GenerationConfig, prompt_length: int) -> int:
    """max_new_tokens, else max_length (which counts the prompt), else 20 within the model's context."""
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    max_length = config.max_length
    if max_length is None:
        max_length = min(prompt_length + DEFAULT_NEW_TOKENS, model.config.max_position_embeddings)
    max_length = int(max_length)
    if max_length <= prompt_length:
        raise ValueError(
            f"max_length ({max_length}) counts the prompt, which already has {prompt_length} tokens: "
            "raise max_length or pass max_new_tokens instead."
        )
    return max_length - prompt_length


def _check_cache_and_numbers(config: GenerationConfig) -> tuple[str, bool]:
    """The cache's kind and whether there is one, checked against `compile`; the plain numbers checked."""
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
    if config.compile and config.return_dict_in_generate and config.output_hidden_states:
        raise ValueError("compile=True does not return hidden states: drop compile or output_hidden_states.")
    if config.compile and config.return_dict_in_generate and config.output_attentions:
        raise ValueError("compile=True does not return attentions: drop compile or output_attentions.")
    for name in ("max_time", "length_penalty"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    return cache_impl, use_cache


def padding_lengths(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's left padding (the reference's `(mask != 0).argmax(1)`), None when nothing is padded."""
    if mask is None or bool(mask.all()):
        return None
    return (mask != 0).int().argmax(dim=1)


def with_processors(
    plan: Plan,
    *,
    prompt_length: int,
    mask: torch.Tensor | None,
    device: torch.device,
    custom: Sequence[Callable] = (),
    prefix_allowed_tokens_fn: Callable | None = None,
) -> Plan:
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
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
    )
    return plan


def start_plan(
    model: Any,
    config: GenerationConfig,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    *,
    logits_processor: Sequence[Callable],
    stopping_criteria: Sequence[Criterion],
    past_key_values: Cache | None,
    prefix_allowed_tokens_fn: Callable | None = None,
) -> Plan:
    """The plan of a checked prompt, processors included (shared by sampling and beam search)."""
    source = input_ids if input_ids is not None else inputs_embeds
    B, T = source.shape[:2]
    check_past(past_key_values, B, T, config)
    plan = make_plan(model, config, T, criteria=list(stopping_criteria))
    if input_ids is None:  # the reference counts only ids in max_length then (the new tokens)
        plan.config.max_length = plan.max_new_tokens
    if inputs_embeds is not None:
        plan.use_cache = True  # as the reference: the embeddings are read once, then the cache
    return with_processors(
        plan,
        prompt_length=T if input_ids is not None else 0,
        mask=attention_mask,
        device=model.device,
        custom=list(logits_processor),
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
    )


def check_past(cache: Any, batch: int, length: int, config: GenerationConfig) -> None:
    """`past_key_values` must be one of stablelm's caches, of `batch` rows, holding fewer positions than
    the prompt's `length` (the prompt repeats the cached tokens, as the reference takes it)."""
    if cache is None:
        return
    check_cache(cache)
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


def vocab_size(model: Any) -> int:
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


def _open_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}.")
    return float(value)


def build_processors(
    config: GenerationConfig,
    *,
    prompt_length: int,
    eos: list[int],
    padding_lengths: torch.Tensor | None,
    device: torch.device,
    custom: Sequence[Processor] = (),
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
) -> list[Processor]:
    """The processors of a resolved `config`, in the reference's order, with `custom` merged in as the
    reference merges them: one of the same class name takes the place of ours, the others come after
    the processors and before the sampling warpers.

    Args:
        config: Resolved settings (see `resolve_config`).
        prompt_length: Tokens in the prompt (0 with `inputs_embeds`).
        eos: The EOS ids (possibly empty).
        padding_lengths: (rows,) left padding of each row, or None without padding.
        device: Where the scores live.
        custom: The caller's `logits_processor` entries.
        prefix_allowed_tokens_fn: The caller's `(batch_id, input_ids) -> allowed token ids`, or None.
    """
    c = config
    out: list[Processor] = []
    if c.sequence_bias is not None:
        out.append(SequenceBiasLogitsProcessor(c.sequence_bias))
    if c.repetition_penalty is not None and c.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(c.repetition_penalty, padding_lengths))
    if c.no_repeat_ngram_size:
        out.append(NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size))
    if c.bad_words_ids is not None:
        out.append(NoBadWordsLogitsProcessor(c.bad_words_ids, eos))
    if eos and c.min_length:
        out.append(MinLengthLogitsProcessor(c.min_length, eos, device))
    if eos and c.min_new_tokens:
        out.append(MinNewTokensLengthLogitsProcessor(prompt_length, c.min_new_tokens, eos, device))
    if prefix_allowed_tokens_fn is not None:
        rows = max(c.num_beams or 1, c.num_return_sequences or 1)
        out.append(PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, rows))
    if c.forced_bos_token_id is not None:
        out.append(ForcedBOSTokenLogitsProcessor(c.forced_bos_token_id))
    if c.forced_eos_token_id is not None:
        out.append(ForcedEOSTokenLogitsProcessor(c.max_length, c.forced_eos_token_id))
    if c.remove_invalid_values is True:
        out.append(InfNanRemoveLogitsProcessor())
    if c.exponential_decay_length_penalty is not None:
        out.append(ExponentialDecayLengthPenalty(c.exponential_decay_length_penalty, eos, prompt_length))
    if c.suppress_tokens is not None:
        out.append(SuppressTokensLogitsProcessor(c.suppress_tokens, device))
    if c.begin_suppress_tokens is not None:
        begin = prompt_length + (1 if prompt_length <= 1 and c.forced_bos_token_id is not None else 0)
        out.append(SuppressTokensAtBeginLogitsProcessor(c.begin_suppress_tokens, begin, device))
    out = merge_custom(out, custom)
    if c.do_sample and c.temperature != 0:  # temperature 0 is greedy (stablelm's reading)
        keep = max(2, 1 + len(eos)) if (c.num_beams or 1) > 1 else 1
        if c.temperature is not None and c.temperature != 1.0:
            out.append(TemperatureLogitsWarper(c.temperature))
        if c.top_k:
            out.append(TopKLogitsWarper(c.top_k, keep))
        if c.top_p is not None and c.top_p < 1.0:
            out.append(TopPLogitsWarper(c.top_p, keep))
        if c.min_p is not None:
            out.append(MinPLogitsWarper(c.min_p, keep))
        if c.typical_p is not None and c.typical_p < 1.0:
            out.append(TypicalLogitsWarper(_open_unit("typical_p", c.typical_p), keep))
        if c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0:
            out.append(EpsilonLogitsWarper(c.epsilon_cutoff, keep))
        if c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0:
            out.append(EtaLogitsWarper(c.eta_cutoff, keep))
    if c.renormalize_logits is True:
        out.append(LogitNormalization())
    return out


def merge_custom(defaults: list, custom: Sequence) -> list:
    """The reference's `_merge_criteria_processor_list`: a custom entry whose class has the name of a default
    one's takes its place; the other custom entries follow the defaults, in their order."""
    if not custom:
        return defaults
    merged = []
    for default in defaults:
        same = next((c for c in custom if type(c).__name__ == type(default).__name__), None)
        merged.append(same if same is not None else default)
    return merged + [c for c in custom if not any(c is m for m in merged)]


def apply_processors(
    processors: Sequence[Processor], input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def sampling_params(config: GenerationConfig) -> SamplingParams:
    """The sampling settings of `config`, checked (TypeError / ValueError naming the setting). None switches
    a processor off, as in the reference."""
    params = SamplingParams(
        do_sample=bool(config.do_sample),
        temperature=1.0 if config.temperature is None else config.temperature,
        top_k=config.top_k,
        top_p=1.0 if config.top_p is None else config.top_p,
        min_p=config.min_p,
        repetition_penalty=1.0 if config.repetition_penalty is None else config.repetition_penalty,
    )
    params.validate()
    return params
