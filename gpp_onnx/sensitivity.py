"""Measured sensitivity of each layer to pruning: the loss a layer alone adds, per unit count.

The measurement needs data, so it is made by the application layer
(:func:`gpp_app.sensitivity.measure_sensitivity`); this is the result, which a latency-target
allocation (:mod:`vta_backend.latency`) prices in cycles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gpp_onnx.errors import UserError


@dataclass(frozen=True)
class LayerSensitivity:
    """The loss added by pruning a layer's first ``counts[i]`` units (in its own ranking) and nothing
    else, measured: ``loss_increase[i]``, with ``counts[0] == 0`` and ``loss_increase[0] == 0``."""

    counts: np.ndarray
    loss_increase: np.ndarray

    def at(self, counts: np.ndarray) -> np.ndarray:
        """The loss added at ``counts``, interpolated; measurement noise is smoothed to a curve that
        never falls (pruning more never counts as less damage) and never goes below 0."""
        rising = np.maximum.accumulate(np.maximum(self.loss_increase, 0.0))
        return np.interp(counts, self.counts, rising)

    def to_dict(self) -> dict[str, list]:
        """JSON form."""
        return {"counts": self.counts.tolist(), "loss_increase": self.loss_increase.tolist()}


Sensitivity = Mapping[str, LayerSensitivity]  # weight name -> its measured sensitivity


def sensitivity_for(sensitivity: Sensitivity, weight: str, units: int) -> LayerSensitivity:
    """``weight``'s sensitivity, checked against the ``units`` its ranking may prune (UserError when it
    was measured on another model or with other pruning options)."""
    layer = sensitivity.get(weight)
    if layer is None or int(layer.counts[-1]) != units:
        raise UserError(
            f"the sensitivity has no measurement of {weight!r} over its {units} prunable units; measure it on "
            "this model with the same --pattern, --exclude and --layer-floor"
        )
    return layer
