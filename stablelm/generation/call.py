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
from .prompt import initial_ids
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


def _check_logits_to_keep(value: Any) -> None:
    """`logits_to_keep` given to `generate`: the reference forwards it to each step's forward, whose last
    position's logits alone pick the token, so any count >= 0 gives the same tokens (stablelm computes the
    last position's only); what would fail inside the reference's loop is refused here."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"logits_to_keep must be an int >= 0 (0 keeps every position's logits, N the last N), got "
            f"{value!r}: generate picks each token from the last position's logits, so it does not change "
            "the result; leave it unset."
        )


def _batch_of(*tensors: Any) -> int:
    """The rows of the first tensor given (the reference takes the batch size of a prompt-less `generate`
    from its other inputs), else 1."""
    return next((t.shape[0] for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0), 1)


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
    position_ids: torch.Tensor | None = None,
    logits_to_keep: Any = None,
) -> Any:
    """`StableLmForCausalLM.generate`'s work (see its docstring); `settings` are the generation settings
    given as keyword arguments (UNSET when not given); `assistant_model` drafts for speculative decoding.
    Given neither `input_ids` nor `inputs_embeds`, the prompt is the BOS token (as the reference's)."""
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
    _check_logits_to_keep(logits_to_keep)
    if input_ids is None and inputs_embeds is None:
        input_ids = initial_ids(model, config, _batch_of(attention_mask, position_ids))
    processors = _callables("logits_processor", logits_processor)
    criteria = _callables("stopping_criteria", stopping_criteria)
    draft = make_draft(model, config, assistant_model)  # refuses what drafting does not combine with
    # What beam search and token-by-token decoding both take.
    common = dict(
        config=config,
        inputs_embeds=inputs_embeds,
        generator=generator,
        logits_processor=processors,
        stopping_criteria=criteria,
        past_key_values=past_key_values,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        position_ids=position_ids,
    )
    if (config.num_beams or 1) > 1:
        if streamer is not None:
            raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in the reference.")
        return beam_search(model, input_ids, attention_mask, **common)
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
        model, input_ids, attention_mask, streamer=streamer, stop_checker=stop_checker, draft=draft, **common
    )
