"""Activation scales for VTA: onnxruntime.quantization's calibrators, rounded to powers of two, cached.

The calibrator runs the float model over calibration images of the train split and
records each activation's range (MinMax), a percentile of its histogram (Percentile) or
the range that minimises the KL divergence (Entropy). VTA uses power-of-two scales, so a
range ``r`` becomes the shift ``floor(log2(127 / r))``. The shifts are cached next to the
model (``MODEL.vta-calibration.json``), keyed by the model's content hash and the
calibration settings, so a second run does not calibrate again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

from gpp_onnx import data
from gpp_onnx.errors import UserError
from vta_backend.quant import shift_for

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
CACHE_VERSION = 2
# The finest activation scale used. An activation that was (nearly) zero on every calibration
# image would otherwise get a huge shift, and the bias and residual of the next conv, scaled
# by 2**(s_in + s_w), would overflow the int32 accumulator.
MAX_ACTIVATION_SHIFT = 12


class _Reader(CalibrationDataReader):
    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def cache_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".vta-calibration.json")


def _cache_key(model_path: Path, method: str, images: int, mean: tuple, std: tuple, dataset: data.Dataset) -> dict:
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    return {
        "version": CACHE_VERSION,
        "model_sha256": digest,
        "method": method,
        "images": images,
        "mean": list(mean),
        "std": list(std),
        "data": dataset.describe(),
    }


def calibrate(
    model_path: Path,
    input_name: str,
    dataset: data.Dataset,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    method: str = "percentile",
    images: int = 1000,
    batch: int = 100,
    track: Callable[[Iterable, str, int], Iterable] = lambda items, description, total: items,
) -> tuple[dict[str, int], bool]:
    """Power-of-two shift of every float activation; returns ``(shifts, from_cache)``."""
    if method not in METHODS:
        raise UserError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    if images < 1:
        raise UserError(f"--calibration-images {images} is below 1")
    key = _cache_key(model_path, method, images, mean, std, dataset)
    cached = _read_cache(model_path, key)
    if cached is not None:
        return cached, True
    batches = (
        data.normalize(x, mean, std)
        for x, _ in track(data.iter_uint8(dataset, "train", batch, images), "calibrating", -(-images // batch))
    )
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            model_path,
            op_types_to_calibrate=["Conv", "Relu", "Add"],
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=METHODS[method],
            extra_options={"percentile": 99.999, "num_bins": 2048} if method == "percentile" else {},
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress lines
            calibrator.collect_data(_Reader(input_name, batches))
            ranges = calibrator.compute_data()
        histograms = getattr(getattr(calibrator, "collector", None), "histogram_dict", None) or {}
        shifts = {}
        for name, tensor_data in ranges.data.items():
            low, high = (np.asarray(v, np.float64) for v in tensor_data.range_value)
            shifts[name] = power_of_two_shift(
                max(float(np.abs(low).max()), float(np.abs(high).max())), histograms.get(name)
            )
    _write_cache(model_path, key, shifts)
    return shifts, False


def power_of_two_shift(calibrated_range: float, histogram: tuple | None) -> int:
    """The shift for a calibrated range: ``floor(log2(127 / range))``, which never clips the range,
    or one finer when the histogram says that has the lower quantization error (rounding error
    of a finer step against clipping the values above the smaller range); never above
    ``MAX_ACTIVATION_SHIFT``."""
    coarse = min(int(shift_for(calibrated_range)), MAX_ACTIVATION_SHIFT)
    if histogram is None or calibrated_range <= 0 or coarse == MAX_ACTIVATION_SHIFT:
        return coarse
    counts, edges = np.asarray(histogram[0], np.float64), np.asarray(histogram[1], np.float64)
    magnitude = np.abs((edges[:-1] + edges[1:]) / 2)

    def error(shift: int) -> float:
        step = 2.0**-shift
        limit = 127 * step
        clipped = np.maximum(magnitude - limit, 0.0) ** 2
        return float(np.sum(counts * np.where(magnitude > limit, clipped, step * step / 12)))

    return min((coarse, coarse + 1), key=error)


def _read_cache(model_path: Path, key: dict) -> dict[str, int] | None:
    path = cache_path(model_path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("key") != key:
        return None
    return {k: int(v) for k, v in doc.get("shifts", {}).items()}


def _write_cache(model_path: Path, key: dict, shifts: dict[str, int]) -> None:
    """Atomically write the cache; a folder that cannot be written only loses the cache."""
    path = cache_path(model_path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "shifts": shifts}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
