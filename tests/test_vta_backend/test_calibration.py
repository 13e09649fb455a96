"""Calibration: streamed one batch at a time, and nothing left behind when it is interrupted."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from helpers import tiny_cnn

from vta_backend.calibration import CalibrationOptions, calibrate


def batches(count: int, interrupt_after: int | None = None):
    rng = np.random.default_rng(0)
    for i in range(count):
        if interrupt_after is not None and i == interrupt_after:
            raise KeyboardInterrupt  # what Ctrl-C, and SIGTERM through the CLI's handler, raise mid-way
        yield {"input": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}


def test_an_interrupted_calibration_leaves_no_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    options = CalibrationOptions(method="percentile", images=16, batch=4)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_cnn(), batches(4, interrupt_after=2), options, data="random", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "tmp").iterdir()) == []  # the calibrator's augmented models are gone
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []  # nothing cached


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_batch_by_batch_collection_gives_the_shifts_of_the_whole_range(tmp_path, method):
    """Ranges and histograms merge across batches: here the shifts equal those of one big batch
    (histograms re-bin when a later batch widens the range, so that equality is not guaranteed)."""
    options = CalibrationOptions(method=method, images=16, batch=4)
    shifts, cached = calibrate(tiny_cnn(), batches(4), options, data="random", cache_dir=tmp_path)
    whole = ({"input": np.concatenate([b["input"] for b in batches(4)])},)
    together, _ = calibrate(
        tiny_cnn(), whole, CalibrationOptions(method=method, images=16, batch=16), data="r2", cache_dir=tmp_path
    )
    assert not cached and shifts == together
