"""Top-1 accuracy of a model on CIFAR-10 with ONNX Runtime or with its convs on the VTA simulator.

With the VTA backend every batch also runs through ONNX Runtime fp32 on the same model
file (the reference): accuracy, top-1 agreement and logit differences come from the same
images. Host speed is measured per backend over the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gpp_onnx import data
from gpp_onnx.annotation import read_annotation, validate_annotation
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import LoadedModel, load_model, single_input
from gpp_onnx.normalization import normalization_for

BACKENDS = ("ort", "vta")
Track = Callable[[Iterable, str, int], Iterable]


@dataclass
class RunOptions:
    backend: str = "vta"
    split: str = "test"
    limit: int | None = None
    batch: int = 256
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    calibration_method: str = "percentile"
    calibration_images: int = 5000
    per_channel: bool = True
    baseline: Path | None = None
    vta_config: object | None = None  # a vta_backend.VTAConfig


@dataclass
class _Timer:
    seconds: float = 0.0
    images: int = 0

    def run(self, session, feeds: dict[str, np.ndarray]) -> np.ndarray:
        start = time.perf_counter()
        out = session.run(None, feeds)[0]
        self.seconds += time.perf_counter() - start
        self.images += len(next(iter(feeds.values())))
        return out

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


@dataclass
class _Tally:
    correct: int = 0
    timer: _Timer = field(default_factory=_Timer)

    def add(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        top1 = logits.argmax(axis=1)
        self.correct += int((top1 == labels).sum())
        return top1


def image_input(model: onnx.ModelProto) -> tuple[str, list[int | str]]:
    """The model's image input: its name and shape; anything but one float NCHW input is an error."""
    inputs = [single_input(model, "gpp-onnx run expects one image input [N, 3, H, W]")]
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4:
        raise UserError(
            f"input '{inputs[0].name}' is not an image tensor (float [N, 3, H, W]); got "
            f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} {dims}"
        )
    return inputs[0].name, dims


def _check_fits(dims: list, images: np.ndarray, name: str) -> None:
    for axis, size in zip((1, 2, 3), images.shape[1:]):
        if isinstance(dims[axis], int) and dims[axis] not in (0, size):
            raise UserError(
                f"input '{name}' expects shape {dims} but the data are {list(images.shape[1:])} images; "
                "pass a model made for 3x32x32 CIFAR-10 images"
            )


def _ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def evaluate(model_path: Path, data_path: Path, options: RunOptions, track: Track = lambda i, d, t: i) -> dict:
    """Run the model over a split; returns the document ``gpp-onnx run --json`` prints."""
    if options.backend not in BACKENDS:
        raise UserError(f"unknown backend {options.backend!r}; use one of {', '.join(BACKENDS)}")
    if options.batch < 1:
        raise UserError(f"batch size {options.batch} is below 1; pass --batch 1 or more")
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit {options.limit} is below 1")
    loaded = load_model(model_path)
    input_name, dims = image_input(loaded.model)
    annotation = read_annotation(loaded.model)
    if annotation is not None:
        validate_annotation(loaded.model, annotation)
    dataset = data.locate(data_path)
    mean, std = normalization_for(loaded.model, options.mean, options.std)

    reference = _Tally()
    reference_session = _ort_session(loaded.model)
    main, vta_session, calibration = reference, None, None
    if options.backend == "vta":
        vta_session, calibration = _vta_session(loaded, input_name, dataset, mean, std, options, track)
        main = _Tally()
    baseline = baseline_session = None
    if options.baseline is not None:
        baseline_model = load_model(options.baseline).model
        image_input(baseline_model)
        baseline, baseline_session = _Tally(), _ort_session(baseline_model)

    total = data.count(dataset, options.split, options.limit)
    agree = images = 0
    max_diff, sum_diff = 0.0, 0.0
    batches = data.iter_uint8(dataset, options.split, options.batch, options.limit)
    for raw, labels in track(batches, f"{options.backend} on {options.split}", -(-total // options.batch)):
        _check_fits(dims, raw, input_name)
        feeds = {input_name: data.normalize(raw, mean, std)}
        ref_logits = reference.timer.run(reference_session, feeds)
        ref_top1 = reference.add(ref_logits, labels)
        if vta_session is not None:
            logits = main.timer.run(vta_session, feeds)
            agree += int((main.add(logits, labels) == ref_top1).sum())
            diff = np.abs(logits - ref_logits)
            max_diff, sum_diff = max(max_diff, float(diff.max())), sum_diff + float(diff.mean()) * len(labels)
        if baseline is not None:
            baseline.add(baseline.timer.run(baseline_session, feeds), labels)
        images += len(labels)
    if images == 0:
        raise UserError(f"no {options.split} images in {data_path}")

    result: dict[str, object] = {
        "backend": options.backend,
        "model": str(model_path),
        "data": dataset.describe(),
        "split": options.split,
        "images": images,
        "accuracy": main.correct / images,
        "images_per_second": main.timer.images_per_second,
        "mean": list(mean),
        "std": list(std),
    }
    if vta_session is not None:
        report = vta_session.report()
        result.update(
            reference={
                "backend": "ort fp32",
                "accuracy": reference.correct / images,
                "images_per_second": reference.timer.images_per_second,
            },
            agreement=agree / images,
            logit_difference={"max": max_diff, "mean": sum_diff / images},
            calibration=calibration,
            vta={
                "simulated": True,
                "board": report["board"],
                "clock_mhz": report["clock_mhz"],
                "cycles": report["cycles"],
                "simulated_ms_per_image": report["simulated_ms"],
                "gemm_uops": report["gemm_uops"],
                "gemm_uops_skipped": report["gemm_uops_skipped"],
                "speedup": report["speedup"],
                "amdahl_bound": report["amdahl_bound"],
                "bytes": report["bytes"],
                "layers": report["layers"],
                "placement": report["placement"],
            },
        )
        vta_session.close()
    if baseline is not None:
        result["baseline"] = {
            "model": str(options.baseline),
            "accuracy": baseline.correct / images,
            "images_per_second": baseline.timer.images_per_second,
        }
    return result


def _vta_session(
    loaded: LoadedModel, input_name: str, dataset: data.Dataset, mean, std, options: RunOptions, track: Track
):
    from vta_backend import VTAConfig
    from vta_backend.calibration import calibrate
    from vta_backend.session import VtaSession

    if loaded.path is None:
        raise UserError("the VTA backend needs the model as a file (calibration is cached next to it)")
    shifts, cached = calibrate(
        loaded.path, input_name, dataset, mean, std, options.calibration_method, options.calibration_images, track=track
    )
    session = VtaSession(loaded.model, shifts, options.vta_config or VTAConfig(), per_channel=options.per_channel)
    calibration = {
        "method": options.calibration_method,
        "images": options.calibration_images,
        "split": "train",
        "cached": cached,
    }
    return session, calibration
