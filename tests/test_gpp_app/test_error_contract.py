"""The error contract of every command under bad input, faults and interruption (issue 12).

Each case runs one command on a copy of its inputs in its own folder and asserts: exit status 2,
exactly one ``error: ...`` line on stderr, no traceback, no file added, removed or changed in the
case's folder (inputs unchanged, no output, no temporary file) and nothing left in the temp folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import conv_model, run_cli, tiny_cnn, write_pickle
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import gpp_onnx
from gpp_onnx.annotation import ANNOTATION_KEY

LONG = "n" * 300  # a file name over the 255 bytes every common file system allows


def _with_weight(model: onnx.ModelProto, name: str, change: Callable[[np.ndarray], np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` replaced by ``change(its values)``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), name))
    return copy


def _tampered(model: onnx.ModelProto, change: Callable[[dict], object]) -> onnx.ModelProto:
    """A copy of ``model`` whose annotation document went through ``change`` (a returned str replaces it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    prop = next(p for p in copy.metadata_props if p.key == ANNOTATION_KEY)
    doc = json.loads(prop.value)
    replaced = change(doc)
    prop.value = replaced if isinstance(replaced, str) else json.dumps(doc)
    return copy


def _images(root: Path, splits: tuple[str, ...], sizes: tuple[int, ...] = (32,), per_split: int = 10) -> Path:
    """Image folders ``split/class/*.png``; image ``i`` has side ``sizes[i % len(sizes)]``."""
    rng = np.random.default_rng(0)
    for split in splits:
        for i in range(per_split):
            folder = root / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            side = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _pickles(root: Path, labels: np.ndarray, test: bool = True, train: bool = True) -> Path:
    """The python-pickle layout with 25 random images and the given labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (25, 3072), dtype=np.uint8)
    batch = pickle.dumps({b"data": images, b"labels": [int(v) for v in labels]})
    for name, wanted in (("test_batch", test), ("data_batch_1", train)):
        if wanted:
            (folder / name).write_bytes(batch)
    return root


def _feature_map_model() -> onnx.ModelProto:
    """Two convs whose output is a feature map, not class scores."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, 3, 3, 3)).astype(np.float32), rng.standard_normal((16, 16, 3, 3)) * 0.1]
    return conv_model([w.astype(np.float32) for w in weights], ["N", 3, 32, 32], attrs=[{"pads": [1] * 4}] * 2)


def _fc_only_model() -> onnx.ModelProto:
    """A classifier without a conv: global average pooling and one Gemm."""
    fc = numpy_helper.from_array(np.full((10, 3), 0.1, np.float32), "fc")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fc_only",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [fc],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _reshaped_input(model: onnx.ModelProto, axis: int, size: int) -> onnx.ModelProto:
    """A copy of ``model`` whose declared input has ``size`` along ``axis`` (weights adjusted for channels)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = size
    return _with_weight(copy, "w0", lambda w: w[:, :size].copy()) if axis == 1 else copy


def _one_nan(weight: np.ndarray) -> np.ndarray:
    """The weight with one value replaced by NaN."""
    weight.flat[7] = np.nan
    return weight


def _build_models(root: Path) -> None:
    """The tiny CNN, a pruned copy and every broken, ill-fitting or tampered variant."""
    dense = tiny_cnn()
    onnx.save(dense, root / "tiny.onnx")
    pruned, _ = gpp_onnx.prune(root / "tiny.onnx", 0.5, exclude=["conv0"])
    onnx.save(pruned, root / "pruned.onnx")
    (root / "empty.onnx").write_bytes(b"")
    (root / "text.onnx").write_text("not a model\n")
    (root / "model.json").write_text('{"a": 1}')
    (root / "truncated.onnx").write_bytes((root / "tiny.onnx").read_bytes()[:3000])
    (root / "folder.onnx").mkdir()
    onnx.save(_with_weight(dense, "w1", _one_nan), root / "nan.onnx")
    onnx.save(_reshaped_input(dense, 1, 1), root / "one-channel.onnx")
    onnx.save(_reshaped_input(dense, 2, 16), root / "16px.onnx")
    onnx.save(_feature_map_model(), root / "feature-map.onnx")
    onnx.save(_fc_only_model(), root / "fc-only.onnx")
    two = onnx.ModelProto()
    two.CopyFrom(dense)
    two.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 3, 32, 32]))
    onnx.save(two, root / "two-inputs.onnx")
    integer = onnx.ModelProto()
    integer.CopyFrom(dense)
    integer.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    onnx.save(integer, root / "int-input.onnx")
    for name, change in TAMPERING.items():
        onnx.save(_tampered(pruned, change), root / f"annotation-{name}.onnx")


def _all_zero_bitmap(doc: dict) -> None:
    entry = doc["weights"][0]
    entry["kept_tiles"] = base64.b64encode(bytes(len(base64.b64decode(entry["kept_tiles"])))).decode()


TAMPERING: dict[str, Callable[[dict], object]] = {
    "weights-null": lambda doc: doc.__setitem__("weights", None),
    "weights-number": lambda doc: doc.__setitem__("weights", 3),
    "bitmap-number": lambda doc: doc["weights"][0].__setitem__("kept_tiles", 12345),
    "bitmap-list": lambda doc: doc["weights"][0].__setitem__("kept_tiles", [1, 0]),
    "bitmap-all-pruned": _all_zero_bitmap,
    "duplicated-entry": lambda doc: doc["weights"].append(doc["weights"][0]),
    "entry-string": lambda doc: doc["weights"].__setitem__(0, "conv1"),
    "shape-wrong": lambda doc: doc["weights"][0].__setitem__("shape", [1, 2, 3, 4]),
    "tile-zero": lambda doc: doc.__setitem__("tile", {"block_out": 0, "block_in": 16}),
    "not-json": lambda doc: "{not json",
}


def _build_data(root: Path) -> None:
    """CIFAR-shaped data that fit, and data that do not."""
    write_pickle(root / "data", str_keys=False)
    (root / "no-data").mkdir()
    for split in ("train", "test"):
        (root / "no-images" / split / "cat").mkdir(parents=True)
    _images(root / "mixed-sizes", ("train", "test"), sizes=(32, 16))
    _images(root / "16px-images", ("train", "test"), sizes=(16,))
    _images(root / "test-only", ("test",))
    _images(root / "train-only", ("train",))
    _pickles(root / "labels-out-of-range", np.arange(25) * 4)
    _pickles(root / "labels-not-whole", np.arange(25) * 0.5)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """Every input the cases use, built once; each case copies what it names."""
    root = tmp_path_factory.mktemp("contract-inputs")
    _build_models(root)
    _build_data(root)
    _compile_bundles(root)
    (root / "input.bin").write_bytes(bytes(16384))
    (root / "short.bin").write_bytes(bytes(100))
    (root / "garbage.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (root / "config.json").write_text("{not json")
    return root


def _compile_bundles(root: Path) -> None:
    """The pruned model compiled to a bundle, and copies whose summary.json was broken."""
    from vta_backend.bundle import write_programs
    from vta_backend.config import VTAConfig
    from vta_backend.model import compile_model

    write_programs(compile_model(onnx.load(root / "pruned.onnx"), VTAConfig()), root / "bundle")
    summary = json.loads((root / "bundle" / "summary.json").read_text())
    for name, change in {"no-programs": lambda s: s.pop("programs"), "entry-garbage": _garbage_entry}.items():
        shutil.copytree(root / "bundle", root / f"bundle-{name}")
        broken = json.loads(json.dumps(summary))
        change(broken)
        (root / f"bundle-{name}" / "summary.json").write_text(json.dumps(broken))


def _garbage_entry(summary: dict) -> None:
    summary["programs"][0] = {"name": summary["programs"][0]["name"], "input": 5}


D = "{F:data}"
RUN = ["--data", D, "--limit", "8", "--batch", "4", "--calibration-images", "8"]
RECALIBRATE = ["recalibrate", "{F:pruned.onnx}", "--dense", "{F:tiny.onnx}", "--images", "8", "--eval-limit", "8"]
FINETUNE = ["finetune", "{F:pruned.onnx}", "--data", D, "--epochs", "1", "--limit", "8", "--device", "cpu"]
SWEEP = ["sweep", "{F:tiny.onnx}", "--data", D, "--patterns", "group", "--sparsities", "0.5", "--epochs", "0"]
PROGRAM = ["run-program", "{F:bundle}", "--program", "conv1", "--input", "{F:input.bin}"]

CASES: dict[str, list[str]] = {
    # prune
    "prune-missing-model": ["prune", "{O:missing.onnx}", "-o", "{O:o.onnx}"],
    "prune-empty-model": ["prune", "{F:empty.onnx}", "-o", "{O:o.onnx}"],
    "prune-text-model": ["prune", "{F:text.onnx}", "-o", "{O:o.onnx}"],
    "prune-json-file": ["prune", "{F:model.json}", "-o", "{O:o.onnx}"],
    "prune-truncated-model": ["prune", "{F:truncated.onnx}", "-o", "{O:o.onnx}"],
    "prune-directory-model": ["prune", "{F:folder.onnx}", "-o", "{O:o.onnx}"],
    "prune-nan-weights": ["prune", "{F:nan.onnx}", "-o", "{O:o.onnx}"],
    "prune-sparsity-1": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "-s", "1"],
    "prune-sparsity-nan": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "-s", "nan"],
    "prune-tile-abc": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "--tile", "abc"],
    "prune-tile-bad-config": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "--tile", "{F:config.json}"],
    "prune-exclude-bad-regex": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "-x", "("],
    "prune-layer-floor-nan": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "--layer-floor", "nan"],
    "prune-output-long-name": ["prune", "{F:tiny.onnx}", "-o", "{O:" + LONG + ".onnx}"],
    "prune-output-missing-folder": ["prune", "{F:tiny.onnx}", "-o", "{O:nope/o.onnx}"],
    "prune-output-is-input": ["prune", "{F:tiny.onnx}", "-o", "{F:tiny.onnx}"],
    "prune-plot-long-name": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "--plot", "{O:" + LONG + ".png}"],
    "prune-plot-not-png": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "--plot", "{O:x.txt}"],
    "prune-recalibrate-16px-images": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "--recalibrate", "{F:16px-images}"],
    "prune-recalibrate-no-images": ["prune", "{F:tiny.onnx}", "-o", "{O:o.onnx}", "--recalibrate", "{F:no-images}"],
    # inspect
    "inspect-garbage-model": ["inspect", "{F:text.onnx}"],
    "inspect-tile-abc": ["inspect", "{F:pruned.onnx}", "--tile", "abc"],
    "inspect-plot-long-name": ["inspect", "{F:pruned.onnx}", "--plot", "{O:" + LONG + ".png}"],
    **{f"inspect-annotation-{name}": ["inspect", "{F:annotation-" + name + ".onnx}"] for name in TAMPERING},
    # compile
    "compile-board-empty": ["compile", "{F:pruned.onnx}", "-o", "{O:b}", "--board", ""],
    "compile-activation-shift--1000": ["compile", "{F:pruned.onnx}", "-o", "{O:b}", "--activation-shift", "-1000"],
    "compile-input-shape-other-channels": ["compile", "{F:pruned.onnx}", "-o", "{O:b}", "--input-shape", "1x1x32x32"],
    "compile-integer-input": ["compile", "{F:int-input.onnx}", "-o", "{O:b}"],
    "compile-output-long-name": ["compile", "{F:pruned.onnx}", "-o", "{O:" + LONG + "}"],
    "compile-output-is-a-file": ["compile", "{F:pruned.onnx}", "-o", "{F:text.onnx}"],
    "compile-bad-vta-config": ["compile", "{F:pruned.onnx}", "-o", "{O:b}", "--vta-config", "{F:config.json}"],
    "compile-annotation-duplicated": ["compile", "{F:annotation-duplicated-entry.onnx}", "-o", "{O:b}"],
    # run
    "run-std-nan": ["run", "{F:pruned.onnx}", *RUN, "--std", "nan,nan,nan"],
    "run-max-drop-nan": ["run", "{F:pruned.onnx}", *RUN, "--max-drop", "nan"],
    "run-limit-negative": ["run", "{F:pruned.onnx}", *RUN[:2], "--limit", "-5"],
    "run-backend-unknown": ["run", "{F:pruned.onnx}", *RUN, "--backend", "foo"],
    "run-board-empty": ["run", "{F:pruned.onnx}", *RUN, "--board", ""],
    "run-empty-data-folder": ["run", "{F:pruned.onnx}", "--data", "{F:no-data}"],
    "run-class-folders-without-images": ["run", "{F:pruned.onnx}", "--data", "{F:no-images}"],
    "run-images-of-different-sizes": ["run", "{F:pruned.onnx}", "--data", "{F:mixed-sizes}", "--batch", "4"],
    "run-images-of-another-size": ["run", "{F:pruned.onnx}", "--data", "{F:16px-images}"],
    "run-one-channel-model-rgb-data": ["run", "{F:one-channel.onnx}", *RUN],
    "run-labels-out-of-range": ["run", "{F:pruned.onnx}", "--data", "{F:labels-out-of-range}", "-b", "ort"],
    "run-labels-not-whole": ["run", "{F:pruned.onnx}", "--data", "{F:labels-not-whole}", "-b", "ort"],
    "run-output-not-scores": ["run", "{F:feature-map.onnx}", *RUN, "-b", "ort"],
    "run-vta-without-conv": ["run", "{F:fc-only.onnx}", *RUN],
    "run-baseline-other-size": ["run", "{F:pruned.onnx}", *RUN, "-b", "ort", "--baseline", "{F:16px.onnx}"],
    "run-baseline-nan": ["run", "{F:pruned.onnx}", *RUN, "-b", "ort", "--baseline", "{F:nan.onnx}"],
    "run-annotation-bitmap-number": ["run", "{F:annotation-bitmap-number.onnx}", *RUN],
    # run-program
    "run-program-unknown-program": [*PROGRAM[:3], "nope", *PROGRAM[4:], "-o", "{O:out.bin}"],
    "run-program-wrong-size-input": [*PROGRAM[:5], "{F:short.bin}", "-o", "{O:out.bin}"],
    "run-program-no-programs": ["run-program", "{F:bundle-no-programs}", *PROGRAM[2:], "-o", "{O:out.bin}"],
    "run-program-garbage-entry": ["run-program", "{F:bundle-entry-garbage}", *PROGRAM[2:], "-o", "{O:out.bin}"],
    "run-program-output-long-name": [*PROGRAM, "-o", "{O:" + LONG + ".bin}"],
    "run-program-output-is-input": [*PROGRAM, "-o", "{F:input.bin}"],
    # recalibrate
    "recalibrate-eval-limit-0": [*RECALIBRATE, "--data", D, "-o", "{O:o.onnx}", "--eval-limit", "0"],
    "recalibrate-without-test-split": [*RECALIBRATE, "--data", "{F:train-only}", "-o", "{O:o.onnx}"],
    "recalibrate-without-train-split": [*RECALIBRATE, "--data", "{F:test-only}", "-o", "{O:o.onnx}"],
    "recalibrate-wrong-size-data": [*RECALIBRATE, "--data", "{F:16px-images}", "-o", "{O:o.onnx}"],
    "recalibrate-images-0": [*RECALIBRATE, "--data", D, "-o", "{O:o.onnx}", "--images", "0"],
    "recalibrate-output-long-name": [*RECALIBRATE, "--data", D, "-o", "{O:" + LONG + ".onnx}"],
    "recalibrate-unpruned-model": ["recalibrate", "{F:tiny.onnx}", *RECALIBRATE[2:], "--data", D, "-o", "{O:o.onnx}"],
    "recalibrate-dense-other-input": [*RECALIBRATE[:3], "{F:one-channel.onnx}", "--data", D, "-o", "{O:o.onnx}"],
    # finetune
    "finetune-lr-inf": [*FINETUNE, "-o", "{O:o.onnx}", "--lr", "inf"],
    "finetune-lr-nan": [*FINETUNE, "-o", "{O:o.onnx}", "--lr", "nan"],
    "finetune-limit-negative": [*FINETUNE[:-4], "--limit", "-5", "-o", "{O:o.onnx}"],
    "finetune-eval-limit-0": [*FINETUNE, "-o", "{O:o.onnx}", "--eval-limit", "0"],
    "finetune-gradual-until-2": [*FINETUNE, "-o", "{O:o.onnx}", "--gradual", "0.5", "--gradual-until", "2"],
    "finetune-pattern-without-gradual": [*FINETUNE, "-o", "{O:o.onnx}", "--pattern", "block"],
    "finetune-empty-layers-without-gradual": [*FINETUNE, "-o", "{O:o.onnx}", "--allow-empty-layers"],
    "finetune-seed-negative": [*FINETUNE, "-o", "{O:o.onnx}", "--seed", "-1"],
    "finetune-output-long-name": [*FINETUNE, "-o", "{O:" + LONG + ".onnx}"],
    "finetune-model-without-conv": ["finetune", "{F:fc-only.onnx}", *FINETUNE[2:], "-o", "{O:o.onnx}"],
    "finetune-two-inputs": ["finetune", "{F:two-inputs.onnx}", *FINETUNE[2:], "-o", "{O:o.onnx}"],
    "finetune-without-test-split": [*FINETUNE[:3], "{F:train-only}", *FINETUNE[4:], "-o", "{O:o.onnx}"],
    "finetune-wrong-size-data": [*FINETUNE[:3], "{F:16px-images}", *FINETUNE[4:], "-o", "{O:o.onnx}"],
    "finetune-annotation-all-pruned": [
        "finetune",
        "{F:annotation-bitmap-all-pruned.onnx}",
        *FINETUNE[2:],
        "-o",
        "{O:o.onnx}",
    ],
    "finetune-teacher-other-size": [*FINETUNE, "-o", "{O:o.onnx}", "--teacher", "{F:16px.onnx}"],
    # sweep
    "sweep-scope-unknown": [*SWEEP, "-o", "{O:sw}", "--scope", "foo"],
    "sweep-exclude-bad-regex": [*SWEEP, "-o", "{O:sw}", "--exclude", "("],
    "sweep-output-existing-file": [*SWEEP, "-o", "{F:text.onnx}"],
    "sweep-output-is-model": [*SWEEP, "-o", "{F:tiny.onnx}"],
    "sweep-output-in-missing-folder": [*SWEEP, "-o", "{O:nope/sw}"],
    "sweep-nan-weights": ["sweep", "{F:nan.onnx}", *SWEEP[2:], "-o", "{O:sw}"],
    "sweep-without-train-split": [*SWEEP[:3], "{F:test-only}", *SWEEP[4:], "-o", "{O:sw}"],
    "sweep-model-without-conv": ["sweep", "{F:fc-only.onnx}", *SWEEP[2:], "-o", "{O:sw}"],
}
NEEDS_TORCH = {name for name in CASES if name.startswith("finetune")}


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> content hash (or "folder")."""
    found = {}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = (
            "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        )
    return found


def _substitute(arg: str, fixtures: Path, case: Path) -> str:
    """``{F:name}``: a copy of the input ``name`` in ``case/in``; ``{O:name}``: ``case/out/name``."""

    def replace(match: re.Match) -> str:
        kind, name = match.groups()
        if kind == "O":
            return str(case / "out" / name)
        source, copy = fixtures / name, case / "in" / name
        if not copy.exists():
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy)
        return str(copy)

    return re.sub(r"\{(F|O):([^}]*)\}", replace, arg)


def assert_one_error_line(code: int, stderr: str) -> None:
    """Exit status 2 and exactly one line on stderr, starting with ``error:``."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_error_line_and_leaves_nothing(name, fixtures, tmp_path, capsys, monkeypatch):
    if name in NEEDS_TORCH:
        pytest.importorskip("torch", reason="needs torch (pip install -e '.[train]')")
    for folder in ("in", "out", "tmp"):
        (tmp_path / folder).mkdir()
    argv = [_substitute(arg, fixtures, tmp_path) for arg in CASES[name]]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path / "out")
    before = _tree(tmp_path)
    code, _, stderr = run_cli(capsys, *argv)
    assert_one_error_line(code, stderr)
    assert _tree(tmp_path) == before  # inputs unchanged, no output, no temporary file


def test_a_checkpoint_of_another_model_is_refused_and_kept(fixtures, tmp_path, capsys):
    pytest.importorskip("torch", reason="needs torch (pip install -e '.[train]')")
    out = tmp_path / "o.onnx"
    options = ["--data", str(fixtures / "data"), "--epochs", "1", "--limit", "8", "--device", "cpu", "-o", str(out)]
    assert run_cli(capsys, "finetune", str(fixtures / "tiny.onnx"), *options)[0] == 0
    out.unlink()
    checkpoint = hashlib.sha256((tmp_path / "o.onnx.ckpt").read_bytes()).hexdigest()
    code, _, stderr = run_cli(capsys, "finetune", str(fixtures / "pruned.onnx"), *options, "--resume")
    assert_one_error_line(code, stderr)
    assert "another model" in stderr and not out.exists()
    assert hashlib.sha256((tmp_path / "o.onnx.ckpt").read_bytes()).hexdigest() == checkpoint


@pytest.mark.parametrize("shifts", ["abc", 10**9, -(10**6), None, True])
def test_a_calibration_cache_with_malformed_values_is_rebuilt(shifts, fixtures, capsys, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPP_CACHE_DIR", str(cache))
    run = ["run", str(fixtures / "pruned.onnx"), *RUN[:1], str(fixtures / "data"), *RUN[2:], "--json"]
    code, first, _ = run_cli(capsys, *run)
    assert code == 0
    (entry,) = cache.glob("calibration-*.json")
    document = json.loads(entry.read_text())
    good = document["shifts"]
    document["shifts"] = None if shifts is None else {name: shifts for name in good}
    entry.write_text(json.dumps(document))
    code, again, stderr = run_cli(capsys, *run)
    assert code == 0 and "Traceback" not in stderr
    assert json.loads(entry.read_text())["shifts"] == good  # measured again and rewritten
    assert json.loads(again)["accuracy"] == json.loads(first)["accuracy"]


def test_a_cache_entry_missing_tensors_is_rebuilt(fixtures, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GPP_CACHE_DIR", str(tmp_path))
    run = ["run", str(fixtures / "pruned.onnx"), *RUN[:1], str(fixtures / "data"), *RUN[2:]]
    assert run_cli(capsys, *run)[0] == 0
    (entry,) = tmp_path.glob("calibration-*.json")
    document = json.loads(entry.read_text())
    document["shifts"] = dict(list(document["shifts"].items())[:1])
    entry.write_text(json.dumps(document))
    code, _, stderr = run_cli(capsys, *run)
    assert code == 0 and "no activation scale" not in stderr
    assert len(json.loads(entry.read_text())["shifts"]) > 1


def test_run_leaves_nothing_beside_a_model_in_a_read_only_folder(fixtures, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy2(fixtures / "pruned.onnx", folder)
    folder.chmod(0o555)
    try:
        code, _, stderr = run_cli(
            capsys, "run", str(folder / "pruned.onnx"), *RUN[:1], str(fixtures / "data"), *RUN[2:]
        )
    finally:
        folder.chmod(0o755)
    assert code == 0, stderr
    assert [p.name for p in folder.iterdir()] == ["pruned.onnx"]


def test_sigterm_during_calibration_leaves_no_temporary_folder(fixtures, tmp_path):
    data = tmp_path / "data"  # 5,000 train images: calibration runs long enough to be interrupted
    folder = data / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5000, 3072), dtype=np.uint8)
    batch = pickle.dumps({b"data": images, b"labels": [i % 10 for i in range(5000)]})
    (folder / "data_batch_1").write_bytes(batch)
    (folder / "test_batch").write_bytes(batch)
    models, temp = tmp_path / "models", tmp_path / "tmp"
    models.mkdir()
    temp.mkdir()
    shutil.copy2(fixtures / "pruned.onnx", models)
    env = dict(os.environ, TMPDIR=str(temp), GPP_CACHE_DIR=str(tmp_path / "cache"))
    command = [shutil.which("gpp-onnx"), "run", str(models / "pruned.onnx"), "--data", str(data)]
    process = subprocess.Popen(
        command + ["--calibration-images", "5000", "--calibration-method", "entropy", "--limit", "8"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(temp.glob("gpp-onnx-calibration.*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the calibrator's temporary folder exists
    assert process.poll() is None, "calibration finished before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "error: interrupted; no partial output was left behind"
    ]
    assert not list(temp.glob("gpp-onnx*")) and [p.name for p in models.iterdir()] == ["pruned.onnx"]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
