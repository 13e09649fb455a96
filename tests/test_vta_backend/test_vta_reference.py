"""The programs `gpp-onnx compile` writes, run on VTA's own simulators (../shared/vta-reference).

Both reference binaries are built from VTA's sources into a temporary folder: the functional
simulator (`vta_fsim_run`, relocating each buffer as VTA's runtime does) and a C simulation of
the Xilinx HLS design (`vta_hls_csim`, one pointer per port). Every program of a small net
(stride 2, a fused residual Add, channel counts that are not multiples of 16, blocks of one to
three output-channel tiles: both hazard-free micro-op orders; a nearly dead channel whose
requantization shift needs two SHR passes) - dense and
group-pruned, per-tensor and per-channel, default and small buffers - must give the same bytes
on both as in our simulator, and the fsim's profiler must count the GEMM micro-ops ours does.
The inputs are built from summary.json alone, as a host runtime would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model
from onnx import TensorProto, helper, numpy_helper

import gpp_onnx
from vta_backend import VTAConfig
from vta_backend.bundle import write_programs
from vta_backend.bundle_run import open_program, run_program
from vta_backend.layout import unpack_activations
from vta_backend.model import compile_model
from vta_backend.quantization import QuantizationOptions
from vta_backend.timing import simulate_timing

REFERENCE = Path(os.environ.get("GPP_VTA_REFERENCE", Path(__file__).parents[3] / "shared" / "vta-reference"))
SMALL_BUFFERS = "configs/smallbuf.json"


def small_net(seed: int = 0) -> onnx.ModelProto:
    """20 -> 24 (3x3) -> 48 (3x3, stride 2) -> 48 (3x3) + Add(shortcut) + Relu -> 40 (1x1, stride 2)."""
    rng = np.random.default_rng(seed)
    inits = []

    def conv(name: str, cin: int, cout: int, k: int, stride: int, source: str, target: str) -> onnx.NodeProto:
        weight = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
        if name == "a":
            weight[1] *= 1e-5  # a nearly dead channel: per-channel shifts beyond the SHR field (passes)
        bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(weight, f"{name}.w"), numpy_helper.from_array(bias, f"{name}.b")])
        inputs = [source, f"{name}.w", f"{name}.b"]
        return helper.make_node("Conv", inputs, [target], pads=[k // 2] * 4, strides=[stride] * 2, name=name)

    nodes = [
        conv("a", 20, 24, 3, 1, "x", "a.out"),
        helper.make_node("Relu", ["a.out"], ["a.relu"]),
        conv("b", 24, 48, 3, 2, "a.relu", "b.out"),
        helper.make_node("Relu", ["b.out"], ["b.relu"]),
        conv("c", 48, 48, 3, 1, "b.relu", "c.out"),
        helper.make_node("Add", ["c.out", "b.relu"], ["c.add"]),
        helper.make_node("Relu", ["c.add"], ["c.relu"]),
        conv("d", 48, 40, 1, 2, "c.relu", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "small_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40, 3, 3])],
        inits,
    )
    return make_model(graph)


def build(tmp: Path, config_file: str | None) -> dict[str, Path]:
    """Both reference binaries for VTA's default config or ``config_file``, built into ``tmp``."""
    env = os.environ | {"OUT": str(tmp)} | ({"CFG": str(REFERENCE / config_file)} if config_file else {})
    for script in ("build.sh", "build_hls.sh"):
        done = subprocess.run(["sh", str(REFERENCE / script)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return {"fsim": tmp / "vta_fsim_run", "hls": tmp / "vta_hls_csim"}


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is absent: VTA's reference simulators cannot be built here")
    if not (REFERENCE / "build.sh").is_file():
        pytest.skip(f"VTA's reference sources are absent at {REFERENCE} (set GPP_VTA_REFERENCE)")
    return {
        None: build(tmp_path_factory.mktemp("vta-default"), None),
        SMALL_BUFFERS: build(tmp_path_factory.mktemp("vta-small"), SMALL_BUFFERS),
    }


def run_reference(binary: Path, folder: Path, entry: dict, images: Path, out: Path, extra: list[str]) -> bytes:
    buffers = entry["buffers"]
    command = [str(binary), "--insn", str(folder / entry["instructions"]["file"])]
    for flag in ("uop", "wgt", "acc"):
        command += [f"--{flag}", str(folder / buffers[flag]["file"])]
    command += ["--inp", str(images), "--out", str(out), "--out-bytes", str(buffers["out"]["bytes"]), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{binary.name} {entry['name']}: {done.stderr}"
    return out.read_bytes()


@pytest.mark.parametrize("config_file", [None, SMALL_BUFFERS], ids=["default", "small-buffers"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5], ids=["dense", "group-50"])
def test_every_program_gives_our_bytes_on_both_vta_simulators(binaries, tmp_path, config_file, per_channel, sparsity):
    model = small_net()
    if sparsity:
        model, _ = gpp_onnx.prune(model, sparsity, pattern="group")
    config = VTAConfig.from_json(REFERENCE / config_file) if config_file else VTAConfig()
    compiled = compile_model(model, config, quantization=QuantizationOptions(per_channel=per_channel))
    check_bundle(compiled, binaries[config_file], tmp_path)


@pytest.mark.parametrize(
    ("output_shift", "path"), [(3, "gemm-after-shift+shr"), (11, "gemm-before-shift+shr")], ids=["after", "before"]
)
def test_every_residual_path_gives_our_bytes_on_both_vta_simulators(binaries, tmp_path, output_shift, path):
    config = VTAConfig()
    compiled = compile_model(small_net(), config, activation_shifts={"c.relu": output_shift})
    assert compiled.layers["c"].programs[0].residual_path == path
    check_bundle(compiled, binaries[None], tmp_path)


def check_bundle(compiled, binaries: dict[str, Path], tmp_path: Path) -> None:
    """Write the bundle; run every program on ours and both references from summary.json alone."""
    config = compiled.config
    assert len(compiled.layers) == 4 and compiled.layers["c"].conv.residual_shift is not None
    folder = tmp_path / "bundle"
    write_programs(compiled, folder)
    summary = json.loads((folder / "summary.json").read_text())
    rng = np.random.default_rng(1)
    for entry, layer in zip(summary["programs"], compiled.layers.values()):
        program = open_program(folder, entry["name"])
        tensors = {
            name: rng.integers(-128, 128, program.expected_bytes(name), dtype=np.int8).tobytes()
            for name in ("input", "residual")
            if entry[name] is not None
        }
        ours = run_program(program, tensors["input"], tensors.get("residual"))
        images = tmp_path / "inp.bin"  # the input buffer, assembled at the offsets summary.json gives
        images.write_bytes(input_buffer(folder, entry, tensors))
        for start in ("0", "1"):
            profile = tmp_path / "profile.json"
            extra = ["--start-core", start, "--profile", str(profile)]
            assert run_reference(binaries["fsim"], folder, entry, images, tmp_path / "o", extra) == ours
            executed = simulate_timing(layer.programs[0].insns, config).gemm_uops
            assert json.loads(profile.read_text())["gemm_counter"] == executed
        assert run_reference(binaries["hls"], folder, entry, images, tmp_path / "o", []) == ours
        check_layout_against_the_layer(entry, layer, tensors, ours)


def input_buffer(folder: Path, entry: dict, tensors: dict[str, bytes]) -> bytes:
    """The INP buffer as a host builds it: each tensor and the constants file at its element offset."""
    element = entry["buffers"]["inp"]["element_bytes"]
    buffer = bytearray(entry["buffers"]["inp"]["bytes"])
    pieces = dict(tensors)
    if entry["constants"] is not None:
        pieces["constants"] = (folder / entry["constants"]["file"]).read_bytes()
    for name, data in pieces.items():
        offset = entry[name]["offset"] * element
        buffer[offset : offset + len(data)] = data
    return bytes(buffer)


def check_layout_against_the_layer(entry: dict, layer, tensors: dict, ours: bytes) -> None:
    """The packed layouts summary.json gives, unpacked, are what the layer computes on NCHW tensors."""

    def nchw(data: bytes, tensor: dict) -> np.ndarray:
        packed = np.frombuffer(data, np.int8).reshape(tensor["packed_shape"][:4] + [tensor["packed_shape"][5]])
        return unpack_activations(packed, tensor["shape"][1])

    x = nchw(tensors["input"], entry["input"])
    residual = nchw(tensors["residual"], entry["residual"]) if "residual" in tensors else None
    expected = layer.run(x, "fast", residual)
    np.testing.assert_array_equal(nchw(ours, entry["output"]), expected)
