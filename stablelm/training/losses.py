"""A training step's loss and the held-out loss: micro-batches, their weights, and their sums over ranks.

A step's loss is the mean over the tokens it predicts, whichever micro-batch and whichever rank holds them.
Plain packed blocks all predict the same number of tokens, so each micro-batch weighs 1 / (accumulation x
world size). Labelled blocks (chat data, `packing.LabelledBlocks`) predict as many tokens as they have labels, so
a micro-batch weighs its labelled tokens over those of the whole global step: that count is summed over the
ranks before any backward, and the loss and gradients are then those of one process with the same global
batch (TRL's and transformers' `num_items_in_batch`). DDP and FSDP average the ranks' gradients, so each rank
scales its backward by the world size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import distributed
from .distributed import Distributed
from .packing import LabelledBlocks

Blocks = torch.Tensor | LabelledBlocks


def batch_loss(module: nn.Module, blocks: Blocks, *, device: torch.device) -> torch.Tensor:
    """The model's mean loss over the predicted tokens of `blocks` (ids, or ids with labels and positions)."""
    if isinstance(blocks, LabelledBlocks):
        # a memory-mapped packed file holds int32
        return module(
            blocks.input_ids.to(device=device, dtype=torch.int64),
            labels=blocks.labels.to(device=device, dtype=torch.int64),
            position_ids=blocks.position_ids.to(device=device, dtype=torch.int64),
            use_cache=False,
            return_dict=True,  # whatever the config's return_dict says
        ).loss
    batch = blocks.to(device=device, dtype=torch.int64)  # a memory-mapped token cache holds int32
    return module(batch, labels=batch, use_cache=False, return_dict=True).loss


def micro_batch_weights(
    batches: Sequence[Blocks], *, parallel: Distributed, device: torch.device
) -> list[float]:
    """Each micro-batch's share of the global step's loss (the shares of all ranks sum to 1)."""
    if not isinstance(batches[0], LabelledBlocks):
        return [1.0 / (len(batches) * parallel.world_size)] * len(batches)
    counts = [int(batch.predicted().sum()) for batch in batches]
    # Summed over the ranks: a rank's own count would give each rank's tokens the weight of a whole step.
    total = distributed.all_reduce(torch.tensor(float(sum(counts)), device=device), parallel).item()
    if total == 0:
        raise ValueError(
            "A training step has no labelled token to predict (no assistant turn in any of its blocks); "
            "check the chat data, or use --loss-on all."
        )
    return [count / total for count in counts]


def accumulate_gradients(
    module: nn.Module,
    batches: Sequence[Blocks],
    *,
    parallel: Distributed,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> float:
    """Forward and backward over this rank's micro-batches of a step; the step's loss over all ranks."""
    weights = micro_batch_weights(batches, parallel=parallel, device=device)
    total = torch.zeros((), device=device)
    for micro, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
        distributed.set_gradient_sync(module, micro == len(batches) - 1)
        with autocast():
            loss = batch_loss(module, batch, device=device)
        (loss * (weight * parallel.world_size)).backward()
        total += loss.detach() * weight
    return distributed.all_reduce(total, parallel).item()


@torch.no_grad()
def held_out_loss(
    module: nn.Module,
    blocks: Blocks,
    *,
    batch_size: int,
    parallel: Distributed,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> float:
    """The mean loss per predicted token of `blocks`, each rank computing blocks rank, rank + W, ..."""
    count, rank, world = blocks.shape[0], parallel.rank, parallel.world_size
    mine = torch.arange(rank, count, world)
    # Every rank runs as many batches as the largest share has: a sharded model gathers its weights in each
    # forward, with all ranks. The surplus batch of a smaller share is computed and not counted.
    batches = math.ceil(math.ceil(count / world) / batch_size)
    sums = torch.zeros(2, dtype=torch.float64)  # the loss summed over the predicted tokens, and their number
    for number in range(batches):
        rows = mine[number * batch_size : (number + 1) * batch_size]
        batch = blocks[rows if rows.numel() else torch.zeros(1, dtype=torch.int64)]
        with autocast():
            loss = batch_loss(module, batch, device=device)
        # plain blocks all predict the same number of tokens; labelled ones weigh by theirs
        weight = int(batch.predicted().sum()) if isinstance(batch, LabelledBlocks) else rows.numel()
        if rows.numel() and weight:
            sums += torch.stack(
                [loss.double().cpu() * weight, torch.tensor(float(weight), dtype=torch.float64)]
            )
    sums = distributed.all_reduce(sums.to(device), parallel)
    return (sums[0] / sums[1]).item()
