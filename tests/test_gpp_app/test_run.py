"""`gpp-onnx run` and VtaSession: ONNX Runtime with the convs on the VTA simulator, checked against ORT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import channels_last, run_cli, tiny_cnn, write_binary, write_folders, write_pickle
from onnx import TensorProto, helper, numpy_helper

import gpp_onnx
from gpp_app import data
from gpp_app.evaluate import calibrate_on_data
from vta_backend.calibration import CalibrationOptions
from vta_backend.session import VtaSession

NORMALIZATION = (data.IMAGENET_MEAN, data.IMAGENET_STD)


def cache_files() -> list[Path]:
    return sorted(Path(os.environ["GPP_CACHE_DIR"]).glob("calibration-*.json"))


def test_vta_session_behaves_like_an_inference_session(model_path, data_dir):
    dataset = data.locate(data_dir)
    before = set(model_path.parent.iterdir())
    shifts, cached = calibrate_on_data(onnx.load(model_path), dataset, NORMALIZATION, CalibrationOptions("minmax", 25))
    assert not cached and len(cache_files()) == 1
    assert set(model_path.parent.iterdir()) == before  # nothing written beside the user's model
    session = VtaSession(model_path, shifts)
    reference = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    x = data.normalize(next(data.iter_uint8(dataset, "test", 25))[0], data.IMAGENET_MEAN, data.IMAGENET_STD)
    logits = session.run(None, {"input": x})[0]
    expected = reference.run(None, {"input": x})[0]
    assert logits.shape == expected.shape == (25, 10)
    # int8 with power-of-two scales: close to fp32, not equal
    assert 0 < np.abs(logits - expected).max() < 0.1 * np.abs(expected).max()
    report = session.report()
    placement = {p.node: p for p in report.placement}
    assert placement["conv0"].device == "cpu" and "first conv" in placement["conv0"].reason
    assert placement["conv1"].device == placement["conv2"].device == "vta"
    assert report.to_dict()["simulated"] and report.cycles > 0
    session.close()


def test_calibration_is_cached_by_content(model_path, data_dir):
    dataset, options = data.locate(data_dir), CalibrationOptions("percentile", 20)
    first, _ = calibrate_on_data(onnx.load(model_path), dataset, NORMALIZATION, options)
    again, cached = calibrate_on_data(onnx.load(model_path), dataset, NORMALIZATION, options)
    assert cached and again == first
    _, cached = calibrate_on_data(tiny_cnn(seed=1), dataset, NORMALIZATION, options)  # new weights: no cache hit
    assert not cached


def test_a_malformed_cache_entry_is_rebuilt(model_path, data_dir):
    dataset, options = data.locate(data_dir), CalibrationOptions("minmax", 20)
    first, _ = calibrate_on_data(onnx.load(model_path), dataset, NORMALIZATION, options)
    (entry,) = cache_files()
    doc = json.loads(entry.read_text())
    doc["shifts"] = {name: "four" for name in doc["shifts"]}
    entry.write_text(json.dumps(doc))
    again, cached = calibrate_on_data(onnx.load(model_path), dataset, NORMALIZATION, options)
    assert not cached and again == first


def test_run_json_vta(capsys, model_path, data_dir):
    code, stdout, _ = run_cli(
        capsys,
        "run",
        str(model_path),
        "--backend",
        "vta",
        "--data",
        str(data_dir),
        "--batch",
        "8",
        "--calibration-images",
        "20",
        "--json",
    )
    assert code == 0
    result = json.loads(stdout)
    assert result["backend"] == "vta" and result["images"] == 25 and 0 <= result["accuracy"] <= 1
    assert {"accuracy", "images_per_second"} <= set(result["reference"])
    assert 0.5 <= result["agreement"] <= 1
    assert {"cycles", "gemm_uops", "gemm_uops_skipped", "simulated_ms", "layers"} <= set(result["vta"])
    assert [layer["name"] for layer in result["vta"]["layers"]] == ["conv1", "conv2"]


def test_run_on_a_pruned_model_skips_tiles(capsys, model_path, data_dir, tmp_path):
    pruned, _ = gpp_onnx.prune(model_path, 0.5)
    pruned_path = tmp_path / "pruned.onnx"
    onnx.save(pruned, pruned_path)
    code, stdout, _ = run_cli(
        capsys, "run", str(pruned_path), "--data", str(data_dir), "--calibration-images", "20", "--json"
    )
    result = json.loads(stdout)
    assert code == 0 and result["vta"]["gemm_uops_skipped"] > 0 and result["vta"]["speedup"] > 1


def test_ort_accuracy_is_the_same_in_every_layout(capsys, model_path, tmp_path):
    accuracies = []
    for folder in (write_pickle(tmp_path / "p", True), write_binary(tmp_path / "b"), write_folders(tmp_path / "f")):
        code, stdout, _ = run_cli(capsys, "run", str(model_path), "--backend", "ort", "--data", str(folder), "--json")
        assert code == 0
        accuracies.append(json.loads(stdout)["accuracy"])
    assert accuracies[0] == accuracies[1] == accuracies[2]


def test_max_drop_gates_the_exit_status(capsys, model_path, data_dir):
    args = ["run", str(model_path), "--backend", "ort", "--data", str(data_dir), "--baseline", str(model_path)]
    assert run_cli(capsys, *args, "--max-drop", "0")[0] == 0
    code, _, stderr = run_cli(capsys, *args, "--max-drop", "-1")
    assert code == 1 and "below the reference" in stderr


def not_an_image_model(tmp_path: Path) -> Path:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
    )
    path = tmp_path / "vector.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def lying_annotation(tmp_path: Path, model_path: Path) -> Path:
    pruned, _ = gpp_onnx.prune(model_path, 0.5)
    w = numpy_helper.to_array(pruned.graph.initializer[1]).copy()
    w[w == 0] = 1.0
    pruned.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "w1"))
    path = tmp_path / "lying.onnx"
    onnx.save(pruned, path)
    return path


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing data", "does not exist"),
        ("wrong data", "accepted layouts"),
        ("not an image model", "is not an image tensor"),
        ("annotation mismatch", "marked pruned hold nonzero"),
        ("unknown backend", "unknown backend 'tpu'"),
        ("batch 0", "batch size 0 is below 1"),
    ],
)
def test_run_bad_input(capsys, model_path, data_dir, tmp_path, case, expected):
    model, folder, extra = model_path, data_dir, []
    if case == "missing data":
        folder = tmp_path / "nowhere"
    elif case == "wrong data":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "not an image model":
        model = not_an_image_model(tmp_path)
    elif case == "annotation mismatch":
        model = lying_annotation(tmp_path, model_path)
    elif case == "unknown backend":
        extra = ["--backend", "tpu"]
    else:
        extra = ["--batch", "0"]
    code, stdout, stderr = run_cli(capsys, "run", str(model), "--data", str(folder), *extra)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr and "Traceback" not in stdout + stderr


def test_a_dead_activation_gets_a_bounded_scale():
    from vta_backend.calibration import MAX_ACTIVATION_SHIFT, power_of_two_shift

    assert power_of_two_shift(0.0, None) == MAX_ACTIVATION_SHIFT  # zero on every calibration image
    assert power_of_two_shift(1e-6, None) == MAX_ACTIVATION_SHIFT
    assert power_of_two_shift(1.0, None) == 6  # 127 / 2**6 covers 1.0


def test_compile_and_run_report_the_same_simulated_cycles(capsys, model_path, data_dir, tmp_path):
    compiled = run_cli(capsys, "compile", str(model_path), "-o", str(tmp_path / "vta"), "--json")
    ran = run_cli(capsys, "run", str(model_path), "--data", str(data_dir), "--calibration-images", "20", "--json")
    assert compiled[0] == ran[0] == 0
    compiled, ran = json.loads(compiled[1]), json.loads(ran[1])["vta"]
    # the same weights, quantized alike: the same GEMM work; only the activation scales differ (compile
    # assumes one, run calibrates), which can change how the requantization and residual are scheduled
    assert compiled["gemm_uops"] == ran["gemm_uops"] > 0 and compiled["dense_cycles"] > 0
    assert [layer["tiles_kept"] for layer in compiled["layers"]] == [layer["tiles_kept"] for layer in ran["layers"]]
    assert compiled["cycles"] == pytest.approx(ran["cycles"], rel=0.1)


def test_data_of_another_size_than_the_model_input_fails_before_calibration(capsys, data_dir, tmp_path):
    model = tiny_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 64  # a 64x64 model, 32x32 data
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 64
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    code, stdout, stderr = run_cli(capsys, "run", str(path), "--data", str(data_dir))
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "expects shape" in stderr and "Traceback" not in stdout + stderr


def fixed_batch_model(batch: int) -> onnx.ModelProto:
    model = tiny_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = batch
    return model


def float16_model() -> onnx.ModelProto:
    model = tiny_cnn()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


@pytest.mark.parametrize("backend", ["ort", "vta"])
@pytest.mark.parametrize("variant", ["fixed batch 1", "fixed batch 4", "float16", "channels last"])
def test_models_with_a_fixed_batch_or_float16_run_on_both_backends(capsys, data_dir, tmp_path, backend, variant):
    """Calibration and evaluation use the model's own batch size (the last batch padded), input type and
    layout; the scores equal the dynamic float32 NCHW model's up to float16 rounding."""
    variants = {"fixed batch 1": fixed_batch_model(1), "fixed batch 4": fixed_batch_model(4)}
    model = {**variants, "channels last": channels_last(tiny_cnn())}.get(variant)
    path = tmp_path / "variant.onnx"
    onnx.save(model if model is not None else float16_model(), path)
    plain = tmp_path / "plain.onnx"
    onnx.save(tiny_cnn(), plain)
    common = ["--data", str(data_dir), "--backend", backend, "--batch", "7", "--calibration-images", "20", "--json"]
    code, stdout, stderr = run_cli(capsys, "run", str(path), *common)
    assert code == 0, stderr
    ours, reference = json.loads(stdout), json.loads(run_cli(capsys, "run", str(plain), *common)[1])
    assert ours["images"] == reference["images"] == 25
    if variant != "float16":
        assert ours["accuracy"] == reference["accuracy"]


def test_run_says_where_its_normalisation_came_from(capsys, data_dir, tmp_path):
    bare = tiny_cnn()
    del bare.metadata_props[:]  # no stored mean / std
    onnx.save(bare, tmp_path / "bare.onnx")
    onnx.save(tiny_cnn(), tmp_path / "stored.onnx")
    sources = {}
    for name, extra in (("bare", []), ("stored", []), ("given", ["--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"])):
        model = tmp_path / ("bare.onnx" if name == "bare" else "stored.onnx")
        code, stdout, _ = run_cli(capsys, "run", str(model), "--data", str(data_dir), "--json", *extra)
        assert code == 0
        sources[name] = json.loads(stdout)["normalization_source"]
    assert sources == {
        "bare": "the ImageNet default (the model stores none)",
        "stored": "the model's metadata",
        "given": "given (--mean / --std)",
    }


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("command", ["prune", "inspect", "compile", "run-ort", "run-vta", "recalibrate"])
def test_non_finite_weights_are_one_line_errors_before_any_work(capsys, data_dir, tmp_path, command, value):
    model = tiny_cnn()
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    broken = numpy_helper.to_array(w1).copy()
    broken[0, 0, 0, 0] = value
    w1.CopyFrom(numpy_helper.from_array(broken, "w1"))
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    args = {
        "prune": ["prune", str(path), "-o", str(out)],
        "inspect": ["inspect", str(path)],
        "compile": ["compile", str(path), "-o", str(tmp_path / "vta")],
        "run-ort": ["run", str(path), "--data", str(data_dir), "--backend", "ort"],
        "run-vta": ["run", str(path), "--data", str(data_dir)],
        "recalibrate": ["recalibrate", str(path), "--dense", str(path), "--data", str(data_dir), "-o", str(out)],
    }[command]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2 and stderr.startswith("error: weight w1 of conv1 holds NaN or infinite values"), stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stdout + stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "cifar"]


def test_run_plot_draws_the_simulated_cycles_of_each_conv(capsys, model_path, data_dir, tmp_path):
    plot = tmp_path / "run.png"
    code, _, _ = run_cli(capsys, "run", str(model_path), "--data", str(data_dir), "--plot", str(plot))
    assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "ort.png"
    code, _, stderr = run_cli(
        capsys, "run", str(model_path), "--data", str(data_dir), "-b", "ort", "--plot", str(other)
    )
    assert code == 2 and "--backend vta" in stderr and not other.exists()
