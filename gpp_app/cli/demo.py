"""``gpp-onnx demo``: the main job in one command, on the embedded CNN and image sample."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from gpp_app.cli.common import JsonOpt, Output, command, progress, stdout

DemoDataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="A CIFAR-10 folder instead of the embedded sample (1,000 test, 500 train images)."),
]
DemoOutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder for the model, programs and plots.")]


def _print_demo(demo) -> None:
    """Dense ORT against the pruned model on ORT and on the VTA simulator, then what was written."""
    run, vta = demo.run, demo.run.vta
    table = Table(title=f"demo CNN on {run.images:,} test images", title_justify="left")
    for column in ("model", "backend", "top-1 accuracy"):
        table.add_column(column, justify="right" if column == "top-1 accuracy" else "left")
    pruned = f"group {demo.pruning.sparsity:.0%}"
    table.add_row("dense", "ONNX Runtime fp32", f"{run.baseline.accuracy:.2%}")
    table.add_row(pruned, "ONNX Runtime fp32", f"{run.reference.accuracy:.2%}")
    table.add_row(pruned, "VTA int8 (simulator)", f"{run.accuracy:.2%}")
    stdout.print(table)
    stdout.print(f"data: {run.data}")
    stdout.print(
        f"simulated VTA ({vta.board}) cycles per image: dense {vta.dense_cycles:,}, {pruned} {vta.cycles:,}: "
        f"{vta.speedup:.2f}x (bound with every weight tile pruned: {vta.amdahl_bound:.2f}x); VTA int8 agrees "
        f"with ORT fp32 on {run.agreement:.2%} of the images; one-shot pruning and recalibration, no "
        "fine-tuning (gpp-onnx finetune recovers more)"
    )
    stdout.print(f"written to {demo.output}/: pruned.onnx, vta-programs/, tile-maps.png, cycles.png, summary.json")


@command
def demo(
    data_dir: DemoDataOpt = None,
    output: DemoOutputOpt = Path("gpp-demo"),
    as_json: JsonOpt = False,
) -> Output:
    """Prune the embedded CIFAR-10 CNN (group, 50 %), recalibrate, compile, run on the VTA simulator beside ORT."""
    from gpp_app.demo import run_demo

    result = run_demo(output, data_dir, track=progress)
    return Output(result.to_dict(), lambda: _print_demo(result))
