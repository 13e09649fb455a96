"""The gpp-onnx command: outputs, JSON, plots, determinism, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import conv_model, make_model, run_cli, symbolic_shape
from onnx import TensorProto, helper, numpy_helper

import gpp_onnx


@pytest.fixture
def conv_chain_path(tmp_path, rng) -> Path:
    ws = [
        rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((64, 32, 3, 3)).astype(np.float32),
    ]
    path = tmp_path / "model.onnx"
    onnx.save(conv_model(ws, [1, 16, 8, 8], attrs=[{"pads": [1] * 4}] * 2), path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prune_then_inspect_json_and_plot(capsys, conv_chain_path, tmp_path):
    out = tmp_path / "pruned.onnx"
    code, stdout, _ = run_cli(capsys, "prune", str(conv_chain_path), "-o", str(out), "--sparsity", "0.7", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert abs(report["sparsity"] - 0.7) <= 0.01
    assert {"name", "weight", "shape", "pattern", "status", "sparsity", "tiles_total", "tiles_kept"} <= set(
        report["layers"][0]
    )
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--json", "--plot", str(tmp_path / "masks.png"))
    assert code == 0 and json.loads(stdout)["layers"] == report["layers"]
    assert (tmp_path / "masks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, stdout, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "conv0" in stdout and "overall sparsity" in stdout


def test_output_is_byte_identical_across_runs(capsys, conv_chain_path, tmp_path):
    for name in ("a.onnx", "b.onnx"):
        assert (
            run_cli(
                capsys, "prune", str(conv_chain_path), "-o", str(tmp_path / name), "-s", "0.6", "--scope", "global"
            )[0]
            == 0
        )
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")


def test_default_output_name_and_input_untouched(capsys, conv_chain_path):
    before = digest(conv_chain_path)
    assert run_cli(capsys, "prune", str(conv_chain_path))[0] == 0
    assert (conv_chain_path.parent / "model-pruned.onnx").exists()
    assert digest(conv_chain_path) == before


def test_external_data_model_via_cli(capsys, conv_chain_path, tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save_model(
        onnx.load(conv_chain_path), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    out = tmp_path / "ext-out.onnx"
    assert run_cli(capsys, "prune", str(src), "-o", str(out))[0] == 0
    assert (tmp_path / "ext-out.onnx.data").exists()
    assert abs(gpp_onnx.inspect(out).sparsity - 0.5) <= 0.01


def no_prunable_layer(tmp_path: Path) -> Path:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, symbolic_shape(2))],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(make_model(g), path)
    return path


BAD_INPUTS = {
    "missing path": (lambda d, m: ["prune", str(d / "nope.onnx")], "does not exist"),
    "directory": (lambda d, m: ["prune", str(d)], "is a directory"),
    "empty file": (lambda d, m: ["prune", str(write(d / "empty.onnx", b""))], "is empty"),
    "truncated file": (
        lambda d, m: ["prune", str(write(d / "cut.onnx", m.read_bytes()[:300]))],
        "re-exporting it if it was truncated",
    ),
    "not onnx": (lambda d, m: ["prune", str(write(d / "text.onnx", b"hello, this is not a model\n"))], "ONNX"),
    "no prunable layer": (lambda d, m: ["prune", str(no_prunable_layer(d))], "no prunable layer"),
    "sparsity 1": (lambda d, m: ["prune", str(m), "--sparsity", "1.0"], "outside [0, 1)"),
    "negative sparsity": (lambda d, m: ["prune", str(m), "--sparsity", "-0.1"], "outside [0, 1)"),
    "sparsity not a number": (lambda d, m: ["prune", str(m), "--sparsity", "lots"], "--sparsity"),
    "unknown pattern": (lambda d, m: ["prune", str(m), "--pattern", "diagonal"], "unknown pattern 'diagonal'"),
    "unknown scope": (lambda d, m: ["prune", str(m), "--scope", "model"], "unknown scope"),
    "tile not two integers": (lambda d, m: ["prune", str(m), "--tile", "16"], "not two positive integers"),
    "tile zero": (lambda d, m: ["prune", str(m), "--tile", "0x16"], "not two positive integers"),
    "output equals input": (lambda d, m: ["prune", str(m), "-o", str(m)], "would overwrite the input"),
    "output folder missing": (lambda d, m: ["prune", str(m), "-o", str(d / "no" / "out.onnx")], "does not exist"),
    "output folder unwritable": (lambda d, m: ["prune", str(m), "-o", "/proc/out.onnx"], "not writable"),
    "bad exclude regex": (lambda d, m: ["prune", str(m), "--exclude", "conv(("], "regular expression"),
    "plot not png": (lambda d, m: ["inspect", str(m), "--plot", str(d / "masks.jpg")], ".png"),
    "inspect missing": (lambda d, m: ["inspect", str(d / "nope.onnx")], "does not exist"),
    "output name too long": (lambda d, m: ["prune", str(m), "-o", str(d / ("x" * 300 + ".onnx"))], "too long"),
    "plot name too long": (lambda d, m: ["inspect", str(m), "--plot", str(d / ("x" * 300 + ".png"))], "too long"),
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, conv_chain_path, tmp_path, case):
    make_args, expected = BAD_INPUTS[case]
    args = make_args(tmp_path, conv_chain_path)
    before_files = set(tmp_path.rglob("*"))
    before = digest(conv_chain_path)
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr and "Traceback" not in stderr + stdout
    assert set(tmp_path.rglob("*")) == before_files  # no output, no temporary file left behind
    assert digest(conv_chain_path) == before


def test_installed_command_reports_errors_without_traceback(tmp_path):
    command = shutil.which("gpp-onnx")
    assert command, "the gpp-onnx console script is not installed; run the README's install command"
    result = subprocess.run([command, "prune", str(tmp_path / "nope.onnx")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_tile_shape_from_a_vta_config(capsys, conv_chain_path, tmp_path):
    config = tmp_path / "vta_config.json"
    config.write_text('{"TARGET": "sim", "LOG_BLOCK": 3, "LOG_BATCH": 0}')
    out = tmp_path / "pruned.onnx"
    code, stdout, _ = run_cli(capsys, "prune", str(conv_chain_path), "-o", str(out), "--tile", str(config), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["tile"] == "8x8" and report["layers"][0]["tiles_total"] == 4 * 2 * 9  # 32x16 weights, 3x3


def test_json_output_is_one_document_even_when_onnx_prints_warnings(tmp_path):
    """The onnx checker prints "Warning: Model contains experimental ops" on stdout (from C++)."""
    weights = np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ImageScaler", ["x"], ["s"], name="scaler", scale=1.0, bias=[0.0] * 16),
            helper.make_node("Conv", ["s", "W"], ["y"], name="conv", pads=[1] * 4),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])],
        [numpy_helper.from_array(weights, "W")],
    )
    path = tmp_path / "experimental.onnx"
    onnx.save(make_model(graph, 9), path)  # ImageScaler is one of the checker's experimental ops
    command = [shutil.which("gpp-onnx"), "prune", str(path), "-o", str(tmp_path / "p.onnx"), "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"][0]["status"] == "pruned"
    assert "experimental" in result.stderr  # the warning is kept, on stderr


def test_plots_get_the_mode_of_the_users_umask(capsys, conv_chain_path, tmp_path):
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "inspect", str(conv_chain_path), "--plot", str(tmp_path / "maps.png"))[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "maps.png").stat().st_mode) == 0o644


def test_normalization_is_shown_and_stored_in_a_copy_that_later_commands_read(capsys, model_path, tmp_path):
    """A third-party model declares no normalisation: `normalization` stores its authors' in a copy
    (the input untouched), which prune carries on and run then reports as the model's."""
    before = model_path.read_bytes()
    code, stdout, _ = run_cli(capsys, "normalization", str(model_path), "--json")
    assert code == 0 and json.loads(stdout)["source"] == "the model's metadata"  # the tests' CNN stores ImageNet's
    copy, pruned = tmp_path / "norm.onnx", tmp_path / "pruned.onnx"
    values = ["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
    code, stdout, _ = run_cli(capsys, "normalization", str(model_path), *values, "-o", str(copy), "--json")
    assert code == 0 and json.loads(stdout)["output"] == str(copy) and model_path.read_bytes() == before
    assert run_cli(capsys, "prune", str(copy), "-o", str(pruned))[0] == 0
    code, stdout, _ = run_cli(capsys, "normalization", str(pruned), "--json")
    shown = json.loads(stdout)
    assert (shown["mean"], shown["std"], shown["source"]) == ([0.5] * 3, [0.25] * 3, "the model's metadata")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mean", "0.5,0.5,0.5"], "give --mean and --std together"),
        (["-o", "out.onnx"], "-o writes a copy with --mean and --std"),
        (["--mean", "0,0,0", "--std", "0,1,1", "-o", "out.onnx"], "std above 0"),
    ],
)
def test_normalization_refuses_half_or_impossible_values_in_one_line(capsys, model_path, tmp_path, args, message):
    args = [a if a != "out.onnx" else str(tmp_path / a) for a in args]
    code, _, stderr = run_cli(capsys, "normalization", str(model_path), *args)
    assert code == 2 and message in stderr and stderr.count("\n") == 1 and not (tmp_path / "out.onnx").exists()
