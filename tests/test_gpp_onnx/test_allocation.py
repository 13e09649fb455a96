"""Sparsity allocation: achieved sparsity near the target, per layer and overall."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import conv_model, weight
from onnx import numpy_helper

import gpp_onnx


def many_layers(rng: np.random.Generator, channels: list[int], kernel: int = 3) -> tuple:
    weights = [rng.standard_normal((o, i, kernel, kernel)).astype(np.float32) for i, o in zip(channels, channels[1:])]
    return conv_model(weights, [1, channels[0], 8, 8], attrs=[{"pads": [kernel // 2] * 4}] * len(weights)), weights


@pytest.mark.parametrize("pattern", ["group", "block", "channel", "element"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_overall_sparsity_within_one_point(rng, pattern, scope, sparsity):
    model, _ = many_layers(rng, [16, 32, 32, 64, 64, 64, 128])
    _, report = gpp_onnx.prune(model, sparsity, pattern=pattern, scope=scope)
    assert abs(report.sparsity - sparsity) <= 0.01
    assert gpp_onnx.read_annotation(_).achieved_sparsity == pytest.approx(report.sparsity)


def test_layer_scope_distributes_rounding(rng):
    # Ten 1x1 convs of 16x48 (3 tiles each): 50% per layer is 1.5 tiles. Rounding every layer
    # down gives 33%, up 67%; distributing the rounding gives 50% overall.
    weights = [rng.standard_normal((16, 48, 1, 1)).astype(np.float32) for _ in range(10)]
    model = conv_model(weights, [1, 48, 4, 4])
    for node in model.graph.node:
        if node.op_type == "Conv":
            node.input[0] = "x"
    _, report = gpp_onnx.prune(model, 0.5, pattern="group")
    assert report.sparsity == pytest.approx(0.5)
    assert {r.tiles_kept for r in report.layers} == {1, 2}


def test_layer_scope_prunes_every_layer_near_the_target(rng):
    model, _ = many_layers(rng, [16, 32, 64, 128])
    _, report = gpp_onnx.prune(model, 0.6, pattern="group", scope="layer")
    for row in report.layers:
        assert abs(row.sparsity - 0.6) < 1 / row.tiles_total + 1e-9


def test_global_scope_is_invariant_to_layer_scale(rng):
    # Scores are normalised by each layer's mean magnitude, so scaling a layer changes nothing.
    model, weights = many_layers(rng, [16, 32, 64, 64])
    scaled = conv_model([weights[0], weights[1] * 100.0, weights[2]], [1, 16, 8, 8], attrs=[{"pads": [1] * 4}] * 3)
    a, _ = gpp_onnx.prune(model, 0.7, scope="global")
    b, _ = gpp_onnx.prune(scaled, 0.7, scope="global")
    for name in ("W0", "W1", "W2"):
        np.testing.assert_array_equal(weight(a, name) == 0, weight(b, name) == 0)


def test_global_scope_differs_from_layer_scope(rng):
    model, weights = many_layers(rng, [16, 32, 64, 64])
    weights[2][:, :32] *= 0.05  # half of the last layer is nearly dead
    model = conv_model(weights, [1, 16, 8, 8], attrs=[{"pads": [1] * 4}] * 3)
    _, layer_report = gpp_onnx.prune(model, 0.4, scope="layer")
    _, global_report = gpp_onnx.prune(model, 0.4, scope="global")
    assert layer_report.layers[2].sparsity == pytest.approx(0.4, abs=0.05)
    assert global_report.layers[2].sparsity >= 0.5
    assert global_report.sparsity == pytest.approx(0.4, abs=0.01)


def test_existing_zeros_count_towards_the_target(rng):
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    w[:16, :16] = 0  # 9 of 36 groups (25%) already zero
    _, report = gpp_onnx.prune(conv_model([w], [1, 32, 6, 6]), 0.5, pattern="group")
    assert report.sparsity == pytest.approx(0.5)
    assert report.layers[0].tiles_kept == 18


def test_sparsity_zero_changes_no_weight(rng):
    model, weights = many_layers(rng, [16, 32, 32])
    pruned, report = gpp_onnx.prune(model, 0.0)
    assert report.sparsity == 0.0
    for i, w in enumerate(weights):
        np.testing.assert_array_equal(weight(pruned, f"W{i}"), w)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_layer_floor_keeps_every_layer_alive(rng, scope):
    small = rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.01  # global ranking would empty it
    large = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    model = conv_model([large, small], [1, 32, 8, 8])
    _, report = gpp_onnx.prune(model, 0.95, pattern="group", scope=scope, layer_floor=0.1)
    for row in report.layers:
        assert row.tiles_kept >= np.ceil(0.1 * row.tiles_total)  # 4 x 9 tiles: at least 4 kept
    assert report.sparsity < 0.95  # the floor holds back part of the target
    _, unfloored = gpp_onnx.prune(model, 0.95, pattern="group", scope=scope)
    assert min(row.tiles_kept for row in unfloored.layers) < 4  # without the floor a layer nearly empties


def test_no_layer_is_emptied_unless_allowed(rng):
    """Block pruning at layer scope: a conv of one 16x16 channel tile keeps it (else the model would
    ignore its input); the report says the target was missed there and by how much."""
    stem = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)  # one channel tile
    wide = rng.standard_normal((64, 16, 3, 3)).astype(np.float32)  # four
    model = conv_model([stem, wide.transpose(1, 0, 2, 3).copy()], [1, 16, 8, 8])
    pruned, report = gpp_onnx.prune(model, 0.5, pattern="block", scope="layer")
    assert np.count_nonzero(weight(pruned, "W0")) == stem.size  # kept whole
    assert report.short_layers[0].name == "conv0" and report.shortfall == pytest.approx(0.1)
    assert report.to_dict()["layers_short_of_target"] == ["conv0"]
    kept, _ = gpp_onnx.prune(model, 0.95, pattern="block", scope="layer")
    emptied, _ = gpp_onnx.prune(model, 0.95, pattern="block", scope="layer", allow_empty_layers=True)
    assert np.count_nonzero(weight(kept, "W0")) == stem.size and np.count_nonzero(weight(emptied, "W0")) == 0


def test_prune_says_where_the_target_was_missed(rng, capsys, tmp_path):
    import onnx
    from helpers import run_cli

    model = conv_model([rng.standard_normal((16, 16, 3, 3)).astype(np.float32)], [1, 16, 8, 8])
    onnx.save(model, tmp_path / "m.onnx")
    code, stdout, _ = run_cli(capsys, "prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "-p", "block")
    assert code == 0 and "target not met: 50.00% short" in stdout and "1 layer(s) below the target" in stdout


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("pattern", ["group", "block", "channel"])
def test_no_group_of_a_grouped_conv_is_emptied(scope, pattern):
    """Two groups of 32 -> 32 channels; the second group's weights are tiny, so without the per-group
    floor a high target empties it (its 32 output channels would ignore the input)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    weight[32:] *= 1e-3
    model = conv_model([weight], [1, 64, 8, 8], attrs=[{"group": 2, "pads": [1] * 4}])
    pruned, _ = gpp_onnx.prune(model, 0.9, pattern=pattern, scope=scope)
    kept = numpy_helper.to_array(pruned.graph.initializer[0]).reshape(2, 32, -1)
    assert all(np.count_nonzero(kept[g]) > 0 for g in range(2))
    unprotected, _ = gpp_onnx.prune(model, 0.9, pattern=pattern, scope=scope, allow_empty_layers=True)
    assert np.count_nonzero(numpy_helper.to_array(unprotected.graph.initializer[0])[32:]) == 0
