"""``gpp-onnx compile`` and ``gpp-onnx run``: the VTA backend and accuracy on CIFAR-10."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from gpp_onnx.cli import JsonOpt, ModelArg, app, progress, stderr, stdout, user_errors
from gpp_onnx.cli_recovery import default_data_dir
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import check_input_path, check_output_path, load_model


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
