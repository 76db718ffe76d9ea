"""Checks of the tensors given to `generate` and to the model's forward: clear errors naming the argument,
raised before any work, instead of an index error or a shape error from deep inside torch.

Checks that read values (token ids within the vocabulary, a mask of zeros and ones) cost a reduction and,
on an accelerator, a wait for the device. `values_checkable` says when to make them: always on the CPU,
on an accelerator only for more than one position (a prompt, not each decode step), never while tracing or
compiling (no Python control flow on values there).
"""

from __future__ import annotations

import torch

_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def values_checkable(t: torch.Tensor, positions: int) -> bool:
    """Whether reading `t`'s values back is cheap and allowed here, for a call over `positions` new
    positions (see the module's docstring)."""
    if t.device.type == "meta" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return positions > 1


def check_input_ids(input_ids: object, vocab_size: int | None = None) -> None:
    """`input_ids` must be an integer tensor (B, T) with B, T >= 1, whose ids lie in [0, vocab_size)
    (the range is checked when `vocab_size` is given and `values_checkable`)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}.")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(
            f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}: pass the "
            "tokenizer's ids, or inputs_embeds for embeddings."
        )
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(
            "input_ids must be 2-D (batch, length) with batch >= 1 and length >= 1, got shape "
            f"{tuple(input_ids.shape)}."
        )
    if vocab_size is not None and values_checkable(input_ids, input_ids.shape[1]):
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids holds the id {bad}, outside the model's vocabulary of {vocab_size} tokens "
                f"(ids 0 to {vocab_size - 1}): was it made by another tokenizer? (After adding tokens, "
                "call model.resize_token_embeddings(len(tokenizer)).)"
            )


def check_inputs_embeds(inputs_embeds: object, hidden_size: int | None = None) -> None:
    """`inputs_embeds` must be a floating tensor (B, T, hidden_size) with B, T >= 1."""
    if not isinstance(inputs_embeds, torch.Tensor):
        raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}.")
    if not inputs_embeds.dtype.is_floating_point:
        raise TypeError(
            f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}: token ids go in input_ids."
        )
    if inputs_embeds.dim() != 3 or 0 in inputs_embeds.shape[:2]:
        raise ValueError(
            "inputs_embeds must be 3-D (batch, length, hidden_size) with batch >= 1 and length >= 1, got shape "
            f"{tuple(inputs_embeds.shape)}."
        )
    if hidden_size is not None and inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(
            f"inputs_embeds has {inputs_embeds.shape[-1]} channels but the model's hidden_size is {hidden_size}."
        )


def check_attention_mask(
    attention_mask: object, batch: int, length: int | None = None, *, positions: int | None = None
) -> None:
    """`attention_mask` must be a tensor (batch, length) of zeros and ones (bool, integer or floating;
    the values are checked when `values_checkable` for a call over `positions` new positions, default
    the mask's length). `length` None leaves the length to the caller."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor of 0 and 1, got {type(attention_mask).__name__}."
        )
    if not (attention_mask.dtype in _MASK_DTYPES or attention_mask.dtype.is_floating_point):
        raise TypeError(f"attention_mask must be bool, integer or float, got dtype {attention_mask.dtype}.")
    expected = f"({batch}, {'length' if length is None else length})"
    if (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != batch
        or (length is not None and attention_mask.shape[1] != length)
    ):
        raise ValueError(
            f"attention_mask must have shape {expected} (batch, length: 1 for real tokens, 0 for padding), "
            f"got shape {tuple(attention_mask.shape)}."
        )
    positions = attention_mask.shape[1] if positions is None else positions
    if (
        attention_mask.dtype == torch.bool
        or attention_mask.numel() == 0
        or not values_checkable(attention_mask, positions)
    ):
        return
    if attention_mask.dtype.is_floating_point:
        bad = bool(((attention_mask != 0) & (attention_mask != 1)).any())
    else:
        low, high = (int(v) for v in torch.aminmax(attention_mask))
        bad = low < 0 or high > 1
    if bad:
        raise ValueError(
            "attention_mask must hold only 0 (padding) and 1 (real token), got other values: pass the mask "
            "the tokenizer returned (an additive float mask of 0 and -inf is not accepted)."
        )
