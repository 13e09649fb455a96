"""``gpp-onnx compile`` and ``gpp-onnx run``: the VTA backend and accuracy on CIFAR-10."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from gpp_app.cli.common import (
    BoardOpt,
    DataOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    Output,
    PerChannelOpt,
    StdOpt,
    VtaConfigOpt,
    check_plot_path,
    command,
    load_vta_config,
    parse_floats,
    parse_shape,
    progress,
    stdout,
)
from gpp_app.evaluate import RunOptions
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import check_input_path, check_output_folder, check_output_path, image_input, load_model
from vta_backend.calibration import CalibrationOptions
from vta_backend.quantization import QuantizationOptions

VTA_DRAM_BYTES = 2**32  # VTA's instructions address DRAM with 32 bits


def quantization_options(per_channel: bool | None, activation_shift: int | None = None) -> QuantizationOptions:
    """The options given on the command line over QuantizationOptions' defaults."""
    given = {"per_channel": per_channel, "activation_shift": activation_shift}
    return QuantizationOptions(**{k: v for k, v in given.items() if v is not None})


def print_vta_report(report, title: str) -> None:
    """Per-layer simulated cycles, the convs that stay on the CPU, and the totals."""
    table = Table(title=title, title_justify="left")
    columns = ("layer", "cycles", "limited by", "GEMM uops", "skipped", "tiles kept", "speedup", "Amdahl", "x bound")
    for column in columns:
        table.add_column(
            column,
            justify="left" if column in ("layer", "limited by") else "right",
            overflow="fold",
            min_width=12 if column == "layer" else None,
        )
    for row in (layer.to_dict() for layer in report.layers):
        table.add_row(
            row["name"],
            f"{row['cycles']:,}",
            row["bound"],
            f"{row['gemm_uops']:,}",
            f"{row['gemm_uops_skipped']:,}",
            f"{row['tiles_kept']}/{row['tiles_total']}",
            f"{row['speedup']:.2f}x",
            f"{row['amdahl_bound']:.2f}x",
            f"{row['gap_to_lower_bound']:.2f}",
        )
    stdout.print(table)
    for entry in report.not_on_vta:
        stdout.print(f"not on VTA: {entry.node}: {entry.reason}")
    stdout.print(
        f"simulated on VTA ({report.board}, {report.clock_mhz:g} MHz): {report.cycles:,} cycles = "
        f"{report.simulated_ms:.3f} ms per image; speedup over dense {report.speedup:.2f}x, "
        f"Amdahl bound {report.amdahl_bound:.2f}x (bias loads, requantization ALU ops and stores "
        "do not shrink with pruning); x bound: cycles over the layer's lower bound (GEMM micro-ops + "
        "one-cycle SHR, MIN, MAX per output vector)"
    )


def check_input_shape(shape: tuple[int, ...] | None, dims: list) -> None:
    """``--input-shape`` agrees with every size the model's input fixes (UserError otherwise)."""
    if shape is None:
        return
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if len(shape) != len(dims) or any(f is not None and f != s for f, s in zip(fixed, shape)):
        model_shape = "x".join(str(f) if f is not None else "?" for f in fixed)
        raise UserError(
            f"--input-shape {'x'.join(map(str, shape))} does not fit the model's input {model_shape}; "
            "give the model's own sizes (? is free)"
        )
    if math.prod(shape) > VTA_DRAM_BYTES:
        raise UserError(
            f"--input-shape {'x'.join(map(str, shape))} is {math.prod(shape):,} int8 bytes, more than VTA's "
            "32-bit DRAM addresses reach; give a smaller input"
        )


CalibrationMethodOpt = Annotated[str, typer.Option("--calibration-method", help="percentile, entropy or minmax.")]
CalibrationImagesOpt = Annotated[int, typer.Option("--calibration-images", help="Train images to calibrate on.")]
MaxDropOpt = Annotated[
    Optional[float], typer.Option("--max-drop", help="Exit 1 if accuracy is more than POINTS below the reference.")
]
CyclesPlotOpt = Annotated[
    Optional[Path],
    typer.Option("--plot", help="Write per-conv simulated cycles (dense, this model, every tile pruned) as a PNG."),
]


@command
def compile_command(
    model: ModelArg,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output folder (default: MODEL-vta/).")
    ] = None,
    vta_config: VtaConfigOpt = None,
    board: BoardOpt = None,
    input_shape: Annotated[
        Optional[str], typer.Option("--input-shape", help="Model input shape, e.g. 1x3x32x32.")
    ] = None,
    activation_shift: Annotated[
        Optional[int],
        typer.Option(
            "--activation-shift",
            help="Power-of-two shift of every activation, no calibration here "
            f"(default: {QuantizationOptions.activation_shift}).",
            show_default=False,
        ),
    ] = None,
    per_channel: PerChannelOpt = None,
    as_json: JsonOpt = False,
    plot: CyclesPlotOpt = None,
) -> Output:
    """Compile MODEL's convs to VTA programs; write the binaries and report simulated cycles."""
    from vta_backend.bundle import write_programs
    from vta_backend.model import compile_model

    check_input_path(model)
    output = output or model.with_name(model.stem + "-vta")
    check_output_folder(output, [model])
    check_plot_path(plot, [model])
    config = load_vta_config(vta_config, board)
    quantization = quantization_options(per_channel, activation_shift)
    loaded = load_model(model)
    shape = parse_shape(input_shape)
    check_input_shape(shape, image_input(loaded.model, "gpp-onnx compile expects one image input [N, C, H, W]")[1])
    compiled = compile_model(loaded.model, config, shape, quantization=quantization, track=progress)
    write_programs(compiled, output)
    report = compiled.report()
    if plot is not None:
        from gpp_app.plots import plot_cycles

        plot_cycles(report, plot, f"{model.name} (VTA programs in {output}/)")
    return Output(
        report.to_dict(), lambda: print_vta_report(report, f"{model} -> {output}/ (VTA programs; cycles simulated)")
    )


def print_run(result) -> None:
    """The accuracy table (VTA, its ORT reference, the baseline), agreement and the VTA per-layer report."""
    table = Table(
        title=f"{result.model} on {result.images:,} {result.split} images ({result.data})", title_justify="left"
    )
    for column in ("backend", "top-1 accuracy", "images/s (host)"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    label = "VTA (int8, simulator)" if result.backend == "vta" else "ONNX Runtime fp32"
    table.add_row(label, f"{result.accuracy:.2%}", f"{result.images_per_second:,.0f}")
    if result.reference is not None:
        ref = result.reference
        table.add_row("ONNX Runtime fp32 (same model)", f"{ref.accuracy:.2%}", f"{ref.images_per_second:,.0f}")
    if result.baseline is not None:
        base = result.baseline
        table.add_row(f"baseline {base.model} (ORT fp32)", f"{base.accuracy:.2%}", f"{base.images_per_second:,.0f}")
    stdout.print(table)
    stdout.print(
        f"normalisation: mean {list(result.mean)}, std {list(result.std)} (from {result.normalization_source})"
    )
    if result.vta is not None:
        diff, calibration = result.logit_difference, result.calibration
        stdout.print(
            f"top-1 agreement with ONNX Runtime fp32: {result.agreement:.2%}; logit difference "
            f"max {diff['max']:.3f}, mean {diff['mean']:.4f}; calibration: {calibration.method} "
            f"on {calibration.images} train images" + (" (cached)" if calibration.cached else "")
        )
        print_vta_report(result.vta, "VTA per layer (cycles simulated, one image)")


@command
def run(
    model: ModelArg,
    backend: Annotated[
        str, typer.Option("--backend", "-b", help="vta (convs on the VTA simulator) or ort.")
    ] = RunOptions.backend,
    data_dir: DataOpt = None,
    split: Annotated[str, typer.Option("--split", help="test or train.")] = RunOptions.split,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N images only.")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Images per batch.")] = RunOptions.batch,
    mean: MeanOpt = None,
    std: StdOpt = None,
    calibration_method: CalibrationMethodOpt = CalibrationOptions.method,
    calibration_images: CalibrationImagesOpt = CalibrationOptions.images,
    per_channel: PerChannelOpt = None,
    baseline: Annotated[
        Optional[Path], typer.Option("--baseline", help="Also run this (unpruned) model on ORT.")
    ] = None,
    max_drop: MaxDropOpt = None,
    vta_config: VtaConfigOpt = None,
    board: BoardOpt = None,
    as_json: JsonOpt = False,
    plot: CyclesPlotOpt = None,
) -> Output:
    """Top-1 accuracy on CIFAR-10 with ONNX Runtime, or with the convs on the VTA simulator (checked against ORT)."""
    from gpp_app import data
    from gpp_app.evaluate import evaluate

    if max_drop is not None and not math.isfinite(max_drop):
        raise UserError(f"--max-drop {max_drop} is not a finite number of points")
    if max_drop is not None and backend != "vta" and baseline is None:
        raise UserError("--max-drop compares against a reference: use --backend vta, or pass --baseline")
    options = RunOptions(
        backend=backend,
        split=split,
        limit=limit,
        batch=batch,
        mean=parse_floats(mean, "--mean"),
        std=parse_floats(std, "--std"),
        calibration=CalibrationOptions(method=calibration_method, images=calibration_images),
        quantization=quantization_options(per_channel),
        baseline=baseline,
        vta_config=load_vta_config(vta_config, board) if backend == "vta" else None,
    )
    options.check()
    check_input_path(model)
    if plot is not None and backend != "vta":
        raise UserError("--plot draws the simulated VTA cycles of each conv: use it with --backend vta")
    check_plot_path(plot, [model])
    result = evaluate(model, data_dir or data.default_data_dir(), options, track=progress)
    if plot is not None and result.vta is not None:
        from gpp_app.plots import plot_cycles

        plot_cycles(result.vta, plot, f"{model.name} on VTA ({result.accuracy:.2%} top-1, {result.images:,} images)")
    drop = result.accuracy_drop_points
    failed = max_drop is not None and drop is not None and drop > max_drop
    message = f"accuracy is {drop:.2f} points below the reference, more than --max-drop {max_drop}" if failed else None
    return Output(result.to_dict(), lambda: print_run(result), 1 if failed else 0, message)


def _read_raw(path: Path | None, what: str) -> bytes | None:
    """The bytes of a raw input file (None when not given)."""
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist or is not a file; pass a raw packed int8 file")
    return path.read_bytes()


@command
def run_program(
    bundle: Annotated[Path, typer.Argument(help="Folder written by gpp-onnx compile.", metavar="FOLDER")],
    program: Annotated[str, typer.Option("--program", "-p", help="Program name, as summary.json lists it.")],
    input_file: Annotated[Path, typer.Option("--input", "-i", help="Raw packed int8 input (summary.json: input).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the raw OUT buffer.")],
    residual: Annotated[
        Optional[Path], typer.Option("--residual", "-r", help="Raw packed int8 residual of a fused Add.")
    ] = None,
    as_json: JsonOpt = False,
) -> Output:
    """Run one compiled program on raw input files with our VTA simulator; write the raw output buffer."""
    from gpp_onnx.files import write_bytes
    from vta_backend.bundle_run import open_program
    from vta_backend.bundle_run import run_program as run_one

    loaded = open_program(bundle, program)
    check_output_path(output, [p for p in (input_file, residual) if p is not None])
    out = run_one(loaded, _read_raw(input_file, "input"), _read_raw(residual, "residual"))
    write_bytes(output, out)
    summary = {"program": program, "output": str(output), "bytes": len(out), "simulated": True}
    return Output(summary, lambda: stdout.print(f"{program}: wrote {len(out):,} bytes (raw OUT buffer) to {output}"))
