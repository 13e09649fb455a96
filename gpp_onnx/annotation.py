"""The sparse-tile annotation: a versioned JSON document in the model's ``metadata_props``.

The schema is described in ``docs/annotation.md``. This module writes it, reads it back
into typed objects and validates it against the weights it describes.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from gpp_onnx.errors import UserError
from gpp_onnx.patterns import canonical, canonical_shape, tile_grid, tile_sum
from gpp_onnx.tiles import TileShape
from gpp_onnx.weights import Layer, find_layers

ANNOTATION_KEY = "gpp_onnx.sparse_tiles"
FORMAT_NAME = "gpp-onnx/sparse-tiles"
FORMAT_VERSION = 1
TILE_ORDER = "group, oc_tile, ic_tile, position (row-major); bit 1 = tile kept, 0 = pruned"


class AnnotationError(UserError):
    """The annotation is malformed or does not match the model's weights."""


def encode_bitmap(bits: np.ndarray) -> str:
    """Pack booleans (C order, most significant bit first) and base64-encode them."""
    return base64.b64encode(np.packbits(bits.ravel().astype(bool), bitorder="big").tobytes()).decode("ascii")


def decode_bitmap(text: str, count: int) -> np.ndarray:
    """Inverse of :func:`encode_bitmap`; raises ValueError when the length or padding is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"bitmap is not a base64 string but {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"bitmap is not base64 ({exc})") from None
    if len(raw) != -(-count // 8):
        raise ValueError(f"bitmap holds {len(raw)} bytes, {-(-count // 8)} expected for {count} tiles")
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="big")
    if bits[count:].any():
        raise ValueError("bitmap has bits set past its last tile")
    return bits[:count].astype(bool)


@dataclass
class WeightAnnotation:
    """The kept-tile map of one pruned weight."""

    nodes: list[str]
    weight: str
    shape: tuple[int, ...]
    layout: str
    groups: int
    kernel_positions: int
    kept: np.ndarray  # bool [groups, oc_tiles, ic_tiles, kernel_positions]
    sparsity: float

    @property
    def name(self) -> str:
        """The consuming node names, comma-joined."""
        return ",".join(self.nodes)

    def to_dict(self) -> dict[str, object]:
        """The entry's JSON form (docs/annotation.md)."""
        g, ot, it, p = self.kept.shape
        return {
            "nodes": self.nodes,
            "weight": self.weight,
            "shape": list(self.shape),
            "layout": self.layout,
            "groups": self.groups,
            "kernel_positions": self.kernel_positions,
            "oc_tiles": ot,
            "ic_tiles": it,
            "tiles_total": int(self.kept.size),
            "tiles_kept": int(self.kept.sum()),
            "sparsity": self.sparsity,
            "kept_tiles": encode_bitmap(self.kept),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WeightAnnotation":
        """Read an entry; raises KeyError, TypeError or ValueError when it is malformed."""
        grid = (int(data["groups"]), int(data["oc_tiles"]), int(data["ic_tiles"]), int(data["kernel_positions"]))
        if min(grid) < 1:
            raise ValueError(f"tile grid {grid} has an empty axis")
        kept = decode_bitmap(data["kept_tiles"], int(np.prod(grid))).reshape(grid)
        return cls(
            nodes=[str(n) for n in data["nodes"]],
            weight=str(data["weight"]),
            shape=tuple(int(d) for d in data["shape"]),
            layout=str(data["layout"]),
            groups=grid[0],
            kernel_positions=grid[3],
            kept=kept,
            sparsity=float(data["sparsity"]),
        )


@dataclass
class SkippedLayer:
    """A layer the pruner left dense, and why."""

    nodes: list[str]
    weight: str
    reason: str

    @property
    def name(self) -> str:
        """The consuming node names, comma-joined."""
        return ",".join(self.nodes)


@dataclass
class Annotation:
    """Everything a backend needs to know about which weight tiles are pruned."""

    tool_version: str
    tile: TileShape
    pattern: str
    scope: str
    target_sparsity: float
    achieved_sparsity: float
    weights: list[WeightAnnotation] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)

    def for_weight(self, name: str) -> WeightAnnotation | None:
        """The entry of a weight, or None when the annotation does not list it."""
        return next((w for w in self.weights if w.weight == name), None)

    def to_json(self) -> str:
        """The versioned JSON document stored in the model's metadata."""
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tool_version": self.tool_version,
            "tile": {"block_out": self.tile.block_out, "block_in": self.tile.block_in},
            "tile_order": TILE_ORDER,
            "pattern": self.pattern,
            "scope": self.scope,
            "target_sparsity": self.target_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "weights": [w.to_dict() for w in self.weights],
            "skipped": [{"nodes": s.nodes, "weight": s.weight, "reason": s.reason} for s in self.skipped],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Annotation":
        """Parse the JSON document; AnnotationError (naming the layer where it can) when it is malformed."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"sparse-tile annotation is not JSON ({exc}); re-run gpp-onnx prune") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise AnnotationError(f"metadata entry {ANNOTATION_KEY} is not a {FORMAT_NAME} document")
        if doc.get("version") != FORMAT_VERSION:
            raise AnnotationError(
                f"sparse-tile annotation version {doc.get('version')!r} is not supported "
                f"(this gpp-onnx reads version {FORMAT_VERSION}); upgrade gpp-onnx or re-run gpp-onnx prune"
            )
        if not isinstance(doc.get("weights", []), list) or not isinstance(doc.get("skipped", []), list):
            raise AnnotationError(
                "sparse-tile annotation: 'weights' and 'skipped' must be lists; re-run gpp-onnx prune"
            )
        weights = []
        for entry in doc.get("weights", []):
            try:
                weights.append(WeightAnnotation.from_dict(entry))
            except (KeyError, TypeError, ValueError) as exc:
                where = entry.get("nodes", "?") if isinstance(entry, dict) else "?"
                raise AnnotationError(f"layer {where}: malformed annotation entry ({exc})") from None
        repeated = sorted({w.weight for w in weights if sum(v.weight == w.weight for v in weights) > 1})
        if repeated:
            raise AnnotationError(f"sparse-tile annotation lists weight {repeated[0]!r} twice; re-run gpp-onnx prune")
        try:
            return cls(
                tool_version=str(doc["tool_version"]),
                tile=TileShape(int(doc["tile"]["block_out"]), int(doc["tile"]["block_in"])),
                pattern=str(doc["pattern"]),
                scope=str(doc["scope"]),
                target_sparsity=float(doc["target_sparsity"]),
                achieved_sparsity=float(doc["achieved_sparsity"]),
                weights=weights,
                skipped=[
                    SkippedLayer([str(n) for n in s["nodes"]], str(s["weight"]), str(s["reason"]))
                    for s in doc.get("skipped", [])
                ],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AnnotationError(f"sparse-tile annotation is missing or has a bad field ({exc})") from None


def write_annotation(model: onnx.ModelProto, annotation: Annotation) -> None:
    """Store ``annotation`` in ``model.metadata_props``, replacing an earlier one."""
    kept = [p for p in model.metadata_props if p.key != ANNOTATION_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=ANNOTATION_KEY, value=annotation.to_json())


def read_annotation(model: onnx.ModelProto) -> Annotation | None:
    """The model's annotation as typed objects, or None when it has none (not validated)."""
    entries = [prop.value for prop in model.metadata_props if prop.key == ANNOTATION_KEY]
    if len(entries) > 1:
        raise AnnotationError(f"the model has {len(entries)} metadata entries {ANNOTATION_KEY}; re-run gpp-onnx prune")
    return Annotation.from_json(entries[0]) if entries else None


def nonzero_tiles(layer: Layer, tile: TileShape) -> np.ndarray:
    """Which tiles of a layer's current weights hold a nonzero: bool ``[G, OT, IT, P]``."""
    assert layer.stored is not None
    nonzero = canonical(layer.stored.nonzero(), layer)
    return tile_sum(nonzero.astype(np.int32), tile) > 0


def validate_annotation(model: onnx.ModelProto, annotation: Annotation) -> dict[str, Layer]:
    """Check the annotation against the weights; returns the annotated layers by the annotation's weight
    names (a weight a quantizer stored as integers under a new name is found by its node).

    Raises AnnotationError naming the layer when a weight no longer exists, its shape or
    tile grid changed, or a tile marked pruned holds a nonzero weight.
    """
    stored = [layer for layer in find_layers(model) if layer.stored is not None]
    layers, by_node = {layer.weight: layer for layer in stored}, {layer.name: layer for layer in stored}
    found = {}
    for entry in annotation.weights:
        layer = layers.get(entry.weight) or _quantized_under_new_name(by_node.get(entry.name))
        if layer is None:
            raise AnnotationError(
                f"layer {entry.name}: weight '{entry.weight}' no longer exists in the model; "
                "re-run gpp-onnx prune on the edited model"
            )
        if tuple(layer.shape) != tuple(entry.shape):
            raise AnnotationError(
                f"layer {entry.name}: weight '{entry.weight}' has shape {list(layer.shape)} "
                f"but the annotation records {list(entry.shape)}; re-run gpp-onnx prune"
            )
        grid = tile_grid(canonical_shape(layer), annotation.tile)
        if entry.kept.shape != grid:
            raise AnnotationError(
                f"layer {entry.name}: tile grid {entry.kept.shape} does not match {grid} "
                f"for tile {annotation.tile}; re-run gpp-onnx prune"
            )
        check_pruned_tiles_are_zero(entry.name, nonzero_tiles(layer, annotation.tile), entry.kept)
        found[entry.weight] = layer
    return found


def _quantized_under_new_name(layer: Layer | None) -> Layer | None:
    """The layer of an annotated node whose weight a quantizer renamed (ONNX Runtime's static quantization
    stores ``W`` as integer ``W_quantized`` behind a DequantizeLinear); None for any other layer."""
    return layer if layer is not None and layer.stored.values.dtype.kind in "iu" else None


def check_pruned_tiles_are_zero(layer_name: str, nonzero: np.ndarray, kept: np.ndarray) -> None:
    """Raise AnnotationError naming the layer when a tile marked pruned holds a nonzero weight.

    ``nonzero`` and ``kept`` are bool tile maps of the same shape ``[G, OT, IT, P]``.
    """
    violated = np.argwhere(nonzero & ~kept)
    if violated.size:
        g, ot, it, p = (int(v) for v in violated[0])
        raise AnnotationError(
            f"layer {layer_name}: {len(violated)} tile(s) marked pruned hold nonzero weights "
            f"(first: group {g}, oc_tile {ot}, ic_tile {it}, position {p}); "
            "re-run gpp-onnx prune after changing weights"
        )


@dataclass(frozen=True)
class KeptTiles:
    """A validated annotation as a backend needs it: the tile shape and each pruned weight's kept-tile map."""

    tile: TileShape
    maps: dict[str, np.ndarray]  # weight name -> bool [groups, oc_tiles, ic_tiles, kernel_positions]

    def for_weight(self, weight: str) -> np.ndarray | None:
        """The kept-tile map of a weight, or None when the annotation does not list it (dense)."""
        return self.maps.get(weight)


def read_kept_tiles(model: onnx.ModelProto) -> KeptTiles | None:
    """Read and validate the model's annotation once; None when it has none."""
    annotation = read_annotation(model)
    if annotation is None:
        return None
    layers = validate_annotation(model, annotation)
    return KeptTiles(annotation.tile, {layers[entry.weight].weight: entry.kept for entry in annotation.weights})
