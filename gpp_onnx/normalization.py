"""The input normalisation a model expects, stored in its metadata by exporters."""

from __future__ import annotations

import json
import math

import onnx

from gpp_onnx.errors import UserError

NORMALIZATION_KEY = "gpp_onnx.normalization"
# What a model without stored normalisation is assumed to expect (torchvision's ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def write_normalization(model: onnx.ModelProto, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Store per-channel mean and std (applied after scaling pixels to [0, 1])."""
    value = json.dumps({"mean": [float(m) for m in mean], "std": [float(s) for s in std]})
    kept = [p for p in model.metadata_props if p.key != NORMALIZATION_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=NORMALIZATION_KEY, value=value)


def read_normalization(model: onnx.ModelProto) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The stored ``(mean, std)``, or None when the model has none."""
    for prop in model.metadata_props:
        if prop.key == NORMALIZATION_KEY:
            try:
                doc = json.loads(prop.value)
                return tuple(float(m) for m in doc["mean"]), tuple(float(s) for s in doc["std"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UserError(f"metadata entry {NORMALIZATION_KEY} is malformed; pass --mean and --std") from None
    return None


def normalization_for(
    model: onnx.ModelProto, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The given mean / std, else the model's stored ones, else the ImageNet-style CIFAR-10 defaults."""
    stored = read_normalization(model)
    mean = mean or (stored[0] if stored else IMAGENET_MEAN)
    std = std or (stored[1] if stored else IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not all(math.isfinite(v) for v in (*mean, *std)):
        raise UserError("--mean and --std take three finite values each (std above 0), e.g. 0.485,0.456,0.406")
    return tuple(mean), tuple(std)


def normalization_source(model: onnx.ModelProto, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> str:
    """Where :func:`normalization_for` took the mean / std from, in words."""
    if mean and std:
        return "given (--mean / --std)"
    stored = "the model's metadata" if read_normalization(model) else "the ImageNet default (the model stores none)"
    return stored if not (mean or std) else f"given and {stored}"
