"""The prompt of a generation checked (`check_prompt`: clear errors naming the argument) and repeated for
each sequence to return (`prepare_inputs`), before any work."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .config import GenerationConfig
from .inputs import check_attention_mask, check_input_ids, check_inputs_embeds
from .plan import vocab_size


def check_prompt(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
) -> None:
    """Check the prompt tensors: `input_ids` (integer ids within the model's vocabulary), `inputs_embeds`
    (B, T, hidden_size) or both (as the reference takes them: the embeddings feed the model, the ids
    start the returned sequences; then of the same (B, T)), at least one row and one position, and an
    `attention_mask` of 0 and 1 of the same (B, T). TypeError/ValueError naming the argument. With `model`
    None, the checks that need the model (vocabulary, hidden size) are left out."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("Pass input_ids or inputs_embeds (the prompt) to generate.")
    if input_ids is not None:
        check_input_ids(input_ids, None if model is None else vocab_size(model))
        B, T = input_ids.shape
    if inputs_embeds is not None:
        check_inputs_embeds(inputs_embeds, None if model is None else model.config.hidden_size)
        if input_ids is not None and tuple(inputs_embeds.shape[:2]) != (B, T):
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} must cover "
                "the same (batch, length) when both are given: the embeddings are the prompt the model reads, "
                "the ids the prompt returned before the new tokens. Pass the ids of those positions, or only "
                "inputs_embeds."
            )
        B, T = inputs_embeds.shape[:2]
    if attention_mask is not None:
        check_attention_mask(attention_mask, B, T)


def check_position_ids(position_ids: object, batch: int, length: int) -> torch.Tensor:
    """`position_ids` given to `generate`: an integer tensor (batch, length) or (1, length), the rotary
    positions of the prompt (the new tokens continue from each row's last one, as in the reference).
    Returns it as (batch, length) int64."""
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}.")
    if (
        position_ids.dtype.is_floating_point
        or position_ids.dtype.is_complex
        or position_ids.dtype == torch.bool
    ):
        raise TypeError(
            f"position_ids must hold integer positions (torch.long), got dtype {position_ids.dtype}."
        )
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(
            f"position_ids must have shape ({batch}, {length}) (or (1, {length})), one position per prompt "
            f"token, got shape {tuple(position_ids.shape)}."
        )
    return position_ids.long().expand(batch, length)


def initial_ids(model: Any, config: GenerationConfig, batch: int) -> torch.Tensor:
    """The prompt of a `generate` call given neither input_ids nor inputs_embeds: `batch` rows of the
    BOS token (the reference's `_maybe_initialize_input_ids_for_generation`)."""
    bos = config.bos_token_id
    if bos is None:
        raise ValueError(
            "generate() needs input_ids (or inputs_embeds) when no bos_token_id is set to start from: pass "
            "the prompt's ids, or bos_token_id=..."
        )
    if isinstance(bos, bool) or not isinstance(bos, int) or not 0 <= bos < vocab_size(model):
        raise ValueError(
            f"bos_token_id ({bos!r}) starts the prompt when no input_ids are given, so it must be a token id "
            f"of the model's vocabulary (0 to {vocab_size(model) - 1})."
        )
    return torch.full((batch, 1), bos, dtype=torch.long, device=model.device)


def prepare_inputs(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    config: GenerationConfig,
    *,
    model: Any = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Check the settings and the prompt tensors (`check_prompt`; a 1-D `input_ids` is one row; the
    caller's `position_ids`, `check_position_ids`), and repeat them for `num_return_sequences`
    (`num_beams` with beam search). Returns (input_ids, attention_mask, inputs_embeds, position_ids)."""
    config.validate()
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_prompt(model, input_ids, attention_mask, inputs_embeds)
    if input_ids is not None and attention_mask is None:
        attention_mask = _mask_from_padding(input_ids, config)
    if input_ids is not None and inputs_embeds is None:
        _warn_right_padding(attention_mask)
    if position_ids is not None:
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        position_ids = check_position_ids(position_ids, B, T)
    # Beam search starts every beam from the prompt (the reference repeats it num_beams times).
    n = max(int(config.num_return_sequences or 1), int(config.num_beams or 1))
    if n > 1:
        input_ids, attention_mask, inputs_embeds, position_ids = (
            None if t is None else t.repeat_interleave(n, dim=0)
            for t in (input_ids, attention_mask, inputs_embeds, position_ids)
        )
    return input_ids, attention_mask, inputs_embeds, position_ids


def _mask_from_padding(input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor | None:
    """The mask the reference infers when none is given (`_prepare_attention_mask_for_generation`): 0 where
    the ids hold `pad_token_id`, when it is set, occurs in them and is no EOS id (else None: all real)."""
    pad = config.pad_token_id
    eos = config.eos_token_id
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    if pad is None or pad in eos_list or not bool((input_ids == pad).any()):
        return None
    return (input_ids != pad).long()


def _warn_right_padding(attention_mask: torch.Tensor | None) -> None:
    if (
        attention_mask is not None
        and attention_mask.shape[0] > 1
        and bool((attention_mask[:, -1] == 0).any())
    ):
        warnings.warn(
            "A decoder-only architecture is being used, but right-padding was detected! For correct generation "
            "results, please set `padding_side='left'` when initializing the tokenizer.",
            stacklevel=3,
        )
