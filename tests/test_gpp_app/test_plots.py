"""What the sweep's plots put on their axes."""

from __future__ import annotations

from gpp_app.plots import _curves
from gpp_app.sweep import SweepRow


def test_sweep_curves_place_each_target_at_the_sparsity_it_reached_averaged_over_seeds():
    """A layer floor stops block pruning at 84.5 % of a 90 % target: the plot must not draw it at 90 %."""
    rows = [
        SweepRow("block", 0.9, 4, seed, sparsity_achieved=0.8448, accuracy_after_ort=accuracy)
        for seed, accuracy in ((0, 0.7154), (1, 0.7133))
    ]
    rows += [SweepRow("group", 0.9, 4, 0, sparsity_achieved=0.9004, accuracy_after_ort=0.69)]
    rows += [SweepRow("group", None, 4, 0, speedup_target=1.5, sparsity_achieved=0.54, accuracy_after_ort=0.84)]
    curves = _curves(rows, "accuracy_after_ort")
    ((block_x, block_y),) = curves["block"]
    assert block_x == 0.8448 and abs(block_y - (0.7154 + 0.7133) / 2) < 1e-12
    assert curves["group"] == [(0.9004, 0.69)]  # the latency-target point is drawn against cycles only
