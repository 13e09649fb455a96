"""Which units each pattern removes: golden cases for the paper's L1 top-k rule, and geometry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import conv_model, weight

import gpp_onnx

# Magnitude of every 16x16 group (oc_tile, ic_tile, position) of a 32x32x1x2 conv.
GROUP_MAGNITUDES = {
    (0, 0, 0): 1.0,
    (0, 0, 1): 10.0,
    (0, 1, 0): 2.0,
    (0, 1, 1): 3.0,
    (1, 0, 0): 4.0,
    (1, 0, 1): 5.0,
    (1, 1, 0): 6.0,
    (1, 1, 1): 7.0,
}


def golden_weight(rng: np.random.Generator) -> np.ndarray:
    w = np.empty((32, 32, 1, 2), np.float32)
    for (ot, it, p), v in GROUP_MAGNITUDES.items():
        signs = rng.choice([-1.0, 1.0], size=(16, 16))
        w[ot * 16 : (ot + 1) * 16, it * 16 : (it + 1) * 16, 0, p] = v * signs * rng.uniform(0.9, 1.1, (16, 16))
    return w


def zero_groups(w: np.ndarray) -> set[tuple[int, int, int]]:
    return {
        (ot, it, p)
        for ot, it, p in itertools.product(range(2), range(2), range(2))
        if not w[ot * 16 : (ot + 1) * 16, it * 16 : (it + 1) * 16, 0, p].any()
    }


def paper_group_rule(w: np.ndarray, sparsity: float) -> set[tuple[int, int, int]]:
    """The paper's rule written out: L1 norm of every group, zero the k lowest."""
    groups = list(itertools.product(range(2), range(2), range(2)))
    l1 = {g: np.abs(w[g[0] * 16 : (g[0] + 1) * 16, g[1] * 16 : (g[1] + 1) * 16, 0, g[2]]).sum() for g in groups}
    k = round(sparsity * len(groups))
    return set(sorted(groups, key=l1.__getitem__)[:k])


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_group_pattern_removes_the_lowest_l1_groups(rng, sparsity):
    w = golden_weight(rng)
    pruned, report = gpp_onnx.prune(conv_model([w], [1, 32, 4, 4]), sparsity, pattern="group")
    assert zero_groups(weight(pruned, "W0")) == paper_group_rule(w, sparsity)
    assert report.sparsity == pytest.approx(sparsity)


def test_group_pattern_golden_half(rng):
    pruned, _ = gpp_onnx.prune(conv_model([golden_weight(rng)], [1, 32, 4, 4]), 0.5, pattern="group")
    assert zero_groups(weight(pruned, "W0")) == {(0, 0, 0), (0, 1, 0), (0, 1, 1), (1, 0, 0)}


def test_block_pattern_removes_whole_channel_tiles(rng):
    # block L1: (0,0) 11, (0,1) 5, (1,0) 9, (1,1) 13 -> the two lowest are (0,1) and (1,0)
    pruned, _ = gpp_onnx.prune(conv_model([golden_weight(rng)], [1, 32, 4, 4]), 0.5, pattern="block")
    assert zero_groups(weight(pruned, "W0")) == {(0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1)}


def test_unpruned_weights_are_untouched(rng):
    w = golden_weight(rng)
    pruned, _ = gpp_onnx.prune(conv_model([w], [1, 32, 4, 4]), 0.5, pattern="group")
    out = weight(pruned, "W0")
    kept = out != 0
    np.testing.assert_array_equal(out[kept], w[kept])


def test_partial_edge_tile_is_scored_by_mean_magnitude():
    # 20 output channels: a full 16-row tile of magnitude 1 (L1 256) and a 4-row edge tile of
    # magnitude 1.5 (L1 96). Raw L1 would prune the edge tile first; per-weight scoring keeps it.
    w = np.ones((20, 16, 1, 1), np.float32)
    w[16:] = 1.5
    pruned, report = gpp_onnx.prune(conv_model([w], [1, 16, 4, 4]), 0.8, pattern="group")
    out = weight(pruned, "W0")
    assert not out[:16].any() and (out[16:] == 1.5).all()
    assert report.layers[0].tiles_kept == 1


def test_channel_pattern_removes_whole_filters(rng):
    w = rng.standard_normal((24, 8, 3, 3)).astype(np.float32)
    w[[3, 7, 11]] *= 0.01
    pruned, report = gpp_onnx.prune(conv_model([w], [1, 8, 6, 6]), 3 / 24, pattern="channel")
    out = weight(pruned, "W0")
    assert [i for i in range(24) if not out[i].any()] == [3, 7, 11]


def test_element_pattern_is_unstructured_magnitude(rng):
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    pruned, report = gpp_onnx.prune(conv_model([w], [1, 16, 6, 6]), 0.6, pattern="element")
    out = weight(pruned, "W0")
    threshold = np.sort(np.abs(w).ravel())[round(0.6 * w.size) - 1]
    np.testing.assert_array_equal(out == 0, np.abs(w) <= threshold)


def test_tile_shape_comes_from_the_option(rng):
    w = rng.standard_normal((16, 16, 1, 1)).astype(np.float32)
    _, report = gpp_onnx.prune(conv_model([w], [1, 16, 4, 4]), 0.5, pattern="group", tile="8x4")
    assert report.layers[0].tiles_total == 2 * 4
    assert report.tile == gpp_onnx.TileShape(8, 4)
