"""Run ONNX CNNs that were not exported by this project through the VTA backend, as a new user would.

    python tools/check_models.py MANIFEST.csv [--data DIR] [--limit N] [--calibration-images N] [-o OUT.csv]

``MANIFEST.csv`` has the columns ``name,path,mean,std`` (mean and std: three numbers separated by
spaces, the preprocessing the model's authors state; empty: the model's metadata or the default).
For each model: ``gpp-onnx run --backend vta``'s measurement (dense ONNX Runtime fp32 and the VTA
backend, int8 on the bit-exact simulator, on the test split), where every conv runs, and the
simulated speedup that group pruning at 50 % (one shot, layer scope) would give on the pynq cycle
model. A model that fails gets its one-line error in the ``error`` column; the others go on.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from gpp_app.data import default_data_dir
from gpp_app.evaluate import RunOptions, evaluate
from gpp_onnx import UserError, prune
from gpp_onnx.files import write_text
from gpp_onnx.model_io import first_line
from vta_backend import VTAConfig
from vta_backend.calibration import CalibrationOptions
from vta_backend.model import compile_model

COLUMNS = [
    "name",
    "images",
    "accuracy_ort",
    "accuracy_vta",
    "agreement",
    "convs_on_vta",
    "convs_on_cpu",
    "cpu_reasons",
    "vta_cycles",
    "group50_speedup",
    "error",
]


def _triple(text: str) -> tuple[float, ...] | None:
    """``"0.5 0.5 0.5"`` -> (0.5, 0.5, 0.5); empty -> None."""
    return tuple(float(v) for v in text.split()) if text.strip() else None


def check(row: dict, args: argparse.Namespace) -> dict:
    """One model's figures, as far as it got, and the first line of the error that stopped it."""
    result: dict[str, object] = {"name": row["name"]}
    try:
        calibration = CalibrationOptions(images=args.calibration_images)
        options = RunOptions(
            limit=args.limit, mean=_triple(row["mean"]), std=_triple(row["std"]), calibration=calibration
        )
        run = evaluate(Path(row["path"]), args.data, options)
        cpu = [p for p in run.vta.placement if p.device == "cpu"] if run.vta else []
        result.update(
            images=run.images,
            accuracy_ort=round(run.reference.accuracy, 4) if run.reference else None,
            accuracy_vta=round(run.accuracy, 4),
            agreement=round(run.agreement or 0.0, 4),
            convs_on_vta=len(run.vta.placement) - len(cpu) if run.vta else 0,
            convs_on_cpu=len(cpu),
            cpu_reasons="; ".join(sorted({p.reason.split(":")[0] for p in cpu if p.reason})),
            vta_cycles=run.vta.cycles if run.vta else None,
        )
        pruned, _ = prune(Path(row["path"]), 0.5, pattern="group")
        result["group50_speedup"] = round(compile_model(pruned, VTAConfig()).report().speedup, 3)
    except Exception as exc:  # a third-party model may break anything: record it, go on with the next
        result["error"] = f"{'' if isinstance(exc, UserError) else type(exc).__name__ + ': '}{first_line(exc)}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 folder (default: gpp-onnx's)")
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--calibration-images", type=int, default=CalibrationOptions.images)
    parser.add_argument("-o", "--output", type=Path, default=None, help="CSV of the results")
    args = parser.parse_args()
    try:
        args.data = args.data or default_data_dir()
    except UserError as exc:
        sys.exit(f"error: {exc}")
    with open(args.manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    results = []
    for row in rows:
        results.append(check(row, args))
        shown = results[-1]
        print(" ".join(f"{k}={shown[k]}" for k in COLUMNS if k in shown), file=sys.stderr, flush=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, COLUMNS)
    writer.writeheader()
    writer.writerows(results)
    if args.output:
        write_text(args.output, table.getvalue())  # atomically
    else:
        print(table.getvalue(), end="")


if __name__ == "__main__":
    main()
