"""Per-layer pruning report, measured from the weights themselves (prune and inspect share it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpp_onnx.annotation import Annotation, nonzero_tiles
from gpp_onnx.tiles import TileShape
from gpp_onnx.weights import Layer


@dataclass
class LayerReport:
    """One conv / FC layer: its status, zeros and tiles, measured from its current weights."""

    name: str
    weight: str
    op_type: str
    shape: list[int]
    layout: str
    pattern: str | None
    status: str  # "pruned", "skipped" or "dense"
    reason: str | None
    params: int
    zeros: int
    tiles_total: int
    tiles_kept: int
    kept: np.ndarray | None = field(default=None, repr=False)  # bool [G, OT, IT, P]

    @property
    def sparsity(self) -> float:
        """Fraction of the layer's weights that are zero."""
        return self.zeros / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON form (``inspect --json``'s ``layers`` entries)."""
        return {
            "name": self.name,
            "weight": self.weight,
            "op_type": self.op_type,
            "shape": self.shape,
            "layout": self.layout,
            "pattern": self.pattern,
            "status": self.status,
            "reason": self.reason,
            "params": self.params,
            "sparsity": self.sparsity,
            "tiles_total": self.tiles_total,
            "tiles_kept": self.tiles_kept,
        }


TARGET_TOLERANCE = 0.005  # achieved sparsity this close to the target counts as meeting it


@dataclass
class Report:
    """The per-layer report of ``prune`` and ``inspect``."""

    tile: TileShape
    pattern: str | None
    scope: str | None
    target_sparsity: float | None
    layers: list[LayerReport]

    @property
    def measured(self) -> list[LayerReport]:
        """The layers the overall sparsity is counted over: the pruned ones, else the dense ones."""
        pruned = [r for r in self.layers if r.status == "pruned"]
        return pruned or [r for r in self.layers if r.status == "dense"]

    @property
    def sparsity(self) -> float:
        """Zero fraction over the measured layers' weights."""
        params = sum(r.params for r in self.measured)
        return sum(r.zeros for r in self.measured) / params if params else 0.0

    @property
    def shortfall(self) -> float:
        """How far the achieved sparsity stays below the target (0 when within TARGET_TOLERANCE)."""
        if self.target_sparsity is None or self.sparsity >= self.target_sparsity - TARGET_TOLERANCE:
            return 0.0
        return self.target_sparsity - self.sparsity

    @property
    def short_layers(self) -> list[LayerReport]:
        """With layer scope, the pruned layers that stay more than TARGET_TOLERANCE below the target
        (a layer stops at whole units and keeps its best one)."""
        if self.scope != "layer" or self.target_sparsity is None:
            return []
        limit = self.target_sparsity - TARGET_TOLERANCE
        return [r for r in self.layers if r.status == "pruned" and r.sparsity < limit]

    def to_dict(self) -> dict[str, object]:
        """JSON form (the ``prune --json`` / ``inspect --json`` document)."""
        return {
            "tile": str(self.tile),
            "pattern": self.pattern,
            "scope": self.scope,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "shortfall": self.shortfall,
            "layers_short_of_target": [r.name for r in self.short_layers],
            "params": sum(r.params for r in self.measured),
            "zeros": sum(r.zeros for r in self.measured),
            "layers": [r.to_dict() for r in self.layers],
        }


def measure_layer(layer: Layer, tile: TileShape, status: str, pattern: str | None, reason: str | None) -> LayerReport:
    """Count zeros and kept tiles of a layer's current weights."""
    params = zeros = tiles_total = tiles_kept = 0
    kept = None
    if layer.stored is not None:
        kept = nonzero_tiles(layer, tile)
        params = int(layer.stored.values.size)
        zeros = params - int(np.count_nonzero(layer.stored.nonzero()))
        tiles_total, tiles_kept = int(kept.size), int(kept.sum())
    return LayerReport(
        name=layer.name,
        weight=layer.weight,
        op_type=layer.op_type,
        shape=list(layer.shape),
        layout=layer.layout,
        pattern=pattern,
        status=status,
        reason=reason,
        params=params,
        zeros=zeros,
        tiles_total=tiles_total,
        tiles_kept=tiles_kept,
        kept=kept,
    )


Status = tuple[str, str | None]  # ("pruned" | "skipped" | "dense", reason)


def annotated_statuses(
    layers: list[Layer], annotation: Annotation | None, annotated: dict[str, Layer] | None = None
) -> dict[str, Status]:
    """Each layer's status as a model's annotation (or its absence) says; ``annotated`` is what
    ``validate_annotation`` returned. A layer whose weight a quantizer renamed is matched by its nodes."""
    pruned = {layer.weight for layer in (annotated or {}).values()}
    skipped = {}
    for entry in annotation.skipped if annotation else []:
        skipped[entry.weight] = skipped[entry.name] = entry.reason
    statuses: dict[str, Status] = {}
    for layer in layers:
        reason = skipped.get(layer.weight, skipped.get(layer.name))
        if layer.weight in pruned:
            statuses[layer.weight] = ("pruned", None)
        elif reason is not None:
            statuses[layer.weight] = ("skipped", reason)
        elif layer.skip_reason is not None:
            statuses[layer.weight] = ("skipped", layer.skip_reason)
        else:
            statuses[layer.weight] = ("dense", "not in the sparse-tile annotation" if annotation else None)
    return statuses


def build_report(
    layers: list[Layer],
    statuses: dict[str, Status],
    tile: TileShape,
    pattern: str | None = None,
    scope: str | None = None,
    target_sparsity: float | None = None,
) -> Report:
    """Measure every layer; ``pattern`` is reported on the pruned ones."""
    rows = []
    for layer in layers:
        status, reason = statuses[layer.weight]
        rows.append(measure_layer(layer, tile, status, pattern if status == "pruned" else None, reason))
    return Report(tile, pattern, scope, target_sparsity, rows)
