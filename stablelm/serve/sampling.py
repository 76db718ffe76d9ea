"""How a served request draws its tokens: its sampling options, the logits processors in vLLM's order,
and the defaults a checkpoint's generation_config.json gives requests that leave a setting out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM's): dividing by them overflows


@dataclass(frozen=True)
class SamplingOptions:
    """How one job draws its tokens and when its rows stop (OpenAI's fields and vLLM's extras)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()  # vLLM's: end a row, also with ignore_eos
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def process_scores(
    options: SamplingOptions,
    scores: Any,
    *,
    prompt: list[int],
    generated: list[int],
    counts: Any,
    stop_ids: frozenset[int],
) -> Any:
    """The logits processors, per row, in vLLM's order: penalties, logit bias, min_tokens, then
    temperature, top-k, top-p and min-p (stablelm.sampling's functions)."""
    import torch

    from .. import sampling

    if options.repetition_penalty != 1.0:
        seen = torch.tensor([prompt + generated], device=scores.device)
        scores = sampling.repetition_penalty(scores, seen, options.repetition_penalty)
    if counts is not None:
        scores = scores - options.frequency_penalty * counts - options.presence_penalty * (counts > 0)
    if options.logit_bias:
        ids = torch.tensor([i for i, _ in options.logit_bias], device=scores.device)
        bias = torch.tensor([b for _, b in options.logit_bias], dtype=scores.dtype, device=scores.device)
        scores = scores.index_add(1, ids, bias[None])
    if len(generated) < options.min_tokens and (stop_ids or options.stop_token_ids):
        banned = torch.tensor(sorted(stop_ids | options.stop_token_ids), device=scores.device)
        scores = sampling.suppress_tokens(scores, banned)
    if options.greedy:
        return scores
    scores = sampling.temperature(scores, options.temperature)
    if options.top_k > 0:
        scores = sampling.top_k(scores, options.top_k)
    scores = sampling.top_p(scores, options.top_p)
    if options.min_p > 0:
        scores = sampling.min_p(scores, options.min_p)
    return scores


SAMPLING_DEFAULTS = {  # (low, high, open_low): where a generation_config.json value is usable
    "temperature": (0.0, None, False),
    "top_p": (0.0, 1.0, True),
    "top_k": (-1, None, False),
    "min_p": (0.0, 1.0, False),
    "repetition_penalty": (0.0, None, True),
}


def sampling_defaults(generation_config: Any) -> dict[str, float]:
    """The sampling settings a checkpoint's generation_config.json sets (temperature, top_p, top_k, min_p,
    repetition_penalty): the defaults of requests that leave them out, as in vLLM. Values out of range are
    left out."""
    if generation_config is None:
        return {}
    found = generation_config if isinstance(generation_config, dict) else generation_config.to_dict()
    defaults = {}
    for name, (low, high, open_low) in SAMPLING_DEFAULTS.items():
        value = found.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            continue
        if (
            (value <= low if open_low else value < low)
            or (high is not None and value > high)
            or value == float("inf")
        ):
            continue
        defaults[name] = int(value) if name == "top_k" else float(value)
    return defaults


def unusable_scores(options: SamplingOptions, what: str) -> str:
    """The 400's message for a row whose processed scores are `what`."""
    return (
        f"The request's sampling settings leave {what} in the token scores (repetition_penalty="
        f"{options.repetition_penalty:g}, temperature={options.temperature:g}, logit_bias of "
        f"{len(options.logit_bias)} tokens): float32 overflows. Use values in a usual range (repetition_penalty "
        "around 1, e.g. 0.5 to 2)."
    )
