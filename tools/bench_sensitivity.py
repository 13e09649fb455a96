"""The sensitivity analysis behind ``--allocation sensitivity``: how long it takes, on CIFAR ResNets.

    python tools/bench_sensitivity.py [--model resnet20.onnx] [--depths 20,56] [--images 1000] [--data DIR] [--json]

For each model (``--model`` files, and synthetic CIFAR ResNets of ``--depths`` from
``tools/resnet_cifar.py``, random weights), :func:`gpp_app.sensitivity.measure_sensitivity` with the
latency target's options (group pattern, 5 % layer floor, the CPU's convs dense) on the first
``--images`` train images: its wall time, the number of (layer, count) evaluations, and the ratio
to one ONNX Runtime pass of the dense model over the same images measured in the same run (the
analysis costs about two such passes per evaluation: statistics, then the loss).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxruntime as ort
from ablate_recovery import DATA_DIR
from resnet_cifar import resnet_cifar

from gpp_app import data
from gpp_app.sensitivity import LatencyAllocation
from gpp_onnx.model_io import LoadedModel, load_model
from gpp_onnx.normalization import normalization_for
from gpp_onnx.pruner import PruneOptions
from vta_backend import VTAConfig


def one_pass_seconds(model: LoadedModel, data_dir: Path, images: int) -> float:
    """Wall time of one ONNX Runtime pass of ``model`` over the first ``images`` train images."""
    model_input = data.model_input(model.model)
    mean, std = normalization_for(model.model)
    batches = [
        data.model_feed(*model_input, x, mean, std)
        for x, _ in data.iter_uint8(data.locate(data_dir), "train", 500, images)
    ]
    began = time.perf_counter()
    session = ort.InferenceSession(model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in batches:
        session.run(None, feed)
    return time.perf_counter() - began


def measure(name: str, model: LoadedModel, data_dir: Path, images: int) -> dict:
    """One row: the analysis's time against one inference pass."""
    reference = one_pass_seconds(model, data_dir, images)
    allocation = LatencyAllocation("sensitivity", data_dir, images)
    began = time.perf_counter()
    measured = allocation.sensitivity(model, PruneOptions(pattern="group", layer_floor=0.05), VTAConfig())
    seconds = time.perf_counter() - began
    evaluations = sum(len(layer.counts) - 1 for layer in (measured or {}).values())
    return {
        "model": name,
        "layers": len(measured or {}),
        "evaluations": evaluations,
        "images": images,
        "seconds": round(seconds, 1),
        "one_pass_seconds": round(reference, 3),
        "ratio_to_one_pass": round(seconds / reference, 1),
        "passes_per_evaluation": round(seconds / reference / max(evaluations, 1), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], type=Path, help="an ONNX model (repeatable)")
    parser.add_argument("--depths", default="20,56", help="synthetic CIFAR ResNets ('' for none)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    models = [(path.name, load_model(path)) for path in args.model]
    depths = [int(d) for d in args.depths.split(",") if d]
    models += [(f"resnet{d} (synthetic)", load_model(resnet_cifar(d, 0))) for d in depths]
    rows = [measure(name, model, args.data, args.images) for name, model in models]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(
            f"{row['model']}: {row['layers']} layers, {row['evaluations']} evaluations on {row['images']} images "
            f"in {row['seconds']} s = {row['ratio_to_one_pass']}x one inference pass "
            f"({row['passes_per_evaluation']} passes per evaluation)"
        )


if __name__ == "__main__":
    main()
