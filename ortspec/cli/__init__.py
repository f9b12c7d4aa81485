"""The `ortspec` command line: export a pair, generate with it, benchmark it, inspect it."""

from __future__ import annotations

from typing import Any

import click

from ortspec.runtime.errors import ContextLengthError, PackageError

from . import bench, demo, export, generate, serve


class _Commands(click.Group):
    """The command group; expected failures of any command (bad package, bad input) become one-line errors
    instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (PackageError, ContextLengthError, ValueError, FileExistsError) as exc:  # ChatTemplateError too
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # what the file system refused (read-only, no permission, full): name the path
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from exc


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ortspec")
def main() -> None:
    """Speculative decoding of Hugging Face causal LMs on ONNX Runtime alone.

    \b
    A typical session:
      ortspec export ./my-target --draft ./my-draft --quantize int4 --out ./pair
      ortspec generate ./pair "def fibonacci(n):" --stats
      ortspec bench ./pair --prompts prompts.txt
      ortspec info ./pair
    """


for command in (
    export.export,
    export.distill,
    export.info,
    generate.generate,
    generate.chat,
    bench.bench,
    bench.evaluate_package,
    bench.calibrate,
    serve.serve,
    demo.demo,
):
    main.add_command(command)
