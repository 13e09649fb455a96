"""``prune`` and ``inspect``: the library API behind ``gpp-onnx prune`` / ``gpp-onnx inspect``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np
import onnx

from gpp_onnx._version import __version__
from gpp_onnx.allocation import SCOPES, prune_order, select_counts, select_global, select_per_layer
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
from gpp_onnx.patterns import Pattern, Units, canonical, canonical_shape, from_canonical, get_pattern, tile_sum
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.report import Report, annotated_statuses, build_report
from gpp_onnx.tiles import TileShape
from gpp_onnx.weights import Layer, check_finite_weights, find_layers

T = TypeVar("T")
ModelSource = str | os.PathLike[str] | onnx.ModelProto | LoadedModel

DEFAULT_SPARSITY = 0.5
DEFAULT_PATTERN = "group"
DEFAULT_SCOPE = "layer"
IMPORTANCE_MEASURES = ("layer-share", "magnitude")  # what LayerRanking.importance can measure


def resolve_tile(tile: TileShape | str | object | None) -> TileShape:
    """A TileShape from None (16x16), ``"OUTxIN"`` or a hardware config object (e.g. a VTAConfig)."""
    if tile is None:
        return TileShape()
    if isinstance(tile, TileShape):
        return tile
    if isinstance(tile, str):
        return TileShape.parse(tile)
    return TileShape.from_config(tile)


@dataclass(frozen=True)
class PruneOptions:
    """What to prune and how; the defaults of ``prune`` and of every command that prunes."""

    sparsity: float = DEFAULT_SPARSITY
    pattern: str = DEFAULT_PATTERN
    scope: str = DEFAULT_SCOPE
    tile: TileShape | str | object | None = None
    exclude: tuple[str, ...] = ()
    include_fc: bool = False
    layer_floor: float = 0.0  # fraction of each layer's units (the best-scoring) never pruned
    allow_empty_layers: bool = False  # else every pruned layer keeps at least its best unit

    def check(self) -> list[re.Pattern[str]]:
        """Validate the options (UserError otherwise); returns the compiled exclude patterns."""
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"sparsity {self.sparsity!r} is outside [0, 1); give a fraction such as 0.7")
        get_pattern(self.pattern)
        if not isinstance(self.layer_floor, (int, float)) or not 0.0 <= self.layer_floor <= 1.0:
            raise UserError(f"layer floor {self.layer_floor!r} is outside [0, 1]; give a fraction such as 0.05")
        if self.scope not in SCOPES:
            raise UserError(f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if self.allow_empty_layers and self.layer_floor > 0:
            raise UserError(
                f"--allow-empty-layers with a layer floor of {self.layer_floor:g} empties nothing (the floor keeps "
                "at least one unit of every layer); pass --layer-floor 0 with it"
            )
        compiled = []
        for text in self.exclude:
            try:
                compiled.append(re.compile(text))
            except re.error as exc:
                raise UserError(f"--exclude {text!r} is not a valid regular expression ({exc})") from None
        return compiled

    def arguments(self) -> dict[str, object]:
        """The options as keyword arguments of :func:`prune`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _skip_reason(layer: Layer, pattern: Pattern, exclude: list[re.Pattern[str]], include_fc: bool) -> str | None:
    if layer.skip_reason is not None:
        return layer.skip_reason
    for rx in exclude:
        if any(rx.search(n) for n in layer.nodes) or rx.search(layer.weight):
            return f"excluded by --exclude {rx.pattern!r}"
    if layer.is_fc and not include_fc:
        return "fully connected layer; pass --include-fc to prune it"
    return pattern.skip_reason(layer)


def _no_prunable_layer(layers: list[Layer], reasons: dict[str, str | None]) -> UserError:
    detail = "; ".join(f"{layer.name}: {reasons[layer.weight]}" for layer in layers[:3])
    return UserError(
        "the model has no prunable layer"
        + (f" ({detail})" if detail else " (no Conv, ConvTranspose, QLinearConv or ConvInteger node)")
        + "; check --pattern, --exclude and --include-fc, or pass a CNN"
    )


def _units(layer: Layer, pattern: Pattern, tile: TileShape) -> Units:
    stored = layer.stored
    assert stored is not None
    return pattern.units(canonical(stored.magnitude(), layer), canonical(stored.nonzero(), layer), tile)


def _zero_units(layer: Layer, unit: Units, pruned_units: np.ndarray, pattern: Pattern, tile: TileShape) -> None:
    """Write zero (the zero point for quantized weights) into the pruned units of a layer's stored tensor."""
    stored = layer.stored
    assert stored is not None
    mask = from_canonical(pattern.expand(pruned_units.reshape(unit.grid), tile, canonical_shape(layer)), layer)
    if np.any(mask & stored.nonzero()):
        stored.replace_values(np.where(mask, stored.zero, stored.values).astype(stored.values.dtype))


def _annotation(
    options: PruneOptions,
    scope: str,
    target: float,
    tile: TileShape,
    report: Report,
    eligible: list[Layer],
    skipped: list[SkippedLayer],
) -> Annotation:
    rows = {row.weight: row for row in report.layers}
    weights = [
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
    ]
    return Annotation(__version__, tile, options.pattern, scope, target, report.sparsity, weights, skipped)


def prune(
    model: ModelSource,
    sparsity: float = DEFAULT_SPARSITY,
    pattern: str = DEFAULT_PATTERN,
    scope: str = DEFAULT_SCOPE,
    tile: TileShape | str | object | None = None,
    exclude: Sequence[str] = (),
    include_fc: bool = False,
    track: Track = no_progress,
    layer_floor: float = 0.0,
    allow_empty_layers: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Prune the conv (and with ``include_fc`` fully connected) weights of a model.

    ``model`` is a path, a ModelProto or a LoadedModel; it is not modified. ``tile`` is a
    TileShape, ``"OUTxIN"`` or a hardware config with ``BLOCK_OUT`` / ``BLOCK_IN`` (a
    ``vta_backend.VTAConfig``). Returns the pruned model, carrying the sparse-tile
    annotation, and the per-layer report. ``layer_floor`` keeps that fraction of every layer's
    units (the best-scoring) whatever the target; every pruned layer keeps at least its best unit
    (a layer of zeros ignores its input) unless ``allow_empty_layers``.
    """
    options = PruneOptions(sparsity, pattern, scope, tile, tuple(exclude), include_fc, layer_floor, allow_empty_layers)
    select = select_global if scope == "global" else select_per_layer
    return _prune(
        model,
        options,
        lambda units, _: select(units, float(sparsity), layer_floor, allow_empty_layers),
        track,
        scope,
        float(sparsity),
    )


def prune_counts(
    model: ModelSource,
    counts: Mapping[str, int],
    options: PruneOptions,
    skip: Mapping[str, str] | None = None,
    track: Track = no_progress,
    scope: str = "latency",
) -> tuple[onnx.ModelProto, Report]:
    """Prune ``counts[weight]`` units of each layer, in its :func:`rank_layers` order (0 for a layer
    absent from ``counts``); the layers in ``skip`` (weight -> reason) stay dense with that reason.
    ``options`` gives the pattern, tile, exclusions, floor (its sparsity is not used); the report
    and annotation name ``scope``, with the achieved sparsity as their target."""

    def select(units: list[Units], eligible: list[Layer]) -> list[np.ndarray]:
        wanted = [int(counts.get(layer.weight, 0)) for layer in eligible]
        return select_counts(units, wanted, options.layer_floor, options.allow_empty_layers)

    return _prune(model, options, select, track, scope, None, skip or {})


def _prune(
    model: ModelSource,
    options: PruneOptions,
    select: Callable[[list[Units], list[Layer]], list[np.ndarray]],
    track: Track,
    scope: str,
    target: float | None,
    skip: Mapping[str, str] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Score the eligible layers' units, zero those ``select`` picks, report and annotate."""
    exclude_rx = options.check()
    tile_shape, chosen_pattern = resolve_tile(options.tile), get_pattern(options.pattern)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    check_finite_weights(loaded.model)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(loaded.model)
    layers = find_layers(pruned)
    reasons = _reasons(layers, chosen_pattern, exclude_rx, options.include_fc, skip or {})
    eligible = [layer for layer in layers if reasons[layer.weight] is None]
    if not eligible:
        raise _no_prunable_layer(layers, reasons)
    units = [_units(layer, chosen_pattern, tile_shape) for layer in track(eligible, "scoring", len(eligible))]
    chosen = select(units, eligible)
    for layer, unit, pruned_units in track(list(zip(eligible, units, chosen)), "pruning", len(eligible)):
        _zero_units(layer, unit, pruned_units, chosen_pattern, tile_shape)
    statuses = {w: ("pruned", None) if r is None else ("skipped", r) for w, r in reasons.items()}
    report = build_report(layers, statuses, tile_shape, options.pattern, scope, target)
    skipped = [SkippedLayer(layer.nodes, layer.weight, reasons[layer.weight] or "") for layer in layers]
    skipped = [s for s in skipped if reasons[s.weight] is not None]
    recorded_target = report.sparsity if target is None else target
    write_annotation(pruned, _annotation(options, scope, recorded_target, tile_shape, report, eligible, skipped))
    return pruned, report


def _reasons(
    layers: list[Layer], pattern: Pattern, exclude: list[re.Pattern[str]], include_fc: bool, skip: Mapping[str, str]
) -> dict[str, str | None]:
    """Why each layer is not pruned (None: it is)."""
    return {
        layer.weight: skip.get(layer.weight) or _skip_reason(layer, pattern, exclude, include_fc) for layer in layers
    }


@dataclass(frozen=True)
class LayerRanking:
    """One prunable layer's units in the order :func:`prune_counts` prunes them."""

    layer: Layer
    units: Units
    order: np.ndarray  # the prunable units (floor-protected ones excluded), first pruned first
    pattern: Pattern
    tile: TileShape

    def importance(self, measure: str = "layer-share") -> np.ndarray:
        """Importance removed by pruning the first k units, k = 0..len(order). ``layer-share``: the share of
        the layer's weight magnitude they hold (every layer weighs the same); ``magnitude``: their
        magnitude over the layer's mean magnitude, in weights (the global scope's measure: layers with
        few weights weigh less)."""
        if measure not in IMPORTANCE_MEASURES:
            raise UserError(f"unknown importance measure {measure!r}; use one of {', '.join(IMPORTANCE_MEASURES)}")
        total = self.units.l1.sum()
        if total <= 0:
            return np.zeros(self.order.size + 1)
        share = np.concatenate(([0.0], np.cumsum(self.units.l1[self.order]))) / total
        return share * self.units.size.sum() if measure == "magnitude" else share

    def kept_tiles(self, count: int) -> np.ndarray:
        """bool ``[G, OT, IT, P]``: the tiles that hold a nonzero once the first ``count`` units are pruned."""
        pruned = np.zeros(self.units.cost.size, bool)
        pruned[self.order[:count]] = True
        mask = self.pattern.expand(pruned.reshape(self.units.grid), self.tile, canonical_shape(self.layer))
        stored = self.layer.stored
        assert stored is not None
        nonzero = canonical(stored.nonzero(), self.layer) & ~mask
        return tile_sum(nonzero.astype(np.int32), self.tile) > 0


def rank_layers(model: ModelSource, options: PruneOptions, skip: Mapping[str, str] | None = None) -> list[LayerRanking]:
    """The eligible layers of ``model`` (as :func:`prune_counts` with these ``options`` and ``skip`` sees
    them), each with its units ranked; the model is not modified."""
    exclude_rx = options.check()
    tile_shape, chosen_pattern = resolve_tile(options.tile), get_pattern(options.pattern)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    check_finite_weights(loaded.model)
    layers = find_layers(loaded.model)
    reasons = _reasons(layers, chosen_pattern, exclude_rx, options.include_fc, skip or {})
    rankings = []
    for layer in layers:
        if reasons[layer.weight] is None:
            units = _units(layer, chosen_pattern, tile_shape)
            order = prune_order(units, options.layer_floor, options.allow_empty_layers)
            rankings.append(LayerRanking(layer, units, order, chosen_pattern, tile_shape))
    return rankings


def inspect(model: ModelSource, tile: TileShape | str | object | None = None) -> Report:
    """Report a model's prunable layers; the annotation, when present, is validated first.

    The tile shape is the annotation's; ``tile`` sets it for a model without one.
    """
    loaded = load_model(model)
    check_finite_weights(loaded.model)
    annotation = read_annotation(loaded.model)
    layers = find_layers(loaded.model)
    if annotation is None:
        return build_report(layers, annotated_statuses(layers, None), resolve_tile(tile))
    annotated = validate_annotation(loaded.model, annotation)
    return build_report(
        layers,
        annotated_statuses(layers, annotation, annotated),
        annotation.tile,
        annotation.pattern,
        annotation.scope,
        annotation.target_sparsity,
    )
