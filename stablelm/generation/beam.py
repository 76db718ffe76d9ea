"""Beam search (and beam sampling), as the reference's vectorised `_beam_search` does it, over the same
decode steps as greedy decoding (`loop.Stepper`: one forward per step over the KV cache, whose rows are
reordered to follow the beams).

Per prompt, `num_beams` running beams are extended by every token; the best `beams_to_keep` candidates
(twice the beams, or more with several EOS tokens) are kept, those that hit a stopping rule go to the
finished set (scored with the length penalty), the best unfinished ones run on. Shapes: B prompts, N beams,
K candidates kept per prompt, L = max_length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..cache import Cache
from .config import GenerationConfig
from .loop import criteria_hit
from .outputs import GenerateBeamDecoderOnlyOutput
from .plan import Criterion, Plan, apply_processors, start_plan
from .prompt import prepare_inputs
from .stepper import Stepper


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) -> (B * N, ...)"""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick beams `index` (B, M) along dim 1 of `t` (B, N, ...)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


class _BeamState:
    """The running and finished beams of every prompt, in the reference's static shapes."""

    def __init__(self, input_ids: torch.Tensor, plan: Plan, num_beams: int, fill: int) -> None:
        BN, T = input_ids.shape
        B, L, device = BN // num_beams, plan.config.max_length, input_ids.device
        self.B, self.N, self.T = B, num_beams, T
        self.running = torch.full((B, num_beams, L), fill, dtype=torch.int64, device=device)
        self.running[:, :, :T] = input_ids.view(B, num_beams, T)
        self.sequences = self.running.clone()
        # Only the first beam starts alive, so that the beams do not all pick the same tokens.
        self.running_scores = torch.zeros((B, num_beams), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((B, num_beams), -1e9, dtype=torch.float, device=device)
        self.finished = torch.zeros((B, num_beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones((B, 1), dtype=torch.bool, device=device)
        self.running_indices = torch.full((B, num_beams, L - T), -1, dtype=torch.int32, device=device)
        self.indices = self.running_indices.clone()


def _stopping(plan: Plan, seq: torch.Tensor, history: tuple | None) -> torch.Tensor:
    """Which candidate rows (B * K, length) hit a stopping rule: the length limit, EOS, max_time, or one
    of the caller's criteria."""
    hit = torch.full((seq.shape[0],), seq.shape[-1] >= plan.config.max_length, device=seq.device)
    if plan.eos is not None:
        hit |= torch.isin(seq[:, -1], plan.eos)
    if plan.deadline is not None and time.time() > plan.deadline:
        hit[:] = True
    if plan.criteria:
        hit |= criteria_hit(plan.criteria, seq, history)
    return hit


def _top_candidates(
    s: _BeamState, log_probs: torch.Tensor, cur_len: int, keep: int, sample: bool, generator: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `keep` best continuations of each prompt over all its beams (B, N * V): scores, sequences and
    beam indices of each, in descending score."""
    if sample:
        picked = torch.multinomial(F.softmax(log_probs, dim=-1), num_samples=keep, generator=generator)
        top_scores = torch.gather(log_probs, 1, picked)
        top_scores, order = top_scores.sort(dim=-1, descending=True)
        picked = picked.gather(-1, order)
    else:
        top_scores, picked = torch.topk(log_probs, k=keep)
    vocab = log_probs.shape[-1] // s.N
    beam = picked // vocab
    top_indices = _gather(s.running_indices, beam)
    top_sequences = _gather(s.running, beam)
    top_sequences[:, :, cur_len] = picked % vocab
    offset = torch.arange(s.B, device=picked.device).view(-1, 1) * s.N
    top_indices[:, :, cur_len - s.T] = (beam + offset).to(top_indices.dtype)
    return top_scores, top_sequences, top_indices


def _update_finished(
    s: _BeamState,
    top_scores: torch.Tensor,
    top_sequences: torch.Tensor,
    top_indices: torch.Tensor,
    hits: torch.Tensor,
    top_mask: torch.Tensor,
    cur_len: int,
    config: GenerationConfig,
) -> None:
    """Merge the candidates that just finished (among the first N) into the finished beams, keeping the
    best N by length-penalised score."""
    just_finished = hits & top_mask[None, :]
    scores = top_scores / ((cur_len + 1 - s.T) ** config.length_penalty)
    full = torch.all(s.finished, dim=-1, keepdim=True) & (config.early_stopping is True)
    scores = scores + full.to(torch.float32) * -1.0e9
    scores = scores + (~s.improvable).to(torch.float32) * -1.0e9
    scores = scores + (~just_finished) * -1.0e9
    merged_scores = torch.cat((s.scores, scores), dim=1)
    best = torch.topk(merged_scores, k=s.N)[1]
    s.sequences = _gather(torch.cat((s.sequences, top_sequences), dim=1), best)
    s.scores = _gather(merged_scores, best)
    s.indices = _gather(torch.cat((s.indices, top_indices), dim=1), best)
    s.finished = _gather(torch.cat((s.finished, just_finished), dim=1), best)


def _still_improvable(s: _BeamState, cur_len: int, config: GenerationConfig) -> None:
    """The reference's early-stopping heuristic: can a running beam still beat the worst finished one?"""
    if config.early_stopping == "never" and config.length_penalty > 0.0:
        best_length = config.max_length - s.T
    else:
        best_length = cur_len - s.T
    best_running = s.running_scores[:, :1] / (best_length**config.length_penalty)
    worst_finished = torch.where(s.finished, torch.min(s.scores, dim=1, keepdim=True)[0], -1.0e9)
    s.improvable = s.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


@torch.no_grad()
def beam_search(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    config: GenerationConfig,
    inputs_embeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    logits_processor: Sequence[Callable] = (),
    stopping_criteria: Sequence[Criterion] = (),
    past_key_values: Cache | None = None,
    prefix_allowed_tokens_fn: Callable | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
    """Beam search over `config.num_beams` beams per prompt; with `do_sample`, beam sampling.

    Returns the best `num_return_sequences` finished beams of each prompt (B * num_return_sequences,
    T + n; only the n new tokens when the prompt is `inputs_embeds` alone, as in the reference), or with
    `config.return_dict_in_generate` a `GenerateBeamDecoderOnlyOutput`.
    """
    if config.stop_strings:
        raise ValueError("stop_strings are not supported with beam search (num_beams > 1).")
    input_ids, attention_mask, inputs_embeds, position_ids = prepare_inputs(
        input_ids, attention_mask, inputs_embeds, config, model=model, position_ids=position_ids
    )
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
    c, N = plan.config, int(config.num_beams)
    prompt = inputs_embeds if inputs_embeds is not None else input_ids
    if input_ids is None:  # the beams hold the new tokens only, as the reference's (B * N, 0) prompt ids
        input_ids = torch.zeros(prompt.shape[0], 0, dtype=torch.long, device=prompt.device)
    eos = plan.eos
    pad = config.pad_token_id if config.pad_token_id is not None else None if eos is None else int(eos[0])
    # The reference's `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`.
    fill = (pad if pad else int(eos[0])) if eos is not None else -1
    s = _BeamState(input_ids, plan, N, fill)
    keep = max(2, 1 + (0 if eos is None else eos.shape[0])) * N
    top_mask = torch.cat((torch.ones(N, dtype=torch.bool), torch.zeros(keep - N, dtype=torch.bool))).to(
        input_ids.device
    )
    record_scores = c.return_dict_in_generate and c.output_scores
    scores_seen: tuple | None = () if record_scores else None
    logits_seen: tuple | None = () if c.return_dict_in_generate and c.output_logits else None
    hidden_seen: tuple | None = () if plan.hidden_states else None
    attentions_seen: tuple | None = () if plan.attentions else None
    mask = torch.ones(prompt.shape[:2], dtype=torch.long) if attention_mask is None else attention_mask
    stepper = Stepper(
        model, plan, mask.to(model.device).long(), cache=past_key_values, positions=position_ids
    )
    if inputs_embeds is not None:  # the cache is kept then (see `start_plan`)
        logits = stepper.prefill(inputs_embeds=inputs_embeds[:, stepper.past :])
    else:
        logits = stepper.prefill(
            input_ids=input_ids[:, stepper.past :] if stepper.cache is not None else input_ids
        )
    flat_running, cur_len = input_ids, s.T
    while True:
        log_probs = apply_processors(plan.processors, flat_running, F.log_softmax(logits, dim=-1))
        if logits_seen is not None:
            logits_seen += (logits.clone(),)
        if scores_seen is not None:
            scores_seen += (log_probs.clone(),)
        if hidden_seen is not None:
            hidden_seen += (stepper.hidden,)
        if attentions_seen is not None:  # like the hidden states: the rows as the step ran them
            attentions_seen += (stepper.attentions,)
        log_probs = log_probs.view(s.B, N, -1) + s.running_scores[:, :, None]
        top_scores, top_sequences, top_indices = _top_candidates(
            s, log_probs.reshape(s.B, -1), cur_len, keep, not plan.params.greedy, generator
        )
        hits = _stopping(plan, _flat(top_sequences[:, :, : cur_len + 1]), scores_seen).view(s.B, keep)
        # The best unfinished candidates run on.
        alive = top_scores + hits.to(torch.float32) * -1.0e9
        best = torch.topk(alive, k=N)[1]
        s.running = _gather(top_sequences, best)
        s.running_scores = _gather(alive, best)
        s.running_indices = _gather(top_indices, best)
        _update_finished(s, top_scores, top_sequences, top_indices, hits, top_mask, cur_len, c)
        stepper.reorder(_flat(s.running_indices[..., cur_len - s.T]).long())
        cur_len += 1
        _still_improvable(s, cur_len, c)
        open_beam = ~(torch.all(s.finished) & (c.early_stopping is True))
        if not bool(torch.any(s.improvable) & open_beam & ~torch.all(hits)):
            break
        flat_running = _flat(s.running[:, :, :cur_len])
        logits = stepper.step(flat_running[:, -1])
    return _outputs(s, c, scores_seen, logits_seen, hidden_seen, attentions_seen, stepper.cache)


def _outputs(
    s: _BeamState,
    c: GenerationConfig,
    scores_seen: tuple | None,
    logits_seen: tuple | None,
    hidden_seen: tuple | None,
    attentions_seen: tuple | None,
    cache: Any,
) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
    n = int(c.num_return_sequences or 1)
    sequences = _flat(s.sequences[:, :n, :])
    scores = _flat(s.scores[:, :n])
    indices = _flat(s.indices[:, :n, :])
    # Unused columns of beam_indices are -1: the longest returned beam sets the length.
    generated = int(((indices + 1).bool()).sum(dim=1).max())
    sequences, indices = sequences[:, : s.T + generated], indices[:, :generated]
    if not c.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=scores if c.output_scores else None,
        scores=scores_seen,
        logits=logits_seen,
        beam_indices=indices,
        hidden_states=hidden_seen,
        attentions=attentions_seen,
        cache=cache,
    )
