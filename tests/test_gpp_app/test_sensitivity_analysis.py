"""Sensitivity analysis (gpp_app.sensitivity) and the latency target's sensitivity allocation on the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import run_cli, tiny_cnn
from onnx import helper

from gpp_app import data
from gpp_app.recalibrate import channel_stats, match_statistics
from gpp_app.sensitivity import measure_sensitivity
from gpp_onnx import load_model
from gpp_onnx.pruner import PruneOptions, prune_counts
from vta_backend import VTAConfig

OPTIONS = PruneOptions(pattern="group", tile=VTAConfig())
SKIP = {"w0": "stays on the CPU"}


def _cross_entropy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    logits = ort.InferenceSession(model.SerializeToString()).run(None, {"input": images})[0].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def test_each_figure_is_the_loss_that_layer_alone_adds_after_its_statistics_are_matched(data_dir):
    dense = load_model(tiny_cnn())
    measured = measure_sensitivity(dense, OPTIONS, SKIP, data_dir, images=20)
    assert set(measured) == {"w1", "w2"}
    (images, labels) = next(data.iter_uint8(data.locate(data_dir), "train", 20, 20))
    x = data.normalize(images, data.IMAGENET_MEAN, data.IMAGENET_STD)
    for weight, layer in measured.items():
        assert layer.counts[0] == 0 and layer.loss_increase[0] == 0 and len(layer.counts) >= 2
        count = int(layer.counts[-1])
        pruned, _ = prune_counts(dense, {weight: count}, OPTIONS, SKIP)
        conv = next(node for node in pruned.graph.node if node.input[1:2] == [weight])
        target = channel_stats(dense.model, "input", [conv.output[0]], [x])[conv.output[0]]
        match_statistics(pruned, conv, ("input", [x]), target)
        expected = _cross_entropy(pruned, x, labels) - _cross_entropy(dense.model, x, labels)
        assert layer.loss_increase[-1] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_a_model_ending_in_softmax_measures_the_same(data_dir):
    model = tiny_cnn()
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    model.graph.output[0].name = "probabilities"
    with_softmax = measure_sensitivity(load_model(model), OPTIONS, SKIP, data_dir, images=20)
    plain = measure_sensitivity(load_model(tiny_cnn()), OPTIONS, SKIP, data_dir, images=20)
    for weight in plain:
        np.testing.assert_allclose(with_softmax[weight].loss_increase, plain[weight].loss_increase, atol=1e-5)


def test_prune_to_a_speedup_with_the_sensitivity_allocation(capsys, model_path, data_dir, tmp_path):
    out = tmp_path / "fast.onnx"
    args = ["prune", str(model_path), "-o", str(out), "--target-speedup", "1.2", "--json"]
    code, stdout, _ = run_cli(capsys, *args, "--allocation", "sensitivity", "--data", str(data_dir))
    assert code == 0
    latency = json.loads(stdout)["latency"]
    assert latency["simulated"] and latency["speedup"] == pytest.approx(1.2, rel=0.02)
    assert out.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--target-speedup", "1.2", "--allocation", "sensitivity"], "measures each layer on train images"),
        (["--target-speedup", "1.2", "--data", "{data}"], "data are read by the sensitivity allocation only"),
        (["--data", "{data}"], "--allocation and --data set how --target-speedup"),
        (["--target-speedup", "1.2", "--allocation", "taylor"], "unknown allocation 'taylor'"),
    ],
)
def test_sensitivity_options_that_do_not_fit_fail_with_one_line(
    capsys, model_path, data_dir, tmp_path, options, message
):
    out = tmp_path / "out.onnx"
    filled = [str(data_dir) if option == "{data}" else option for option in options]
    code, _, stderr = run_cli(capsys, "prune", str(model_path), "-o", str(out), *filled)
    assert code == 2 and message in stderr and stderr.count("\n") == 1
    assert not out.exists()


def test_sweep_speedups_with_the_sensitivity_allocation_name_it_in_the_recipe(capsys, model_path, data_dir, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", str(model_path), "--data", str(data_dir), "-o", str(out), "--patterns", "group", "--epochs", "0"]
    code, _, stderr = run_cli(capsys, *args, "--sparsities", "0.5", "--speedups", "1.2", "--allocation", "sensitivity")
    assert code == 0, stderr
    with open(out / "results.csv", newline="") as f:
        rows = {(r["sparsity_target"], r["speedup_target"]): r for r in csv.DictReader(f)}
    assert not any(r["error"] for r in rows.values())
    assert rows[("", "1.2")]["recipe"].endswith(", sensitivity allocation")
    assert "allocation" not in rows[("0.5", "")]["recipe"]  # a sparsity target allocates no cycles
    assert float(rows[("", "1.2")]["vta_speedup"]) == pytest.approx(1.2, rel=0.02)
    code, _, _ = run_cli(capsys, *args, "--speedups", "1.2")  # the default allocation at the same speed: a new point
    with open(out / "results.csv", newline="") as f:
        assert len([r for r in csv.DictReader(f) if r["speedup_target"] == "1.2"]) == 2
    assert code == 0 and len(list((out / "points").glob("group-1.2x-seed0-*"))) == 2  # each its own models


def test_sweep_allocation_without_speedups_is_refused(capsys, model_path, data_dir, tmp_path):
    args = ["sweep", str(model_path), "--data", str(data_dir), "-o", str(tmp_path / "s"), "--allocation", "sensitivity"]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2 and "--allocation spreads the pruning of --speedups targets" in stderr
    assert not (tmp_path / "s").exists()
