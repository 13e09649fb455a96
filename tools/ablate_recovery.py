"""Ablation of the recovery recipe, measured on held-out train images (never the test split).

Every configuration prunes the dense model (global scope, first conv kept dense),
recalibrates it, fine-tunes it on the first ``--train`` images of the train split and
reports ONNX Runtime fp32 accuracy on the remaining train images. Rows go to a CSV as they
finish; a rerun skips the rows already there (resumable).

    python tools/ablate_recovery.py resnet20-jpeg.onnx --sparsities 0.5,0.9 --epochs 2 \
        -o docs/results/ablation.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gpp_app import data
from gpp_app.evaluate import RunOptions, vta_session
from gpp_app.finetune import FinetuneOptions, finetune, split_in_memory
from gpp_app.recalibrate import recalibrate_from_data
from gpp_onnx import load_model, prune, save_model
from gpp_onnx.annotation import read_kept_tiles
from gpp_onnx.files import write_text
from gpp_onnx.normalization import normalization_for
from gpp_onnx.pruner import PruneOptions

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GPP_DATA_DIR", REPO.parent / "shared" / "data")) / "cifar10-jpeg"
# name -> (restore batch-norm, peak lr, distil from the dense model, layer floor, gradual pruning, QAT epochs)
CONFIGS = {
    "folded": (False, 0.01, False, 0.0, False, 0),  # the recipe before: BN folded, low lr
    "bn": (True, 0.01, False, 0.0, False, 0),
    "bn-lr05": (True, 0.05, False, 0.0, False, 0),
    "bn-lr05-kd": (True, 0.05, True, 0.0, False, 0),
    "bn-lr05-kd-floor": (True, 0.05, True, 0.05, False, 0),
    "bn-lr05-kd-gradual": (True, 0.05, True, 0.0, True, 0),
    "bn-lr05-kd-qat": (True, 0.05, True, 0.0, False, 1),
    "bn-lr05-kd-floor-qat": (True, 0.05, True, 0.05, False, 1),
    "bn-lr05-kd-floor-gradual": (True, 0.05, True, 0.05, True, 0),
    "bn-lr05-kd-floor10": (True, 0.05, True, 0.1, False, 0),
}
COLUMNS = [
    "pattern",
    "sparsity",
    "config",
    "epochs",
    "train_images",
    "heldout_images",
    "heldout_accuracy",
    "heldout_accuracy_vta",
    "seconds",
]


def heldout_accuracy(
    model_path: Path, dataset: data.Dataset, start: int, with_vta: bool = True
) -> tuple[float, float | None, int]:
    """Top-1 on train images ``start`` and later: ONNX Runtime fp32, and (``with_vta``) the VTA backend
    (int8, calibrated on the first train images as ``gpp-onnx run`` does; else None)."""
    model = load_model(model_path).model
    model_input = data.model_input(model)
    images, labels = split_in_memory(str(dataset.root), dataset.layout, "train", None)
    mean, std = normalization_for(model)
    sessions = [ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])]
    if with_vta:
        sessions.append(vta_session(model, read_kept_tiles(model), dataset, (mean, std), RunOptions())[0])
    correct = np.zeros(len(sessions), int)
    for i in range(start, len(labels), 500):
        feeds = data.model_feed(*model_input, images[i : i + 500], mean, std)
        for k, session in enumerate(sessions):
            correct[k] += int((session.run(None, feeds)[0].argmax(1) == labels[i : i + 500]).sum())
    for session in sessions[1:]:
        session.close()
    count = len(labels) - start
    return correct[0] / count, (correct[1] / count if with_vta else None), count


def run(args: argparse.Namespace, pattern: str, sparsity: float, config: str) -> dict:
    restore_bn, lr, distil, floor, gradual, qat_epochs = CONFIGS[config]
    dense = load_model(args.model)
    began = time.perf_counter()
    pruning = PruneOptions(sparsity, pattern, "global", exclude=("^/conv1/",), layer_floor=floor)
    pruned, _ = prune(dense, **pruning.arguments())
    pruned = recalibrate_from_data(pruned, dense.model, args.data, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        source, tuned = Path(tmp) / "pruned.onnx", Path(tmp) / "tuned.onnx"
        save_model(dense.model if gradual else pruned, source, external_data=False)
        options = FinetuneOptions(
            epochs=args.epochs,
            lr=lr,
            restore_bn=restore_bn,
            teacher=str(args.model) if distil else None,
            limit=args.train,
            seed=args.seed,
            gradual=pruning if gradual else None,
            qat_epochs=qat_epochs,
        )
        finetune(source, args.data, tuned, options)
        accuracy, accuracy_vta, count = heldout_accuracy(tuned, data.locate(args.data), args.train)
    return {
        "pattern": pattern,
        "sparsity": sparsity,
        "config": config,
        "epochs": args.epochs,
        "train_images": args.train,
        "heldout_images": count,
        "heldout_accuracy": round(accuracy, 4),
        "heldout_accuracy_vta": round(accuracy_vta, 4),
        "seconds": round(time.perf_counter() - began),
    }


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    """The CSV of ``rows``, written atomically (rewritten after every row: a rerun resumes)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the dense ONNX model")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--patterns", default="group")
    parser.add_argument("--sparsities", default="0.5,0.9")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="names from CONFIGS, comma-separated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=45000, help="train on the first N train images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "results" / "ablation.csv")
    args = parser.parse_args()
    rows = list(csv.DictReader(args.output.open())) if args.output.exists() else []
    done = {(r["pattern"], float(r["sparsity"]), r["config"], int(r["epochs"])) for r in rows}
    for pattern in args.patterns.split(","):
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            for config in args.configs.split(","):
                if (pattern, sparsity, config, args.epochs) in done:
                    continue
                rows.append(run(args, pattern, sparsity, config))
                print(rows[-1], flush=True)
                write_rows(args.output, rows, COLUMNS)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
