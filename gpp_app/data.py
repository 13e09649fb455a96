"""CIFAR-10 in the layouts people have, streamed in preprocessed batches.

Accepted layouts (detected from the path):

* ``pickle``: the python release ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``);
  dictionary keys may be bytes or str, as files differ in how they were pickled;
* ``binary``: the binary release ``cifar-10-batches-bin`` (``data_batch_1..5.bin``,
  ``test_batch.bin``; 3073-byte records: label, then 3x32x32 channel-major pixels);
* ``folder``: image folders ``train|test/<class>/*.png|jpg`` (class index = position of
  the folder name in CIFAR-10's label order, else in sorted order).

The path may also be a folder holding one of these. Images stream in batches, so memory
does not grow with the number of images.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from gpp_onnx.errors import UserError
from gpp_onnx.model_io import image_dtype, image_input
from gpp_onnx.normalization import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported for callers)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LAYOUTS_HELP = (
    "accepted layouts: cifar-10-batches-py (python pickle), cifar-10-batches-bin (binary), "
    "or image folders train|test/<class>/*.png|jpg"
)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_RECORD = 3073


@dataclass(frozen=True)
class Dataset:
    """A located CIFAR-10 copy: its layout and root folder."""

    layout: str  # "pickle", "binary" or "folder"
    root: Path

    def describe(self) -> str:
        """What the data are, saying so when the images are JPEG (lossy: pixels differ from the release)."""
        kind = {
            "pickle": "CIFAR-10 python pickle release",
            "binary": "CIFAR-10 binary release",
            "folder": "image folders",
        }[self.layout]
        if self.layout == "folder" and next(self.root.glob("*/*/*.jp*g"), None) is not None:
            kind += " of JPEG files (recompressed: pixels differ from the official release)"
        return f"{kind} at {self.root}"


def _split_files(root: Path, split: str, suffix: str) -> list[Path]:
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    return [root / (n + suffix) for n in names if (root / (n + suffix)).is_file()]


def locate(path: str | Path) -> Dataset:
    """Detect the layout of a CIFAR-10 copy at ``path`` (or in a folder directly below it)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data folder {path} does not exist; {LAYOUTS_HELP}")
    if not path.is_dir():
        raise UserError(f"data path {path} is not a folder; {LAYOUTS_HELP}")
    for candidate in [path] + sorted(p for p in path.iterdir() if p.is_dir()):
        if (candidate / "test_batch").is_file() or (candidate / "data_batch_1").is_file():
            return Dataset("pickle", candidate)
        if (candidate / "test_batch.bin").is_file() or (candidate / "data_batch_1.bin").is_file():
            return Dataset("binary", candidate)
        if any((candidate / s).is_dir() for s in ("train", "test")):
            return Dataset("folder", candidate)
    raise UserError(f"no CIFAR-10 data found in {path}; {LAYOUTS_HELP}")


def _load_pickle(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{file} is not a readable CIFAR-10 pickle batch ({exc})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{file} holds a {type(batch).__name__}, not a CIFAR-10 batch dictionary; {LAYOUTS_HELP}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    try:
        data = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32)
        raw_labels = np.asarray(batch.get("labels", batch.get("fine_labels")))
        labels = raw_labels.astype(np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{file} does not hold CIFAR-10 'data' and 'labels' ({exc})") from None
    if labels.ndim != 1 or len(labels) != len(data):
        raise UserError(f"{file} holds {len(data)} images but {labels.size} labels; pass a complete CIFAR-10 batch")
    if raw_labels.dtype.kind not in "iu" and not (raw_labels.dtype.kind == "f" and np.array_equal(raw_labels, labels)):
        raise UserError(f"{file} has labels that are not whole numbers; pass a CIFAR-10 batch (labels 0..9)")
    return _check_batch(file, data, labels)


def _check_batch(file: Path, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch file's images and labels; UserError when it holds no image or a label outside 0..9."""
    if len(labels) == 0:
        raise UserError(f"{file} holds no images; pass a complete CIFAR-10 batch")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise UserError(f"{file} has label {bad}, outside CIFAR-10's 0..{len(CLASSES) - 1}; pass CIFAR-10 data")
    return images, labels


def _load_binary(file: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(file, np.uint8)
    if raw.size % _RECORD:
        raise UserError(f"{file} is not a CIFAR-10 binary batch (size is not a multiple of {_RECORD} bytes)")
    records = raw.reshape(-1, _RECORD)
    return _check_batch(file, records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64))


def _folder_files(root: Path, split: str) -> list[tuple[Path, int]]:
    """Image files of a split with their labels, interleaved across classes (so any prefix is balanced)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"{root} has no '{split}' folder; {LAYOUTS_HELP}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{split_dir} has no class folders; {LAYOUTS_HELP}")
    order = sorted(classes, key=lambda c: (CLASSES.index(c) if c in CLASSES else len(CLASSES), c))
    per_class = [sorted(f for f in (split_dir / c).iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES) for c in order]
    if not any(per_class):
        raise UserError(f"the class folders of {split_dir} hold no .png or .jpg images; {LAYOUTS_HELP}")
    files = []
    for rank in range(max(len(fs) for fs in per_class)):
        for label, fs in enumerate(per_class):
            if rank < len(fs):
                files.append((fs[rank], label))
    return files


def _decode(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB"), np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{file} is not a readable image ({exc})") from None


def _stack(images: list[np.ndarray], chunk: list[tuple[Path, int]]) -> np.ndarray:
    """One batch array; images of different sizes are an error naming one of the odd ones."""
    first = images[0].shape
    for (file, _), image in zip(chunk, images):
        if image.shape != first:
            raise UserError(
                f"{file} is {image.shape[1]}x{image.shape[2]} but {chunk[0][0]} is {first[1]}x{first[2]}; "
                "all images must have one size"
            )
    return np.stack(images)


def iter_uint8(
    dataset: Dataset, split: str, batch: int, limit: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of ``(uint8 [B, 3, H, W] images, int64 labels)`` of a split, in a fixed order."""
    if batch < 1:
        raise UserError(f"batch size {batch} is below 1; pass --batch 1 or more")
    remaining = limit if limit is not None else None
    if dataset.layout == "folder":
        files = _folder_files(dataset.root, split)[:limit]
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            yield _stack([_decode(f) for f, _ in chunk], chunk), np.array([label for _, label in chunk], np.int64)
        return
    suffix, loader = ("", _load_pickle) if dataset.layout == "pickle" else (".bin", _load_binary)
    files = _split_files(dataset.root, split, suffix)
    if not files:
        raise UserError(f"{dataset.root} has no {split} batches; {LAYOUTS_HELP}")
    for file in files:
        images, labels = loader(file)
        if remaining is not None:
            images, labels = images[:remaining], labels[:remaining]
            remaining -= len(labels)
        for start in range(0, len(labels), batch):
            yield images[start : start + batch], labels[start : start + batch]
        if remaining is not None and remaining <= 0:
            return


def count(dataset: Dataset, split: str, limit: int | None = None) -> int:
    """How many images ``iter_uint8`` yields (without decoding images)."""
    if dataset.layout == "folder":
        total = len(_folder_files(dataset.root, split))
    else:
        suffix = "" if dataset.layout == "pickle" else ".bin"
        total = 0
        for file in _split_files(dataset.root, split, suffix):
            total += len(_load_pickle(file)[1]) if dataset.layout == "pickle" else file.stat().st_size // _RECORD
    return min(total, limit) if limit is not None else total


def input_layout(dims: list, image_shape: tuple[int, ...]) -> str | None:
    """How a model input of ``dims`` takes images of ``image_shape`` (C, H, W): "NCHW", or "NHWC" as
    TensorFlow / Keras exports do; NCHW where both fit (an input with C, H and W all symbolic is taken
    as NCHW); None where neither does."""

    def fits(axes: list) -> bool:
        return all(not isinstance(d, int) or d in (0, size) for d, size in zip(axes, image_shape))

    if len(dims) == 4 and fits(dims[1:4]):
        return "NCHW"
    return "NHWC" if len(dims) == 4 and fits([dims[3], dims[1], dims[2]]) else None


def channels_last(dims: list, image_shape: tuple[int, ...]) -> bool:
    """Whether the model input ``dims`` takes these images as [N, H, W, C] (see :func:`input_layout`)."""
    return input_layout(dims, image_shape) == "NHWC"


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], nhwc: bool = False) -> np.ndarray:
    """uint8 NCHW -> float32 scaled to [0, 1], minus mean, over std (per channel); NHWC if ``nhwc``."""
    mean_arr = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std_arr = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    x = ((images.astype(np.float32) / 255.0 - mean_arr) / std_arr).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x


def model_input(model: onnx.ModelProto) -> tuple[str, list, type]:
    """The model's image input as :func:`model_feed` and :func:`feeds` take it: name, dims, numpy type."""
    return (*image_input(model), image_dtype(model))


def model_feed(
    input_name: str, dims: list, dtype: type, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, np.ndarray]:
    """uint8 NCHW images as the ONNX Runtime input of a model whose image input is ``dims``: normalised,
    in the model's layout (NCHW or NHWC) and float type."""
    return {input_name: normalize(images, mean, std, channels_last(dims, images.shape[1:])).astype(dtype)}


SHARED_DATA_DIR = Path("..") / "shared" / "data"  # the project's shared data, beside the working folder


def default_data_dir() -> Path:
    """``$GPP_DATA_DIR/cifar10-jpeg`` (``../shared/data`` when unset): where commands look without ``--data``."""
    root = Path(os.environ.get("GPP_DATA_DIR") or SHARED_DATA_DIR)
    if not os.environ.get("GPP_DATA_DIR") and not root.is_dir():
        raise UserError(f"pass --data DIR (a CIFAR-10 folder) or set GPP_DATA_DIR (no {root} here)")
    return root.resolve() / "cifar10-jpeg"


def feeds(
    dataset: Dataset,
    model_input: tuple[str, list, type],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    split: str,
    batch: int,
    limit: int | None = None,
) -> Iterator[Mapping[str, np.ndarray]]:
    """Batches of a split as ONNX Runtime inputs of a model whose image input is ``model_input`` (name,
    dims, float type), streamed (for calibration): see :func:`model_feed`."""
    for images, _ in iter_uint8(dataset, split, batch, limit):
        yield model_feed(*model_input, images, mean, std)


def describe_feeds(dataset: Dataset, split: str, mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    """What :func:`feeds` yields, in words: a cache key for results computed from them."""
    return f"{dataset.describe()}; {split} split; mean {list(mean)}, std {list(std)}"
