"""Which allocation keeps the most accuracy at one simulated VTA speedup, measured on held-out train images.

Configurations: the sparsity-target default of ``sweep`` (global scope, 5 % layer floor) at a
given sparsity, and the latency-target allocation (:mod:`vta_backend.latency`) at the speedup
that sparsity reaches on the pynq cycle model, with each of its allocations. Every one is
recalibrated, fine-tuned (the ``sweep`` recipe: batch-norm restored, one-cycle lr 0.05,
distillation from the dense model) on the first ``--train`` train images, and scored with
ONNX Runtime fp32 and the VTA backend on train images 45,000-49,999 - never the test split.
Rows go to a CSV as they finish; a rerun skips the rows already there.

    python tools/ablate_allocation.py resnet20-jpeg.onnx --sparsity 0.7 --epochs 1 --train 10000 \
        -o docs/results/ablation-allocation.csv
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from ablate_recovery import DATA_DIR, heldout_accuracy, write_rows

from gpp_app import data
from gpp_app.finetune import FinetuneOptions, finetune
from gpp_app.recalibrate import recalibrate_from_data
from gpp_onnx import load_model, prune, save_model
from gpp_onnx.pruner import PruneOptions
from vta_backend import VTAConfig
from vta_backend.latency import ALLOCATIONS, LatencyTarget, prune_for_latency
from vta_backend.model import compile_model

COLUMNS = [
    "allocation",
    "sparsity",
    "speedup",
    "epochs",
    "train_images",
    "heldout_images",
    "heldout_accuracy",
    "heldout_accuracy_vta",
]
EXCLUDE = ("^/conv1/",)
HELDOUT_START = 45000  # scored on train images 45,000-49,999 (never trained on: --train is at most this)


def prune_with(allocation: str, dense, sparsity: float) -> tuple:
    """The pruned model of one configuration, its weight sparsity and simulated speedup (compile's figure)."""
    options = PruneOptions(sparsity, "group", "global", exclude=EXCLUDE, layer_floor=0.05)
    pruned, report = prune(dense, **options.arguments())
    if allocation != "sparsity-global":
        speedup = compile_model(pruned, VTAConfig()).report().speedup
        target = LatencyTarget(speedup=speedup)
        measure = allocation.split(":")[1]
        pruned, report, _ = prune_for_latency(dense, target, VTAConfig(), options, allocation=measure)
    return pruned, report.sparsity, compile_model(pruned, VTAConfig()).report().speedup


def run(args: argparse.Namespace, allocation: str) -> dict:
    """Prune, recalibrate, fine-tune, score on held-out train images."""
    dense = load_model(args.model)
    pruned, sparsity, speedup = prune_with(allocation, dense, args.sparsity)
    pruned = recalibrate_from_data(pruned, dense.model, args.data, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        source, tuned = Path(tmp) / "pruned.onnx", Path(tmp) / "tuned.onnx"
        save_model(pruned, source, external_data=False)
        options = FinetuneOptions(epochs=args.epochs, teacher=str(args.model), limit=args.train, seed=args.seed)
        finetune(source, args.data, tuned, options)
        accuracy, accuracy_vta, count = heldout_accuracy(tuned, data.locate(args.data), HELDOUT_START)
    return {
        "allocation": allocation,
        "sparsity": round(sparsity, 4),
        "speedup": round(speedup, 4),
        "epochs": args.epochs,
        "train_images": args.train,
        "heldout_images": count,
        "heldout_accuracy": round(accuracy, 4),
        "heldout_accuracy_vta": round(accuracy_vta, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the dense ONNX model")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--sparsity", type=float, default=0.7, help="of the sparsity-target point; sets the speedup")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train", type=int, default=45000, help=f"train on the first N (<= {HELDOUT_START}) images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if not 0 < args.train <= HELDOUT_START:
        parser.error(f"--train must be 1..{HELDOUT_START}: the images from {HELDOUT_START} on are the held-out ones")
    allocations = ["sparsity-global"] + [f"latency:{a}" for a in ALLOCATIONS]
    rows = list(csv.DictReader(args.output.open())) if args.output.exists() else []
    done = {(r["allocation"], r["epochs"], r["train_images"]) for r in rows}
    for allocation in allocations:
        if (allocation, str(args.epochs), str(args.train)) in done:
            continue
        began = time.perf_counter()
        rows.append(run(args, allocation))
        print(rows[-1], f"{time.perf_counter() - began:.0f} s", flush=True)
        write_rows(args.output, rows, COLUMNS)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
