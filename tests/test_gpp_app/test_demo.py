"""`gpp-onnx demo`: the main job end to end on the embedded CNN and image sample."""

from __future__ import annotations

import json

import onnx
from helpers import run_cli

import gpp_onnx


def test_demo_prunes_compiles_and_runs_the_embedded_model(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli(capsys, "demo", "-o", str(out), "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    run = result["run"]
    assert run["images"] == 1000 and "embedded sample" in run["data"]
    assert run["baseline"]["accuracy"] > 0.7  # the shipped CNN is trained: far above chance on CIFAR-10
    assert run["reference"]["accuracy"] > 0.5  # pruned 50 % and recalibrated, without fine-tuning
    assert abs(run["accuracy"] - run["reference"]["accuracy"]) < 0.02 and run["agreement"] > 0.95
    assert run["vta"]["simulated"] and run["vta"]["speedup"] > 1.2
    assert abs(result["pruning"]["sparsity"] - 0.5) < 0.01
    pruned = onnx.load(out / "pruned.onnx")
    gpp_onnx.validate_annotation(pruned, gpp_onnx.read_annotation(pruned))
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result
    for name in ("tile-maps.png", "cycles.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    programs = json.loads((out / "vta-programs" / "summary.json").read_text())
    assert programs["programs"]
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary left behind


def test_demo_refuses_bad_output_and_data_before_any_work(capsys, tmp_path):
    taken = tmp_path / "file"
    taken.write_text("mine")
    code, _, stderr = run_cli(capsys, "demo", "-o", str(taken))
    assert code == 2 and stderr.count("\n") == 1 and "is a file" in stderr
    assert taken.read_text() == "mine"
    code, _, stderr = run_cli(capsys, "demo", "-o", str(tmp_path / "out"), "--data", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in stderr and not (tmp_path / "out").exists()
    code, _, stderr = run_cli(capsys, "demo", "-o", str(tmp_path / "no" / "such" / "folder"))
    assert code == 2 and stderr.count("\n") == 1 and "does not exist" in stderr and not (tmp_path / "no").exists()
