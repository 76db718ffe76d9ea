"""Request fields this server does not implement, refused by name with a 400 (`unsupported_parameter`)
rather than ignored: OpenAI's tools, JSON output, echo and suffix, and vLLM's extras that would change
the output (guided decoding, beam search, the detokenizer's and the chat template's switches). A field
given at the value that changes nothing (its default: `"echo": false`, `"skip_special_tokens": true`,
`"tool_choice": "none"`, ...) is accepted. Fields neither implemented nor listed here are ignored, as
OpenAI's clients send extras."""

from __future__ import annotations

from typing import Any

from .fields import bad, show

NOT_SET = (None, False, [], {}, "")  # a field at any of these is not asking for anything
TOOLS = "no tool calls"
NEW_TEXT = "it returns the new text only"
GUIDED = "no guided decoding"
# name: (the endpoints it applies to, the values accepted as asking for nothing, why it is refused)
REFUSED: dict[str, tuple[tuple[str, ...], tuple[Any, ...], str]] = {
    "tools": (("chat", "completion"), NOT_SET, TOOLS),
    "functions": (("chat", "completion"), NOT_SET, TOOLS),
    "function_call": (("chat", "completion"), (*NOT_SET, "none"), TOOLS),
    "tool_choice": (("chat", "completion"), (*NOT_SET, "none"), TOOLS),
    "echo": (("chat", "completion"), NOT_SET, NEW_TEXT),
    "suffix": (("chat", "completion"), NOT_SET, NEW_TEXT),
    "prompt_logprobs": (("chat", "completion"), NOT_SET, "no prompt logprobs"),
    "use_beam_search": (("chat", "completion"), NOT_SET, "no beam search"),
    "guided_json": (("chat", "completion"), NOT_SET, GUIDED),
    "guided_regex": (("chat", "completion"), NOT_SET, GUIDED),
    "guided_choice": (("chat", "completion"), NOT_SET, GUIDED),
    "guided_grammar": (("chat", "completion"), NOT_SET, GUIDED),
    "structured_outputs": (("chat", "completion"), NOT_SET, GUIDED),
    "allowed_token_ids": (("chat", "completion"), NOT_SET, "no allowed-token lists (use logit_bias)"),
    "bad_words": (("chat", "completion"), NOT_SET, "no bad-word lists (use logit_bias)"),
    "logits_processors": (("chat", "completion"), NOT_SET, "no custom logits processors"),
    "truncate_prompt_tokens": (("chat", "completion"), NOT_SET, "prompts are never truncated"),
    "include_stop_str_in_output": (("chat", "completion"), NOT_SET, "the stop string is never returned"),
    "skip_special_tokens": (("chat", "completion"), (None, True), "special tokens are always skipped"),
    "spaces_between_special_tokens": (("chat", "completion"), (None, True), "the tokenizer's own decoding"),
    "add_generation_prompt": (("chat",), (None, True), "the assistant's turn is always opened"),
    "continue_final_message": (("chat",), NOT_SET, "the assistant's turn is always a new one"),
    "documents": (("chat",), NOT_SET, "the chat template gets the messages only"),
    "chat_template_kwargs": (("chat",), NOT_SET, "the chat template gets the messages only"),
    "add_special_tokens": (("chat",), (None, False), "the chat template places the special tokens"),
    "prompt_embeds": (("completion",), NOT_SET, "prompts are text or token ids"),
}


def refuse_unsupported(body: dict, endpoint: str, *, n: int) -> None:
    """A 400 naming the first field of `body` that asks `endpoint` ("chat" or "completion") for something
    this server does not do; `n` the choices asked for (`best_of` may only repeat it)."""
    for name, (endpoints, accepted, why) in REFUSED.items():
        value = body.get(name)
        if endpoint in endpoints and not any(value == a and type(value) is type(a) for a in accepted):
            raise bad(
                f"'{name}' is not supported by this server ({why}); got {show(value)}.",
                name,
                "unsupported_parameter",
            )
    response_format = body.get("response_format")
    if response_format is not None and not (
        isinstance(response_format, dict) and response_format.get("type") == "text"
    ):
        raise bad(
            '\'response_format\' other than {"type": "text"} is not supported by this server (no JSON '
            f"output); got {show(response_format)}.",
            "response_format",
            "unsupported_parameter",
        )
    best_of = body.get("best_of")
    if best_of is not None and not (type(best_of) is int and best_of == n):
        raise bad(
            f"'best_of' is not supported (it must equal n, {n}, if given); got {show(best_of)}.",
            "best_of",
            "unsupported_parameter",
        )
