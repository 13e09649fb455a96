"""Top-1 accuracy of a model on CIFAR-10 with ONNX Runtime or with its convs on the VTA simulator.

With the VTA backend every batch also runs through ONNX Runtime fp32 on the same model
file (the reference): accuracy, top-1 agreement and logit differences come from the same
images. Host speed is measured per backend over the same batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gpp_app import data
from gpp_onnx.annotation import KeptTiles, read_kept_tiles
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import image_dtype, load_model
from gpp_onnx.model_io import image_input as model_image_input
from gpp_onnx.normalization import normalization_for, normalization_source
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.weights import check_finite_weights
from vta_backend.calibration import CalibrationOptions, calibrate
from vta_backend.config import VTAConfig
from vta_backend.model import VtaReport
from vta_backend.quantization import QuantizationOptions

BACKENDS = ("ort", "vta")


@dataclass(frozen=True)
class RunOptions:
    """How ``evaluate`` runs a model; the defaults of ``gpp-onnx run``."""

    backend: str = "vta"
    split: str = "test"
    limit: int | None = None
    batch: int = 256
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    calibration: CalibrationOptions = CalibrationOptions()
    quantization: QuantizationOptions = QuantizationOptions()
    baseline: Path | None = None
    vta_config: VTAConfig | None = None

    def check(self) -> None:
        """Raise UserError for options that cannot work, before any expensive step."""
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.split not in ("test", "train"):
            raise UserError(f"unknown split {self.split!r}; use test or train")
        if self.batch < 1:
            raise UserError(f"batch size {self.batch} is below 1; pass --batch 1 or more")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit} is below 1")
        if self.backend == "vta":
            self.calibration.check()


@dataclass
class Score:
    """Accuracy and host speed of one backend over the evaluated images."""

    backend: str
    accuracy: float
    images_per_second: float
    model: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON form (``model`` only where it names another model than the one evaluated)."""
        doc: dict[str, object] = {"backend": self.backend, "accuracy": self.accuracy}
        doc["images_per_second"] = self.images_per_second
        if self.model is not None:
            doc["model"] = self.model
        return doc


@dataclass
class CalibrationInfo:
    """How the VTA backend's activation scales were obtained."""

    method: str
    images: int
    cached: bool
    split: str = "train"

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"method": self.method, "images": self.images, "split": self.split, "cached": self.cached}


@dataclass
class EvalResult:
    """What ``gpp-onnx run`` measures; ``to_dict`` is its ``--json`` document."""

    backend: str
    model: str
    data: str
    split: str
    images: int
    accuracy: float
    images_per_second: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization_source: str = ""  # where mean and std came from: given, the model's metadata, the default
    reference: Score | None = None  # ONNX Runtime fp32 on the same model (VTA backend)
    agreement: float | None = None  # top-1 agreement with the reference
    logit_difference: dict[str, float] | None = None  # max and mean |VTA - reference|
    calibration: CalibrationInfo | None = None
    vta: VtaReport | None = None
    baseline: Score | None = None  # ONNX Runtime fp32 on --baseline

    @property
    def accuracy_drop_points(self) -> float | None:
        """Points below the reference (else the baseline); None without either."""
        compared = self.reference or self.baseline
        return None if compared is None else (compared.accuracy - self.accuracy) * 100

    def to_dict(self) -> dict[str, object]:
        """JSON form: every field, nested results by their own ``to_dict``."""
        doc: dict[str, object] = {
            "backend": self.backend,
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "images": self.images,
            "accuracy": self.accuracy,
            "images_per_second": self.images_per_second,
            "mean": list(self.mean),
            "std": list(self.std),
            "normalization_source": self.normalization_source,
        }
        for name in ("reference", "calibration", "vta", "baseline"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value.to_dict()
        if self.agreement is not None:
            doc.update(agreement=self.agreement, logit_difference=self.logit_difference)
        doc["accuracy_drop_points"] = self.accuracy_drop_points
        return doc


def fixed_batch(dims: list) -> int | None:
    """The batch size a model's input fixes, None when it is symbolic."""
    return dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None


def model_batches(dims: list, batch: int, images: int) -> tuple[int, int]:
    """Batch size and image count to feed a model whose input is ``dims``: its fixed batch size, if it
    has one, with the count rounded down to a multiple of it (at least one batch); else as given."""
    fixed = fixed_batch(dims)
    return (fixed, max(fixed, images // fixed * fixed)) if fixed else (batch, images)


def run_in_model_batches(session, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output for a batch of any size: cut into the session input's fixed batch size, the last
    piece padded with zeros and the padding's outputs dropped."""
    ((name, images),) = feeds.items()
    batch = fixed_batch(list(session.get_inputs()[0].shape))
    if batch is None or batch == len(images):
        return session.run(None, feeds)[0]
    outputs = []
    for start in range(0, len(images), batch):
        piece = images[start : start + batch]
        padding = np.zeros((batch - len(piece), *piece.shape[1:]), piece.dtype)
        outputs.append(session.run(None, {name: np.concatenate([piece, padding])})[0][: len(piece)])
    return np.concatenate(outputs)


@dataclass
class _Tally:
    """Correct predictions and host time of one session."""

    session: object
    correct: int = 0
    seconds: float = 0.0
    images: int = 0

    def run(self, feeds: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        logits = run_in_model_batches(self.session, feeds)
        self.seconds += time.perf_counter() - start
        check_scores(logits, labels)
        self.images += len(labels)
        self.correct += int((logits.argmax(axis=1) == labels).sum())
        return logits

    def score(self, backend: str, model: str | None = None) -> Score:
        return Score(backend, self.correct / self.images, self.images / self.seconds if self.seconds else 0.0, model)


@dataclass
class _Comparison:
    """Top-1 agreement and logit differences of the VTA backend against the reference."""

    agree: int = 0
    max_diff: float = 0.0
    sum_diff: float = 0.0
    images: int = 0

    def add(self, logits: np.ndarray, reference: np.ndarray) -> None:
        diff = np.abs(logits - reference)
        self.agree += int((logits.argmax(axis=1) == reference.argmax(axis=1)).sum())
        self.max_diff = max(self.max_diff, float(diff.max()))
        self.sum_diff += float(diff.mean()) * len(logits)
        self.images += len(logits)


def _ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def check_scores(logits: np.ndarray, labels: np.ndarray) -> None:
    """The model gives one score per class for each image, for at least as many classes as the labels name."""
    if logits.ndim != 2 or len(logits) != len(labels):
        raise UserError(
            f"the model's first output is {list(logits.shape)} for {len(labels)} images, not [N, classes] "
            "scores; pass a classifier whose first output holds the class scores"
        )
    check_labels(labels, logits.shape[1])


def check_labels(labels: np.ndarray, classes: int) -> None:
    """Every label names one of the model's ``classes`` scores (UserError otherwise)."""
    if labels.max(initial=0) >= classes:
        raise UserError(
            f"the data have label {labels.max()} but the model scores {classes} classes; "
            "pass a model trained on these classes (CIFAR-10: 10)"
        )


def check_output(model: onnx.ModelProto) -> None:
    """The model's first output is declared as [N, classes] scores where its rank is known (UserError otherwise)."""
    output = model.graph.output[0] if model.graph.output else None
    if output is None:
        raise UserError("the model has no output; pass a classifier")
    tensor = output.type.tensor_type
    if tensor.HasField("shape") and len(tensor.shape.dim) != 2:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        raise UserError(
            f"output '{output.name}' is {dims}, not [N, classes] scores; pass a classifier whose first output "
            "holds the class scores"
        )


def check_fits(model: onnx.ModelProto, dataset: data.Dataset, splits: tuple[str, ...]) -> None:
    """Before any work: the model takes one image input of the data's size and channels, in every split
    named, and declares class scores as its output (UserError otherwise)."""
    name, dims = model_image_input(model, "gpp-onnx expects one image input [N, C, H, W] or [N, H, W, C]")
    check_output(model)
    for split in splits:
        check_data_fits(dataset, split, dims, name)


def check_data_fits(dataset: data.Dataset, split: str, dims: list, name: str) -> None:
    """The first image of the split has the model's input size and channels (UserError otherwise)."""
    first = next(data.iter_uint8(dataset, split, 1, 1), None)
    if first is None:
        raise UserError(f"no {split} images in {dataset.root}; {data.LAYOUTS_HELP}")
    _check_fits(dims, first[0], name)


def _check_fits(dims: list, images: np.ndarray, name: str) -> None:
    """The model's input takes these images, channels first or (TensorFlow exports) last."""
    image_shape = images.shape[1:]
    if data.input_layout(dims, image_shape) is None:
        raise UserError(
            f"input '{name}' expects shape {dims} but the data are {list(image_shape)} images (C, H, W; "
            "[N, H, W, C] inputs are fed channels last); pass a model made for these images (CIFAR-10: 3x32x32)"
        )


def calibrate_on_data(
    model: onnx.ModelProto,
    dataset: data.Dataset,
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
    options: CalibrationOptions = CalibrationOptions(),
    track: Track = no_progress,
) -> tuple[dict[str, int], bool]:
    """VTA activation shifts from the train split of ``dataset`` (cached); returns ``(shifts, from_cache)``.

    A model with a fixed batch size is calibrated in batches of that size (the image count rounded
    down to a multiple of it, at least one batch)."""
    input_name, dims = model_image_input(model)
    batch, images = model_batches(dims, options.batch, options.images)
    options = replace(options, batch=batch, images=images)
    model_input = (input_name, dims, image_dtype(model))
    feeds = data.feeds(dataset, model_input, *normalization, "train", options.batch, options.images)
    described = data.describe_feeds(dataset, "train", *normalization)
    return calibrate(model, track(feeds, "calibrating", -(-options.images // options.batch)), options, data=described)


def vta_session(
    model: onnx.ModelProto,
    kept: KeptTiles | None,
    dataset: data.Dataset,
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
    options: RunOptions,
    track: Track = no_progress,
):
    """Calibrate on train images (cached) and build the VtaSession; returns it and how it was calibrated."""
    from vta_backend.session import VtaSession

    shifts, cached = calibrate_on_data(model, dataset, normalization, options.calibration, track)
    session = VtaSession(model, shifts, options.vta_config or VTAConfig(), options.quantization, kept)
    return session, CalibrationInfo(options.calibration.method, options.calibration.images, cached)


def evaluate(
    model_path: Path | onnx.ModelProto, data_path: Path, options: RunOptions, track: Track = no_progress
) -> EvalResult:
    """Run the model (a file, or a model in memory) over a split with the chosen backend (and ORT fp32
    beside the VTA backend)."""
    options.check()
    loaded = load_model(model_path)
    label = "the model" if isinstance(model_path, onnx.ModelProto) else str(model_path)
    check_finite_weights(loaded.model)
    input_name, dims = model_image_input(
        loaded.model, "gpp-onnx run expects one image input [N, C, H, W] or [N, H, W, C]"
    )
    kept = read_kept_tiles(loaded.model)  # validated once, before anything expensive
    dataset = data.locate(data_path)
    normalization = normalization_for(loaded.model, options.mean, options.std)
    check_data_fits(dataset, options.split, dims, input_name)  # before calibration or any session
    check_output(loaded.model)
    if options.backend == "vta" and not any(node.op_type == "Conv" for node in loaded.model.graph.node):
        raise UserError(f"{label} has no Conv for VTA to run; use --backend ort")
    dtype = image_dtype(loaded.model)
    baseline = _baseline_tally(options.baseline, dims)
    reference = _Tally(_ort_session(loaded.model))
    vta = calibration = None
    if options.backend == "vta":
        session, calibration = vta_session(loaded.model, kept, dataset, normalization, options, track)
        vta = _Tally(session)
    comparison = _Comparison()
    total = data.count(dataset, options.split, options.limit)
    batches = data.iter_uint8(dataset, options.split, options.batch, options.limit)
    for raw, labels in track(batches, f"{options.backend} on {options.split}", -(-total // options.batch)):
        _check_fits(dims, raw, input_name)
        feeds = data.model_feed(input_name, dims, dtype, raw, *normalization)
        reference_logits = reference.run(feeds, labels)
        if vta is not None:
            comparison.add(vta.run(feeds, labels), reference_logits)
        if baseline is not None:
            baseline.run(feeds, labels)
    if reference.images == 0:
        raise UserError(f"no {options.split} images in {data_path}")
    result = EvalResult(
        options.backend, label, dataset.describe(), options.split, reference.images, 0.0, 0.0, *normalization
    )
    result.normalization_source = normalization_source(loaded.model, options.mean, options.std)
    return _fill(result, reference, vta, comparison, calibration, baseline, options.baseline)


def _baseline_tally(path: Path | None, dims: list) -> _Tally | None:
    """ONNX Runtime on the --baseline model, which must take the evaluated model's images."""
    if path is None:
        return None
    model = load_model(path).model
    check_finite_weights(model)
    _, baseline_dims = model_image_input(model, "--baseline expects one image input [N, C, H, W] or [N, H, W, C]")
    for axis in (1, 2, 3):
        if (
            all(isinstance(d[axis], int) and d[axis] > 0 for d in (dims, baseline_dims))
            and dims[axis] != baseline_dims[axis]
        ):
            raise UserError(
                f"--baseline {path} takes {baseline_dims} inputs, the model {dims}; pass the model this one came from"
            )
    check_output(model)
    return _Tally(_ort_session(model))


def _fill(
    result: EvalResult,
    reference: _Tally,
    vta: _Tally | None,
    comparison: _Comparison,
    calibration: CalibrationInfo | None,
    baseline: _Tally | None,
    baseline_path: Path | None,
) -> EvalResult:
    """Put the tallies' scores into the result (the VTA session's report too, then close it)."""
    main = (vta or reference).score(result.backend)
    result.accuracy, result.images_per_second = main.accuracy, main.images_per_second
    if vta is not None:
        result.reference = reference.score("ort fp32")
        result.agreement = comparison.agree / comparison.images
        result.logit_difference = {"max": comparison.max_diff, "mean": comparison.sum_diff / comparison.images}
        result.calibration = calibration
        result.vta = vta.session.report()
        vta.session.close()
    if baseline is not None:
        result.baseline = baseline.score("ort fp32", str(baseline_path))
    return result
