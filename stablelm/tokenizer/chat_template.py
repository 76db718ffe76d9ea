"""Render chat templates: the Jinja programs that checkpoints ship to turn a conversation into a prompt.

Templates come from the hub and are untrusted code, so they run in Jinja's `ImmutableSandboxedEnvironment`
and see only plain data (strings, numbers, lists, dicts), within a budget of time and size
(`template_budget`). The environment matches the one the reference renders with (`trim_blocks`,
`lstrip_blocks`, `loopcontrols`, `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape), so
a template renders the same text here as there.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import types
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import template_budget as budget

_MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes
# Appended to the final message so its end can be found (and cut) in the rendered text.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """A chat template failed to render: it raised an error itself, or it is not valid Jinja."""


class ChatTemplateSecurityError(ChatTemplateError):
    """A chat template tried to reach outside the sandbox; nothing it asked for was executed."""


class _TemplateRaised(TemplateError):
    """Raised by `raise_exception(...)` inside a template, so its message can be passed on as it is."""


class _SandboxedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the budget's checks in its hooks (every call, attribute, item and operator)."""

    code_generator_class = budget.BudgetCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    concat = staticmethod(budget.budgeted_concat)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an Undefined that fails only when used, so `{{ ''.__class__ }}` renders as "";
        # failing at the first unsafe access gives one clear error for every escape attempt.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget.tick()
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(getattr(__obj, "__self__", None), str):
            args = budget.check_str_method(__obj.__self__, __obj.__name__, args, kwargs)
        return budget.checked(super().call(__context, __obj, *args, **kwargs), "a call's result")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget.tick()
        if operator == "*":
            budget.check_repeat(left, right)
            budget.check_repeat(right, left)
        elif operator == "**":
            budget.check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            budget.check_percent(left, right)
        return budget.checked(super().call_binop(context, operator, left, right), f"the {operator} operator")

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget.tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        text, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(wrapper)
        def checked_format(*args: Any, **kwargs: Any) -> str:
            if is_map and len(args) == 1 and isinstance(args[0], Mapping):
                budget.check_format(text, (), args[0])
            elif not is_map:
                budget.check_format(text, args, kwargs)
            return budget.checked(wrapper(*args, **kwargs), "str.format")

        return checked_format


# While `generation_spans.render_with_generation_spans` renders: the text rendered so far, and the spans found.
GENERATION_TRACKING: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = (
    contextvars.ContextVar("generation_spans", default=None)
)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body,
    and records where in the text the body went when `render_with_generation_spans` asks (as the reference's
    `AssistantTracker` does)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_generation", [])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _generation(self, caller: Any) -> str:
        text = caller()
        tracking = GENERATION_TRACKING.get()
        if tracking is not None:
            rendered, spans = tracking
            start = sum(map(len, rendered))
            spans.append((start, start + len(text)))
        return text


class _TemplateDict:
    """The `dict` global: builds dicts, without exposing the `dict` type itself to the template."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which would reach Python internals."""

    def __init__(
        *args: Any, **kwargs: Any
    ) -> None:  # `self` in *args, as in Jinja, so `namespace(self=1)` works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, budget.checked(value, f"namespace attribute {name!r}"))

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold the underscore-prefixed attribute {name!r}")


def _raise_exception(message: str) -> None:
    message = str(message)
    raise _TemplateRaised(message if len(message) <= 2000 else message[:2000] + "...")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` escapes <, >, & and ' for HTML, which would change the prompt text.
    budget.check_small(indent, "tojson's indent")
    budget.check_small(separators, "tojson's separators")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    budget.check_small(fmt, "strftime_now's format")
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    version = tuple(int(re.match(r"\d*", part).group() or 0) for part in jinja2.__version__.split(".")[:3])
    if version < _MIN_JINJA:
        raise ImportError(
            f"Chat templates need jinja2>=3.1.6 (older versions have known sandbox escapes), but jinja2 "
            f"{jinja2.__version__} is installed. Upgrade it with `pip install -U 'jinja2>=3.1.6'`."
        )
    env = _SandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols, budget.BudgetExtension],
        finalize=budget.printable,
    )
    env.filters["tojson"] = _tojson
    env.filters.update({name: budget.budgeted_filter(name, f) for name, f in env.filters.items()})
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
        range=budget.bounded_range,
        lipsum=budget.bounded_lipsum,
    )
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"The chat template is not valid Jinja (line {err.lineno}): {err.message}. Fix the template or pass "
            "another one with `chat_template=`."
        ) from err
    except RecursionError as err:
        raise ChatTemplateError(
            "The chat template nests its expressions or blocks too deeply to be compiled; pass another one with "
            "`chat_template=`."
        ) from err


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types, so a template cannot call methods of the caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses such as enums carry extra methods: keep only the base value
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"  # anything else becomes an inert placeholder naming its type


def _conversation(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if len(messages) == 0:
        raise ValueError("Cannot apply a chat template to an empty conversation; pass at least one message.")
    conversation = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(
                f"Each chat message must be a dict with 'role' and 'content', but got {message!r}."
            )
        # APIs return `content=None`; templates handle a missing key better than the string "None".
        conversation.append({key: value for key, value in _plain(message).items() if value is not None})
    return conversation


def select_chat_template(
    templates: str | Mapping[str, str] | None, chosen: str | None = None, *, tools: Sequence | None = None
) -> str:
    """The template to render, picked as the reference picks it.

    Args:
        templates: The tokenizer's template, or its templates by name.
        chosen: A Jinja template, or the name of one of `templates`.
        tools: When given, a template named "tool_use" is preferred.

    Raises:
        ValueError: There is no template, or there are several, none named "default" and none chosen.
    """
    if isinstance(templates, Mapping):
        if chosen is not None:
            return templates.get(chosen, chosen)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ValueError(
            "This tokenizer has several chat templates and none is named 'default': choose one with "
            f"chat_template=, one of {sorted(templates)}."
        )
    if chosen is not None:
        return chosen
    if templates is None:
        raise ValueError(
            "This tokenizer has no chat template (tokenizer_config.json sets none and there is no "
            "chat_template.jinja): pass a Jinja template as chat_template=."
        )
    return templates


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render one conversation with a chat template, the way the reference renders it.

    Args:
        template: The Jinja source of the chat template.
        messages: The conversation: dicts with at least `role` and `content`.
        add_generation_prompt: Append the header that starts a new assistant turn.
        continue_final_message: Leave the final message open (no end-of-turn tokens after its content), so the
            model continues it. Cannot be combined with `add_generation_prompt`.
        variables: Further names the template can read (special tokens, `tools`, `documents`, custom flags).

    Returns:
        The rendered prompt text.

    Raises:
        ChatTemplateError: The template raised an error (its message is passed on), failed (a Python error
            such as a TypeError, named in the message), is not valid Jinja, or went over its budget: it ran for
            more than `template_budget.MAX_SECONDS`, or would build more than `template_budget.MAX_CHARS`
            characters.
        ChatTemplateSecurityError: The template tried to reach outside the sandbox.
        ValueError: The conversation is empty, or `continue_final_message` cannot be honoured.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt cannot both be set: use continue_final_message "
            "to have the model continue the final message, or add_generation_prompt to start a new "
            "assistant message."
        )
    conversation = _conversation(messages)
    final = None
    if continue_final_message:
        final = conversation[-1].get("content")
        if not isinstance(final, str):
            raise ValueError(
                "continue_final_message is set, but the final message has no string 'content' to continue."
            )
        if "content" not in template:
            raise ValueError("continue_final_message is set, but the chat template never reads 'content'.")
        conversation[-1]["content"] = final + _CONTINUE_TAG
    context = {"tools": None, "documents": None, **_plain(dict(variables or {}))}
    context.update(messages=conversation, add_generation_prompt=add_generation_prompt)
    if len(template) > budget.MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(
            f"The chat template is {len(template):,} characters long, more than the {budget.MAX_TEMPLATE_CHARS:,} "
            "a chat template may have; pass another one with `chat_template=`."
        )
    compiled = _compile(template)
    try:
        rendered = _render(compiled, context)
    except budget.BudgetExceeded as err:
        raise _over_budget(str(err)) from err
    except RecursionError as err:
        raise _over_budget("it nests calls, loops or values too deeply") from err
    except MemoryError as err:
        raise _over_budget("it ran out of memory") from err
    except SecurityError as err:
        raise ChatTemplateSecurityError(
            f"The chat template tried to reach outside the sandbox ({err}); nothing it asked for was executed. "
            "Use a template from a source you trust, or pass another one with `chat_template=`."
        ) from err
    except _TemplateRaised as err:
        raise ChatTemplateError(f"The chat template raised an error: {err.message}") from err
    except Exception as err:  # the template's own mistakes: TemplateError, TypeError, IndexError, ...
        raise ChatTemplateError(
            f"The chat template failed to render: {type(err).__name__}: {str(err)[:2000]}"
        ) from err
    return rendered if final is None else _cut_after_final_message(rendered, final)


def _render(compiled: jinja2.Template, context: dict[str, Any]) -> str:
    """Render within the budget: the time limit, and the size limit on the text as it comes."""
    tracking = GENERATION_TRACKING.get()
    parts, size = (tracking[0] if tracking is not None else []), 0
    with budget.rendering() as limits:
        for part in compiled.generate(**context):
            size += len(part)
            if size > budget.MAX_CHARS:
                raise budget.BudgetExceeded(f"its text would pass {budget.MAX_CHARS:,} characters")
            limits.tick()
            parts.append(part)
    return "".join(parts)


def _over_budget(reason: str) -> ChatTemplateError:
    return ChatTemplateError(
        f"The chat template exceeded its budget: {reason}. A chat template must render in a few seconds to at "
        f"most {budget.MAX_CHARS:,} characters; use a template from a source you trust, or pass another one "
        "with `chat_template=`."
    )


def _cut_after_final_message(rendered: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError(
            "continue_final_message is set, but the final message does not appear in the rendered chat: the "
            f"chat template changes or drops it.\nFinal message: {final.strip()}\nRendered chat:\n{rendered}"
        )
    end = rendered.rindex(tag)
    if rendered[end : end + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:end]
    return rendered[:end].rstrip()  # the template trimmed trailing space from the message, so trim it too
