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
    """Check the prompt tensors: exactly one of `input_ids` (integer ids within the model's vocabulary)
    and `inputs_embeds` (B, T, hidden_size), at least one row and one position, and an `attention_mask`
    of 0 and 1 of the same (B, T). TypeError/ValueError naming the argument. With `model` None, the
    checks that need the model (vocabulary, hidden size) are left out."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids and inputs_embeds to generate.")
    if input_ids is not None:
        check_input_ids(input_ids, None if model is None else vocab_size(model))
        B, T = input_ids.shape
    else:
        check_inputs_embeds(inputs_embeds, None if model is None else model.config.hidden_size)
        B, T = inputs_embeds.shape[:2]
    if attention_mask is not None:
        check_attention_mask(attention_mask, B, T)


def prepare_inputs(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    config: GenerationConfig,
    *,
    model: Any = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Check the settings and the prompt tensors (`check_prompt`; a 1-D `input_ids` is one row), and
    repeat them for `num_return_sequences` (`num_beams` with beam search)."""
    config.validate()
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_prompt(model, input_ids, attention_mask, inputs_embeds)
    if input_ids is not None:
        _check_padding(input_ids, attention_mask, config)
    # Beam search starts every beam from the prompt (the reference repeats it num_beams times).
    n = max(int(config.num_return_sequences or 1), int(config.num_beams or 1))
    if n > 1:
        input_ids, attention_mask, inputs_embeds = (
            None if t is None else t.repeat_interleave(n, dim=0)
            for t in (input_ids, attention_mask, inputs_embeds)
        )
    return input_ids, attention_mask, inputs_embeds


def _check_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig
) -> None:
    pad = config.pad_token_id
    if attention_mask is None:
        eos = config.eos_token_id
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        if (
            input_ids.shape[0] > 1
            and pad is not None
            and pad not in eos_list
            and bool((input_ids == pad).any())
        ):
            raise ValueError(
                "The batch holds pad tokens but no attention_mask was passed: pass the attention_mask the "
                "tokenizer returned (e.g. model.generate(**tokenizer(texts, padding=True, return_tensors='pt')))."
            )
        return
    if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn(
            "A decoder-only architecture is being used, but right-padding was detected! For correct generation "
            "results, please set `padding_side='left'` when initializing the tokenizer.",
            stacklevel=3,
        )
