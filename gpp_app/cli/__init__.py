"""The ``gpp-onnx`` command: a thin shell over the library. This module owns the Typer app and
registers the commands, which live in one module per concern."""

from __future__ import annotations

import atexit
import signal
import sys

import typer

from gpp_app.cli import demo, prune, recovery, vta
from gpp_app.cli.common import stderr
from gpp_onnx.files import interruption_handler

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune ONNX CNNs into VTA weight-tile patterns, compile them for VTA and recover their accuracy.",
)
app.command()(prune.prune)
app.command()(prune.inspect)
app.command()(prune.normalization)
app.command("compile")(vta.compile_command)
app.command()(vta.run)
app.command("run-program")(vta.run_program)
app.command("recalibrate")(recovery.recalibrate_command)
app.command()(recovery.finetune)
app.command("sweep")(recovery.sweep_command)
app.command()(demo.demo)
app.command()(prune.version)


INTERRUPTED = 130  # the exit status of a command stopped by SIGINT or SIGTERM


def main() -> None:
    """Entry point: parser errors (bad option values, missing arguments) become one line, exit 2;
    SIGINT and SIGTERM stop the command cleanly (exit 130), leaving no partial output."""
    for stop in (signal.SIGINT, signal.SIGTERM):  # both unwind like Ctrl-C, removing every temporary
        signal.signal(stop, interruption_handler)
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        code = INTERRUPTED
    except Exception as exc:
        if not hasattr(exc, "format_message"):  # not a command-line parsing error
            raise
        if exc.format_message():  # empty after no_args_is_help has printed the help
            stderr.print(
                f"error: {exc.format_message()} (see gpp-onnx --help)", markup=False, highlight=False, soft_wrap=True
            )
        sys.exit(getattr(exc, "exit_code", 2))
    if code == INTERRUPTED:  # Typer returns it for a KeyboardInterrupt
        stderr.print("error: interrupted; no partial output was left behind", markup=False, highlight=False)
    sys.exit(code if isinstance(code, int) else 0)


def _ignore_interruptions() -> None:
    """At interpreter shutdown the command is over and there is nothing left to clean up: a late SIGINT or
    SIGTERM (Python resets its handlers while it shuts down) must not turn a finished command into a kill."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


atexit.register(_ignore_interruptions)
