"""The ``gpp-onnx`` command: a thin layer over the library API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, TextColumn
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
        pruned = _recalibrated(pruned, loaded.model, recalibrate_data, recalibrate_images)
    save_model(pruned, output, external_data=loaded.had_external_data)
    emit(report, as_json, f"{model} -> {output}", plot)


def _recalibrated(pruned, dense, data_dir: Path, images: int):
    from gpp_onnx import data
    from gpp_onnx.evaluate import image_input
    from gpp_onnx.normalization import normalization_for
    from gpp_onnx.recalibrate import recalibrate

    mean, std = normalization_for(dense)
    input_name, _ = image_input(dense)
    result, _ = recalibrate(pruned, dense, input_name, data.locate(data_dir), mean, std, images, track=progress)
    return result


@app.command()
@user_errors
def inspect(model: ModelArg, as_json: JsonOpt = False, plot: PlotOpt = None, tile: TileOpt = None) -> None:
    """Show MODEL's prunable layers: tiles kept, sparsity, pattern, and why layers were skipped."""
    check_plot_path(plot, [model])
    emit(inspect_model(model, tile=tile), as_json, str(model), plot)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--input-shape {text!r} is not positive integers joined by x, e.g. 1x3x32x32")
    return tuple(int(p) for p in parts)


def load_vta_config(path: Path | None, board: str | None):
    from dataclasses import replace

    from vta_backend import VTAConfig

    config = VTAConfig.from_json(path) if path is not None else VTAConfig()
    return replace(config, BOARD=board) if board else config


def print_vta_summary(summary: dict, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("layer", "cycles", "limited by", "GEMM uops", "skipped", "tiles kept", "speedup", "Amdahl bound"):
        table.add_column(
            column,
            justify="left" if column in ("layer", "limited by") else "right",
            overflow="fold",
            min_width=12 if column == "layer" else None,
        )
    for row in summary["layers"]:
        table.add_row(
            row["name"],
            f"{row['cycles']:,}",
            row["bound"],
            f"{row['gemm_uops']:,}",
            f"{row['gemm_uops_skipped']:,}",
            f"{row['tiles_kept']}/{row['tiles_total']}",
            f"{row['speedup']:.2f}x",
            f"{row['amdahl_bound']:.2f}x",
        )
    stdout.print(table)
    for entry in summary["not_on_vta"]:
        stdout.print(f"not on VTA: {entry['node']}: {entry['reason']}")
    stdout.print(
        f"simulated on VTA ({summary['board']}, {summary['clock_mhz']:g} MHz): {summary['cycles']:,} cycles = "
        f"{summary['simulated_ms']:.3f} ms per image; speedup over dense {summary['speedup']:.2f}x, "
        f"Amdahl bound {summary['amdahl_bound']:.2f}x (bias loads, requantization ALU ops and stores "
        "do not shrink with pruning)"
    )


@app.command("compile")
@user_errors
def compile_command(
    model: ModelArg,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output folder [default: MODEL-vta/].")
    ] = None,
    vta_config: Annotated[
        Optional[Path], typer.Option("--vta-config", help="VTA config JSON (vta_config.json).")
    ] = None,
    board: Annotated[Optional[str], typer.Option("--board", help="pynq, de10nano, ultra96 or zcu104.")] = None,
    input_shape: Annotated[
        Optional[str], typer.Option("--input-shape", help="Model input shape, e.g. 1x3x32x32.")
    ] = None,
    activation_shift: Annotated[
        int, typer.Option("--activation-shift", help="Power-of-two shift of every activation (no calibration here).")
    ] = 4,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="Per-output-channel weight scales.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compile MODEL's convs to VTA programs; write the binaries and report simulated cycles."""
    from vta_backend.model import compile_model, write_programs

    check_input_path(model)
    output = output or model.with_name(model.stem + "-vta")
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} is a file; give a folder path")
    check_output_path(output / "summary.json", [model]) if output.is_dir() else check_output_path(output, [model])
    config = load_vta_config(vta_config, board)
    loaded = load_model(model)
    compiled = compile_model(
        loaded.model,
        config,
        parse_shape(input_shape),
        default_shift=activation_shift,
        per_channel=per_channel,
        track=progress,
    )
    write_programs(compiled, output)
    summary = compiled.summary()
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        print_vta_summary(summary, f"{model} -> {output}/ (VTA programs; cycles simulated)")


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text!r} is not three numbers separated by commas, e.g. 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise UserError(f"{option} takes three values (one per channel), got {len(values)}")
    return values


def print_run(result: dict) -> None:
    table = Table(
        title=f"{result['model']} on {result['images']:,} {result['split']} images ({result['data']})",
        title_justify="left",
    )
    for column in ("backend", "top-1 accuracy", "images/s (host)"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    label = "VTA (int8, simulator)" if result["backend"] == "vta" else "ONNX Runtime fp32"
    table.add_row(label, f"{result['accuracy']:.2%}", f"{result['images_per_second']:,.0f}")
    if "reference" in result:
        ref = result["reference"]
        table.add_row("ONNX Runtime fp32 (same model)", f"{ref['accuracy']:.2%}", f"{ref['images_per_second']:,.0f}")
    if "baseline" in result:
        base = result["baseline"]
        table.add_row(
            f"baseline {base['model']} (ORT fp32)", f"{base['accuracy']:.2%}", f"{base['images_per_second']:,.0f}"
        )
    stdout.print(table)
    if "vta" in result:
        diff = result["logit_difference"]
        stdout.print(
            f"top-1 agreement with ONNX Runtime fp32: {result['agreement']:.2%}; logit difference "
            f"max {diff['max']:.3f}, mean {diff['mean']:.4f}; calibration: {result['calibration']['method']} "
            f"on {result['calibration']['images']} train images"
            + (" (cached)" if result["calibration"]["cached"] else "")
        )
        vta = dict(
            result["vta"],
            simulated_ms=result["vta"]["simulated_ms_per_image"],
            not_on_vta=[p for p in result["vta"]["placement"] if p["device"] != "vta"],
        )
        print_vta_summary(vta, "VTA per layer (cycles simulated, one image)")


@app.command()
@user_errors
def run(
    model: ModelArg,
    backend: Annotated[str, typer.Option("--backend", "-b", help="vta (convs on the VTA simulator) or ort.")] = "vta",
    data_dir: Annotated[
        Optional[Path], typer.Option("--data", help="CIFAR-10 folder [default: $GPP_DATA_DIR/cifar10-jpeg].")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="test or train.")] = "test",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N images only.")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Images per batch.")] = 256,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean [default: model metadata].")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel std [default: model metadata].")] = None,
    calibration_method: Annotated[
        str, typer.Option("--calibration-method", help="percentile, entropy or minmax.")
    ] = "percentile",
    calibration_images: Annotated[
        int, typer.Option("--calibration-images", help="Train images to calibrate on.")
    ] = 5000,
    per_tensor: Annotated[
        bool, typer.Option("--per-tensor", help="One weight scale per conv (default: per channel).")
    ] = False,
    baseline: Annotated[
        Optional[Path], typer.Option("--baseline", help="Also run this (unpruned) model on ORT.")
    ] = None,
    max_drop: Annotated[
        Optional[float], typer.Option("--max-drop", help="Exit 1 if accuracy is more than POINTS below the reference.")
    ] = None,
    vta_config: Annotated[Optional[Path], typer.Option("--vta-config", help="VTA config JSON.")] = None,
    board: Annotated[Optional[str], typer.Option("--board", help="pynq, de10nano, ultra96 or zcu104.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-1 accuracy on CIFAR-10 with ONNX Runtime, or with the convs on the VTA simulator (checked against ORT)."""
    from gpp_onnx.evaluate import RunOptions, evaluate

    data_dir = data_dir or default_data_dir()
    if split not in ("test", "train"):
        raise UserError(f"unknown split {split!r}; use test or train")
    if max_drop is not None and backend != "vta" and baseline is None:
        raise UserError("--max-drop compares against a reference: use --backend vta, or pass --baseline")
    options = RunOptions(
        backend=backend,
        split=split,
        limit=limit,
        batch=batch,
        mean=parse_floats(mean, "--mean"),
        std=parse_floats(std, "--std"),
        calibration_method=calibration_method,
        calibration_images=calibration_images,
        per_channel=not per_tensor,
        baseline=baseline,
        vta_config=load_vta_config(vta_config, board) if backend == "vta" else None,
    )
    check_input_path(model)
    result = evaluate(model, data_dir, options, track=progress)
    reference = result.get("reference", result.get("baseline"))
    drop = None if reference is None else (reference["accuracy"] - result["accuracy"]) * 100
    result["accuracy_drop_points"] = drop
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        print_run(result)
    if max_drop is not None and drop is not None and drop > max_drop:
        stderr.print(
            f"accuracy is {drop:.2f} points below the reference, more than --max-drop {max_drop}",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(1)


@app.command("recalibrate")
@user_errors
def recalibrate_command(
    model: ModelArg,
    dense: Annotated[Path, typer.Option("--dense", help="The unpruned model MODEL was pruned from.")],
    data_dir: Annotated[Optional[Path], typer.Option("--data", help="CIFAR-10 folder.")] = None,
    images: Annotated[int, typer.Option("--images", help="Train images to match statistics on.")] = 2000,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output model [default: MODEL-recal.onnx].")
    ] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Test images to report on.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit each pruned conv's output statistics to the dense model's (ONNX only); report test accuracy."""
    from gpp_onnx.evaluate import RunOptions, evaluate

    data_dir = data_dir or default_data_dir()
    check_input_path(model)
    output = output or model.with_name(model.stem + "-recal.onnx")
    check_output_path(output, [model, dense])
    loaded = load_model(model)
    result = _recalibrated(loaded.model, load_model(dense).model, data_dir, images)
    save_model(result, output, external_data=loaded.had_external_data)
    options = RunOptions(backend="ort", limit=eval_limit)
    before = evaluate(model, data_dir, options, track=progress)
    after = evaluate(output, data_dir, options, track=progress)
    summary = {
        "model": str(model),
        "output": str(output),
        "images": images,
        "data": after["data"],
        "test_images": after["images"],
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
    }
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        stdout.print(
            f"{output}: test accuracy (ONNX Runtime fp32, {after['images']:,} images of {after['data']}) "
            f"{before['accuracy']:.2%} -> {after['accuracy']:.2%} after recalibrating on {images} train images"
        )


@app.command()
@user_errors
def finetune(
    model: ModelArg,
    data_dir: Annotated[Optional[Path], typer.Option("--data", help="CIFAR-10 folder.")] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output model [default: MODEL-ft.onnx].")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the train split.")] = 3,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (SGD, momentum 0.9, wd 1e-4).")] = 0.002,
    batch: Annotated[int, typer.Option("--batch", help="Images per step.")] = 128,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine or onecycle.")] = "cosine",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda [default: cuda if available].")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.ckpt.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on the first N images only.")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Test images to report on.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune MODEL on the train split with its pruned tiles frozen at zero; evaluate on the test split."""
    from gpp_onnx.evaluate import RunOptions, evaluate
    from gpp_onnx.finetune import FinetuneOptions
    from gpp_onnx.finetune import finetune as run_finetune

    data_dir = data_dir or default_data_dir()
    check_input_path(model)
    output = output or model.with_name(model.stem + "-ft.onnx")
    check_output_path(output, [model])
    options = FinetuneOptions(
        epochs=epochs, lr=lr, batch=batch, schedule=schedule, device=device, seed=seed, resume=resume, limit=limit
    )
    with training_progress(epochs) as on_step:
        result = run_finetune(model, data_dir, output, options, on_step=on_step)
    evaluation = evaluate(output, data_dir, RunOptions(backend="ort", limit=eval_limit), track=progress)
    result.update(test_accuracy=evaluation["accuracy"], test_images=evaluation["images"])
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        last = result["history"][-1]
        stdout.print(
            f"{output}: {epochs} epochs, last train loss {last['loss']:.3f}, train accuracy "
            f"{last['train_accuracy']:.2%}; test accuracy (ONNX Runtime fp32, {evaluation['images']:,} "
            f"images of {evaluation['data']}) {evaluation['accuracy']:.2%}"
        )


@app.command("sweep")
@user_errors
def sweep_command(
    model: ModelArg,
    data_dir: Annotated[Optional[Path], typer.Option("--data", help="CIFAR-10 folder.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Results folder.")] = Path("results"),
    patterns: Annotated[
        str, typer.Option("--patterns", help="Comma-separated patterns.")
    ] = "group,block,channel,element",
    sparsities: Annotated[str, typer.Option("--sparsities", help="Comma-separated targets.")] = "0.5,0.6,0.7,0.8,0.9",
    epochs: Annotated[int, typer.Option("--epochs", help="Fine-tuning epochs per point (0: none).")] = 3,
    scope: Annotated[str, typer.Option("--scope", help="layer or global.")] = "global",
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", "-x", help="Layers kept dense (regex).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Points run in parallel processes.")] = 1,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Test images per evaluation.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Prune, recalibrate, fine-tune and evaluate (ORT and VTA) every pattern x sparsity; CSV and plots."""
    from gpp_onnx.sweep import SweepOptions, sweep

    data_dir = data_dir or default_data_dir()
    check_input_path(model)
    try:
        targets = [float(s) for s in sparsities.split(",")]
    except ValueError:
        raise UserError(f"--sparsities {sparsities!r} is not comma-separated numbers, e.g. 0.5,0.7,0.9") from None
    options = SweepOptions(
        patterns=patterns.split(","),
        sparsities=targets,
        epochs=epochs,
        scope=scope,
        exclude=exclude or [],
        workers=workers,
        eval_limit=eval_limit,
    )

    def on_point(row: dict) -> None:
        status = row.get("error") or f"after {row['accuracy_after_ort']:.2%} (VTA {row['accuracy_after_vta']:.2%})"
        stderr.print(f"{row['pattern']} {row['sparsity_target']}: {status}", markup=False, highlight=False)

    result = sweep(model, data_dir, output, options, on_point)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        table = Table(title=f"{output}/results.csv (dense ORT {result['dense']['accuracy_ort']:.2%})")
        for column in (
            "pattern",
            "target",
            "achieved",
            "before",
            "recalibrated",
            "after ORT",
            "after VTA",
            "VTA speedup (sim.)",
            "error",
        ):
            table.add_column(column)
        for row in result["rows"]:
            cells = [
                row["pattern"],
                row["sparsity_target"],
                row["sparsity_achieved"],
                row["accuracy_before_ort"],
                row["accuracy_recalibrated_ort"],
                row["accuracy_after_ort"],
                row["accuracy_after_vta"],
                row["vta_speedup"],
                row["error"],
            ]
            table.add_row(*[str(c) for c in cells])
        stdout.print(table)


def default_data_dir() -> Path:
    import os

    if not os.environ.get("GPP_DATA_DIR"):
        raise UserError("pass --data DIR (a CIFAR-10 folder) or set GPP_DATA_DIR")
    return Path(os.environ["GPP_DATA_DIR"]) / "cifar10-jpeg"


@contextmanager
def training_progress(epochs: int):
    """A progress bar with the running loss and accuracy (on a terminal), as an on_step callback."""
    if not stderr.is_terminal:
        yield lambda *args: None
        return
    columns = (*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%}"))
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: dict[int, object] = {}

        def on_step(epoch: int, step: int, steps: int, loss: float, accuracy: float) -> None:
            if epoch not in tasks:
                tasks[epoch] = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, loss=0.0, acc=0.0)
            bar.update(tasks[epoch], completed=step + 1, loss=loss, acc=accuracy)

        yield on_step


@app.command()
def version() -> None:
    """Print the gpp-onnx version."""
    stdout.print(__version__)


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


if __name__ == "__main__":
    main()
