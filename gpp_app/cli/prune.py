"""``gpp-onnx prune`` and ``gpp-onnx inspect``: pruning and looking at tile maps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from gpp_app.cli.common import (
    AllocationOpt,
    AllowEmptyOpt,
    BoardOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    Output,
    PlotOpt,
    SensitivityImagesOpt,
    StdOpt,
    TileOpt,
    VtaConfigOpt,
    check_plot_path,
    command,
    load_vta_config,
    parse_floats,
    parse_tile,
    progress,
    stdout,
)
from gpp_app.recalibrate import DEFAULT_RECALIBRATION_IMAGES
from gpp_app.sensitivity import DEFAULT_LATENCY_ALLOCATION, DEFAULT_SENSITIVITY_IMAGES, LatencyAllocation
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import check_input_path, check_output_path, load_model, save_model
from gpp_onnx.normalization import normalization_for, normalization_source, write_normalization
from gpp_onnx.patterns import pattern_names
from gpp_onnx.pruner import DEFAULT_PATTERN, DEFAULT_SCOPE, DEFAULT_SPARSITY, PruneOptions
from gpp_onnx.pruner import inspect as inspect_model
from gpp_onnx.report import Report
from vta_backend.config import VTAConfig
from vta_backend.latency import DEFAULT_ALLOCATION, LatencyReport, LatencyTarget

SparsityOpt = Annotated[
    Optional[float],
    typer.Option("--sparsity", "-s", help=f"Fraction of prunable weights to zero, in [0, 1) [{DEFAULT_SPARSITY}]."),
]
ScopeOpt = Annotated[
    Optional[str],
    typer.Option("--scope", help=f"layer (each layer at the target) or global (one ranking) [{DEFAULT_SCOPE}]."),
]
TargetSpeedupOpt = Annotated[
    Optional[float],
    typer.Option(
        "--target-speedup",
        help="Instead of a sparsity: prune VTA convs until the simulated speedup over the dense program is this.",
    ),
]
SensitivityDataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="CIFAR-10-style data whose train images --allocation sensitivity measures on."),
]
TargetCyclesOpt = Annotated[
    Optional[int],
    typer.Option("--target-cycles", help="Instead of a sparsity: prune until this many simulated VTA cycles."),
]
ExcludeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", "-x", help="Regex on node or weight names to keep dense; repeatable."),
]
RecalibrateOpt = Annotated[
    Optional[Path],
    typer.Option("--recalibrate", help="Then match each pruned conv's output statistics to MODEL's on this data."),
]
RecalibrateImagesOpt = Annotated[int, typer.Option("--recalibrate-images", help="Train images for that.")]
IncludeFcOpt = Annotated[bool, typer.Option("--include-fc", help="Also prune Gemm/MatMul with constant weights.")]


def print_report(report: Report, title: str) -> None:
    """The per-layer table and the overall sparsity."""
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
    if report.shortfall:
        stdout.print(
            f"target not met: {report.shortfall:.2%} short (every layer keeps its best unit and the layer floor; "
            "--allow-empty-layers lets layers be zeroed)"
        )
    short = report.short_layers
    if short:
        names = ", ".join(f"{r.name} {r.sparsity:.1%}" for r in short[:5]) + (" ..." if len(short) > 5 else "")
        stdout.print(f"{len(short)} layer(s) below the target (whole units): {names}")


def report_output(report: Report, title: str, plot: Path | None) -> Output:
    """Write the tile-map plot (if asked) and describe the report for --json and for people."""
    if plot is not None:
        from gpp_app.plots import plot_tile_maps

        plot_tile_maps(report, plot)

    def show() -> None:
        print_report(report, title)
        if plot is not None:
            stdout.print(f"tile maps written to {plot}")

    return Output(report.to_dict(), show)


@command
def prune(
    model: ModelArg,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output model (default: MODEL-pruned.onnx).")
    ] = None,
    sparsity: SparsityOpt = None,
    pattern: Annotated[str, typer.Option("--pattern", "-p", help=f"{', '.join(pattern_names())}.")] = DEFAULT_PATTERN,
    scope: ScopeOpt = None,
    target_speedup: TargetSpeedupOpt = None,
    target_cycles: TargetCyclesOpt = None,
    allocation: AllocationOpt = DEFAULT_ALLOCATION,
    sensitivity_data: SensitivityDataOpt = None,
    sensitivity_images: SensitivityImagesOpt = DEFAULT_SENSITIVITY_IMAGES,
    vta_config: VtaConfigOpt = None,
    board: BoardOpt = None,
    tile: TileOpt = None,
    exclude: ExcludeOpt = None,
    include_fc: IncludeFcOpt = False,
    layer_floor: Annotated[
        float,
        typer.Option("--layer-floor", help="Fraction of each layer's units (the best) never pruned, so none empties."),
    ] = PruneOptions.layer_floor,
    allow_empty_layers: AllowEmptyOpt = False,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    recalibrate_data: RecalibrateOpt = None,
    recalibrate_images: RecalibrateImagesOpt = DEFAULT_RECALIBRATION_IMAGES,
) -> Output:
    """Prune the conv weights of MODEL and write the sparse-tile annotation into the output."""
    from gpp_app.pipeline import prune_file

    check_input_path(model)
    output = output or model.with_name(model.stem + "-pruned.onnx")
    check_output_path(output, [model])
    check_plot_path(plot, [model, output])
    options = PruneOptions(
        DEFAULT_SPARSITY if sparsity is None else sparsity,
        pattern,
        DEFAULT_SCOPE if scope is None else scope,
        parse_tile(tile),
        tuple(exclude or ()),
        include_fc,
        layer_floor,
        allow_empty_layers,
    )
    recalibration = (recalibrate_data, recalibrate_images)
    spread = LatencyAllocation(allocation, sensitivity_data, sensitivity_images)
    if target_speedup is not None or target_cycles is not None:
        target = LatencyTarget(target_speedup, target_cycles)
        config = load_vta_config(vta_config, board)
        latency = (target, config, spread)
        return _prune_for_latency(model, output, latency, options, (sparsity, scope, tile), recalibration, plot)
    if vta_config is not None or board is not None or spread != DEFAULT_LATENCY_ALLOCATION:
        raise UserError(
            "--vta-config, --board, --allocation and --data set how --target-speedup / --target-cycles prune; "
            "give one, or drop them"
        )
    report = prune_file(model, output, options, *recalibration, track=progress)
    return report_output(report, f"{model} -> {output}", plot)


def _prune_for_latency(
    model: Path,
    output: Path,
    latency_target: tuple[LatencyTarget, VTAConfig, LatencyAllocation],
    options: PruneOptions,
    sparsity_options: tuple[object, object, object],
    recalibration: tuple[Path | None, int],
    plot: Path | None,
) -> Output:
    """``prune --target-speedup / --target-cycles``: the latency-target allocation on the board's cycle model
    (``latency_target``: the target, the VTA config, the allocation)."""
    from gpp_app.pipeline import prune_latency_file

    target, config, allocation = latency_target
    if any(value is not None for value in sparsity_options):
        raise UserError(
            "--sparsity, --scope and --tile do not apply with a latency target (the VTA config sets the tile and the "
            "cycle model allocates); drop them or drop --target-speedup / --target-cycles"
        )
    target.check()
    report, latency = prune_latency_file(
        model, output, target, config, options, *recalibration, track=progress, allocation=allocation
    )
    title = f"{model} -> {output}"
    base = report_output(report, title, plot)

    def show() -> None:
        base.show()
        print_latency(latency)

    return Output({**report.to_dict(), "latency": latency.to_dict()}, show)


def print_latency(latency: LatencyReport) -> None:
    """Per VTA conv the simulated cycles before and after, then the totals against the target."""
    table = Table(title=f"simulated VTA cycles per image ({latency.board})", title_justify="left")
    for column in ("conv", "dense", "pruned", "units pruned"):
        table.add_column(column, justify="left" if column == "conv" else "right")
    for layer in latency.layers:
        table.add_row(
            layer.name, f"{layer.dense_cycles:,}", f"{layer.cycles:,}", f"{layer.units_pruned}/{layer.units_prunable}"
        )
    stdout.print(table)
    stdout.print(
        f"simulated: {latency.cycles:,} cycles against {latency.dense_cycles:,} dense = {latency.speedup:.3f}x "
        f"(target {latency.target_speedup:.3f}x = {latency.target_cycles:,.0f} cycles; "
        f"bound with every weight tile pruned {latency.amdahl_bound:.2f}x)"
    )
    if not latency.on_target:
        stdout.print("the nearest the pattern's unit granularity allows: no allocation lands closer to the target")
    for placement in latency.not_on_vta:
        stdout.print(f"left dense, stays on the CPU: {placement.node} ({placement.reason})")


@command
def inspect(model: ModelArg, as_json: JsonOpt = False, plot: PlotOpt = None, tile: TileOpt = None) -> Output:
    """Show MODEL's prunable layers: tiles kept, sparsity, pattern, and why layers were skipped."""
    check_plot_path(plot, [model])
    return report_output(inspect_model(model, tile=parse_tile(tile)), str(model), plot)


@command
def normalization(
    model: ModelArg,
    mean: MeanOpt = None,
    std: StdOpt = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="With --mean/--std: the copy (default: MODEL-norm.onnx).")
    ] = None,
    as_json: JsonOpt = False,
) -> Output:
    """Show the input normalisation MODEL declares, or store --mean and --std in a copy of it: every command
    (recalibrate, finetune, sweep, run) then feeds it images normalised that way."""
    check_input_path(model)
    given = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    if given.count(None) == 1:
        raise UserError("give --mean and --std together (three values each), or neither to show what MODEL declares")
    if output is not None and given[0] is None:
        raise UserError("-o writes a copy with --mean and --std stored; give them, or drop -o")
    loaded = load_model(model)
    values = normalization_for(loaded.model, *given)
    document = {"model": str(model), "mean": list(values[0]), "std": list(values[1])}
    document["source"] = normalization_source(loaded.model, *given)
    if given[0] is not None:
        output = output or model.with_name(model.stem + "-norm.onnx")
        check_output_path(output, [model])
        write_normalization(loaded.model, *values)
        save_model(loaded.model, output, external_data=loaded.had_external_data)
        document["output"] = str(output)
    shown = f"mean {document['mean']}, std {document['std']} ({document['source']})"
    return Output(document, lambda: stdout.print(shown + (f" -> stored in {output}" if given[0] else ""), markup=False))


def version() -> None:
    """Print the gpp-onnx version."""
    from gpp_onnx import __version__

    stdout.print(__version__)
