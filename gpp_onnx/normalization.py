"""The input normalisation a model expects, stored in its metadata by exporters."""

from __future__ import annotations

import json

import onnx

from gpp_onnx.errors import UserError

NORMALIZATION_KEY = "gpp_onnx.normalization"


def write_normalization(model: onnx.ModelProto, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Store per-channel mean and std (applied after scaling pixels to [0, 1])."""
    value = json.dumps({"mean": [float(m) for m in mean], "std": [float(s) for s in std]})
    kept = [p for p in model.metadata_props if p.key != NORMALIZATION_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=NORMALIZATION_KEY, value=value)


def read_normalization(model: onnx.ModelProto) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    for prop in model.metadata_props:
        if prop.key == NORMALIZATION_KEY:
            try:
                doc = json.loads(prop.value)
                return tuple(float(m) for m in doc["mean"]), tuple(float(s) for s in doc["std"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UserError(f"metadata entry {NORMALIZATION_KEY} is malformed; pass --mean and --std") from None
    return None
