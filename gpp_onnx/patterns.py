"""Pruning patterns: how a weight is cut into units, how units are scored, and tile maps.

Every weight is first viewed in the canonical shape ``[G, OCg, ICg, P]``: conv group,
output channel within the group, input channel within the group, kernel position
(the flattened N-d kernel; 1 for fully connected layers). The patterns cut that view:

* ``group``   - one BLOCK_OUT x BLOCK_IN tile at one kernel position (the paper's unit);
* ``block``   - one BLOCK_OUT x BLOCK_IN channel tile across all kernel positions;
* ``channel`` - one output filter;
* ``element`` - one weight.

A unit's score is its L1 norm divided by the number of real weights in it (its mean
magnitude). For full tiles this ranks exactly like the paper's L1 norm; for the partial
edge tiles of channel counts that are not a multiple of the tile it does not favour
the small tiles just because they hold fewer weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpp_onnx.tiles import TileShape
from gpp_onnx.weights import Layer

PATTERNS = ("group", "block", "channel", "element")
TILE_PATTERNS = ("group", "block")


def canonical(values: np.ndarray, layer: Layer) -> np.ndarray:
    """View a weight-shaped array as ``[G, OCg, ICg, P]``."""
    g = layer.groups
    if layer.is_fc:
        matrix = values if layer.layout == "OI" else values.T
        return matrix.reshape(1, matrix.shape[0], matrix.shape[1], 1)
    first, second = layer.shape[0] // g, layer.shape[1]
    view = values.reshape(g, first, second, layer.positions)
    return view.transpose(0, 2, 1, 3) if layer.in_major else view


def from_canonical(canon: np.ndarray, layer: Layer) -> np.ndarray:
    """Inverse of :func:`canonical`."""
    if layer.is_fc:
        matrix = canon.reshape(canon.shape[1], canon.shape[2])
        return matrix if layer.layout == "OI" else matrix.T
    view = canon.transpose(0, 2, 1, 3) if layer.in_major else canon
    return np.ascontiguousarray(view).reshape(layer.shape)


def canonical_shape(layer: Layer) -> tuple[int, int, int, int]:
    """``(G, OCg, ICg, P)`` of a layer's canonical view."""
    if layer.is_fc:
        o, i = layer.shape if layer.layout == "OI" else layer.shape[::-1]
        return 1, o, i, 1
    g = layer.groups
    oc_per_group = layer.shape[1] if layer.in_major else layer.shape[0] // g
    return g, oc_per_group, layer.in_channels_per_group, layer.positions


def tile_grid(canon_shape: tuple[int, ...], tile: TileShape) -> tuple[int, int, int, int]:
    """``(G, oc_tiles, ic_tiles, P)`` of the tile map of a canonical weight."""
    g, o, i, p = canon_shape
    return g, -(-o // tile.block_out), -(-i // tile.block_in), p


def tile_sum(canon: np.ndarray, tile: TileShape) -> np.ndarray:
    """Sum a canonical array over each tile: ``[G, OT, IT, P]`` (edge tiles partial)."""
    o_starts = np.arange(0, canon.shape[1], tile.block_out)
    i_starts = np.arange(0, canon.shape[2], tile.block_in)
    return np.add.reduceat(np.add.reduceat(canon, o_starts, axis=1), i_starts, axis=2)


def _edge_sizes(length: int, block: int) -> np.ndarray:
    """How many real rows each tile along an axis of ``length`` holds."""
    starts = np.arange(0, length, block)
    return np.minimum(block, length - starts)


def tile_real_counts(canon_shape: tuple[int, ...], tile: TileShape) -> np.ndarray:
    """Real (unpadded) weights per tile at one position: ``[OT, IT]``."""
    return np.outer(_edge_sizes(canon_shape[1], tile.block_out), _edge_sizes(canon_shape[2], tile.block_in))


@dataclass
class Units:
    """Flat per-unit arrays of one layer for one pattern."""

    grid: tuple[int, ...]  # shape of the unit map
    l1: np.ndarray  # sum of magnitudes
    size: np.ndarray  # real weights in the unit
    cost: np.ndarray  # weights in the unit that are not zero yet (what pruning it removes)

    @property
    def score(self) -> np.ndarray:
        return self.l1 / self.size


def make_units(magnitude: np.ndarray, nonzero: np.ndarray, pattern: str, tile: TileShape) -> Units:
    """Score the units of a layer for ``pattern`` from its canonical magnitudes and nonzero map."""
    if pattern == "element":
        return Units(magnitude.shape, magnitude.ravel(), np.ones(magnitude.size, np.int64), nonzero.ravel())
    if pattern == "channel":
        l1 = magnitude.sum(axis=(2, 3), dtype=np.float64)
        size = np.full(l1.shape, magnitude.shape[2] * magnitude.shape[3], np.int64)
        return Units(l1.shape, l1.ravel(), size.ravel(), nonzero.sum(axis=(2, 3)).ravel())
    l1 = tile_sum(magnitude.astype(np.float64, copy=False), tile)
    cost = tile_sum(nonzero.astype(np.int32), tile)
    size = np.broadcast_to(tile_real_counts(magnitude.shape, tile)[None, :, :, None], l1.shape)
    if pattern == "block":
        l1, cost, size = l1.sum(axis=3), cost.sum(axis=3), size.sum(axis=3)
    return Units(l1.shape, l1.ravel(), np.ascontiguousarray(size).ravel(), cost.ravel())


def expand(pruned: np.ndarray, pattern: str, tile: TileShape, canon_shape: tuple[int, ...]) -> np.ndarray:
    """Turn a boolean unit map into a boolean mask of pruned weights, canonical shape."""
    g, o, i, p = canon_shape
    if pattern == "element":
        return pruned.reshape(canon_shape)
    if pattern == "channel":
        return np.broadcast_to(pruned.reshape(g, o, 1, 1), canon_shape)
    tiles = pruned.reshape(tile_grid(canon_shape, tile)[:3] + ((p,) if pattern == "group" else (1,)))
    full = tiles.repeat(tile.block_out, axis=1)[:, :o].repeat(tile.block_in, axis=2)[:, :, :i]
    return np.broadcast_to(full, canon_shape)


def tile_pattern_skip_reason(layer: Layer) -> str | None:
    """Why a tile pattern cannot apply to a layer: a depthwise conv has one input channel per group."""
    if layer.groups > 1 and layer.in_channels_per_group == 1:
        return "depthwise conv: one input channel per group cannot hold a tile; use --pattern channel or element"
    return None
