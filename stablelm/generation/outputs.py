"""What `generate(..., return_dict_in_generate=True)` returns: the reference's output records, with the
same field names (attribute, key and index access over the fields that are set)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import Cache
from ..outputs import ModelOutput


class _CacheAlias:
    @property
    def past_key_values(self) -> Cache | None:
        """The reference's older name of `cache`."""
        return self.cache


@dataclass
class GenerateDecoderOnlyOutput(_CacheAlias, ModelOutput):
    """Greedy or sampled generation.

    Attributes:
        sequences: (B, T + n) the prompt and the new tokens.
        scores: Per step, the processed scores (B, V) the token was chosen from (`output_scores`).
        logits: Per step, the model's raw logits (B, V) in fp32 (`output_logits`).
        attentions: Per step, the forward's attention probabilities: a tuple over layers of (B, heads,
            positions fed, positions attended) (`output_attentions`; computed on eager attention).
        hidden_states: Per step, the forward's hidden states: a tuple (embeddings, then each layer's
            output) of (B, positions fed, C) (`output_hidden_states`).
        cache: The KV cache after the last step (its positions: every token but the last).
    """

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Cache | None = None


@dataclass
class GenerateBeamDecoderOnlyOutput(_CacheAlias, ModelOutput):
    """Beam search.

    Attributes:
        sequences: (B * num_return_sequences, T + n) the best finished beams of each prompt.
        sequences_scores: (B * num_return_sequences,) their length-penalised scores (`output_scores`).
        scores: Per step, the processed log-probabilities (B * num_beams, V) (`output_scores`).
        logits: Per step, the model's raw logits (B * num_beams, V) in fp32 (`output_logits`).
        beam_indices: (B * num_return_sequences, n) the beam row each token of `sequences` came from.
        attentions: Per step, the forward's attention probabilities (B * num_beams rows, in the order the
            step ran them, as the hidden states), as in `GenerateDecoderOnlyOutput`.
        hidden_states: Per step, the forward's hidden states, as in `GenerateDecoderOnlyOutput`.
        cache: The KV cache after the last step, its rows in the order of the running beams.
    """

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Cache | None = None


def transition_scores(
    sequences: torch.Tensor,
    scores: tuple[torch.Tensor, ...],
    beam_indices: torch.Tensor | None,
    *,
    vocab_size: int,
    normalize_logits: bool = False,
) -> torch.Tensor:
    """The score of each generated token (B, n), as the reference's `compute_transition_scores`: from the
    steps' `scores` (per beam with `beam_indices`), log-softmaxed first with `normalize_logits`; 0 past a
    beam's end."""
    if not scores:
        raise ValueError("scores is empty: generate with return_dict_in_generate=True, output_scores=True.")
    if beam_indices is None:  # greedy or sampling: row i always continues row i
        beam_indices = torch.arange(scores[0].shape[0], device=sequences.device).view(-1, 1)
        beam_indices = beam_indices.expand(-1, len(scores))
    stacked = torch.stack(scores).reshape(len(scores), -1).transpose(0, 1)  # (rows * V, n)
    if normalize_logits:
        stacked = torch.nn.functional.log_softmax(stacked.reshape(-1, vocab_size, stacked.shape[-1]), dim=1)
        stacked = stacked.reshape(-1, stacked.shape[-1])
    ended = beam_indices < 0
    length = int((1 - ended.long()).sum(-1).max())
    beam_indices, ended = beam_indices.clone()[:, :length], ended[:, :length]
    beam_indices[ended] = 0
    indices = sequences[:, sequences.shape[-1] - length :] + beam_indices * vocab_size
    out = stacked.gather(0, indices)
    out[ended] = 0
    return out
