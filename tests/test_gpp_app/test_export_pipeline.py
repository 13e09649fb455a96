"""examples/export_pipeline.py: PyTorch -> ONNX -> pruned -> recalibrated -> QDQ -> VTA, gated on accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

import gpp_onnx

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "export_pipeline.py"


def run_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300)


def test_the_pipeline_ends_with_a_valid_pruned_int8_model_gated_on_vta_accuracy(torch, tmp_path):
    out = tmp_path / "out"
    done = run_example("-o", str(out), "--max-drop", "100")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["passed"] and abs(result["sparsity"] - 0.5) < 0.01 and result["test_images"] == 1000
    assert result["dense_ort_fp32"] > 0.7 and result["vta_speedup_simulated"] > 1.2
    assert abs(result["pruned_qdq_vta_int8"] - result["pruned_qdq_ort"]) < 0.03
    quantized = onnx.load(out / "pruned-qdq.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in quantized.graph.node}
    annotation = gpp_onnx.read_annotation(quantized)
    gpp_onnx.validate_annotation(quantized, annotation)  # the quantizer renamed the weights; the tiles still hold
    assert annotation.weights

    gated = run_example("-o", str(tmp_path / "again"), "--max-drop", "-100")  # asks for 100 points above dense
    assert gated.returncode == 1 and json.loads(gated.stdout)["passed"] is False


def test_bad_data_is_one_line_and_exit_2(torch, tmp_path):
    done = run_example("-o", str(tmp_path / "out"), "--data", str(tmp_path / "missing"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    assert not (tmp_path / "out").exists()
