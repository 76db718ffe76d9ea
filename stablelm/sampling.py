"""Logits processors and the token sampler, as small pure functions over fp32 scores (B, V).

They follow the reference's arithmetic and order (repetition penalty, minimum length, then temperature,
top-k, top-p, min-p), so a seeded run draws the same tokens as the reference's `generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEG_INF = -float("inf")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. `do_sample=False` (or temperature 0) is greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        """Raise ValueError naming the parameter and its valid range (TypeError when not a number).
        NaN is out of every range."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (bool, str)) or not _is_real(value)):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        if self.temperature is None or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 and finite (0 means greedy), got {self.temperature}.")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ValueError(
                f"top_k must be a non-negative integer (0 or None disables it), got {self.top_k!r}."
            )
        if self.top_p is None or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (None disables it), got {self.min_p}.")
        if self.repetition_penalty is None or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(
                f"repetition_penalty must be > 0 and finite (1 disables it), got {self.repetition_penalty}."
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _is_real(value: object) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def repetition_penalty(
    scores: torch.Tensor,
    input_ids: torch.Tensor,
    penalty: float,
    *,
    ignore_before: torch.Tensor | None = None,
) -> torch.Tensor:
    """Make every token already in `input_ids` (prompt included) less likely: divide positive scores by
    `penalty`, multiply negative ones. `ignore_before` (B,) skips each row's first positions (its left
    padding, as the reference does when given an attention mask)."""
    if penalty == 1.0 or input_ids.shape[1] == 0:
        return scores
    vocab = scores.shape[-1]
    if ignore_before is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        input_ids = input_ids.masked_fill(positions[None, :] < ignore_before[:, None], vocab)
    ids = input_ids.clamp(max=vocab)  # ids past the head's vocabulary land on a dropped extra column
    padded = torch.nn.functional.pad(scores, (0, 1))
    picked = torch.gather(padded, 1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, ids, picked)[..., :vocab]


def suppress_tokens(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Forbid `token_ids` (used to hold back EOS until `min_new_tokens` are made)."""
    token_ids = token_ids[token_ids < scores.shape[-1]]  # an id past the head's vocabulary cannot be drawn
    return scores.index_fill(-1, token_ids, NEG_INF)


def temperature(scores: torch.Tensor, value: float) -> torch.Tensor:
    return scores if value == 1.0 else scores / value


def top_k(scores: torch.Tensor, k: int | None, *, keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th are kept), at least `keep`."""
    if not k:
        return scores
    k = min(max(k, keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: float, *, keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (at least `keep`)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -keep:] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def min_p(scores: torch.Tensor, p: float | None, *, keep: int = 1) -> torch.Tensor:
    """Drop tokens less likely than p times the most likely one (the top `keep` tokens always stay)."""
    if p is None:
        return scores
    probs = torch.softmax(scores, dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, min(keep, probs.shape[-1]), dim=-1).indices, False)
    return scores.masked_fill(remove, NEG_INF)


def typical_p(scores: torch.Tensor, mass: float, *, keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to `mass`."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    entropy = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - entropy)
    sorted_shifted, order = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1)
    last.clamp_(max=sorted_shifted.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last.view(-1, 1))
    remove_sorted[..., :keep] = 0
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def epsilon_cutoff(scores: torch.Tensor, epsilon: float | torch.Tensor, *, keep: int = 1) -> torch.Tensor:
    """Drop tokens of probability below `epsilon` (a number, or (B, 1) per row), keeping the top `keep`."""
    remove = scores.softmax(dim=-1) < epsilon
    kth = torch.topk(scores, min(keep, scores.size(-1)))[0][..., -1, None]
    return scores.masked_fill(remove & (scores < kth), NEG_INF)


def eta_cutoff(scores: torch.Tensor, eta: float, *, keep: int = 1) -> torch.Tensor:
    """Epsilon cutoff at min(eta, sqrt(eta) * exp(-entropy)) per row (eta sampling)."""
    epsilon = torch.tensor(eta, device=scores.device)
    entropy = torch.distributions.Categorical(logits=scores).entropy()
    return epsilon_cutoff(
        scores, torch.min(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy))[..., None], keep=keep
    )


def process_logits(
    scores: torch.Tensor,
    input_ids: torch.Tensor,
    params: SamplingParams,
    *,
    banned_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply every processor in the reference's order. `banned_ids` are forbidden this step."""
    scores = repetition_penalty(scores, input_ids, params.repetition_penalty)
    if banned_ids is not None:
        scores = suppress_tokens(scores, banned_ids)
    if params.greedy:
        return scores
    scores = temperature(scores, params.temperature)
    scores = top_k(scores, params.top_k)
    scores = top_p(scores, params.top_p)
    return min_p(scores, params.min_p)


def select_tokens(
    scores: torch.Tensor, params: SamplingParams, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token per row (B,): argmax when greedy, else one draw from softmax(scores)."""
    if params.greedy:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
