"""An export pipeline: PyTorch CNN -> ONNX -> pruned for VTA -> recalibrated -> int8 QDQ -> gated on VTA accuracy.

    pip install -e '.[train]'          # torch and onnx2torch
    python examples/export_pipeline.py [-o OUT] [--data DIR] [--sparsity 0.5] [--max-drop 5]

Steps, each with the tool a pipeline already uses:

1. ``torch.onnx.export`` of the PyTorch model (``torch_model()`` stands in for yours: by default the
   demo CNN shipped with gpp-onnx, converted to PyTorch with onnx2torch), normalisation in metadata;
2. ``gpp_onnx.prune`` in memory: group pattern, global ranking with a 5 % layer floor, the convs that
   stay on VTA's host CPU left dense;
3. recalibration of the pruned model against the dense one on train images (no training);
4. ``onnxruntime.quantization.quantize_static``: QDQ, int8 weights per channel, calibrated on train
   images; the sparse-tile annotation stays valid (checked);
5. the quantized model with its convs on the VTA simulator (``gpp_app.evaluate``), against the dense
   fp32 model on ONNX Runtime: accuracy and simulated speedup.

Prints one JSON document; writes ``OUT/dense.onnx`` and ``OUT/pruned-qdq.onnx`` once every step has
passed (each file atomically). Exit status 1 when the VTA accuracy is more than ``--max-drop`` points
below the dense model's, 2 on bad input (one line), 130 when interrupted (temporary files removed). The
data default to the embedded sample of CIFAR-10 (1,000 test, 500 train images); the pruning recipe is
the demo's (``gpp_app.demo.PRUNING``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import gpp_onnx
from gpp_app import data
from gpp_app.demo import IMAGES, MODEL_ASSET, PRUNING, demo_asset, demo_data
from gpp_app.evaluate import RunOptions, evaluate
from gpp_app.recalibrate import recalibrate_from_data
from gpp_app.torch_model import export_image_classifier, import_training
from gpp_onnx.errors import UserError
from gpp_onnx.files import interruption_handler, temporary_folder
from gpp_onnx.model_io import check_output_path
from gpp_onnx.normalization import normalization_for
from vta_backend.calibration import CalibrationOptions
from vta_backend.config import VTAConfig
from vta_backend.latency import cpu_exclusions

Normalization = tuple[tuple[float, ...], tuple[float, ...]]
TRAIN_IMAGES = IMAGES  # the demo's: for recalibration, QDQ calibration and VTA's activation scales


def torch_model() -> tuple[torch.nn.Module, Normalization]:
    """The PyTorch model to deploy and the input normalisation it was trained with (replace with yours):
    the demo CNN, converted with onnx2torch."""
    _, onnx2torch = import_training()  # onnx2torch, importable beside the CPU build of torch

    with demo_asset(MODEL_ASSET) as path:
        model = onnx.load(path)
    return onnx2torch.convert(model).eval(), normalization_for(model)


class TrainImages(CalibrationDataReader):
    """ONNX Runtime's calibration reader over normalised train images (never the test split)."""

    def __init__(self, model: onnx.ModelProto, data_path: Path) -> None:
        model_input = data.model_input(model)
        feeds = data.feeds(data.locate(data_path), model_input, *normalization_for(model), "train", 100, TRAIN_IMAGES)
        self._feeds: Iterator = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_qdq(model: onnx.ModelProto, data_path: Path, output: Path) -> None:
    """Static int8 QDQ quantization with onnxruntime.quantization (weights per channel) into ``output``."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice, on the root logger, to pre-process the model first
    try:
        gpp_onnx.save_model(model, output.with_name("pruned.onnx"), external_data=False)
        quantize_static(
            output.with_name("pruned.onnx"),
            output,
            TrainImages(model, data_path),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)


def pipeline(out: Path, data_path: Path, sparsity: float) -> dict:
    """Run the five steps in a temporary folder; write the two models into ``out`` only when all passed."""
    check_output_path(out / "dense.onnx" if out.is_dir() else out, [])
    config = VTAConfig()
    dense = export_image_classifier(*torch_model())
    options = replace(PRUNING, sparsity=sparsity, exclude=cpu_exclusions(dense, config), tile=config)
    pruned, report = gpp_onnx.prune(dense, **options.arguments())
    pruned = recalibrate_from_data(pruned, dense, data_path, TRAIN_IMAGES)
    with temporary_folder("gpp-export-") as work:
        gpp_onnx.save_model(dense, work / "dense.onnx", external_data=False)
        quantize_qdq(pruned, data_path, work / "pruned-qdq.onnx")
        quantized = onnx.load(work / "pruned-qdq.onnx")
        gpp_onnx.validate_annotation(quantized, gpp_onnx.read_annotation(quantized))  # pruned tiles still zero
        options = RunOptions(calibration=CalibrationOptions(images=TRAIN_IMAGES), baseline=work / "dense.onnx")
        run = evaluate(quantized, data_path, options)
        out.mkdir(exist_ok=True)
        for name in ("dense.onnx", "pruned-qdq.onnx"):
            gpp_onnx.save_model(onnx.load(work / name), out / name, external_data=False)
    return {
        "sparsity": report.sparsity,
        "test_images": run.images,
        "dense_ort_fp32": run.baseline.accuracy,
        "pruned_qdq_ort": run.reference.accuracy,
        "pruned_qdq_vta_int8": run.accuracy,
        "drop_points": (run.baseline.accuracy - run.accuracy) * 100,
        "vta_cycles_simulated": run.vta.cycles,
        "vta_speedup_simulated": run.vta.speedup,
        "outputs": [str(out / "dense.onnx"), str(out / "pruned-qdq.onnx")],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("export-pipeline"))
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 folder (default: the embedded sample)")
    parser.add_argument("--sparsity", type=float, default=PRUNING.sparsity)
    parser.add_argument("--max-drop", type=float, default=5.0, help="points below dense fp32 that still pass")
    args = parser.parse_args()
    for stop in (signal.SIGINT, signal.SIGTERM):  # unwind like Ctrl-C: temporary folders are removed
        signal.signal(stop, interruption_handler)
    try:
        with demo_data(args.data) as data_path:
            result = pipeline(args.output, data_path, args.sparsity)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    result["passed"] = result["drop_points"] <= args.max_drop
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
