"""Pruning to a simulated VTA latency target instead of a sparsity target.

Each VTA conv's units (the pattern's: tiles, blocks, channels, weights) are taken in the layer's
own ranking, so a layer's choice is how many of them to prune. Its price in cycles comes from
the cycle model: the tiling estimate (:func:`vta_backend.tiling.estimate_cycles`) as a function
of the share of weight tiles the program still issues, computed once per conv shape and mapped
linearly onto the layer's exactly simulated dense and fully pruned programs. Allocations: ``global``
(the default) prunes the shortest prefix of the global scope's ranking (mean magnitude over the
layer's) whose estimated total meets the budget - a global-scope sparsity chosen for the cycles;
``sensitivity``, ``layer-share`` and ``magnitude`` move, greedily, the layer whose next counts remove
the least importance per cycle saved, until the estimated total meets the budget: the loss the layer
alone adds, measured on data (:mod:`gpp_onnx.sensitivity`), or its share of the weight magnitude
(:meth:`gpp_onnx.pruner.LayerRanking.importance`). The pruned model is then compiled
and simulated exactly, and the budget corrected by the ratio of exact to estimated cycles until
the exact figure is within :data:`TOLERANCE` of the target. Convs that stay on the CPU are left
dense (pruning them saves no VTA cycle) and listed with their reason. All figures are simulated.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx

from gpp_onnx.errors import UserError
from gpp_onnx.model_io import LoadedModel, load_model
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.pruner import IMPORTANCE_MEASURES, LayerRanking, PruneOptions, prune_counts, rank_layers
from gpp_onnx.report import Report
from gpp_onnx.sensitivity import Sensitivity, sensitivity_for
from gpp_onnx.weights import find_layers
from vta_backend.config import VTAConfig
from vta_backend.importer import ConvSite
from vta_backend.layer import VtaConv, reference_cycles
from vta_backend.model import conv_sites, placements
from vta_backend.quant import QuantConv
from vta_backend.report import Placement
from vta_backend.tiling import choose_tilings, estimate_cycles, geometry

TOLERANCE = 0.01  # the exact simulated cycles end within 1 % of the target when the tile granularity allows
ROUNDS = 5  # exact compilations that correct the estimate's budget, at most
LEVELS = 48  # unit counts priced per layer (every count in smaller layers)
ALLOCATIONS = ("global", "sensitivity", *IMPORTANCE_MEASURES)  # how the cycles are spread over the layers (module doc)
DEFAULT_ALLOCATION = "global"  # the best that needs no data (docs/results.md)
MEASURED_ALLOCATION = "sensitivity"  # the most accurate on held-out train images; needs data (docs/results.md)
DENSITIES = np.linspace(0.0, 1.0, 41)  # issued-tile shares the estimate is evaluated at, per conv shape


@dataclass(frozen=True)
class LatencyTarget:
    """The goal: a simulated speedup over the dense program, or a number of simulated cycles."""

    speedup: float | None = None
    cycles: int | None = None

    def check(self) -> None:
        """Exactly one goal, and a sensible one (UserError otherwise)."""
        if (self.speedup is None) == (self.cycles is None):
            raise UserError("give either a target speedup or a target cycle count, not both")
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 1.0):
            raise UserError(f"target speedup {self.speedup!r} must be a number above 1, e.g. 1.5")
        if self.cycles is not None and not self.cycles > 0:
            raise UserError(f"target cycles {self.cycles!r} must be a positive number of simulated cycles")

    def cycles_for(self, dense_cycles: int) -> float:
        """The target in simulated cycles for a model whose dense program takes ``dense_cycles``."""
        return float(self.cycles) if self.cycles is not None else dense_cycles / float(self.speedup or 1.0)


@dataclass
class LayerLatency:
    """One VTA conv's part of the plan (simulated cycles per image)."""

    name: str
    weight: str
    dense_cycles: int
    cycles: int
    units_pruned: int
    units_prunable: int

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return dict(self.__dict__)


@dataclass
class LatencyReport:
    """What a latency-target pruning reached, all cycles simulated on ``board``."""

    board: str
    target_cycles: float
    target_speedup: float
    dense_cycles: int
    cycles: int
    amdahl_bound: float  # dense cycles over the cycles with every weight tile pruned
    layers: list[LayerLatency]
    not_on_vta: list[Placement]

    @property
    def speedup(self) -> float:
        """Dense cycles over the pruned model's cycles (``gpp-onnx compile``'s speedup)."""
        return self.dense_cycles / self.cycles if self.cycles else 1.0

    @property
    def on_target(self) -> bool:
        """Whether the cycles are within :data:`TOLERANCE` of the target (else the nearest that the
        units' granularity allowed, faster than asked)."""
        return abs(self.cycles - self.target_cycles) <= TOLERANCE * self.target_cycles

    def to_dict(self) -> dict[str, object]:
        """JSON form; ``simulated`` is always True."""
        return {
            "simulated": True,
            "board": self.board,
            "target_cycles": self.target_cycles,
            "target_speedup": self.target_speedup,
            "dense_cycles": self.dense_cycles,
            "cycles": self.cycles,
            "speedup": self.speedup,
            "on_target": self.on_target,
            "amdahl_bound": self.amdahl_bound,
            "layers": [layer.to_dict() for layer in self.layers],
            "not_on_vta": [{"node": p.node, "reason": p.reason} for p in self.not_on_vta],
        }


@dataclass
class _LayerTable:
    """The unit counts a layer may prune, with the importance each removes and its estimated cycles."""

    ranking: LayerRanking
    site: ConvSite
    dense_cycles: int
    counts: np.ndarray
    importance: np.ndarray
    cycles: np.ndarray
    scores: np.ndarray  # per unit of ranking.order: its mean magnitude over the layer's (the global scope's score)

    def cycles_at(self, count: np.ndarray | int) -> np.ndarray:
        """Estimated cycles with ``count`` units pruned (interpolated between the priced counts)."""
        return np.interp(count, self.counts, self.cycles)


@dataclass
class _Attempt:
    """One allocation, pruned and simulated exactly."""

    counts: dict[str, int]
    model: onnx.ModelProto
    report: Report
    cycles: dict[str, int]  # VTA conv node -> simulated cycles

    @property
    def total(self) -> int:
        """Simulated cycles of the whole model."""
        return sum(self.cycles.values())


def prune_for_latency(
    model: str | onnx.ModelProto | LoadedModel,
    target: LatencyTarget,
    config: VTAConfig,
    options: PruneOptions,
    track: Track = no_progress,
    allocation: str = DEFAULT_ALLOCATION,
    sensitivity: Sensitivity | None = None,
) -> tuple[onnx.ModelProto, Report, LatencyReport]:
    """Prune ``model``'s VTA convs so that its simulated cycles on ``config``'s board meet ``target``;
    ``allocation`` (:data:`ALLOCATIONS`) spreads the pruning over the layers (``sensitivity``: with the
    measured ``sensitivity`` of every prunable layer), ``options`` gives the pattern, exclusions and
    layer floor (the tile is the config's). Returns the pruned model, the pruning report and the
    latency report. UserError when the target lies beyond what pruning every prunable unit reaches."""
    target.check()
    check_allocation(allocation)
    if (allocation == MEASURED_ALLOCATION) != (sensitivity is not None):
        raise UserError(
            "the sensitivity allocation needs the layers' measured sensitivity (give --data), and only it uses one"
        )
    options = replace(options, tile=config)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    sites = conv_sites(loaded.model, config)
    skip = cpu_layers(loaded.model, sites)
    references = {
        site.node: reference_cycles(site.conv, site.in_shape, config)
        for site in track(sites, "dense cycles", len(sites))
        if site.conv is not None and site.in_shape is not None
    }
    tables = _tables(loaded, sites, options, skip, (config, references), (allocation, sensitivity))
    fixed = sum(dense for node, (dense, _) in references.items() if node not in {t.site.node for t in tables})
    dense_cycles = sum(dense for dense, _ in references.values())
    wanted = target.cycles_for(dense_cycles)
    allocate = _allocate_global if allocation == "global" else _allocate
    cheapest = allocate(tables, -np.inf)  # every prunable unit pruned
    attempt = _search(loaded, (tables, allocate, cheapest), options, skip, config, (wanted, fixed))
    if attempt.total > wanted * (1 + TOLERANCE) and attempt.counts == cheapest:
        raise _unreachable(target, dense_cycles, attempt.total, config)
    floor = sum(f for _, f in references.values())
    report = _latency_report(config, (wanted, dense_cycles, floor), sites, tables, attempt)
    return attempt.model, attempt.report, report


def check_allocation(allocation: str) -> None:
    """UserError unless ``allocation`` is one of :data:`ALLOCATIONS`."""
    if allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")


def _search(
    loaded: LoadedModel,
    allocation: tuple[list[_LayerTable], Callable[[list[_LayerTable], float], dict[str, int]], dict[str, int]],
    options: PruneOptions,
    skip: dict[str, str],
    config: VTAConfig,
    goal: tuple[float, int],
) -> _Attempt:
    """Allocate on the estimate, prune, simulate exactly, correct the budget; the attempt nearest the
    target. ``allocation``: the tables, how to allocate on them and the cheapest allocation; ``goal``: the
    wanted cycles of the model and those of its VTA convs that are not pruned."""
    (tables, allocate, cheapest), (wanted, fixed) = allocation, goal
    compiled: dict[tuple, int] = {}

    def attempt_at(budget: float) -> _Attempt:
        counts = allocate(tables, budget - fixed)
        pruned, report = prune_counts(loaded, counts, options, skip)
        return _Attempt(counts, pruned, report, _exact_cycles(pruned, config, compiled))

    budget, best, too_slow = wanted, None, None
    for _ in range(ROUNDS):
        attempt = attempt_at(budget)
        if best is None or _closer(attempt.total, best.total, wanted):
            best = attempt
        if abs(attempt.total - wanted) <= TOLERANCE * wanted or (attempt.total > wanted and attempt.counts == cheapest):
            return best
        too_slow = budget if attempt.total > wanted else too_slow
        budget *= wanted / attempt.total
    assert best is not None
    low = fixed  # the estimate's budget with every prunable unit pruned
    for _ in range(ROUNDS if too_slow is not None and best.total > wanted else 0):  # a step the ratio overshoots
        middle = (low + too_slow) / 2
        attempt = attempt_at(middle)
        best = attempt if _closer(attempt.total, best.total, wanted) else best
        low, too_slow = (low, middle) if attempt.total > wanted else (middle, too_slow)
    return best


def _closer(cycles: int, than: int, wanted: float) -> bool:
    """Whether ``cycles`` serves the target better than ``than``: within the tolerance, nearer; else
    meeting the target (fewer cycles than wanted) before missing it, then nearer."""

    def rank(value: int) -> tuple[bool, float]:
        within = abs(value - wanted) <= TOLERANCE * wanted
        return (not within and value > wanted, abs(value - wanted))

    return rank(cycles) < rank(than)


def _exact_cycles(model: onnx.ModelProto, config: VTAConfig, cache: dict[tuple, int]) -> dict[str, int]:
    """Simulated cycles of every VTA conv of ``model``, compiled as ``gpp-onnx compile`` compiles it;
    ``cache`` keeps them per conv content, so a search recompiles only the convs an attempt changed."""
    cycles = {}
    for site in conv_sites(model, config):
        if site.conv is not None and site.in_shape is not None:
            key = (site.node, site.in_shape, _digest(site.conv))
            if key not in cache:
                cache[key] = VtaConv.compile(site.conv, site.in_shape, config).timing().cycles
            cycles[site.node] = cache[key]
    return cycles


def _digest(conv: QuantConv) -> str:
    """A fingerprint of everything in ``conv`` that its program depends on."""
    digest = hashlib.sha256(repr((conv.stride, conv.pads, conv.dilation, conv.groups, conv.relu)).encode())
    for value in (conv.weight, conv.bias, conv.shift, conv.kept, conv.residual_shift):
        digest.update(b"|" + (b"-" if value is None else np.ascontiguousarray(value).tobytes()))
    return digest.hexdigest()


def cpu_exclusions(model: onnx.ModelProto, config: VTAConfig) -> tuple[str, ...]:
    """``exclude`` patterns for :func:`gpp_onnx.prune` naming the weights of the convs that stay on the
    CPU: at a sparsity target, pruning them would cost accuracy and save no VTA cycle."""
    return tuple(f"^{re.escape(weight)}$" for weight in cpu_layers(model, conv_sites(model, config)))


def cpu_layers(model: onnx.ModelProto, sites: list[ConvSite]) -> dict[str, str]:
    """Weight name -> why its conv stays dense: it does not run on VTA."""
    cpu = {p.node: p.reason or "does not run on VTA" for p in placements(sites) if p.device == "cpu"}
    return {
        layer.weight: f"{cpu[node]}; left dense: pruning it saves no VTA cycle"
        for layer in find_layers(model)
        for node in layer.nodes
        if node in cpu
    }


def _tables(
    loaded: LoadedModel,
    sites: list[ConvSite],
    options: PruneOptions,
    skip: dict[str, str],
    pricing: tuple[VTAConfig, dict[str, tuple[int, int]]],
    allocation: tuple[str, Sensitivity | None],
) -> list[_LayerTable]:
    """A table per VTA conv that ``options`` lets prune; ``pricing``: the config and each VTA conv's
    exactly simulated (dense, every tile pruned) cycles; ``allocation``: its name and sensitivity."""
    config, references = pricing
    by_node = {site.node: site for site in sites if site.conv is not None}
    curves: dict[tuple, np.ndarray] = {}
    tables = []
    for ranking in rank_layers(loaded, options, skip):
        site = next((by_node[n] for n in ranking.layer.nodes if n in by_node), None)
        if site is None or site.conv is None or site.in_shape is None:
            continue
        dense, floor = references[site.node]
        counts = np.unique(np.linspace(0, ranking.order.size, min(LEVELS, ranking.order.size + 1)).round().astype(int))
        shares = np.array([ranking.kept_tiles(int(k)).mean() for k in counts])
        curve = _shape_curve(site, config, curves)
        span = curve[-1] - curve[0]
        relative = (np.interp(shares, DENSITIES, curve) - curve[0]) / span if span > 0 else shares
        cycles = floor + (dense - floor) * relative
        importance = _importance(ranking, counts, *allocation)
        mean = ranking.units.l1.sum() / max(ranking.units.size.sum(), 1)
        scores = ranking.units.score[ranking.order] / mean if mean > 0 else np.zeros(ranking.order.size)
        tables.append(_LayerTable(ranking, site, dense, counts, importance, cycles, scores))
    if not tables:
        raise UserError("no conv that runs on VTA can be pruned; check --pattern and --exclude")
    return tables


def _importance(
    ranking: LayerRanking, counts: np.ndarray, allocation: str, sensitivity: Sensitivity | None
) -> np.ndarray:
    """The importance that pruning the layer's first ``counts`` units removes, as ``allocation`` weighs it."""
    if sensitivity is not None:
        return sensitivity_for(sensitivity, ranking.layer.weight, int(ranking.order.size)).at(counts)
    return ranking.importance("layer-share" if allocation == "global" else allocation)[counts]


def _shape_curve(site: ConvSite, config: VTAConfig, cache: dict[tuple, np.ndarray]) -> np.ndarray:
    """Estimated cycles of the conv at each of :data:`DENSITIES`, best of a few tilings per share;
    computed once per conv shape (the layer's exact end points calibrate it)."""
    conv, in_shape = site.conv, site.in_shape
    assert conv is not None and in_shape is not None
    key = (in_shape, conv.weight.shape, conv.stride, conv.pads, conv.dilation, conv.groups, conv.residual_shift is None)
    if key not in cache:
        g = geometry(conv, (in_shape[0] // conv.groups, *in_shape[1:]), config)
        tilings = {t for share in (1.0, 0.5, 0.2, 0.05) for t in choose_tilings(conv, g, config, share, 2)}
        memo: dict = {}
        cache[key] = np.array([min(estimate_cycles(conv, g, config, t, d, memo) for t in tilings) for d in DENSITIES])
    return cache[key]


def _allocate(tables: list[_LayerTable], budget: float) -> dict[str, int]:
    """Units to prune per weight so that the estimated total meets ``budget``: greedily, the move (one
    layer to a higher count) that removes the least importance per cycle saved, until the budget is
    met; the last move goes only as far as the budget needs. Every layer at its cheapest when the
    budget cannot be met."""
    levels = [0] * len(tables)
    total = float(sum(t.cycles[0] for t in tables))
    while total > budget:
        move = _best_move(tables, levels)
        if move is None:
            break
        i, j = move
        table, current = tables[i], levels[i]
        saved = table.cycles[current] - table.cycles[current + 1 : j + 1]
        enough = np.flatnonzero(total - saved <= budget)
        if enough.size:  # the budget is met within this move: stop at the cheapest count that meets it
            candidates = current + 1 + enough
            j = int(candidates[np.argmin(table.importance[candidates])])
        total -= table.cycles[current] - table.cycles[j]
        levels[i] = j
    return {t.ranking.layer.weight: int(t.counts[level]) for t, level in zip(tables, levels)}


def _allocate_global(tables: list[_LayerTable], budget: float) -> dict[str, int]:
    """Units to prune per weight as the global scope ranks them (one ranking of every layer's units by
    mean magnitude over the layer's, ties by position), the shortest prefix of that ranking whose
    estimated total meets ``budget``: a global-scope sparsity chosen for the cycles. Every unit
    when the budget cannot be met."""
    layer = np.concatenate([np.full(t.scores.size, i) for i, t in enumerate(tables)])
    rank = np.concatenate([np.arange(t.scores.size) for t in tables])
    scores = np.concatenate([t.scores for t in tables])
    order = np.lexsort((rank, layer, scores))
    saved = np.empty(order.size)  # cycles saved by each unit of the ranking, in ranking order
    for i, table in enumerate(tables):
        mine = layer[order] == i
        steps = rank[order][mine]
        saved[mine] = table.cycles_at(steps) - table.cycles_at(steps + 1)
    totals = sum(t.cycles[0] for t in tables) - np.concatenate(([0.0], np.cumsum(saved)))
    meeting = np.flatnonzero(totals <= budget)
    prefix = int(meeting[0]) if meeting.size else order.size
    counts = np.bincount(layer[order[:prefix]], minlength=len(tables))
    return {t.ranking.layer.weight: int(c) for t, c in zip(tables, counts)}


def _best_move(tables: list[_LayerTable], levels: list[int]) -> tuple[int, int] | None:
    """(layer, level) of the move with the least importance removed per estimated cycle saved."""
    best: tuple[float, int, int] | None = None
    for i, (table, current) in enumerate(zip(tables, levels)):
        saved = table.cycles[current] - table.cycles[current + 1 :]
        if not (saved > 0).any():
            continue
        lost = table.importance[current + 1 :] - table.importance[current]
        ratio = np.where(saved > 0, lost / np.where(saved > 0, saved, 1.0), np.inf)
        j = int(np.argmin(ratio))
        if best is None or ratio[j] < best[0]:
            best = (float(ratio[j]), i, current + 1 + j)
    return None if best is None else best[1:]


def _unreachable(target: LatencyTarget, dense_cycles: int, cycles: int, config: VTAConfig) -> UserError:
    asked = f"{target.speedup:g}x" if target.speedup is not None else f"{target.cycles:,} cycles"
    return UserError(
        f"target {asked} is beyond reach on {config.BOARD}: pruning every prunable unit (each layer keeping its "
        f"floor and its best unit) gives {cycles:,} simulated cycles, {dense_cycles / cycles:.2f}x the dense "
        f"{dense_cycles:,}; ask for at most that, or lower --layer-floor (0 with --allow-empty-layers empties layers)"
    )


def _latency_report(
    config: VTAConfig,
    totals: tuple[float, int, int],
    sites: list[ConvSite],
    tables: list[_LayerTable],
    attempt: _Attempt,
) -> LatencyReport:
    """The report of ``attempt``; ``totals``: the wanted, dense and every-tile-pruned cycles."""
    wanted, dense_cycles, floor = totals
    layers = [
        LayerLatency(
            t.site.node,
            t.ranking.layer.weight,
            t.dense_cycles,
            attempt.cycles[t.site.node],
            attempt.counts[t.ranking.layer.weight],
            int(t.ranking.order.size),
        )
        for t in tables
    ]
    not_on_vta = [p for p in placements(sites) if p.device == "cpu"]
    return LatencyReport(
        config.BOARD,
        wanted,
        dense_cycles / wanted,
        dense_cycles,
        attempt.total,
        dense_cycles / floor if floor else 1.0,
        layers,
        not_on_vta,
    )
