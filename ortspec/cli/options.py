"""Flags built from the API's own declarations: each GenerationConfig field becomes a click option checked
by `check_option` (same rules, same messages), and the runtime flags become `load` keywords."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, ClassVar

import click

from ortspec.models.catalog import check_package, resolve_package
from ortspec.runtime.options import OPTIONS, check_option, spec_of
from ortspec.runtime.pipeline import Pipeline, load

RUNTIME_OPTIONS = [
    click.option(
        "--provider",
        "providers",
        multiple=True,
        help="ONNX Runtime execution provider, in priority order (repeatable). Default: CPUExecutionProvider. "
        "GPUs: --provider CUDAExecutionProvider with onnxruntime-gpu and an --dtype fp16 package.",
    ),
    click.option(
        "--draft-provider",
        "draft_providers",
        multiple=True,
        help="Execution provider of the draft (repeatable; default: --provider's), e.g. the draft on "
        "CPUExecutionProvider beside a target on CUDAExecutionProvider.",
    ),
    click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads of the target (default: ORT's)."),
    click.option(
        "--draft-threads",
        type=click.IntRange(min=1),
        help="Intra-op threads of the draft (default: 1: a small draft loses more to pool sync than it gains).",
    ),
    click.option(
        "--max-length",
        type=click.IntRange(min=1),
        help="Longest prompt + generation to hold (default: the model's maximum, at most 4096).",
    ),
    click.option(
        "--no-verify", is_flag=True, help="Skip the sha256 check of the package files (sizes are still checked)."
    ),
]


def runtime_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--provider / --draft-provider / --threads / --draft-threads / --max-length / --no-verify, handed over as
    one `runtime` dict."""
    names = ["providers", "draft_providers", "threads", "draft_threads", "max_length", "no_verify"]

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, runtime={name: kwargs.pop(name) for name in names}, **kwargs)

    command: Callable[..., Any] = wrapper
    for option in reversed(RUNTIME_OPTIONS):
        command = option(command)
    return command


def load_options(runtime: dict[str, Any]) -> dict[str, Any]:
    """The runtime options as `ortspec.load` keywords."""
    return dict(
        providers=runtime["providers"] or None,
        draft_providers=runtime["draft_providers"] or None,
        threads=runtime["threads"],
        draft_threads=runtime["draft_threads"],
        max_length=runtime["max_length"],
        verify=not runtime["no_verify"],
    )


class PackageParam(click.ParamType):
    """PACKAGE: a package directory, or a catalog model's name (fetched and exported on first use, by
    `load_pipeline` / `resolve_package`)."""

    name = "package"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_package(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


PACKAGE = PackageParam()


def report(line: str) -> None:
    """Progress and notes for the user, on stderr."""
    click.echo(line, err=True)


def load_pipeline(package: str, runtime: dict[str, Any]) -> Pipeline:
    """PACKAGE (a directory or a catalog name) loaded with the runtime options; calibration messages go to stderr."""
    pipe = load(resolve_package(package, report), **load_options(runtime))
    pipe.on_calibrate = lambda message: click.echo(message, err=True)
    return pipe


class OptionValue(click.ParamType):
    """A generation option on the command line, checked by the API's own `check_option` (same rules, same
    messages): numbers are parsed, the rest is left as text for the check to judge."""

    METAVARS: ClassVar[dict[str, str]] = {
        "int": "INTEGER",
        "float": "FLOAT",
        "gamma": "N|adaptive|auto",
        "strings": "TEXT",
    }

    def __init__(self, option: str) -> None:
        self.option = option
        self.spec = spec_of(option)
        self.name = option

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return f"[{'|'.join(self.spec.choices)}]" if self.spec.kind == "choice" else self.METAVARS[self.spec.kind]

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if self.spec.kind == "strings":
            value = self._unescape(value, param, ctx)
        elif isinstance(value, str):
            value = _number(value)
        try:
            checked = check_option(self.option, value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return checked[0] if self.spec.kind == "strings" else checked  # strings: one value per use

    def _unescape(self, value: str, param: Any, ctx: Any) -> str:
        """A "\\n" typed on a command line arrives as backslash + n: understand the usual escapes."""
        try:
            return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as exc:
            self.fail(f"{value!r} holds an invalid escape ({exc.reason}); write a backslash as \\\\", param, ctx)


def _number(text: str) -> int | float | str:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _generation_option(name: str, default: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one GenerationConfig field, from its spec."""
    spec = spec_of(name)
    flag = spec.flag or "--" + name.replace("_", "-")
    if spec.kind == "bool":  # a flag that turns the default off (or on)
        return click.option(flag, name, is_flag=True, flag_value=not default, default=default, help=spec.help)
    must = spec.bounds() if spec.kind == "int" else f"a finite number {spec.bounds()}" if spec.kind == "float" else ""
    return click.option(
        flag,
        name,
        type=OptionValue(name),
        default=default,
        multiple=spec.kind == "strings",
        show_default=default not in (None, ()),
        help=spec.help + (f" Must be {must.rstrip()}." if must else ""),
    )


def generation_options(*names: str, **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options for the named GenerationConfig fields (default: all), built from their specs; `defaults`
    replaces a field's default for this command. The command receives them as one `options` dict."""
    names = names or tuple(OPTIONS)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, options={name: kwargs.pop(name) for name in names}, **kwargs)

        command: Callable[..., Any] = wrapper
        for name in reversed(names):
            command = _generation_option(name, defaults.get(name, OPTIONS[name].default))(command)
        return command

    return decorate
