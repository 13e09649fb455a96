"""Choosing which units to prune so that the achieved sparsity meets the target.

Sparsity counts zeros: pruning a unit costs the weights in it that are not zero yet,
so weights that already are zero count toward the target and all-zero units are
always marked pruned (for free).

* ``layer`` scope: each layer aims at the target on its own. A layer can only stop at
  unit boundaries, so each layer first takes the largest prefix of its ranking that
  stays at or under its share; then the layers whose next unit comes closest to their
  share are rounded up (largest remainder first) for as long as that brings the
  overall count nearer the overall target.
* ``global`` scope: one ranking over all layers. A unit's score is its mean magnitude
  divided by the mean magnitude of its layer, so layers of different scale (and
  quantized and float layers) compare; the lowest-scoring prefix whose cost comes
  closest to the target is pruned.

A *layer floor* ``f`` (both scopes) protects the ``ceil(f * units)`` highest-scoring units
of every layer (of every group of a grouped conv), and unless empty layers are allowed at least
its best unit, so that no layer or group is emptied however high the target (an emptied layer
ignores its input); the achieved sparsity then stays below the target where the floor forbids more.

* explicit counts (:func:`select_counts`): the caller says how many units of each layer to prune,
  in the layer's own ranking (a latency target's allocation, which prices units in cycles).

Ties are broken by position (layer order, then unit order), so results are deterministic.
"""

from __future__ import annotations

import numpy as np

from gpp_onnx.patterns import Units

SCOPES = ("layer", "global")


def _prefix(costs_in_order: np.ndarray) -> np.ndarray:
    """Cumulative cost of pruning the first k units (k = 0..n)."""
    return np.concatenate(([0], np.cumsum(costs_in_order, dtype=np.int64)))


def _free_count(costs_in_order: np.ndarray) -> int:
    """How many leading units cost nothing (are already all zero)."""
    nonfree = np.flatnonzero(costs_in_order)
    return int(nonfree[0]) if nonfree.size else len(costs_in_order)


def _zeros_to_gain(sizes: np.ndarray, costs: np.ndarray, sparsity: float) -> float:
    total = int(sizes.sum())
    return sparsity * total - (total - int(costs.sum()))


def _mask(order: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(order.size, bool)
    mask[order[:k]] = True
    return mask


def protected_scores(units: Units, floor: float, allow_empty: bool = False) -> np.ndarray:
    """The unit scores with each conv group's ``ceil(floor * units)`` best units - at least one unless
    ``allow_empty`` - raised to +inf (never pruned); units that are already all zero are never
    protected (they cost nothing and VTA skips them). A group of a grouped conv is a conv of its
    own: emptying one silences its output channels. Where every group is a single unit (a depthwise
    conv under the channel pattern: the unit is the group) the layer as a whole keeps its best."""
    groups = units.grid[0] if units.grid and units.cost.size > units.grid[0] else 1
    score = units.score.astype(np.float64, copy=True).reshape(groups, -1)
    cost = units.cost.reshape(groups, -1)
    keep = max(int(np.ceil(floor * score.shape[1] - 1e-9)) if floor > 0 else 0, 0 if allow_empty else 1)
    if keep:
        best = np.argsort(-score, axis=1, kind="stable")[:, :keep]
        rows = np.repeat(np.arange(groups), best.shape[1])
        columns = best.reshape(-1)
        costly = cost[rows, columns] > 0
        score[rows[costly], columns[costly]] = np.inf
    return score.reshape(-1)


def _prunable(scores: np.ndarray) -> int:
    return int(np.isfinite(scores).sum())


def prune_order(units: Units, floor: float = 0.0, allow_empty: bool = False) -> np.ndarray:
    """The indices of a layer's prunable units (floor-protected ones excluded), lowest score first:
    already all-zero units lead (they cost nothing)."""
    scores = protected_scores(units, floor, allow_empty)
    return np.argsort(scores, kind="stable")[: _prunable(scores)]


def select_counts(
    layers: list[Units], counts: list[int], floor: float = 0.0, allow_empty: bool = False
) -> list[np.ndarray]:
    """Pruned-unit masks that prune the ``counts[i]`` first units of layer i's :func:`prune_order` (at
    least its all-zero units, at most its prunable ones): the allocation of a latency target."""
    masks = []
    for units, count in zip(layers, counts):
        order = prune_order(units, floor, allow_empty)
        k = min(max(count, _free_count(units.cost[order])), order.size)
        mask = np.zeros(units.cost.size, bool)
        mask[order[:k]] = True
        masks.append(mask)
    return masks


def select_per_layer(
    layers: list[Units], sparsity: float, floor: float = 0.0, allow_empty: bool = False
) -> list[np.ndarray]:
    """Pruned-unit masks, one per layer, each layer near ``sparsity`` and the total nearest."""
    scores = [protected_scores(u, floor, allow_empty) for u in layers]
    orders = [np.argsort(s, kind="stable") for s in scores]
    prefixes = [_prefix(u.cost[o])[: _prunable(s) + 1] for u, o, s in zip(layers, orders, scores)]
    needs = [_zeros_to_gain(u.size, u.cost, sparsity) for u in layers]
    counts = [
        min(max(int(np.searchsorted(cum, need, side="right")) - 1, _free_count(u.cost[o])), len(cum) - 1)
        for u, o, cum, need in zip(layers, orders, prefixes, needs)
    ]
    deficit = sum(needs) - sum(int(cum[k]) for cum, k in zip(prefixes, counts))
    candidates = []
    for li, (cum, k, need) in enumerate(zip(prefixes, counts, needs)):
        if k + 1 < len(cum):
            step = int(cum[k + 1] - cum[k])
            candidates.append((-(need - cum[k]) / step if step else 0.0, li, step))
    for _, li, step in sorted(candidates):
        if abs(deficit - step) < abs(deficit):
            counts[li] += 1
            deficit -= step
    return [_mask(o, k) for o, k in zip(orders, counts)]


def select_global(
    layers: list[Units], sparsity: float, floor: float = 0.0, allow_empty: bool = False
) -> list[np.ndarray]:
    """Pruned-unit masks from one ranking across layers of layer-normalised scores."""
    scores = []
    for u in layers:
        protected, layer_mean = protected_scores(u, floor, allow_empty), u.l1.sum() / u.size.sum()
        scores.append(protected / layer_mean if layer_mean > 0 else np.where(np.isinf(protected), np.inf, 0.0))
    costs = np.concatenate([u.cost for u in layers])
    sizes = np.concatenate([u.size for u in layers])
    all_scores = np.concatenate(scores)
    order = np.argsort(all_scores, kind="stable")
    cum = _prefix(costs[order])[: _prunable(all_scores) + 1]
    target = _zeros_to_gain(sizes, costs, sparsity)
    k = min(max(int(np.argmin(np.abs(cum - target))), _free_count(costs[order])), len(cum) - 1)
    chosen = _mask(order, k)
    bounds = np.cumsum([0] + [u.cost.size for u in layers])
    return [chosen[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
