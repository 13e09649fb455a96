"""``gpp-onnx compile``: ONNX model in, VTA program binaries and simulated figures out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import conv_model, run_cli
from onnx import numpy_helper

import gpp_onnx
from vta_backend import VTAConfig
from vta_backend.isa import decode_program
from vta_backend.model import compile_model


def two_conv_model(rng) -> onnx.ModelProto:
    ws = [
        rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((64, 32, 3, 3)).astype(np.float32),
    ]
    return conv_model(ws, [1, 16, 8, 8], attrs=[{"pads": [1] * 4}, {"pads": [1] * 4, "strides": [2, 2]}])


@pytest.fixture
def pruned_path(tmp_path, rng) -> Path:
    pruned, _ = gpp_onnx.prune(two_conv_model(rng), 0.6)
    path = tmp_path / "pruned.onnx"
    onnx.save(pruned, path)
    return path


def test_compile_writes_binaries_and_reports_json(capsys, pruned_path, tmp_path):
    out = tmp_path / "vta"
    code, stdout, _ = run_cli(capsys, "compile", str(pruned_path), "-o", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["simulated"] is True and summary["gemm_uops_skipped"] > 0
    assert {"gemm_uops", "gemm_uops_skipped", "cycles", "layers", "placement"} <= set(summary)
    assert [(p["node"], p["device"]) for p in summary["placement"]] == [("conv0", "vta"), ("conv1", "vta")]
    assert [layer["name"] for layer in summary["layers"]] == ["conv0", "conv1"]
    assert summary["cycles"] == sum(layer["cycles"] for layer in summary["layers"])
    assert 1.0 < summary["speedup"] <= summary["amdahl_bound"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["cycles"] == summary["cycles"]
    program = decode_program((out / "000_conv0.insn.bin").read_bytes(), VTAConfig())
    assert len(program) == on_disk["programs"][0]["instructions"]["count"]
    assert (out / "000_conv0.uop.bin").stat().st_size == on_disk["programs"][0]["buffers"]["uop"]["bytes"]


def test_compile_table_labels_figures_simulated(capsys, pruned_path, tmp_path):
    code, stdout, _ = run_cli(capsys, "compile", str(pruned_path), "-o", str(tmp_path / "vta"))
    assert code == 0 and "simulated" in stdout and "Amdahl bound" in stdout


def test_compile_plot_writes_the_cycles_figure(capsys, pruned_path, tmp_path):
    plot = tmp_path / "cycles.png"
    code, _, _ = run_cli(capsys, "compile", str(pruned_path), "-o", str(tmp_path / "vta"), "--plot", str(plot))
    assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, stderr = run_cli(capsys, "compile", str(pruned_path), "-o", str(tmp_path / "v2"), "--plot", "x.txt")
    assert code == 2 and "must end in .png" in stderr and not (tmp_path / "v2").exists()


def test_pruned_model_needs_fewer_gemm_uops_than_dense(rng):
    model = two_conv_model(rng)
    dense = compile_model(model, VTAConfig()).report()
    pruned, _ = gpp_onnx.prune(model, 0.7)
    sparse = compile_model(pruned, VTAConfig()).report()
    assert dense.gemm_uops_skipped == 0
    assert sparse.gemm_uops < 0.4 * dense.gemm_uops
    assert sparse.cycles < dense.cycles


def test_fused_relu_and_bias(rng):
    model = two_conv_model(rng)
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "B0"))
    model.graph.node[0].input.append("B0")
    compiled = compile_model(model, VTAConfig())
    conv = compiled.layers["conv0"].conv
    assert conv.relu and conv.bias is not None and conv.bias.dtype == np.int32


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case,expected",
    [
        ("unknown config key", "unknown key(s) LOG_BLOK"),
        ("tiny buffers", "does not fit"),
        ("tile mismatch", "pruned for 16x16 tiles"),
        ("inconsistent annotation", "marked pruned hold nonzero"),
    ],
)
def test_compile_bad_input(capsys, pruned_path, tmp_path, case, expected):
    args = ["compile", str(pruned_path), "-o", str(tmp_path / "out")]
    if case == "unknown config key":
        args += ["--vta-config", str(write(tmp_path / "c.json", '{"LOG_BLOK": 4}'))]
    elif case == "tiny buffers":
        args += ["--vta-config", str(write(tmp_path / "c.json", '{"LOG_INP_BUFF_SIZE": 7}'))]
    elif case == "tile mismatch":
        args += ["--vta-config", str(write(tmp_path / "c.json", '{"LOG_BLOCK": 3}'))]
    else:
        model = onnx.load(pruned_path)
        w = numpy_helper.to_array(model.graph.initializer[0]).copy()
        w[w == 0] = 0.5
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W0"))
        onnx.save(model, pruned_path)
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def bundle(capsys, pruned_path, tmp_path) -> Path:
    out = tmp_path / "vta"
    assert run_cli(capsys, "compile", str(pruned_path), "-o", str(out))[0] == 0
    return out


def test_run_program_runs_a_program_from_its_files_alone(capsys, bundle, pruned_path, tmp_path, rng):
    entry = json.loads((bundle / "summary.json").read_text())["programs"][1]
    x = rng.integers(-127, 128, (1, 32, 8, 8)).astype(np.int8)  # NCHW
    packed = np.zeros((1, 2, 8, 8, 16), np.int8)  # [1, C/16, H, W, 16] as summary.json gives it
    packed[0] = x[0].reshape(2, 16, 8, 8).transpose(0, 2, 3, 1)
    (tmp_path / "in.bin").write_bytes(packed.tobytes())
    args = ["run-program", str(bundle), "-p", "conv1", "-i", str(tmp_path / "in.bin"), "-o", str(tmp_path / "o.bin")]
    code, stdout, _ = run_cli(capsys, *args, "--json")
    assert code == 0 and json.loads(stdout)["bytes"] == entry["buffers"]["out"]["bytes"]
    out = np.frombuffer((tmp_path / "o.bin").read_bytes(), np.int8).reshape(4, 4, 4, 16).transpose(0, 3, 1, 2)
    layer = compile_model(onnx.load(pruned_path), VTAConfig()).layers["conv1"]
    np.testing.assert_array_equal(out.reshape(1, 64, 4, 4), layer.run(x, "fast"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"-p": "nope"}, "no program 'nope'.*programs: conv0, conv1"),
        ({"size": 10}, "the input file has 10 bytes; program conv1 expects 2048"),
        ({"--residual": "in.bin"}, "program conv1 takes no residual file"),
        ({"folder": "elsewhere"}, "holds no summary.json"),
    ],
)
def test_run_program_refuses_bad_input_in_one_line(capsys, bundle, tmp_path, change, message):
    (tmp_path / "in.bin").write_bytes(bytes(change.get("size", 2048)))
    (tmp_path / "elsewhere").mkdir()
    folder = tmp_path / change.get("folder", "vta")
    args = ["run-program", str(folder), "-p", change.get("-p", "conv1"), "-i", str(tmp_path / "in.bin")]
    args += ["-o", str(tmp_path / "o.bin")] + (
        ["--residual", str(tmp_path / "in.bin")] if "--residual" in change else []
    )
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr) and not (tmp_path / "o.bin").exists()
