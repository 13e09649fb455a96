"""The ``gpp-onnx`` command: a thin layer over the library API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import track as rich_track
from rich.table import Table

from gpp_onnx._version import __version__
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import check_input_path, check_output_path, load_model, save_model
from gpp_onnx.pruner import inspect as inspect_model
from gpp_onnx.pruner import prune as prune_model
from gpp_onnx.report import Report

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune ONNX CNNs into VTA weight-tile patterns and annotate the sparse tiles.",
)
stdout = Console()
stderr = Console(stderr=True)
T = TypeVar("T")


def fail(message: str) -> None:
    """Print a one-line error and exit with status 2."""
    stderr.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def user_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn UserError (and unreadable files) into a one-line error with exit status 2."""

    @wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except MemoryError:
            fail("out of memory; prune a smaller model or free memory")

    return wrapper


def progress(items: Iterable[T], description: str, total: int) -> Iterable[T]:
    """A progress bar on stderr when it is a terminal (pipes and logs stay clean)."""
    if not stderr.is_terminal:
        return items
    return rich_track(items, description=description, total=total, console=stderr, transient=True)


def print_report(report: Report, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("layer", "weight", "shape", "tiles kept/total", "sparsity", "pattern", "status"):
        table.add_column(column, justify="right" if column in ("tiles kept/total", "sparsity") else "left")
    for row in report.layers:
        status = row.status if row.reason is None else f"{row.status}: {row.reason}"
        table.add_row(
            row.name,
            row.weight,
            "x".join(map(str, row.shape)),
            f"{row.tiles_kept}/{row.tiles_total}",
            f"{row.sparsity:.1%}",
            row.pattern or "-",
            status,
        )
    stdout.print(table)
    counted = "pruned" if any(r.status == "pruned" for r in report.layers) else "dense"
    target = f" (target {report.target_sparsity:.1%})" if report.target_sparsity is not None else ""
    stdout.print(f"overall sparsity of the {counted} layers: {report.sparsity:.2%}{target}, tile {report.tile}")


def check_plot_path(plot: Path | None, inputs: list[Path]) -> None:
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise UserError(f"--plot {plot} must end in .png")
        check_output_path(plot, inputs)


def emit(report: Report, as_json: bool, title: str, plot: Path | None) -> None:
    if plot is not None:
        from gpp_onnx.plot import plot_tile_maps

        plot_tile_maps(report, plot)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        print_report(report, title)
        if plot is not None:
            stdout.print(f"tile maps written to {plot}")


ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
PlotOpt = Annotated[Optional[Path], typer.Option("--plot", help="Write each layer's tile map as a PNG heat map.")]
TileOpt = Annotated[
    Optional[str], typer.Option("--tile", help="Tile shape OUTxIN (default 16x16) or a VTA config JSON.")
]


@app.command()
@user_errors
def prune(
    model: ModelArg,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output model [default: MODEL-pruned.onnx].")
    ] = None,
    sparsity: Annotated[
        float, typer.Option("--sparsity", "-s", help="Fraction of prunable weights to zero, in [0, 1).")
    ] = 0.5,
    pattern: Annotated[str, typer.Option("--pattern", "-p", help="group, block, channel or element.")] = "group",
    scope: Annotated[
        str, typer.Option("--scope", help="layer (each layer at the target) or global (one ranking).")
    ] = "layer",
    tile: TileOpt = None,
    exclude: Annotated[
        Optional[list[str]],
        typer.Option("--exclude", "-x", help="Regex on node or weight names to keep dense; repeatable."),
    ] = None,
    include_fc: Annotated[
        bool, typer.Option("--include-fc", help="Also prune Gemm/MatMul with constant weights.")
    ] = False,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    recalibrate_data: Annotated[
        Optional[Path],
        typer.Option("--recalibrate", help="Then match each pruned conv's output statistics to MODEL's on this data."),
    ] = None,
    recalibrate_images: Annotated[int, typer.Option("--recalibrate-images", help="Train images for that.")] = 2000,
) -> None:
    """Prune the conv weights of MODEL and write the sparse-tile annotation into the output."""
    check_input_path(model)
    output = output or model.with_name(model.stem + "-pruned.onnx")
    check_output_path(output, [model])
    check_plot_path(plot, [model, output])
    loaded = load_model(model)
    pruned, report = prune_model(
        loaded,
        sparsity,
        pattern=pattern,
        scope=scope,
        tile=tile,
        exclude=exclude or (),
        include_fc=include_fc,
        track=progress,
    )
    if recalibrate_data is not None:
        from gpp_onnx.recalibrate import recalibrate_from_data

        pruned = recalibrate_from_data(pruned, loaded.model, recalibrate_data, recalibrate_images, track=progress)
    save_model(pruned, output, external_data=loaded.had_external_data)
    emit(report, as_json, f"{model} -> {output}", plot)


@app.command()
@user_errors
def inspect(model: ModelArg, as_json: JsonOpt = False, plot: PlotOpt = None, tile: TileOpt = None) -> None:
    """Show MODEL's prunable layers: tiles kept, sparsity, pattern, and why layers were skipped."""
    check_plot_path(plot, [model])
    emit(inspect_model(model, tile=tile), as_json, str(model), plot)


@app.command()
def version() -> None:
    """Print the gpp-onnx version."""
    stdout.print(__version__)


def _register_commands() -> None:
    """The compile/run and recalibrate/finetune/sweep commands live in their own modules."""
    from gpp_onnx import cli_recovery, cli_vta  # noqa: F401


def main() -> None:
    """Entry point: parser errors (bad option values, missing arguments) become one line, exit 2."""
    _register_commands()
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


if __name__ == "__main__":
    main()
