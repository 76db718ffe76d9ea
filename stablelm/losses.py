"""The heads' losses, as the reference computes them (-100 labels ignored)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each position predicting the next label; -100 labels are ignored.

    The mean over the labelled positions, or with `num_items_in_batch` (the reference's Trainer passes the
    count of labelled tokens over all its gradient-accumulation steps) their sum divided by it.
    `shift_labels` (B, T) are labels already shifted, used as they are (the reference's sequence-parallel
    path).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="mean" if num_items_in_batch is None else "sum",
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def sequence_classification_loss(
    pooled: torch.Tensor, labels: torch.Tensor, *, num_labels: int, problem_type: str | None
) -> torch.Tensor:
    """The loss of the config's `problem_type`, inferred when unset as the reference does: regression for
    one label, single-label classification for integer labels, multi-label otherwise."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    labels = labels.to(pooled.device)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(pooled.squeeze(), labels.squeeze().to(pooled.dtype))
        return F.mse_loss(pooled, labels.to(pooled.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens of (B, T, num_labels) logits."""
    flat = logits.float().view(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.view(-1).to(logits.device), ignore_index=IGNORE_INDEX)
