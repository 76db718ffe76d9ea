"""Where a chat template's `{% generation %}` blocks put the assistant's text, and which tokens that is.

Templates made for training mark the assistant's text with `{% generation %}...{% endgeneration %}`; the
reference's `apply_chat_template(..., return_assistant_tokens_mask=True)` reads those spans, and so do
`Tokenizer.apply_chat_template` and chat training (`stablelm.training.chat`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .chat_template import GENERATION_TRACKING, render_chat_template

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def render_with_generation_spans(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    variables: Mapping[str, Any] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render as `render_chat_template` does, and say where the `{% generation %}` blocks' text lies.

    Returns:
        The rendered text and the (start, end) character spans of each generation block's output, in order:
        the assistant text a template marks for training (empty when it has no such blocks).
    """
    spans: list[tuple[int, int]] = []
    token = GENERATION_TRACKING.set(([], spans))
    try:
        text = render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt, variables=variables
        )
    finally:
        GENERATION_TRACKING.reset(token)
    return text, spans


def assistant_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters (`offsets`) overlap one of `spans`, else 0: the reference's rule for
    `return_assistant_tokens_mask`."""
    mask, span = [0] * len(offsets), 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[index] = 1
    return mask
