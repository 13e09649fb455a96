"""VtaSession: the typed report, and a construction that fails half-way cleans up quietly."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
from helpers import conv_model, tiny_cnn

from gpp_onnx import UserError
from vta_backend import QuantizationOptions
from vta_backend.report import VtaReport
from vta_backend.session import VtaSession

SHIFTS = {"c0": 4, "r0": 4, "c1": 3, "r1": 3, "c2": 3, "r2": 3}


def test_report_is_the_compiled_models(rng):
    session = VtaSession(tiny_cnn(), SHIFTS, quantization=QuantizationOptions(per_channel=False))
    try:
        report = session.report()
        assert isinstance(report, VtaReport)
        assert [(p.node, p.device) for p in report.placement] == [("conv0", "cpu"), ("conv1", "vta"), ("conv2", "vta")]
        x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
        (logits,) = session.run(None, {session.get_inputs()[0].name: x})
        assert logits.shape == (2, 10)
    finally:
        session.close()


def test_failed_construction_prints_no_exception_ignored(monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(UserError, match="no activation scale"):
        VtaSession(tiny_cnn(), {})  # fails before any kernel is registered
    first_conv_only = conv_model([np.ones((16, 3, 3, 3), np.float32)], [1, 3, 8, 8])
    with pytest.raises(UserError, match="no Conv that VTA can run"):
        VtaSession(first_conv_only, {"c0": 4})  # fails in the compiler
    with pytest.raises(TypeError):
        VtaSession()  # type: ignore[call-arg]  # the arguments do not even bind
    gc.collect()
    assert unraisable == []
