"""Chat templates rendered as transformers renders them, in a Jinja sandbox bounded in time and size.

Jinja's sandbox stops a template from reaching Python internals, not from running forever or
filling memory. Here every loop iteration, call, filter, output piece and use of the +, *, ** and %
operators is checked against a deadline, and every value a render builds and all the text it writes
against a size limit; the operations that can make a value far larger than their inputs (`*`, `**`, format
widths, `replace`, `join`) are checked before they run. A template over a limit stops with a
ChatTemplateError. (Imported only to render: jinja2 takes ~0.1 s to import.)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import Template, TemplateError, nodes, pass_context, pass_eval_context
from jinja2.filters import do_format, do_join, do_replace
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from ortspec.runtime.errors import ChatTemplateError

MAX_CHARS = 4_000_000  # text written, and any value built on the way: far beyond any context
MAX_SECONDS = 5.0  # real chat templates render in milliseconds
MAX_RESULT_BITS = 3 * MAX_CHARS  # an integer is as large as its decimal digits
PERCENT_WIDTHS = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")
BRACE_SPECS = re.compile(r"\{[^{}]*:([^{}]*)\}")


class Budget:
    """The limits of one render: a deadline and a character budget."""

    def __init__(self, max_chars: int = MAX_CHARS, max_seconds: float = MAX_SECONDS) -> None:
        self.max_chars = max_chars
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds
        self.written = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(
                f"the chat template took longer than {self.max_seconds:g} s to render: stopped (an endless loop?)"
            )

    def expect(self, size: int, what: str = "a value") -> None:
        """Refuse to build something of `size` characters (or items) over the limit."""
        self.tick()
        if size > self.max_chars:
            raise ChatTemplateError(
                f"the chat template built {what} of over {self.max_chars} characters or items: stopped"
            )

    def value(self, value: Any) -> Any:
        self.expect(size(value, self.max_chars))
        return value

    def argument(self, value: Any) -> Any:
        """A call or filter argument: a number used as a width or count must be within the limit too."""
        if isinstance(value, int) and abs(value) > self.max_chars:
            raise ChatTemplateError(f"the chat template passed the number {value} to a call or filter: too large")
        return self.value(value)

    def write(self, value: Any) -> Any:
        self.written += size(value, self.max_chars)
        self.expect(self.written, "an output")
        return value


_BUDGET: ContextVar[Budget] = ContextVar("chat_template_budget")


def size(value: Any, limit: int) -> int:
    """Characters (strings), items (containers, their contents included) or decimal digits (integers) in
    `value`; counting stops soon after `limit`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return value.bit_length() // 3
    if isinstance(value, Mapping):
        value = [*value.keys(), *value.values()]
    if not isinstance(value, (list, tuple, set, frozenset)):
        return 1
    total = len(value)
    for item in value:
        if total > limit:
            break
        total += size(item, limit)
    return total


def _budget() -> Budget:
    return _BUDGET.get()


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(count, int) and not isinstance(sequence, (int, float)):
                    budget.expect(size(sequence, budget.max_chars) * count)
        if (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and right > 0
            and left.bit_length() * right > MAX_RESULT_BITS
        ):
            raise ChatTemplateError(f"the chat template computes {left} ** {right}: too large")
        if operator == "%" and isinstance(left, str):
            _check_format(left, PERCENT_WIDTHS)
            for item in right if isinstance(right, tuple) else (right,):
                budget.argument(item)
        return budget.value(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # jinja's signature
        budget = _budget()
        for value in (*args, *kwargs.values()):
            budget.argument(value)
        receiver, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(receiver, str) and name == "replace" and len(args) >= 2:
            budget.expect(_replaced_size(receiver, *args[:2]))
        if isinstance(receiver, str) and name == "join" and len(args) == 1:
            args = (list(args[0]),)
            budget.expect(len(receiver) * len(args[0]) + size(args[0], budget.max_chars))
        return budget.value(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            _check_format(value.__self__, BRACE_SPECS)
        return wrapper


def _replaced_size(text: Any, old: Any, new: Any) -> int:
    text, old, new = str(text), str(old), str(new)
    occurrences = text.count(old) if old else len(text) + 1
    return len(text) + occurrences * max(len(new) - len(old), 0)


def _check_format(text: str, specs: re.Pattern[str]) -> None:
    """Refuse format widths and precisions past the limit (`'%9999999999d' % 1` is 10 GB)."""
    for match in specs.finditer(text):
        for digits in re.findall(r"\d+", "".join(g or "" for g in match.groups())):
            if len(digits.lstrip("0")) > len(str(_budget().max_chars)):
                raise ChatTemplateError(f"the chat template formats with a width of {digits}: too large")


@pass_context
def _loop(context: Any, iterable: Any) -> Any:
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


@pass_context
def _value(context: Any, value: Any) -> Any:
    return _budget().value(value)


@pass_context
def _argument(context: Any, value: Any) -> Any:
    return _budget().argument(value)


@pass_context
def _write(context: Any, value: Any) -> Any:
    return _budget().write(value)


@pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> Any:
    _budget().expect(_replaced_size(s, old, new))
    return do_replace(eval_ctx, s, old, new, count)


@pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
    items = list(value)
    _budget().expect(len(str(d)) * len(items) + size(items, _budget().max_chars))
    return do_join(eval_ctx, items, d, attribute)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_format(str(value), PERCENT_WIDTHS)  # its arguments are checked as every filter's are
    return do_format(value, *args, **kwargs)


GUARDS = {"_ortspec_loop": _loop, "_ortspec_value": _value, "_ortspec_argument": _argument, "_ortspec_write": _write}


class _Guard(NodeTransformer):
    """Route a template's loops, outputs, concatenations and filters through the budget checks."""

    def __init__(self, environment: ImmutableSandboxedEnvironment) -> None:
        self.environment = environment

    def wrap(self, node: nodes.Node, guard: str) -> nodes.Filter:
        wrapped = nodes.Filter(node, guard, [], [], None, None, lineno=node.lineno)
        wrapped.set_environment(self.environment)
        return wrapped

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self.wrap(node.iter, "_ortspec_loop")
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [self.wrap(child, "_ortspec_write") for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return self.wrap(node, "_ortspec_value")

    def visit_Filter(self, node: nodes.Filter) -> nodes.Filter:
        self.generic_visit(node)
        node.args = [self.wrap(arg, "_ortspec_argument") for arg in node.args]
        for keyword in node.kwargs:
            keyword.value = self.wrap(keyword.value, "_ortspec_argument")
        # a filter block's filter (no node) applies to the block's text, which its outputs already counted
        return node if node.node is None else self.wrap(node, "_ortspec_value")


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates do not want.
    if indent:  # each line gains up to `indent` per level: bound the text before writing it
        compact = json.dumps(value, ensure_ascii=ensure_ascii, separators=separators)
        _budget().expect((len(compact) + 1) * (1 + (len(indent) if isinstance(indent, str) else indent)))
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str) -> Template:
    """A chat template compiled with every loop, output, concatenation and filter routed through the checks,
    in a sandbox with loop controls and transformers' chat-template settings and helpers."""
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters.update(GUARDS, replace=_replace, join=_join, format=_format, tojson=_tojson)
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(_Guard(env).visit(env.parse(source)))
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {exc}") from None


def render(source: str, variables: dict[str, Any], budget: Budget | None = None) -> str:
    """Chat template `source` rendered with `variables` within `budget` (default: MAX_SECONDS, MAX_CHARS)."""
    token = _BUDGET.set(budget or Budget())
    try:
        return compile_template(source).render(**variables)
    except ChatTemplateError:
        raise
    except Exception as exc:  # the template is a package's code: whatever it raises is its error
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}"[:500]) from None
    finally:
        _BUDGET.reset(token)
