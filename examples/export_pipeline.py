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

Prints one JSON document; writes ``OUT/dense.onnx`` and ``OUT/pruned-qdq.onnx``. Exit status 1 when
the VTA accuracy is more than ``--max-drop`` points below the dense model's, 2 on bad input. The data
default to the embedded sample of CIFAR-10 (1,000 test, 500 train images).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import gpp_onnx
from gpp_app import data
from gpp_app.demo import MODEL_ASSET, demo_asset, demo_data
from gpp_app.evaluate import RunOptions, evaluate
from gpp_app.recalibrate import recalibrate_from_data
from gpp_app.torch_model import import_training
from gpp_onnx.errors import UserError
from gpp_onnx.files import temporary_folder
from gpp_onnx.model_io import image_input
from gpp_onnx.normalization import normalization_for, write_normalization
from vta_backend.calibration import CalibrationOptions
from vta_backend.config import VTAConfig
from vta_backend.latency import cpu_exclusions

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the normalisation torch_model() expects
TRAIN_IMAGES = 500  # for recalibration, QDQ calibration and VTA's activation scales


def torch_model() -> torch.nn.Module:
    """The PyTorch model to deploy (replace with yours): the demo CNN, converted with onnx2torch."""
    _, onnx2torch = import_training()  # onnx2torch, importable beside the CPU build of torch

    with demo_asset(MODEL_ASSET) as path:
        return onnx2torch.convert(onnx.load(path)).eval()


def export(model: torch.nn.Module) -> onnx.ModelProto:
    """``torch.onnx.export`` into memory: dynamic batch, opset 17, normalisation recorded in the metadata."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 32, 32),),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    exported = onnx.load_from_string(buffer.getvalue())
    write_normalization(exported, MEAN, STD)
    return exported


class TrainImages(CalibrationDataReader):
    """ONNX Runtime's calibration reader over normalised train images (never the test split)."""

    def __init__(self, model: onnx.ModelProto, data_path: Path) -> None:
        name, _ = image_input(model)
        feeds = data.feeds(data.locate(data_path), name, *normalization_for(model), "train", 100, TRAIN_IMAGES)
        self._feeds: Iterator = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_qdq(model: onnx.ModelProto, data_path: Path, output: Path) -> onnx.ModelProto:
    """Static int8 QDQ quantization with onnxruntime.quantization (weights per channel)."""
    with temporary_folder("gpp-export-") as folder:
        gpp_onnx.save_model(model, folder / "pruned.onnx", external_data=False)
        logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process the model first
        quantize_static(
            folder / "pruned.onnx",
            folder / "qdq.onnx",
            TrainImages(model, data_path),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
        quantized = onnx.load(folder / "qdq.onnx")
    gpp_onnx.save_model(quantized, output, external_data=False)
    return quantized


def pipeline(out: Path, data_path: Path, sparsity: float) -> dict:
    """Run the five steps; returns the figures."""
    config = VTAConfig()
    dense = export(torch_model())
    pruned, report = gpp_onnx.prune(
        dense, sparsity, pattern="group", scope="global", layer_floor=0.05, exclude=cpu_exclusions(dense, config)
    )
    pruned = recalibrate_from_data(pruned, dense, data_path, TRAIN_IMAGES)
    out.mkdir(parents=True, exist_ok=True)
    gpp_onnx.save_model(dense, out / "dense.onnx", external_data=False)
    quantized = quantize_qdq(pruned, data_path, out / "pruned-qdq.onnx")
    gpp_onnx.validate_annotation(quantized, gpp_onnx.read_annotation(quantized))  # pruned tiles still all zero
    options = RunOptions(calibration=CalibrationOptions(images=TRAIN_IMAGES), baseline=out / "dense.onnx")
    run = evaluate(out / "pruned-qdq.onnx", data_path, options)
    return {
        "sparsity": report.sparsity,
        "test_images": run.images,
        "dense_ort_fp32": run.baseline.accuracy,
        "pruned_qdq_ort": run.reference.accuracy,
        "pruned_qdq_vta_int8": run.accuracy,
        "drop_points": (run.baseline.accuracy - run.accuracy) * 100,
        "vta_cycles_simulated": run.vta.cycles,
        "vta_speedup_simulated": run.vta.speedup,
        "annotation_valid_after_quantization": True,
        "outputs": [str(out / "dense.onnx"), str(out / "pruned-qdq.onnx")],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("export-pipeline"))
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 folder (default: the embedded sample)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--max-drop", type=float, default=5.0, help="points below dense fp32 that still pass")
    args = parser.parse_args()
    try:
        with demo_data(args.data) as data_path:
            result = pipeline(args.output, data_path, args.sparsity)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["passed"] = result["drop_points"] <= args.max_drop
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
