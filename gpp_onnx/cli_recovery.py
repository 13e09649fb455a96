"""``gpp-onnx recalibrate``, ``finetune`` and ``sweep``: recovering accuracy after pruning."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress, TextColumn
from rich.table import Table

from gpp_onnx.cli import JsonOpt, ModelArg, app, progress, stderr, stdout, user_errors
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import check_input_path, check_output_path, load_model, save_model
from gpp_onnx.recalibrate import recalibrate_from_data


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
    result = recalibrate_from_data(loaded.model, load_model(dense).model, data_dir, images, track=progress)
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
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (SGD, momentum 0.9, wd 1e-4).")] = 0.01,
    batch: Annotated[int, typer.Option("--batch", help="Images per step.")] = 128,
    schedule: Annotated[str, typer.Option("--schedule", help="onecycle or cosine.")] = "onecycle",
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
