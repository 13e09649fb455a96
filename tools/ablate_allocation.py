"""Which allocation keeps the most accuracy at equal simulated VTA speed, measured on held-out train images.

For each speedup target (pynq cycle model, group pattern by default, 5 % layer floor, the first conv
dense) each allocation prunes the dense model to that speed: the latency target's allocations
(:data:`vta_backend.latency.ALLOCATIONS`; ``sensitivity`` measured once on the first train images),
and ``uniform``, the sparsity target's default (every layer at one sparsity, ``--scope layer``),
at the sparsity whose simulated speed is nearest the target (bisection on the cycle model). Every
model is recalibrated, fine-tuned (the ``sweep`` recipe: batch-norm restored, one-cycle lr 0.05,
distillation from the dense model) on the first ``--train`` train images, and scored with ONNX
Runtime fp32 (and the VTA backend with ``--vta``) on train images 45,000-49,999 - never the test
split. Rows go to a CSV as they finish; a rerun skips the rows already there. The plot beside the
CSV (same name, .png) shows each allocation's held-out accuracy against the simulated speedup.

    python tools/ablate_allocation.py resnet20-jpeg.onnx --speedups 1.3,1.5,1.7 --seeds 0,1 \
        --allocations uniform,global,sensitivity --epochs 1 --train 10000 -o docs/results/allocation-heldout.csv
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from ablate_recovery import DATA_DIR, heldout_accuracy, write_rows

from gpp_app import data
from gpp_app.finetune import FinetuneOptions, finetune
from gpp_app.plots import save_figure
from gpp_app.recalibrate import recalibrate_from_data
from gpp_app.sensitivity import LatencyAllocation
from gpp_onnx import load_model, prune, save_model
from gpp_onnx.pruner import PruneOptions
from vta_backend import VTAConfig
from vta_backend.latency import MEASURED_ALLOCATION, LatencyTarget, cpu_exclusions, prune_for_latency
from vta_backend.model import compile_model

COLUMNS = [
    "allocation",
    "speedup_target",
    "sparsity",
    "speedup",
    "epochs",
    "train_images",
    "seed",
    "heldout_images",
    "heldout_accuracy",
    "heldout_accuracy_vta",
]
HELDOUT_START = 45000  # scored on train images 45,000-49,999 (never trained on: --train is at most this)
BISECTION_STEPS = 14


def uniform_at_speed(dense, options: PruneOptions, speedup: float, config: VTAConfig):
    """The layer-scope pruning whose simulated speedup is nearest ``speedup``: the pruned model, its report."""
    uniform = PruneOptions(0.0, options.pattern, "layer", exclude=options.exclude, layer_floor=options.layer_floor)
    low, high, best = 0.0, 0.99, None
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        pruned, report = prune(dense, **replace(uniform, sparsity=middle).arguments())
        reached = compile_model(pruned, config).report().speedup
        if best is None or abs(reached - speedup) < abs(best[2] - speedup):
            best = (pruned, report, reached)
        low, high = (middle, high) if reached < speedup else (low, middle)
    assert best is not None
    return best[0], best[1]


def prune_with(allocation: str, dense, speedup: float, options: PruneOptions, measured) -> tuple:
    """The pruned model of one allocation at ``speedup``, its weight sparsity and simulated speedup."""
    config = VTAConfig()
    if allocation == "uniform":
        pruned, report = uniform_at_speed(dense, options, speedup, config)
    else:
        target = LatencyTarget(speedup=speedup)
        sensitivity = measured if allocation == MEASURED_ALLOCATION else None
        pruned, report, _ = prune_for_latency(
            dense, target, config, options, allocation=allocation, sensitivity=sensitivity
        )
    return pruned, report.sparsity, compile_model(pruned, config).report().speedup


def run(args: argparse.Namespace, allocation: str, speedup: float, seed: int, measured) -> dict:
    """Prune, recalibrate, fine-tune, score on held-out train images."""
    dense = load_model(args.model)
    options = PruneOptions(0.0, args.pattern, "global", exclude=tuple(args.exclude), layer_floor=0.05)
    pruned, sparsity, reached = prune_with(allocation, dense, speedup, options, measured)
    pruned = recalibrate_from_data(pruned, dense.model, args.data, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        source, tuned = Path(tmp) / "pruned.onnx", Path(tmp) / "tuned.onnx"
        save_model(pruned, source, external_data=False)
        tune = FinetuneOptions(epochs=args.epochs, teacher=str(args.model), limit=args.train, seed=seed)
        finetune(source, args.data, tuned, tune)
        accuracy, accuracy_vta, count = heldout_accuracy(tuned, data.locate(args.data), HELDOUT_START, args.vta)
    return {
        "allocation": allocation,
        "speedup_target": speedup,
        "sparsity": round(sparsity, 4),
        "speedup": round(reached, 4),
        "epochs": args.epochs,
        "train_images": args.train,
        "seed": seed,
        "heldout_images": count,
        "heldout_accuracy": round(accuracy, 4),
        "heldout_accuracy_vta": "" if accuracy_vta is None else round(accuracy_vta, 4),
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Held-out accuracy against simulated speedup: each seed a point, each allocation's mean a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for allocation in dict.fromkeys(r["allocation"] for r in rows):
        mine = [r for r in rows if r["allocation"] == allocation]
        speeds = sorted({float(r["speedup_target"]) for r in mine})
        means = [
            np.mean([float(r["heldout_accuracy"]) for r in mine if float(r["speedup_target"]) == s]) for s in speeds
        ]
        line = ax.plot(speeds, means, marker="o", label=allocation)[0]
        ax.scatter(
            [float(r["speedup"]) for r in mine],
            [float(r["heldout_accuracy"]) for r in mine],
            s=12,
            color=line.get_color(),
            alpha=0.5,
        )
    ax.set_xlabel("simulated VTA speedup (pynq)")
    ax.set_ylabel("top-1, held-out train images (ORT fp32)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the dense ONNX model")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--speedups", default="1.3,1.5,1.7", help="simulated speedup targets (pynq)")
    parser.add_argument("--allocations", default="uniform,global,sensitivity")
    parser.add_argument("--pattern", default="group")
    parser.add_argument("--exclude", action="append", default=None, help="regex kept dense [the CPU's convs]")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train", type=int, default=10000, help=f"train on the first N (<= {HELDOUT_START}) images")
    parser.add_argument("--vta", action="store_true", help="also score with the VTA backend (slow)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if not 0 < args.train <= HELDOUT_START:
        parser.error(f"--train must be 1..{HELDOUT_START}: the images from {HELDOUT_START} on are the held-out ones")
    args.exclude = (
        args.exclude if args.exclude is not None else list(cpu_exclusions(load_model(args.model).model, VTAConfig()))
    )
    rows = list(csv.DictReader(args.output.open())) if args.output.exists() else []
    done = {(r["allocation"], float(r["speedup_target"]), int(r["seed"]), r["epochs"], r["train_images"]) for r in rows}
    measured = None
    for speedup in map(float, args.speedups.split(",")):
        for seed in map(int, args.seeds.split(",")):
            for allocation in args.allocations.split(","):
                if (allocation, speedup, seed, str(args.epochs), str(args.train)) in done:
                    continue
                if allocation == MEASURED_ALLOCATION and measured is None:
                    options = PruneOptions(0.0, args.pattern, exclude=tuple(args.exclude), layer_floor=0.05)
                    measured = LatencyAllocation(allocation, args.data).sensitivity(
                        load_model(args.model), options, VTAConfig()
                    )
                began = time.perf_counter()
                rows.append(run(args, allocation, speedup, seed, measured))
                print(rows[-1], f"{time.perf_counter() - began:.0f} s", flush=True)
                write_rows(args.output, rows, COLUMNS)
    title = f"{args.model.name}: allocations at equal simulated speed, {args.epochs} epoch(s) on {args.train} images"
    plot(rows, args.output.with_suffix(".png"), title)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
