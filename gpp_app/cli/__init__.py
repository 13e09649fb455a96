"""The ``gpp-onnx`` command: a thin shell over the library. This module owns the Typer app and
registers the commands, which live in one module per concern."""

from __future__ import annotations

import sys

import typer

from gpp_app.cli import prune, recovery, vta
from gpp_app.cli.common import stderr

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune ONNX CNNs into VTA weight-tile patterns, compile them for VTA and recover their accuracy.",
)
app.command()(prune.prune)
app.command()(prune.inspect)
app.command("compile")(vta.compile_command)
app.command()(vta.run)
app.command("recalibrate")(recovery.recalibrate_command)
app.command()(recovery.finetune)
app.command("sweep")(recovery.sweep_command)
app.command()(prune.version)


def main() -> None:
    """Entry point: parser errors (bad option values, missing arguments) become one line, exit 2."""
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        if not hasattr(exc, "format_message"):  # not a command-line parsing error
            raise
        if exc.format_message():  # empty after no_args_is_help has printed the help
            stderr.print(
                f"error: {exc.format_message()} (see gpp-onnx --help)", markup=False, highlight=False, soft_wrap=True
            )
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
