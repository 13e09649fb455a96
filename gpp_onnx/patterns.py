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

Each pattern is a small class registered with :func:`register_pattern`; adding a pattern
touches this file only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpp_onnx.errors import UserError
from gpp_onnx.tiles import TileShape
from gpp_onnx.weights import Layer


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
        """Mean magnitude of each unit."""
        return self.l1 / self.size


class Pattern:
    """A pruning pattern: how a layer's canonical weight is cut into units and expanded back.

    Subclasses set ``name`` and implement :meth:`units` and :meth:`expand`; decorating one
    with :func:`register_pattern` makes it available everywhere (CLI, sweep, annotation).
    """

    name: str = ""

    def units(self, magnitude: np.ndarray, nonzero: np.ndarray, tile: TileShape) -> Units:
        """Score the layer's units from its canonical magnitudes and nonzero map."""
        raise NotImplementedError

    def expand(self, pruned: np.ndarray, tile: TileShape, canon_shape: tuple[int, ...]) -> np.ndarray:
        """Turn a boolean unit map into a boolean mask of pruned weights, canonical shape."""
        raise NotImplementedError

    def skip_reason(self, layer: Layer) -> str | None:
        """Why this pattern cannot apply to a layer, or None."""
        return None


_REGISTRY: dict[str, Pattern] = {}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: add a pattern to the registry under its ``name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def pattern_names() -> tuple[str, ...]:
    """The registered patterns, in registration order."""
    return tuple(_REGISTRY)


def get_pattern(name: str) -> Pattern:
    """The registered pattern called ``name``; a UserError listing the others otherwise."""
    if name not in _REGISTRY:
        raise UserError(f"unknown pattern {name!r}; use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


class _TilePattern(Pattern):
    """Shared by the patterns whose units are BLOCK_OUT x BLOCK_IN weight tiles."""

    per_position = True  # a unit is a tile at one kernel position (False: across all positions)

    def units(self, magnitude: np.ndarray, nonzero: np.ndarray, tile: TileShape) -> Units:
        l1 = tile_sum(magnitude.astype(np.float64, copy=False), tile)
        cost = tile_sum(nonzero.astype(np.int32), tile)
        size = np.broadcast_to(tile_real_counts(magnitude.shape, tile)[None, :, :, None], l1.shape)
        if not self.per_position:
            l1, cost, size = l1.sum(axis=3), cost.sum(axis=3), size.sum(axis=3)
        return Units(l1.shape, l1.ravel(), np.ascontiguousarray(size).ravel(), cost.ravel())

    def expand(self, pruned: np.ndarray, tile: TileShape, canon_shape: tuple[int, ...]) -> np.ndarray:
        g, o, i, p = canon_shape
        tiles = pruned.reshape(tile_grid(canon_shape, tile)[:3] + ((p,) if self.per_position else (1,)))
        full = tiles.repeat(tile.block_out, axis=1)[:, :o].repeat(tile.block_in, axis=2)[:, :, :i]
        return np.broadcast_to(full, canon_shape)

    def skip_reason(self, layer: Layer) -> str | None:
        if layer.groups > 1 and layer.in_channels_per_group == 1:
            return "depthwise conv: one input channel per group cannot hold a tile; use --pattern channel or element"
        return None


@register_pattern
class GroupPattern(_TilePattern):
    """One tile at one kernel position (the paper's group pattern)."""

    name = "group"


@register_pattern
class BlockPattern(_TilePattern):
    """One channel tile across all kernel positions (the block-wise baseline)."""

    name = "block"
    per_position = False


@register_pattern
class ChannelPattern(Pattern):
    """One whole output filter."""

    name = "channel"

    def units(self, magnitude: np.ndarray, nonzero: np.ndarray, tile: TileShape) -> Units:
        l1 = magnitude.sum(axis=(2, 3), dtype=np.float64)
        size = np.full(l1.shape, magnitude.shape[2] * magnitude.shape[3], np.int64)
        return Units(l1.shape, l1.ravel(), size.ravel(), nonzero.sum(axis=(2, 3)).ravel())

    def expand(self, pruned: np.ndarray, tile: TileShape, canon_shape: tuple[int, ...]) -> np.ndarray:
        g, o, _, _ = canon_shape
        return np.broadcast_to(pruned.reshape(g, o, 1, 1), canon_shape)


@register_pattern
class ElementPattern(Pattern):
    """One weight (unstructured magnitude pruning)."""

    name = "element"

    def units(self, magnitude: np.ndarray, nonzero: np.ndarray, tile: TileShape) -> Units:
        return Units(magnitude.shape, magnitude.ravel(), np.ones(magnitude.size, np.int64), nonzero.ravel())

    def expand(self, pruned: np.ndarray, tile: TileShape, canon_shape: tuple[int, ...]) -> np.ndarray:
        return pruned.reshape(canon_shape)
