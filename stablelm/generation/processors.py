"""The logits processors of the reference's `generate`, each a callable `(input_ids, scores) -> scores`.

Each class carries the name of the reference's class that does the same arithmetic, so that a processor
of the reference passed in `logits_processor=` replaces ours of the same name, as the reference merges
its lists. `plan.build_processors` assembles them in the reference's order (`_get_logits_processor`);
the sampling arithmetic itself lives in `stablelm.sampling`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import sampling
from .config import check_integer

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ids(name: str, value: Any) -> list[int]:
    """A token id or a list of them, as a list; TypeError/ValueError naming `name` otherwise."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        check_integer(name, v, 0, what="a token id or a list of token ids")
    return [int(v) for v in values]


def _isin_vocab(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(torch.arange(scores.shape[-1], device=scores.device), ids.to(scores.device))


class _VocabMask:
    """`ids` banned from the scores: a copy of the scores with -inf at those ids within the vocabulary
    (`torch.where(isin(arange(V), ids), -inf, scores)`, the same values). The ids within the vocabulary
    are picked once per vocabulary size and device; index_fill_ then costs ~8 us for the 160M shape's
    vocabulary where the where over a (V,) mask costs ~30 us (warm), and remaking that mask every step
    ~0.3 ms."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self._key: tuple[int, torch.device] | None = None
        self._inside = ids

    def banned(self, scores: torch.Tensor) -> torch.Tensor:
        key = (scores.shape[-1], scores.device)
        if key != self._key:
            self._key = key
            self._inside = self.ids[(self.ids >= 0) & (self.ids < key[0])].to(scores.device)
        return scores.clone().index_fill_(-1, self._inside, -math.inf)


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
        # An empty word bans nothing, as in the reference (whose bias for the empty sequence is never applied).
        words = [w for w in bad_words_ids if w and all(w != [i] for i in eos)]
        super().__init__({tuple(_ids(self.name, w)): -math.inf for w in words} or {(0,): 0.0})


class _SuppressEos:
    def __init__(self, eos: list[int], device: torch.device) -> None:
        self.eos = torch.tensor(eos, device=device)
        self._banned = _VocabMask(self.eos)

    def suppress(self, scores: torch.Tensor) -> torch.Tensor:
        return self._banned.banned(scores)


class MinLengthLogitsProcessor(_SuppressEos):
    def __init__(self, min_length: int, eos: list[int], device: torch.device) -> None:
        super().__init__(eos, device)
        self.min_length = min_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.suppress(scores) if input_ids.shape[-1] < self.min_length else scores

    def bans(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return self.eos if input_ids.shape[-1] < self.min_length else None


class MinNewTokensLengthLogitsProcessor(_SuppressEos):
    def __init__(self, prompt_length: int, min_new_tokens: int, eos: list[int], device: torch.device) -> None:
        super().__init__(eos, device)
        self.until = prompt_length + min_new_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.suppress(scores) if input_ids.shape[-1] < self.until else scores

    def bans(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return self.eos if input_ids.shape[-1] < self.until else None


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
        self._banned = _VocabMask(self.ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self._banned.banned(scores)

    def bans(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return self.ids


class SuppressTokensAtBeginLogitsProcessor:
    def __init__(self, token_ids: Sequence[int], begin_index: int, device: torch.device) -> None:
        self.ids = torch.tensor(_ids("begin_suppress_tokens", list(token_ids)), device=device)
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.begin_index:
            return scores
        return torch.where(_isin_vocab(scores, self.ids), -math.inf, scores)

    def bans(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return self.ids if input_ids.shape[-1] == self.begin_index else None


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


# Processors that only set some ids to -inf: each says which ids at a step (`bans(input_ids)`, None for
# none), so that a greedy step can pick its token without the whole scores (`stablelm.greedy_head`).
# Exact types only: a subclass (the caller's) may do more than its `bans` says.
BANNING = (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
)


def only_bans(processors: Sequence[Any]) -> bool:
    """Whether every processor only sets ids to -inf (see `BANNING`)."""
    return all(type(p) in BANNING for p in processors)


def banned_ids(processors: Sequence[Any], input_ids: torch.Tensor) -> torch.Tensor | None:
    """The ids the processors (all of `BANNING`) set to -inf after `input_ids`, or None."""
    found = [ids for p in processors if (ids := p.bans(input_ids)) is not None]
    return None if not found else found[0] if len(found) == 1 else torch.cat(found)
