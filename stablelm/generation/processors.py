"""The logits processors of the reference's `generate`, each a callable `(input_ids, scores) -> scores`.

Each class carries the name of the reference's class that does the same arithmetic, so that a processor
of the reference passed in `logits_processor=` replaces ours of the same name, as the reference merges
its lists. `build_processors` assembles them in the reference's order (`_get_logits_processor`); the
sampling arithmetic itself lives in `stablelm.sampling`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import sampling
from .config import GenerationConfig, check_integer

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ids(name: str, value: Any) -> list[int]:
    """A token id or a list of them, as a list; TypeError/ValueError naming `name` otherwise."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        check_integer(name, v, 0, what="a token id or a list of token ids")
    return [int(v) for v in values]


def _isin_vocab(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(torch.arange(scores.shape[-1], device=scores.device), ids.to(scores.device))


class RepetitionPenaltyLogitsProcessor:
    def __init__(self, penalty: float, prompt_ignore_length: torch.Tensor | None = None) -> None:
        self.penalty, self.ignore_before = penalty, prompt_ignore_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return sampling.repetition_penalty(scores, input_ids, self.penalty, ignore_before=self.ignore_before)


class NoRepeatNGramLogitsProcessor:
    """Forbid any token that would repeat an n-gram already in the row (prompt included)."""

    def __init__(self, ngram_size: int) -> None:
        check_integer("no_repeat_ngram_size", ngram_size, 1)
        self.n = int(ngram_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length < self.n:
            return scores
        prefix = input_ids[:, length + 1 - self.n :]
        windows = input_ids.unfold(dimension=1, size=self.n, step=1)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        vocab = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], -math.inf)


class SequenceBiasLogitsProcessor:
    """Add a bias to the last token of each sequence when the row ends with the rest of it.

    `sequence_bias` is a dict {(ids...): bias} or a list [[ids, bias], ...], as the reference takes it.
    """

    name = "sequence_bias"

    def __init__(self, sequence_bias: dict | list) -> None:
        self.bias = self._as_dict(sequence_bias)
        self.prepared: tuple[torch.Tensor, list] | None = None

    def _as_dict(self, value: Any) -> dict[tuple[int, ...], float]:
        pairs = value.items() if isinstance(value, dict) else value
        bad = ValueError(
            f"{self.name} must be a non-empty dict {{(token ids...): bias}} or a list [[token ids, bias], ...], "
            f"got {value!r}."
        )
        if not isinstance(value, (dict, list)) or not value:
            raise bad
        out = {}
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise bad
            ids, bias = pair
            if not isinstance(ids, (list, tuple)) or not ids or isinstance(bias, bool):
                raise bad
            if not isinstance(bias, (int, float)):
                raise bad
            out[tuple(_ids(self.name, ids))] = float(bias)
        return out

    def _prepare(self, scores: torch.Tensor) -> tuple[torch.Tensor, list]:
        vocab, device = scores.shape[-1], scores.device
        outside = [i for ids in self.bias for i in ids if i >= vocab]
        if outside:
            raise ValueError(
                f"{self.name} names token ids outside the model's vocabulary of {vocab}: {outside}."
            )
        single = torch.zeros(vocab, dtype=torch.float, device=device)
        singles = [(ids[0], b) for ids, b in self.bias.items() if len(ids) == 1]
        if singles:
            single[[i for i, _ in singles]] = torch.tensor([b for _, b in singles], device=device)
        groups: dict[int, list] = {}
        for ids, b in self.bias.items():
            if len(ids) > 1:
                groups.setdefault(len(ids) - 1, []).append((ids, b))
        multi = [
            (
                torch.tensor([ids[:-1] for ids, _ in group], device=device),
                torch.tensor([ids[-1] for ids, _ in group], device=device),
                torch.tensor([b for _, b in group], dtype=torch.float, device=device),
            )
            for group in groups.values()
        ]
        return single, multi

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prepared is None:
            self.prepared = self._prepare(scores)
        single, multi = self.prepared
        bias = torch.zeros_like(scores)
        bias += single
        for prefixes, last, biases in multi:
            n = prefixes.shape[1]
            if n > input_ids.shape[1]:
                continue
            rows = (input_ids[:, None, -n:] == prefixes).all(dim=-1)
            bias.index_add_(1, last, torch.where(rows, biases, 0.0).to(bias.dtype))
        return scores + bias


class NoBadWordsLogitsProcessor(SequenceBiasLogitsProcessor):
    """Never complete one of `bad_words_ids` (lists of token ids); a lone EOS is not banned."""

    name = "bad_words_ids"

    def __init__(self, bad_words_ids: list[list[int]], eos_token_id: list[int] | None = None) -> None:
        if (
            not isinstance(bad_words_ids, list)
            or not bad_words_ids
            or any(not isinstance(w, list) for w in bad_words_ids)
        ):
            raise ValueError(
                f"bad_words_ids must be a non-empty list of lists of token ids, got {bad_words_ids!r}."
            )
        eos = eos_token_id or []
        words = [w for w in bad_words_ids if all(w != [i] for i in eos)]
        super().__init__({tuple(_ids(self.name, w)): -math.inf for w in words} or {(0,): 0.0})


class _SuppressEos:
    def __init__(self, eos: list[int], device: torch.device) -> None:
        self.eos = torch.tensor(eos, device=device)

    def suppress(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.where(_isin_vocab(scores, self.eos), -math.inf, scores)


class MinLengthLogitsProcessor(_SuppressEos):
    def __init__(self, min_length: int, eos: list[int], device: torch.device) -> None:
        super().__init__(eos, device)
        self.min_length = min_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.suppress(scores) if input_ids.shape[-1] < self.min_length else scores


class MinNewTokensLengthLogitsProcessor(_SuppressEos):
    def __init__(self, prompt_length: int, min_new_tokens: int, eos: list[int], device: torch.device) -> None:
        super().__init__(eos, device)
        self.until = prompt_length + min_new_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.suppress(scores) if input_ids.shape[-1] < self.until else scores


class PrefixConstrainedLogitsProcessor:
    """Allow only the tokens `fn(batch_id, row_ids)` lists for each row (`rows_per_prompt` rows per
    prompt: its beams or returned sequences)."""

    def __init__(self, fn: Callable[[int, torch.Tensor], list[int]], rows_per_prompt: int) -> None:
        if not callable(fn):
            raise TypeError(f"prefix_allowed_tokens_fn must be a callable (batch_id, input_ids), got {fn!r}.")
        self.fn, self.n = fn, rows_per_prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(scores, -math.inf)
        prompts = input_ids.shape[0] // self.n
        for batch_id in range(prompts):
            for beam in range(self.n):
                row = batch_id * self.n + beam
                allowed = self.fn(batch_id, input_ids[row])
                if len(allowed) == 0:
                    raise ValueError(
                        f"prefix_allowed_tokens_fn returned no token for batch_id {batch_id}: the constraint "
                        "cannot be met."
                    )
                mask[row, allowed] = 0
        out = scores + mask
        # Where every allowed token of every row of a prompt is -inf, the constraint still holds (score 0).
        stuck = out.amax(dim=-1).isneginf().view(prompts, -1).all(dim=-1, keepdim=True)
        return torch.where(stuck.repeat_interleave(self.n, dim=0), mask, out)


class _Force:
    def __init__(self, ids: list[int], at_length: int) -> None:
        self.ids, self.at_length = ids, at_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.at_length:
            return scores
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.ids] = 0
        return forced


class ForcedBOSTokenLogitsProcessor(_Force):
    """Force `forced_bos_token_id` as the token after a one-token prompt."""

    def __init__(self, token_id: int) -> None:
        super().__init__(_ids("forced_bos_token_id", token_id), 1)


class ForcedEOSTokenLogitsProcessor(_Force):
    """Force one of `forced_eos_token_id` as the last token when `max_length` is reached."""

    def __init__(self, max_length: int, token_ids: int | list[int]) -> None:
        super().__init__(_ids("forced_eos_token_id", token_ids), max_length - 1)


class InfNanRemoveLogitsProcessor:
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.where(scores != scores, 0.0, scores)
        out = torch.where(scores == math.inf, torch.finfo(scores.dtype).max, out)
        return torch.where(scores == -math.inf, torch.finfo(scores.dtype).min, out)


class ExponentialDecayLengthPenalty:
    """From `start` new tokens on, raise EOS's score by |score| * (factor ** (tokens past start) - 1)."""

    def __init__(self, setting: Sequence, eos: list[int], prompt_length: int) -> None:
        if not isinstance(setting, (list, tuple)) or len(setting) != 2 or isinstance(setting[1], bool):
            raise ValueError(
                f"exponential_decay_length_penalty must be a pair (start_index, decay_factor), got {setting!r}."
            )
        check_integer("exponential_decay_length_penalty's start_index", setting[0], 0)
        self.start, self.factor = int(setting[0]) + prompt_length, float(setting[1])
        self.eos = torch.tensor(eos)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length <= self.start:
            return scores
        self.eos = self.eos.to(scores.device)
        penalties = torch.zeros_like(scores)
        penalty = torch.abs(scores[:, self.eos]) * (pow(self.factor, length - self.start) - 1)
        penalties[:, self.eos] = penalty.masked_fill(~torch.isfinite(scores[:, self.eos]), 0.0)
        return scores + penalties


class SuppressTokensLogitsProcessor:
    def __init__(self, token_ids: Sequence[int], device: torch.device) -> None:
        self.ids = torch.tensor(_ids("suppress_tokens", list(token_ids)), device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.where(_isin_vocab(scores, self.ids), -math.inf, scores)


class SuppressTokensAtBeginLogitsProcessor:
    def __init__(self, token_ids: Sequence[int], begin_index: int, device: torch.device) -> None:
        self.ids = torch.tensor(_ids("begin_suppress_tokens", list(token_ids)), device=device)
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.begin_index:
            return scores
        return torch.where(_isin_vocab(scores, self.ids), -math.inf, scores)


class LogitNormalization:
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.log_softmax(dim=-1)


class _Warper:
    """One of stablelm.sampling's warpers with its setting and `keep` (the reference's min_tokens_to_keep)."""

    fn: Callable[..., torch.Tensor]

    def __init__(self, value: Any, keep: int = 1) -> None:
        self.value, self.keep = value, keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return type(self).fn(scores, self.value, keep=self.keep)


class TemperatureLogitsWarper(_Warper):
    fn = staticmethod(lambda scores, value, keep: sampling.temperature(scores, value))


class TopKLogitsWarper(_Warper):
    fn = staticmethod(sampling.top_k)


class TopPLogitsWarper(_Warper):
    fn = staticmethod(sampling.top_p)


class MinPLogitsWarper(_Warper):
    fn = staticmethod(sampling.min_p)


class TypicalLogitsWarper(_Warper):
    fn = staticmethod(sampling.typical_p)


class EpsilonLogitsWarper(_Warper):
    fn = staticmethod(sampling.epsilon_cutoff)


class EtaLogitsWarper(_Warper):
    fn = staticmethod(sampling.eta_cutoff)


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
