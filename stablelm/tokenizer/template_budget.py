"""The budget of one chat-template rendering: a time limit, and a limit on the size of what it builds.

Jinja's sandbox keeps a template from reaching outside, but not from running for hours
(`{% for i in range(99999) %}{% for j in range(99999) %}...`) or asking for gigabytes (`'x' * 10**10`).
While a template renders, a deadline is checked cooperatively (on every call, attribute or item access,
intercepted operator, loop step and piece of output), and sizes are checked before the operations that can
multiply them (repetition, powers, widths and padding, replace, join, string formatting, the filters that
take such arguments) and after anything that builds a string or a container. Crossing a limit raises
`BudgetExceeded`, which the renderer turns into a `ChatTemplateError`. Real chat templates stay far inside
the limits, and every check returns the value it was given, so they render exactly as without them.
"""

from __future__ import annotations

import functools
import inspect
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import jinja2.ext
import jinja2.nodes as nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import TemplateError

MAX_SECONDS = 5.0  # wall time of one rendering
MAX_CHARS = 16 * 2**20  # the rendered text, and any one string or container built while rendering
MAX_RANGE = 100_000  # items of one range(...), as Jinja's own sandbox allows
MAX_INT_BITS = 2**16  # integers a template computes (Python prints at most 4300 digits anyway)
MAX_TEMPLATE_CHARS = 2**20  # the template's source (real ones have a few thousand characters)
MAX_ARGUMENT = 1_000  # strftime formats, tojson indents and separators, and similar small arguments

_CURRENT: ContextVar[Budget | None] = ContextVar("stablelm_chat_template_budget", default=None)


class BudgetExceeded(TemplateError):
    """A chat template went over its time or size budget (a TemplateError, so Jinja passes it on)."""


class Budget:
    """The deadline of one rendering."""

    __slots__ = ("deadline", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"it ran for more than {self.seconds:g} seconds")


@contextmanager
def rendering() -> Iterator[Budget]:
    """Give the renderings in this block (in this thread or task) a fresh budget of MAX_SECONDS."""
    token = _CURRENT.set(Budget(MAX_SECONDS))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def tick() -> None:
    """Raise BudgetExceeded past the deadline of the current rendering (nothing outside a rendering)."""
    budget = _CURRENT.get()
    if budget is not None:
        budget.tick()


def _over(what: str) -> BudgetExceeded:
    return BudgetExceeded(f"{what} would pass the size limit of {MAX_CHARS:,} characters")


# ---- sizes ------------------------------------------------------------------------------------------------


def weight(value: Any, limit: int | None = None) -> int:
    """About how many characters `str(value)` has; counting stops past `limit` (default MAX_CHARS).

    A container counts each of its items every time it holds it, so a list holding one long string many
    times weighs what its text would. Past `limit`, the answer is some number above it.
    """
    limit = MAX_CHARS if limit is None else limit
    total, stack, steps = 0, [value], 0
    inside: set[int] = set()  # the namespaces being counted: only they can hold themselves
    while stack:
        item = stack.pop()
        if isinstance(item, _Leave):
            inside.discard(item.key)
        elif isinstance(item, str):
            total += len(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, jinja2.utils.Namespace):
            if id(item) in inside:  # printing it would never end
                return limit + 1
            inside.add(id(item))
            stack.extend((_Leave(id(item)), getattr(item, "_Namespace__attrs", {})))
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        else:
            total += 8
        if total > limit:
            return total
        steps += 1
        if steps % 4096 == 0:
            tick()
    return total


class _Leave:
    """Marks, in `weight`'s stack, the end of a namespace's items."""

    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        self.key = key


def checked(value: Any, what: str = "a value") -> Any:
    """`value`, unless it is a string, container or integer over the limits."""
    if isinstance(value, str):
        if len(value) > MAX_CHARS:
            raise _over(what)
    elif isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded(f"{what} is an integer of more than {MAX_INT_BITS:,} bits")
    elif isinstance(value, (list, tuple, set, frozenset, Mapping, jinja2.utils.Namespace)):
        if weight(value) > MAX_CHARS:
            raise _over(what)
    return value


def _int_over(value: Any, limit: int) -> bool:
    return isinstance(value, int) and value > limit


def check_repeat(sequence: Any, times: Any) -> None:
    """`sequence * times`."""
    if isinstance(sequence, (str, list, tuple)) and isinstance(times, int) and times > 1 and len(sequence):
        per_copy = MAX_CHARS // times
        if weight(sequence, per_copy) > per_copy:
            raise _over(f"repeating a value {times:,} times")


def check_power(base: Any, exponent: Any) -> None:
    """`base ** exponent` for integers."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 1 and abs(base) > 1:
        if exponent * base.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded(f"{base} ** {exponent} would have more than {MAX_INT_BITS:,} bits")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")


def check_percent(fmt: str, args: Any) -> None:
    """`fmt % args`: every conversion can write the largest argument, padded to the largest width."""
    specs = _PERCENT_SPEC.findall(fmt)
    if not specs:
        return
    values = (
        list(args.values())
        if isinstance(args, Mapping)
        else list(args)
        if isinstance(args, tuple)
        else [args]
    )
    widths = [int(n) for spec in specs for n in spec if n.isdigit()]
    if any(n == "*" for spec in specs for n in spec):
        widths += [v for v in values if isinstance(v, int)]
    _check_fields(len(specs), values, widths, "formatting with %")


def check_format(fmt: str, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """`fmt.format(*args, **kwargs)` and `fmt.format_map(kwargs)`, as `check_percent`."""
    fields, widths, nested = 0, [], False
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is not None:
            fields += 1
            widths += [int(n) for n in re.findall(r"\d+", spec or "")]
            nested = nested or "{" in (spec or "")
    if not fields:
        return
    values = [*args, *kwargs.values()]
    if nested:
        widths += [v for v in values if isinstance(v, int)]
    _check_fields(fields, values, widths, "str.format")


def _check_fields(fields: int, values: list, widths: list[int], what: str) -> None:
    if any(w > MAX_CHARS for w in widths):
        raise _over(f"{what} with a width of {max(widths):,}")
    largest = max((weight(v) for v in values), default=0) + max(widths, default=0)
    if fields * largest > MAX_CHARS:
        raise _over(f"{what} ({fields:,} fields of up to {largest:,} characters)")


def check_str_method(text: str, name: str, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """Pre-check a call of the string method `name`; returns the arguments to call it with."""
    if name in ("center", "ljust", "rjust", "zfill") and args and _int_over(args[0], MAX_CHARS):
        raise _over(f"str.{name}({args[0]:,})")
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int) and len(text) + text.count("\t") * size > MAX_CHARS:
            raise _over("str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(text, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name == "join" and len(args) == 1:
        items = list(args[0]) if isinstance(args[0], Iterable) else args[0]
        if isinstance(items, list):
            _check_join(text, items)
        return (items,)
    elif name == "translate" and args and isinstance(args[0], Mapping):
        largest = max((weight(v) for v in args[0].values()), default=0)
        if len(text) * max(largest, 1) > MAX_CHARS:
            raise _over("str.translate")
    return args


def _check_replace(text: str, old: str, new: str, count: Any) -> None:
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    if len(text) + found * len(new) > MAX_CHARS:
        raise _over("replace")


def _check_join(separator: str, items: list) -> None:
    if len(separator) * max(len(items) - 1, 0) + weight(items) > MAX_CHARS:
        raise _over(f"joining {len(items):,} items")


def bounded_range(*args: int) -> range:
    """`range(...)` as templates call it, up to MAX_RANGE items."""
    numbers = range(*args)
    try:
        size = len(numbers)
    except OverflowError:  # more items than an index can count
        size = MAX_RANGE + 1
    if size > MAX_RANGE:
        raise BudgetExceeded(f"range{args} has more than {MAX_RANGE:,} items")
    return numbers


def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    """Jinja's `lipsum` global, for at most MAX_ARGUMENT paragraphs of at most MAX_ARGUMENT words."""
    if _int_over(n, MAX_ARGUMENT) or _int_over(max, MAX_ARGUMENT):
        raise BudgetExceeded(f"lipsum({n}, max={max}) asks for more than {MAX_ARGUMENT} paragraphs or words")
    return jinja2.utils.generate_lipsum(n, html, min, max)


def check_small(value: Any, what: str) -> None:
    """Arguments that are repeated in the output: a strftime format, a tojson indent or separator."""
    if _int_over(value, MAX_ARGUMENT) or weight(value, MAX_ARGUMENT) > MAX_ARGUMENT:
        raise BudgetExceeded(f"{what} is longer than {MAX_ARGUMENT} characters")


# ---- filters ----------------------------------------------------------------------------------------------


def _filter_checks(name: str, a: dict[str, Any]) -> None:
    """Pre-check the arguments of the built-in filters that can multiply sizes (bound by name)."""
    if name == "center" and _int_over(a.get("width"), MAX_CHARS):
        raise _over(f"center({a['width']:,})")
    elif name == "indent":
        text, width = a.get("s"), a.get("width")
        lines = text.count("\n") + 1 if isinstance(text, str) else weight(text) + 1
        pad = width if isinstance(width, int) else weight(width)
        if lines * pad > MAX_CHARS:
            raise _over("indent")
    elif name == "format" and isinstance(a.get("value"), str):
        args, kwargs = a.get("args", ()), a.get("kwargs", {})
        check_percent(a["value"], kwargs or args)
    elif name == "replace" and all(isinstance(a.get(k), str) for k in ("s", "old", "new")):
        _check_replace(a["s"], a["old"], a["new"], a.get("count"))
    elif name in ("batch", "slice"):
        count = a.get("linecount", a.get("slices"))
        if _int_over(count, MAX_RANGE) or (
            isinstance(count, int) and count * weight(a.get("fill_with")) > MAX_CHARS
        ):
            raise _over(f"{name}({count:,})")
    elif name == "wordwrap":
        text, width, wrap = a.get("s"), a.get("width"), a.get("wrapstring")
        if isinstance(text, str) and isinstance(width, int) and width > 0 and isinstance(wrap, str):
            lines = len(text) // width + text.count("\n") + 1
            if len(text) + lines * len(wrap) > MAX_CHARS:
                raise _over("wordwrap")
    elif name == "urlize":
        extra = weight(a.get("target")) + weight(a.get("rel"))
        if weight(a.get("value")) * (1 + extra) > MAX_CHARS:
            raise _over("urlize")


def budgeted_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` (a filter) with the deadline, the pre-checks for `name` and a check of its result."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(function)  # keeps Jinja's pass_context / pass_eval_context marks
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tick()
        if signature is not None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                bound = None  # the call itself raises the clear error
            if bound is not None:
                bound.apply_defaults()
                if name == "join" and isinstance(bound.arguments.get("value"), Iterable):
                    items = list(bound.arguments["value"])
                    separator = bound.arguments.get("d")
                    if isinstance(separator, str):
                        _check_join(separator, items)
                    bound.arguments["value"] = items
                    args, kwargs = bound.args, bound.kwargs
                else:
                    _filter_checks(name, bound.arguments)
        return checked(function(*args, **kwargs), f"the {name} filter's result")

    return wrapper


# ---- compiled templates -----------------------------------------------------------------------------------


class BudgetExtension(jinja2.ext.Extension):
    """Functions that the compiled template calls around loops, `~` and container literals."""

    def loop(self, iterable: Any) -> Any:
        """The iterable of a for loop, checking the deadline at every step."""
        budget = _CURRENT.get()
        return iterable if budget is None else _BudgetedIterable(iterable, budget)

    @staticmethod
    def concat(join: Callable[[tuple], str], parts: tuple) -> str:
        """`a ~ b ~ ...`, after checking the size of the parts."""
        if sum(weight(part) for part in parts) > MAX_CHARS:
            raise _over("the ~ operator")
        return join(parts)

    @staticmethod
    def literal(value: Any) -> Any:
        """A list, tuple or dict literal, checked like any other container."""
        return checked(value, "a literal")


class _BudgetedIterable:
    """An iterable whose iteration checks a deadline; it keeps the length, so `loop.length` works as before."""

    __slots__ = ("_iterable", "_budget")

    def __init__(self, iterable: Any, budget: Budget) -> None:
        self._iterable, self._budget = iterable, budget

    def __len__(self) -> int:
        return len(self._iterable)

    def __iter__(self) -> Iterator[Any]:
        tick = self._budget.tick
        for item in self._iterable:
            tick()
            yield item


_ID = BudgetExtension.identifier


class BudgetCodeGenerator(CodeGenerator):
    """Jinja's code generator, with for loops, `~` and container literals routed through `BudgetExtension`."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        iterable = node.iter
        if not (isinstance(iterable, nodes.Call) and isinstance(iterable.node, nodes.ExtensionAttribute)):
            node.iter = nodes.Call(
                nodes.ExtensionAttribute(_ID, "loop"), [iterable], [], None, None, lineno=iterable.lineno
            )
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write(f"environment.extensions[{_ID!r}].concat(")
        if frame.eval_ctx.volatile:
            self.write("(markup_join if context.eval_ctx.volatile else str_join)")
        else:
            self.write("markup_join" if frame.eval_ctx.autoescape else "str_join")
        self.write(", (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _literal(self, visit: Callable[[Any, Frame], None], node: nodes.Expr, frame: Frame) -> None:
        self.write(f"environment.extensions[{_ID!r}].literal(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":
            self._literal(super().visit_Tuple, node, frame)
        else:  # an assignment target
            super().visit_Tuple(node, frame)


def printable(value: Any) -> Any:
    """The environment's `finalize`: every `{{ ... }}` value before it is written must fit in the budget."""
    if not isinstance(value, str) and weight(value) > MAX_CHARS:
        raise _over("a value to print")
    return value


def budgeted_concat(parts: Iterable[str]) -> str:
    """`Environment.concat`: joins the output buffered by macros, `{% set %}` blocks and call blocks."""
    parts = list(parts)
    if sum(map(len, parts)) > MAX_CHARS:
        raise _over("a macro's or block's output")
    return "".join(parts)
