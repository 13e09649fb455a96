"""``gpp-onnx prune --target-speedup / --target-cycles`` and ``sweep --speedups``: outputs and bad input."""

from __future__ import annotations

import json

import onnx
import pytest
from helpers import run_cli, tiny_cnn

import gpp_onnx


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), path)
    return path


def test_prune_to_a_speedup_writes_the_model_and_reports_the_cycles(capsys, tiny_path, tmp_path):
    out = tmp_path / "fast.onnx"
    code, stdout, _ = run_cli(capsys, "prune", str(tiny_path), "-o", str(out), "--target-speedup", "1.3", "--json")
    assert code == 0
    document = json.loads(stdout)
    latency = document["latency"]
    assert latency["simulated"] and latency["board"] == "pynq"
    assert latency["speedup"] == pytest.approx(1.3, rel=0.02) and latency["on_target"]
    assert [entry["node"] for entry in latency["not_on_vta"]] == ["conv0"]
    assert gpp_onnx.inspect(out).scope == "latency"
    assert document["sparsity"] == pytest.approx(gpp_onnx.inspect(out).sparsity)


def test_prune_to_a_cycle_count_prints_the_table(capsys, tiny_path, tmp_path):
    code, stdout, _ = run_cli(
        capsys, "prune", str(tiny_path), "-o", str(tmp_path / "o.onnx"), "--target-cycles", "20000"
    )
    assert code == 0
    assert "simulated VTA cycles per image" in stdout and "conv1" in stdout and "stays on the CPU" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-speedup", "1.3", "--sparsity", "0.5"], "do not apply with a latency target"),
        (["--target-speedup", "1.3", "--scope", "global"], "do not apply with a latency target"),
        (["--target-speedup", "1.3", "--target-cycles", "100"], "not both"),
        (["--target-speedup", "0.8"], "above 1"),
        (["--target-speedup", "nan"], "above 1"),
        (["--target-cycles", "-5"], "positive"),
        (["--board", "pynq"], "--target-speedup"),
        (["--target-speedup", "40"], "beyond reach"),
        (["--target-speedup", "1.3", "--board", "nope"], "unknown BOARD"),
    ],
)
def test_bad_latency_options_are_one_line_errors_and_write_nothing(capsys, tiny_path, tmp_path, extra, message):
    out = tmp_path / "o.onnx"
    code, stdout, stderr = run_cli(capsys, "prune", str(tiny_path), "-o", str(out), *extra)
    assert code == 2 and not out.exists() and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_sweep_refuses_speedups_with_gradual_pruning(capsys, tiny_path, tmp_path, data_dir):
    code, _, stderr = run_cli(
        capsys,
        "sweep",
        str(tiny_path),
        "--data",
        str(data_dir),
        "-o",
        str(tmp_path / "s"),
        "--speedups",
        "1.3",
        "--gradual",
    )
    assert code == 2 and "--gradual" in stderr and not (tmp_path / "s").exists()
