"""``prune`` and ``inspect``: the library API behind ``gpp-onnx prune`` / ``gpp-onnx inspect``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np
import onnx

from gpp_onnx._version import __version__
from gpp_onnx.allocation import SCOPES, select_global, select_per_layer
from gpp_onnx.annotation import (
    Annotation,
    SkippedLayer,
    WeightAnnotation,
    read_annotation,
    validate_annotation,
    write_annotation,
)
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import LoadedModel, load_model
from gpp_onnx.patterns import (
    PATTERNS,
    TILE_PATTERNS,
    canonical,
    canonical_shape,
    expand,
    from_canonical,
    make_units,
    tile_pattern_skip_reason,
)
from gpp_onnx.report import Report, annotated_statuses, build_report
from gpp_onnx.tiles import TileShape
from gpp_onnx.weights import Layer, find_layers

T = TypeVar("T")
ModelSource = str | os.PathLike[str] | onnx.ModelProto | LoadedModel
Tracker = Callable[[Iterable[T], str, int], Iterable[T]]


def _no_progress(items: Iterable[T], description: str, total: int) -> Iterable[T]:
    return items


def resolve_tile(tile: TileShape | str | object | None) -> TileShape:
    """A TileShape from None (16x16), ``"OUTxIN"``, a VTA config JSON path or a config object."""
    if tile is None:
        return TileShape()
    if isinstance(tile, TileShape):
        return tile
    if isinstance(tile, str):
        return TileShape.parse(tile)
    return TileShape.from_config(tile)


def check_options(sparsity: float, pattern: str, scope: str, exclude: Sequence[str]) -> list[re.Pattern[str]]:
    """Validate pruning options; returns the compiled exclude patterns."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity {sparsity!r} is outside [0, 1); give a fraction such as 0.7")
    if pattern not in PATTERNS:
        raise UserError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    if scope not in SCOPES:
        raise UserError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    compiled = []
    for text in exclude:
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise UserError(f"--exclude {text!r} is not a valid regular expression ({exc})") from None
    return compiled


def _skip_reason(layer: Layer, pattern: str, exclude: list[re.Pattern[str]], include_fc: bool) -> str | None:
    if layer.skip_reason is not None:
        return layer.skip_reason
    for rx in exclude:
        if any(rx.search(n) for n in layer.nodes) or rx.search(layer.weight):
            return f"excluded by --exclude {rx.pattern!r}"
    if layer.is_fc and not include_fc:
        return "fully connected layer; pass --include-fc to prune it"
    if pattern in TILE_PATTERNS:
        return tile_pattern_skip_reason(layer)
    return None


def prune(
    model: ModelSource,
    sparsity: float,
    pattern: str = "group",
    scope: str = "layer",
    tile: TileShape | str | object | None = None,
    exclude: Sequence[str] = (),
    include_fc: bool = False,
    track: Tracker = _no_progress,
) -> tuple[onnx.ModelProto, Report]:
    """Prune the conv (and with ``include_fc`` fully connected) weights of a model.

    ``model`` is a path, a ModelProto or a LoadedModel; it is not modified. Returns the pruned model,
    carrying the sparse-tile annotation, and the per-layer report.
    """
    exclude_rx = check_options(sparsity, pattern, scope, exclude)
    tile_shape = resolve_tile(tile)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(loaded.model)
    layers = find_layers(pruned)
    reasons = {layer.weight: _skip_reason(layer, pattern, exclude_rx, include_fc) for layer in layers}
    eligible = [layer for layer in layers if reasons[layer.weight] is None]
    if not eligible:
        detail = "; ".join(f"{layer.name}: {reasons[layer.weight]}" for layer in layers[:3])
        raise UserError(
            "the model has no prunable layer"
            + (f" ({detail})" if detail else " (no Conv, ConvTranspose, QLinearConv or ConvInteger node)")
            + "; check --pattern, --exclude and --include-fc, or pass a CNN"
        )
    units = []
    for layer in track(eligible, "scoring", len(eligible)):
        stored = layer.stored
        assert stored is not None
        units.append(
            make_units(canonical(stored.magnitude(), layer), canonical(stored.nonzero(), layer), pattern, tile_shape)
        )
    select = select_global if scope == "global" else select_per_layer
    chosen = select(units, float(sparsity))
    for layer, unit, pruned_units in track(list(zip(eligible, units, chosen)), "pruning", len(eligible)):
        stored = layer.stored
        assert stored is not None
        mask = from_canonical(
            expand(pruned_units.reshape(unit.grid), pattern, tile_shape, canonical_shape(layer)), layer
        )
        if np.any(mask & stored.nonzero()):
            stored.replace_values(np.where(mask, stored.zero, stored.values).astype(stored.values.dtype))
    statuses = {w: ("pruned", None) if r is None else ("skipped", r) for w, r in reasons.items()}
    report = build_report(layers, statuses, tile_shape, pattern, scope, float(sparsity))
    rows = {row.weight: row for row in report.layers}
    annotation = Annotation(
        tool_version=__version__,
        tile=tile_shape,
        pattern=pattern,
        scope=scope,
        target_sparsity=float(sparsity),
        achieved_sparsity=report.sparsity,
        weights=[
            WeightAnnotation(
                layer.nodes,
                layer.weight,
                layer.shape,
                layer.layout,
                layer.groups,
                layer.positions,
                rows[layer.weight].kept,
                rows[layer.weight].sparsity,
            )
            for layer in eligible
        ],
        skipped=[
            SkippedLayer(layer.nodes, layer.weight, reasons[layer.weight] or "")
            for layer in layers
            if reasons[layer.weight] is not None
        ],
    )
    write_annotation(pruned, annotation)
    return pruned, report


def inspect(model: ModelSource, tile: TileShape | str | object | None = None) -> Report:
    """Report a model's prunable layers; the annotation, when present, is validated first.

    The tile shape is the annotation's; ``tile`` sets it for a model without one.
    """
    loaded = load_model(model)
    annotation = read_annotation(loaded.model)
    if annotation is not None:
        validate_annotation(loaded.model, annotation)
        tile_shape = annotation.tile
    else:
        tile_shape = resolve_tile(tile)
    layers = find_layers(loaded.model)
    if annotation is None:
        return build_report(layers, annotated_statuses(layers, None), tile_shape)
    return build_report(
        layers,
        annotated_statuses(layers, annotation),
        tile_shape,
        annotation.pattern,
        annotation.scope,
        annotation.target_sparsity,
    )
