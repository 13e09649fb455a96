"""The measured sensitivity a latency-target allocation reads (gpp_onnx.sensitivity)."""

from __future__ import annotations

import numpy as np
import pytest

from gpp_onnx import UserError
from gpp_onnx.sensitivity import LayerSensitivity, sensitivity_for


def test_noise_never_makes_pruning_more_look_cheaper():
    measured = LayerSensitivity(np.array([0, 2, 4, 6]), np.array([0.0, -0.01, 0.3, 0.2]))
    np.testing.assert_allclose(measured.at(np.array([0, 1, 2, 3, 4, 5, 6])), [0, 0, 0, 0.15, 0.3, 0.3, 0.3])


def test_a_sensitivity_of_other_layers_or_options_is_refused():
    measured = {"w1": LayerSensitivity(np.array([0, 4]), np.array([0.0, 1.0]))}
    assert sensitivity_for(measured, "w1", 4) is measured["w1"]
    with pytest.raises(UserError, match="no measurement of 'w2'"):
        sensitivity_for(measured, "w2", 4)
    with pytest.raises(UserError, match="over its 8 prunable units.*same --pattern"):
        sensitivity_for(measured, "w1", 8)
