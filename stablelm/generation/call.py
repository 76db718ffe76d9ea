"""One `model.generate(...)` call: its arguments read as the reference reads them, then greedy/sampling
(`loop`, speculatively with a drafter of `drafts`) or beam search (`beam`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .beam import beam_search
from .config import resolve_config
from .drafts import make_draft
from .inputs import check_input_ids
from .loop import generate as decode
from .stop import StopStringChecker


def _callables(name: str, value: Any) -> Sequence[Callable]:
    """`logits_processor` / `stopping_criteria`: None or a list of callables (the reference's
    LogitsProcessorList and StoppingCriteriaList are lists)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of callables (input_ids, scores), such as transformers' "
            f"{'LogitsProcessorList' if name == 'logits_processor' else 'StoppingCriteriaList'}, got "
            f"{type(value).__name__}."
        )
    return list(value)


def run_generate(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    inputs: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    generation_config: Any,
    logits_processor: Any,
    stopping_criteria: Any,
    past_key_values: Any,
    prefix_allowed_tokens_fn: Any,
    tokenizer: Any,
    streamer: Any,
    generator: torch.Generator | None,
    settings: dict[str, Any],
    assistant_model: Any = None,
) -> Any:
    """`StableLmForCausalLM.generate`'s work (see its docstring); `settings` are the generation settings
    given as keyword arguments (UNSET when not given); `assistant_model` drafts for speculative decoding."""
    if inputs is not None:
        if input_ids is not None:
            raise ValueError("Pass the prompt once: inputs and input_ids are the same argument.")
        input_ids = inputs
    if (
        attention_mask is not None
        and not isinstance(attention_mask, torch.Tensor)
        and generation_config is None
        and (isinstance(attention_mask, dict) or hasattr(attention_mask, "do_sample"))
    ):
        # The reference's second positional argument is generation_config.
        generation_config, attention_mask = attention_mask, None
    config = resolve_config(model, generation_config, **settings)
    config.validate()  # before the stop checker reads num_return_sequences
    processors = _callables("logits_processor", logits_processor)
    criteria = _callables("stopping_criteria", stopping_criteria)
    draft = make_draft(model, config, assistant_model)  # refuses what drafting does not combine with
    if (config.num_beams or 1) > 1:
        if streamer is not None:
            raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in the reference.")
        return beam_search(
            model,
            input_ids,
            attention_mask,
            config=config,
            inputs_embeds=inputs_embeds,
            generator=generator,
            logits_processor=processors,
            stopping_criteria=criteria,
            past_key_values=past_key_values,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )
    stop_checker = None
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError(
                "stop_strings need the tokenizer to read the text: pass tokenizer=... to generate."
            )
        if input_ids is not None and not isinstance(input_ids, torch.Tensor):
            check_input_ids(input_ids)  # a TypeError naming it, before its shape is read
        rows = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        stop_checker = StopStringChecker(
            tokenizer, config.stop_strings, rows * (config.num_return_sequences or 1)
        )
    return decode(
        model,
        input_ids,
        attention_mask,
        config=config,
        inputs_embeds=inputs_embeds,
        generator=generator,
        streamer=streamer,
        stop_checker=stop_checker,
        logits_processor=processors,
        stopping_criteria=criteria,
        past_key_values=past_key_values,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        draft=draft,
    )
