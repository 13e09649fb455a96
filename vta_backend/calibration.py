"""Activation scales for VTA: onnxruntime.quantization's calibrators, rounded to powers of two, cached.

The calibrator runs the float model over calibration feeds (any iterable of input
dictionaries, as ONNX Runtime's ``CalibrationDataReader`` takes them) and records each
activation's range (MinMax), a percentile of its histogram (Percentile) or the range that
minimises the KL divergence (Entropy). VTA uses power-of-two scales, so a range ``r``
becomes the shift ``floor(log2(127 / r))`` (or one finer, see :func:`power_of_two_shift`).

The shifts are cached in the user's cache folder (``$GPP_CACHE_DIR``, else
``$XDG_CACHE_HOME/gpp-onnx``, else ``~/.cache/gpp-onnx``), never beside the model, keyed by
the model's content hash, the calibration settings and a description of the data, so a
second run does not calibrate again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gpp_onnx.errors import UserError
from gpp_onnx.files import temporary_folder, write_text
from vta_backend.integer_convs import expand_integer_convs
from vta_backend.quant import SHIFT_LIMIT, shift_for

# our method names -> onnxruntime.quantization.CalibrationMethod members
METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
CACHE_VERSION = 3
# The finest activation scale used. An activation that was (nearly) zero on every calibration
# image would otherwise get a huge shift, and the bias and residual of the next conv, scaled
# by 2**(s_in + s_w), would overflow the int32 accumulator.
MAX_ACTIVATION_SHIFT = 12


@dataclass(frozen=True)
class CalibrationOptions:
    """How activation ranges are measured; the one place their defaults live.

    ``method`` and ``images`` were chosen on held-out train images (docs/results.md).
    """

    method: str = "percentile"
    images: int = 5000  # train images fed through the float model
    batch: int = 100  # images per calibration batch

    def check(self) -> None:
        """Raise UserError for an unknown method or a count below 1."""
        if self.method not in METHODS:
            raise UserError(f"unknown calibration method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.images < 1:
            raise UserError(f"--calibration-images {self.images} is below 1")
        if self.batch < 1:
            raise UserError(f"calibration batch {self.batch} is below 1")


def default_cache_dir() -> Path:
    """``$GPP_CACHE_DIR``, else ``$XDG_CACHE_HOME/gpp-onnx``, else ``~/.cache/gpp-onnx``."""
    if os.environ.get("GPP_CACHE_DIR"):
        return Path(os.environ["GPP_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative path is ignored
        return Path(xdg) / "gpp-onnx"
    try:
        return Path.home() / ".cache" / "gpp-onnx"
    except RuntimeError:  # no home folder known
        return Path(tempfile.gettempdir()) / "gpp-onnx-cache"


def cache_key(model: onnx.ModelProto, options: CalibrationOptions, data: str) -> dict:
    """What a cached result depends on: the model's content, the settings and the data (described by the caller)."""
    return {
        "version": CACHE_VERSION,
        "model_sha256": hashlib.sha256(model.SerializeToString()).hexdigest(),
        "method": options.method,
        "images": options.images,
        "data": data,
    }


def cache_file(key: dict, cache_dir: Path) -> Path:
    """The cache entry of a key: one small JSON file per model and setting."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / f"calibration-{digest}.json"


def calibrate(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    options: CalibrationOptions = CalibrationOptions(),
    *,
    data: str,
    cache_dir: Path | None = None,
) -> tuple[dict[str, int], bool]:
    """Power-of-two shift of every float activation; returns ``(shifts, from_cache)``.

    ``feeds`` yields input dictionaries (``options.images`` images in all); it is not
    consumed when the result is cached. ``data`` describes the feeds for the cache key
    (data set, split, normalisation). ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    options.check()
    model = expand_integer_convs(model)  # QLinearConv / ConvInteger run on VTA as QDQ convs: their inputs too
    key = cache_key(model, options, data)
    path = cache_file(key, cache_dir or default_cache_dir())
    cached = _read_cache(path, key)
    if cached is not None and not missing_shifts(model, cached):
        return cached, True
    shifts = _measure(model, feeds, options)
    _write_cache(path, key, shifts)
    return shifts, False


def _measure(
    model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], options: CalibrationOptions
) -> dict[str, int]:
    """Each calibrated activation's range, rounded to a power-of-two shift."""
    ranges, histograms = _collect(model, feeds, options)
    shifts = {}
    for name, tensor_data in ranges.data.items():
        low, high = (np.asarray(v, np.float64) for v in tensor_data.range_value)
        magnitude = max(float(np.abs(low).max()), float(np.abs(high).max()))
        shifts[name] = power_of_two_shift(magnitude, histograms.get(name))
    return shifts


def _collect(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], options: CalibrationOptions):
    """Run ONNX Runtime's calibrator over the feeds (in a temporary folder: it writes augmented
    models there), one batch at a time so that memory does not grow with the image count (its
    ranges and histograms merge across calls); returns its ranges and, for histogram methods,
    the histograms."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self, feed: Mapping[str, np.ndarray]) -> None:
            self.feed: Mapping[str, np.ndarray] | None = feed

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed, self.feed = self.feed, None
            if feed is None:
                return None
            return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feed.items()}

    with temporary_folder("gpp-onnx-calibration.") as tmp:
        model_path = Path(tmp) / "model.onnx"
        onnx.save_model(float32_copy(model), model_path)
        calibrator = create_calibrator(
            model_path,
            op_types_to_calibrate=["Conv", "Relu", "Add"],
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, METHODS[options.method]),
            extra_options={"percentile": 99.999, "num_bins": 2048} if options.method == "percentile" else {},
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress lines
            collected = False
            for feed in feeds:  # one batch at a time: ranges and histograms merge, activations are dropped
                calibrator.collect_data(Reader(feed))
                collected = True
            if not collected:
                raise UserError("no calibration images; pass a data folder with train images")
            ranges = calibrator.compute_data()
        histograms = getattr(getattr(calibrator, "collector", None), "histogram_dict", None) or {}
    return ranges, histograms


def float32_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float16 initializer, constant, Cast target and declared tensor in float32
    (the calibrators' histograms need float32 activations); the model itself when it has none."""
    half, full = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph, changed = copy.graph, False
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == half:
            value.type.tensor_type.elem_type, changed = full, True
    for tensor in [*graph.initializer] + [a.t for n in graph.node for a in n.attribute if a.type == a.TENSOR]:
        if tensor.data_type == half:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
            changed = True
    for attribute in (a for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"):
        if attribute.i == half:
            attribute.i, changed = full, True
    return copy if changed else model


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


def missing_shifts(model: onnx.ModelProto, shifts: Mapping[str, int]) -> list[str]:
    """Conv inputs and outputs without a shift (a conv reading a graph input is exempt: it may stay on the CPU)."""
    model = expand_integer_convs(model)
    graph_inputs = {i.name for i in model.graph.input}
    needed = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            needed += [name for name in (node.input[0], node.output[0]) if name not in graph_inputs]
    return [name for name in needed if name not in shifts]


def _valid_shift(value: object) -> bool:
    """A shift calibration can give: an integer within -SHIFT_LIMIT..MAX_ACTIVATION_SHIFT."""
    return isinstance(value, int) and not isinstance(value, bool) and -SHIFT_LIMIT <= value <= MAX_ACTIVATION_SHIFT


def _read_cache(path: Path, key: dict) -> dict[str, int] | None:
    """The cached shifts for ``key``; None when absent, for another key, or malformed (then it is rebuilt)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("shifts"), dict):
        return None
    shifts = doc["shifts"]
    if not all(isinstance(k, str) and _valid_shift(v) for k, v in shifts.items()):
        return None
    return dict(shifts)


def _write_cache(path: Path, key: dict, shifts: dict[str, int]) -> None:
    """Write the cache entry atomically; a cache folder that cannot be written only loses the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"key": key, "shifts": shifts}, indent=1, sort_keys=True))
    except (OSError, UserError):
        pass
