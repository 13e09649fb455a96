"""The shared pretrained ResNet-20 and the JPEG copy of CIFAR-10, end to end (skipped where they are absent)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import gpp_onnx
from gpp_app import data
from gpp_app.evaluate import calibrate_on_data
from vta_backend.calibration import CalibrationOptions
from vta_backend.session import VtaSession

REPO = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("GPP_MODELS_DIR", REPO.parent / "shared" / "models"))
DATA = Path(os.environ.get("GPP_DATA_DIR", REPO.parent / "shared" / "data")) / "cifar10-jpeg"
WEIGHTS = MODELS / "resnet20-cifar10-akamaster.th"

pytestmark = pytest.mark.skipif(
    not WEIGHTS.exists() or not DATA.exists(),
    reason=f"needs {WEIGHTS} and {DATA} (set GPP_MODELS_DIR / GPP_DATA_DIR)",
)
torch = pytest.importorskip("torch", reason="the ResNet-20 export needs torch (pip install -e '.[train]')")


def export_module():
    spec = importlib.util.spec_from_file_location("export_resnet20", REPO / "examples" / "export_resnet20.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, object]:
    export = export_module()
    path = tmp_path_factory.mktemp("resnet20") / "resnet20.onnx"
    export.export(export.load_pretrained(WEIGHTS), path)
    return path, export


def first_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = next(data.iter_uint8(data.locate(DATA), "test", count, count))
    return data.normalize(images, data.IMAGENET_MEAN, data.IMAGENET_STD), labels


def test_exported_onnx_predicts_as_torch(exported):
    path, export = exported
    x, labels = first_images(500)
    with torch.no_grad():
        expected = export.load_pretrained(WEIGHTS)(torch.from_numpy(x)).numpy()
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(logits, expected, atol=1e-3)
    assert (logits.argmax(1) == labels).mean() > 0.7  # 81 % on the whole JPEG test split


def test_vta_backend_agrees_with_onnx_runtime(exported):
    path, _ = exported
    normalization = (data.IMAGENET_MEAN, data.IMAGENET_STD)
    options = CalibrationOptions("percentile", 1000)
    shifts, _ = calibrate_on_data(onnx.load(path), data.locate(DATA), normalization, options)
    session = VtaSession(path, shifts)
    placement = {p.node: p.device for p in session.report().placement}
    assert list(placement.values()).count("vta") == 18 and placement["/conv1/Conv"] == "cpu"
    x, labels = first_images(500)
    vta = session.run(None, {"input": x})[0].argmax(1)
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].argmax(1)
    assert (vta == fp32).mean() >= 0.96
    assert abs((vta == labels).mean() - (fp32 == labels).mean()) <= 0.02
    session.close()


def test_pruned_resnet20_skips_half_the_gemm_work(exported):
    path, _ = exported
    pruned, report = gpp_onnx.prune(path, 0.5, exclude=["^/conv1/"])
    assert abs(report.sparsity - 0.5) <= 0.01
    from vta_backend import VTAConfig
    from vta_backend.model import compile_model

    report = compile_model(pruned, VTAConfig()).report()
    assert report.gemm_uops_skipped == pytest.approx(report.gemm_uops_weights, rel=0.05)
    assert 1.2 < report.speedup < report.amdahl_bound
