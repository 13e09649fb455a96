"""Fixtures shared by every test module; helper functions live in ``helpers.py``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import tiny_cnn, write_pickle


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own gpp-onnx cache folder, never the user's."""
    monkeypatch.setenv("GPP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def model_path(tmp_path):
    """A tiny CNN (first conv, two convs with bias / Relu / residual Add, GAP, FC) saved as a file."""
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), path)
    return path


@pytest.fixture
def data_dir(tmp_path):
    """25 CIFAR-10-shaped images in the python-pickle layout (test and one train batch)."""
    return write_pickle(tmp_path / "cifar", str_keys=False)


@pytest.fixture
def torch():
    """torch, or the test is skipped (fine-tuning needs the ``train`` extra)."""
    return pytest.importorskip("torch", reason="needs torch (pip install -e '.[train]')")
