"""Pruning to a simulated VTA latency target (vta_backend.latency)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers import tiny_cnn, weight

import gpp_onnx
from gpp_onnx import UserError
from gpp_onnx.pruner import PruneOptions, rank_layers
from gpp_onnx.sensitivity import LayerSensitivity
from vta_backend import VTAConfig
from vta_backend.latency import LatencyTarget, prune_for_latency
from vta_backend.model import compile_model

CONFIG = VTAConfig()


@pytest.mark.parametrize("speedup", [1.3, 1.6])
def test_speedup_target_is_met_and_compile_reports_the_same(speedup):
    model = tiny_cnn()
    pruned, report, latency = prune_for_latency(model, LatencyTarget(speedup=speedup), CONFIG, PruneOptions())
    assert latency.speedup == pytest.approx(speedup, rel=0.02)
    compiled = compile_model(pruned, CONFIG).report()  # what `gpp-onnx compile` says of the written model
    assert compiled.cycles == latency.cycles
    assert compiled.speedup == pytest.approx(latency.speedup, rel=0.005)
    statuses = {row.name: (row.status, row.reason) for row in report.layers}
    assert statuses["conv0"][0] == "skipped" and "stays on the CPU" in statuses["conv0"][1]
    assert [p.node for p in latency.not_on_vta] == ["conv0"]
    assert gpp_onnx.inspect(pruned).pattern == "group"  # the annotation is valid for the pruned weights


def test_cycle_target_and_the_layers_table():
    model = tiny_cnn()
    dense = compile_model(model, CONFIG).report().dense_cycles
    _, _, latency = prune_for_latency(model, LatencyTarget(cycles=int(dense * 0.7)), CONFIG, PruneOptions())
    assert latency.cycles == pytest.approx(dense * 0.7, rel=0.02)
    assert sum(layer.cycles for layer in latency.layers) == latency.cycles
    assert all(0 <= layer.units_pruned <= layer.units_prunable for layer in latency.layers)
    assert any(layer.units_pruned for layer in latency.layers)


def test_the_global_allocation_is_the_global_scope_at_the_sparsity_that_meets_the_target():
    model = tiny_cnn()
    options = PruneOptions(0.6, "group", "global")
    _, _, latency = prune_for_latency(model, LatencyTarget(speedup=1.4), CONFIG, options)
    by_latency, report, _ = prune_for_latency(model, LatencyTarget(speedup=1.4), CONFIG, options)
    by_scope, _ = gpp_onnx.prune(model, report.sparsity, "group", "global")
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(weight(by_latency, name), weight(by_scope, name))
    assert latency.speedup == pytest.approx(1.4, rel=0.02)


def test_the_cycle_priced_allocation_removes_less_of_its_importance_than_the_global_scope_at_the_same_speed():
    model = tiny_cnn()
    options = PruneOptions(0.6, "group", "global")
    by_sparsity, _ = gpp_onnx.prune(model, **options.arguments())
    speedup = compile_model(by_sparsity, CONFIG).report().speedup
    target = LatencyTarget(speedup=speedup)
    by_latency, _, latency = prune_for_latency(model, target, CONFIG, options, allocation="layer-share")
    assert latency.speedup >= speedup * 0.99

    def removed(pruned) -> float:  # share of each VTA conv's weight magnitude pruned, summed over the convs
        kept = {r.layer.weight: r.units for r in rank_layers(pruned, PruneOptions(tile=CONFIG))}
        original = {r.layer.weight: r.units for r in rank_layers(model, PruneOptions(tile=CONFIG))}
        return sum(1 - kept[w].l1.sum() / original[w].l1.sum() for w in ("w1", "w2"))

    assert removed(by_latency) < removed(by_sparsity)


def test_a_target_beyond_reach_names_the_bound():
    with pytest.raises(UserError, match=r"beyond reach on pynq.*x the dense"):
        prune_for_latency(tiny_cnn(), LatencyTarget(speedup=50.0), CONFIG, PruneOptions())


@pytest.mark.parametrize(
    "target", [LatencyTarget(), LatencyTarget(1.5, 1000), LatencyTarget(speedup=0.9), LatencyTarget(cycles=0)]
)
def test_a_bad_target_is_refused(target):
    with pytest.raises(UserError, match="target"):
        prune_for_latency(tiny_cnn(), target, CONFIG, PruneOptions())


@pytest.mark.parametrize("allocation", ["global", "layer-share", "magnitude"])
@pytest.mark.parametrize("pattern", ["block", "channel", "element"])
def test_every_pattern_meets_the_target_or_names_its_bound(pattern, allocation):
    """tiny_cnn's convs hold 2 and 4 blocks: where no allocation lands within 1 %, the nearest faster one."""
    options = PruneOptions(pattern=pattern)
    try:
        target = LatencyTarget(speedup=1.15)
        _, report, latency = prune_for_latency(tiny_cnn(), target, CONFIG, options, allocation=allocation)
    except UserError as exc:
        assert "beyond reach" in str(exc)
        return
    assert report.pattern == pattern and latency.speedup >= 1.15 * 0.99
    assert latency.on_target == (latency.speedup == pytest.approx(1.15, rel=0.01))


def test_latency_pruning_does_not_modify_its_input():
    model = tiny_cnn()
    before = model.SerializeToString()
    prune_for_latency(model, LatencyTarget(speedup=1.3), CONFIG, PruneOptions())
    assert model.SerializeToString() == before
    assert np.isfinite(compile_model(model, CONFIG).report().cycles)


def _sensitivity(options: PruneOptions, losses: dict[str, float]) -> dict[str, LayerSensitivity]:
    """A sensitivity in which pruning all of a layer's units adds ``losses[weight]``, linearly."""
    rankings = rank_layers(tiny_cnn(), replace(options, tile=CONFIG), {"w0": "on the CPU"})
    return {
        r.layer.weight: LayerSensitivity(np.array([0, r.order.size]), np.array([0.0, losses[r.layer.weight]]))
        for r in rankings
    }


def test_the_sensitivity_allocation_spares_the_layer_whose_pruning_costs_most_loss():
    options = PruneOptions(pattern="group")
    target = LatencyTarget(speedup=1.2)
    pruned = {}
    for fragile in ("w1", "w2"):
        sensitivity = _sensitivity(options, {"w1": 1.0, "w2": 1.0} | {fragile: 100.0})
        _, _, latency = prune_for_latency(
            tiny_cnn(), target, CONFIG, options, allocation="sensitivity", sensitivity=sensitivity
        )
        assert latency.speedup == pytest.approx(1.2, rel=0.02)
        pruned[fragile] = {layer.weight: layer.units_pruned for layer in latency.layers}
    assert pruned["w1"]["w1"] < pruned["w2"]["w1"] and pruned["w2"]["w2"] < pruned["w1"]["w2"]


def test_the_sensitivity_allocation_needs_a_sensitivity_of_the_same_layers():
    options = PruneOptions(pattern="group")
    target = LatencyTarget(speedup=1.2)
    with pytest.raises(UserError, match="needs the layers' measured sensitivity"):
        prune_for_latency(tiny_cnn(), target, CONFIG, options, allocation="sensitivity")
    measured = _sensitivity(options, {"w1": 1.0, "w2": 1.0})
    with pytest.raises(UserError, match="only it uses one"):
        prune_for_latency(tiny_cnn(), target, CONFIG, options, sensitivity=measured)
    with pytest.raises(UserError, match="measure it on this model with the same --pattern"):
        other = _sensitivity(PruneOptions(pattern="block"), {"w1": 1.0, "w2": 1.0})
        prune_for_latency(tiny_cnn(), target, CONFIG, options, allocation="sensitivity", sensitivity=other)
