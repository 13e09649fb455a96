"""Accuracy recovery: recalibration (ONNX only), masked fine-tuning (torch), and the sweep."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import channels_last, run_cli, tiny_cnn
from onnx import numpy_helper

import gpp_onnx
from gpp_app import data
from gpp_app.recalibrate import channel_stats, recalibrate
from gpp_onnx import UserError
from gpp_onnx.normalization import read_normalization


@pytest.fixture
def dense_path(model_path) -> Path:
    return model_path


@pytest.fixture
def pruned_path(tmp_path, dense_path) -> Path:
    pruned, _ = gpp_onnx.prune(dense_path, 0.5, exclude=["conv0"])
    path = tmp_path / "pruned.onnx"
    onnx.save(pruned, path)
    return path


def weights(path_or_model) -> dict[str, np.ndarray]:
    model = onnx.load(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_recalibration_matches_dense_statistics_and_keeps_zeros(pruned_path, dense_path, data_dir):
    pruned, dense = onnx.load(pruned_path), onnx.load(dense_path)
    dataset = data.locate(data_dir)
    result, folded = recalibrate(pruned, dense, "input", dataset, data.IMAGENET_MEAN, data.IMAGENET_STD, images=25)
    assert [f["node"] for f in folded] == ["conv1", "conv2"]
    calibration = [
        data.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD) for x, _ in data.iter_uint8(dataset, "train", 25)
    ]
    target = channel_stats(dense, "input", ["c1", "c2"], calibration)
    got = channel_stats(result, "input", ["c1", "c2"], calibration)
    for name in ("c1", "c2"):
        np.testing.assert_allclose(got[name][0], target[name][0], atol=1e-3)  # means match
        np.testing.assert_allclose(np.sqrt(got[name][1]), np.sqrt(target[name][1]), rtol=1e-3, atol=1e-4)  # stds
    before, after = weights(pruned), weights(result)
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(after[name] == 0, before[name] == 0)  # pruned tiles stay zero
    gpp_onnx.validate_annotation(result, gpp_onnx.read_annotation(result))


def test_channel_statistics_of_tensors_of_different_sizes_are_each_their_own(dense_path, data_dir):
    """c0 is 32x32 and c1 16x16: asking for both at once gives what asking for each alone gives (a
    shared pixel count once divided c1's sums by c0's, shrinking later stages' targets 4x per stride)."""
    dense, dataset = onnx.load(dense_path), data.locate(data_dir)
    images = [data.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD) for x, _ in data.iter_uint8(dataset, "train", 8)]
    together = channel_stats(dense, "input", ["c0", "c1"], images)
    for name in ("c0", "c1"):
        alone = channel_stats(dense, "input", [name], images)[name]
        np.testing.assert_allclose(together[name][0], alone[0], rtol=1e-9)
        np.testing.assert_allclose(together[name][1], alone[1], rtol=1e-9)


def test_recalibrate_command_and_prune_recalibrate(capsys, pruned_path, dense_path, data_dir, tmp_path):
    out = tmp_path / "recal.onnx"
    code, stdout, _ = run_cli(
        capsys,
        "recalibrate",
        str(pruned_path),
        "--dense",
        str(dense_path),
        "--data",
        str(data_dir),
        "--images",
        "25",
        "-o",
        str(out),
        "--json",
    )
    assert code == 0
    summary = json.loads(stdout)
    assert {"accuracy_before", "accuracy_after", "test_images"} <= set(summary) and out.exists()
    out2 = tmp_path / "pruned-recal.onnx"
    code, _, _ = run_cli(
        capsys,
        "prune",
        str(dense_path),
        "-o",
        str(out2),
        "--sparsity",
        "0.5",
        "--exclude",
        "conv0",
        "--recalibrate",
        str(data_dir),
        "--recalibrate-images",
        "25",
    )
    assert code == 0
    np.testing.assert_allclose(weights(out2)["w1"], weights(out)["w1"], rtol=1e-5, atol=1e-6)


def test_recalibrate_needs_the_matching_dense_model(pruned_path, data_dir, tmp_path):
    other = tiny_cnn()
    other.graph.node[2].output[0] = "renamed"
    other.graph.node[3].input[0] = "renamed"
    with pytest.raises(UserError, match="dense model has no tensor 'c1'"):
        recalibrate(
            onnx.load(pruned_path), other, "input", data.locate(data_dir), data.IMAGENET_MEAN, data.IMAGENET_STD, 25
        )


def test_finetune_keeps_pruned_tiles_zero_and_carries_metadata(torch, capsys, pruned_path, data_dir, tmp_path):
    out = tmp_path / "ft.onnx"
    code, stdout, _ = run_cli(
        capsys,
        "finetune",
        str(pruned_path),
        "--data",
        str(data_dir),
        "--epochs",
        "2",
        "--batch",
        "8",
        "--lr",
        "0.01",
        "-o",
        str(out),
        "--json",
    )
    assert code == 0
    result = json.loads(stdout)
    assert len(result["history"]) == 2 and 0 <= result["test_accuracy"] <= 1 and result["frozen_weights"] > 0
    before, after = weights(pruned_path), weights(out)
    for name in ("w1", "w2"):
        assert not np.array_equal(after[name], before[name])  # trained ...
        np.testing.assert_array_equal(after[name][before[name] == 0], 0)  # ... with the pruned tiles exactly zero
    tuned = onnx.load(out)
    gpp_onnx.validate_annotation(tuned, gpp_onnx.read_annotation(tuned))
    assert read_normalization(tuned) == read_normalization(onnx.load(pruned_path))
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in onnx.load(pruned_path).graph.node]
    assert (tmp_path / "ft.onnx.ckpt").exists()


def test_finetune_resume_continues_from_the_checkpoint(torch, pruned_path, data_dir, tmp_path):
    from gpp_app.finetune import FinetuneOptions, finetune

    out = tmp_path / "ft.onnx"
    finetune(pruned_path, data_dir, out, FinetuneOptions(epochs=1, batch=8))
    resumed = finetune(pruned_path, data_dir, out, FinetuneOptions(epochs=1, batch=8, resume=True))
    assert len(resumed.history) == 1  # nothing left to train: the checkpoint already holds epoch 1
    with pytest.raises(UserError, match="other options"):
        finetune(pruned_path, data_dir, out, FinetuneOptions(epochs=1, batch=16, resume=True))


def test_dense_model_finetunes_too(torch, dense_path, data_dir, tmp_path):
    from gpp_app.finetune import FinetuneOptions, finetune

    result = finetune(dense_path, data_dir, tmp_path / "dense-ft.onnx", FinetuneOptions(epochs=1, batch=8))
    assert result.frozen_weights == 0


def test_without_torch_the_command_says_what_to_install(capsys, pruned_path, data_dir, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    code, _, stderr = run_cli(
        capsys, "finetune", str(pruned_path), "--data", str(data_dir), "-o", str(tmp_path / "x.onnx")
    )
    assert code == 2 and "pip install -e '.[train]'" in stderr and stderr.count("\n") == 1


def test_sweep_writes_csv_and_plots_and_resumes(torch, capsys, dense_path, data_dir, tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        str(dense_path),
        "--data",
        str(data_dir),
        "-o",
        str(out),
        "--patterns",
        "group,block",
        "--sparsities",
        "0.5",
        "--epochs",
        "1",
        "--exclude",
        "conv0",
    ]
    code, _, _ = run_cli(capsys, *args)
    assert code == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["pattern"] for r in rows] == ["group", "block"] and not any(r["error"] for r in rows)
    assert set(rows[0]) >= {
        "pattern",
        "sparsity_target",
        "sparsity_achieved",
        "epochs",
        "accuracy_before_ort",
        "accuracy_recalibrated_ort",
        "accuracy_after_ort",
        "accuracy_after_vta",
        "vta_cycles",
        "vta_speedup",
    }
    assert float(rows[0]["vta_speedup"]) > 1
    for png in ("accuracy.png", "speedup.png", "accuracy-vs-cycles.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    stamp = (out / "results.csv").stat().st_mtime_ns
    assert run_cli(capsys, *args)[0] == 0  # resumed: nothing left to do
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (out / "results.csv").stat().st_mtime_ns == stamp


def test_a_failing_point_is_reported_and_the_others_go_on(capsys, dense_path, data_dir, tmp_path):
    out = tmp_path / "sweep"
    code, _, _ = run_cli(
        capsys,
        "sweep",
        str(dense_path),
        "--data",
        str(data_dir),
        "-o",
        str(out),
        "--patterns",
        "group,channel",
        "--sparsities",
        "0.5",
        "--epochs",
        "0",
        "--exclude",
        ".*",
    )
    assert code == 0  # everything excluded: each point fails on its own
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all("no prunable layer" in r["error"] for r in rows)


def test_a_diverging_run_stops_with_a_clear_error(torch, pruned_path, data_dir, tmp_path):
    from gpp_app.finetune import FinetuneOptions, finetune

    with pytest.raises(UserError, match="training diverged .* lower --lr"):
        finetune(pruned_path, data_dir, tmp_path / "x.onnx", FinetuneOptions(epochs=3, batch=8, lr=1e12))
    assert not (tmp_path / "x.onnx").exists()


def test_gradual_pruning_reaches_the_target_with_a_valid_annotation(torch, dense_path, data_dir, tmp_path):
    from gpp_app.finetune import FinetuneOptions, finetune
    from gpp_onnx.pruner import PruneOptions

    gradual = PruneOptions(0.5, "group", "layer", exclude=("conv0",))
    out = tmp_path / "gradual.onnx"
    result = finetune(dense_path, data_dir, out, FinetuneOptions(epochs=2, batch=8, gradual=gradual))
    tuned = onnx.load(out)
    annotation = gpp_onnx.read_annotation(tuned)
    gpp_onnx.validate_annotation(tuned, annotation)
    assert annotation.pattern == "group" and abs(annotation.achieved_sparsity - 0.5) < 0.05
    assert result.frozen_weights > 0


def test_a_gradual_schedule_below_the_current_sparsity_is_refused(torch, pruned_path, data_dir, tmp_path):
    from gpp_app.finetune import FinetuneOptions, finetune
    from gpp_onnx.pruner import PruneOptions

    options = FinetuneOptions(epochs=1, batch=8, gradual=PruneOptions(0.2, "group", exclude=("conv0",)))
    with pytest.raises(UserError, match="below the model's"):
        finetune(pruned_path, data_dir, tmp_path / "x.onnx", options)
    assert not (tmp_path / "x.onnx").exists()


def test_distillation_from_a_teacher_with_other_outputs_is_refused(torch, pruned_path, data_dir, tmp_path):
    from gpp_app.finetune import FinetuneOptions, finetune

    other = tiny_cnn()
    other.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 10
    fc = next(t for t in other.graph.initializer if t.name == "fc")
    fc.CopyFrom(numpy_helper.from_array(np.zeros((7, 32), np.float32), "fc"))  # 7 classes instead of 10
    other.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7
    teacher = tmp_path / "teacher.onnx"
    onnx.save(other, teacher)
    options = FinetuneOptions(epochs=1, batch=8, teacher=str(teacher))
    with pytest.raises(UserError, match="outputs \\[2, 7\\], the student \\[2, 10\\]"):
        finetune(pruned_path, data_dir, tmp_path / "x.onnx", options)
    assert not (tmp_path / "x.onnx").exists()


def test_restored_batchnorm_leaves_the_function_unchanged_until_trained(torch, pruned_path, data_dir):
    from gpp_app.finetune import split_in_memory
    from gpp_app.torch_model import to_trainable

    dataset = data.locate(data_dir)
    images, _ = split_in_memory(str(dataset.root), dataset.layout, "train", None)
    x = torch.from_numpy(data.normalize(images, data.IMAGENET_MEAN, data.IMAGENET_STD))
    trainable = to_trainable(onnx.load(pruned_path))
    before = trainable.module.eval()(x).detach()
    trainable.restore_batchnorm([x])
    assert len(trainable.batchnorms) == 1  # conv1 has a bias initializer; conv0 and conv2 have none
    torch.testing.assert_close(trainable.module.eval()(x).detach(), before, rtol=1e-4, atol=1e-4)
    model = onnx.load(pruned_path)
    trainable.write_back(model)  # folds the batch-norm back: the ONNX model computes the same
    np.testing.assert_allclose(weights(model)["w1"], weights(pruned_path)["w1"], rtol=1e-4, atol=1e-5)


def test_quantization_aware_epochs_keep_the_pruned_tiles_and_the_graph(torch, pruned_path, data_dir, tmp_path):
    from gpp_app.finetune import FinetuneOptions, finetune

    out = tmp_path / "qat.onnx"
    finetune(pruned_path, data_dir, out, FinetuneOptions(epochs=2, batch=8, qat_epochs=1))
    tuned, source = onnx.load(out), onnx.load(pruned_path)
    gpp_onnx.validate_annotation(tuned, gpp_onnx.read_annotation(tuned))
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in source.graph.node]
    assert not np.array_equal(weights(tuned)["w2"], weights(source)["w2"])
    with pytest.raises(UserError, match="--qat-epochs 3 must be between 0 and --epochs 2"):
        FinetuneOptions(epochs=2, qat_epochs=3).check()


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--epochs", "2", "--qat-epochs", "3"], "--qat-epochs 3 must be between 0 and --epochs 2"),
        (["--gradual", "0.2", "-x", "conv0"], "below the model's"),
        (["--kd-weight", "1.5"], "--kd-weight in [0, 1]"),
        (["--gradual", "0.5", "--gradual-until", "0"], "--gradual-until 0.0 is outside (0, 1]"),
        (["--teacher", "missing.onnx"], "does not exist"),
    ],
)
def test_contradicting_recipe_options_fail_before_training(
    torch, capsys, pruned_path, data_dir, tmp_path, extra, expected
):
    out = tmp_path / "ft.onnx"
    code, stdout, stderr = run_cli(
        capsys, "finetune", str(pruned_path), "--data", str(data_dir), "-o", str(out), *extra
    )
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr and "Traceback" not in stdout + stderr
    assert not out.exists() and not (tmp_path / "ft.onnx.ckpt").exists()


@pytest.mark.parametrize("stop_before", [1, 2])  # interrupted before the QAT epoch, or during it (epochs 0-based)
def test_an_interrupted_qat_run_resumes_from_its_checkpoint(
    torch, monkeypatch, pruned_path, data_dir, tmp_path, stop_before
):
    from gpp_app import finetune as module

    out, options = tmp_path / "qat.onnx", module.FinetuneOptions(epochs=3, batch=8, qat_epochs=2)
    real_epoch = module._Trainer.epoch

    def interrupted(self, epoch, on_step):
        if epoch == stop_before:
            raise KeyboardInterrupt
        real_epoch(self, epoch, on_step)

    monkeypatch.setattr(module._Trainer, "epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        module.finetune(pruned_path, data_dir, out, options)
    assert not out.exists() and module.checkpoint_path(out).exists()
    monkeypatch.setattr(module._Trainer, "epoch", real_epoch)
    result = module.finetune(pruned_path, data_dir, out, module.FinetuneOptions(**{**vars(options), "resume": True}))
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    tuned = onnx.load(out)
    gpp_onnx.validate_annotation(tuned, gpp_onnx.read_annotation(tuned))


def test_resume_refuses_a_checkpoint_of_another_model_or_a_garbage_file(
    torch, dense_path, pruned_path, data_dir, tmp_path
):
    from gpp_app.finetune import FinetuneOptions, checkpoint_path, finetune

    out = tmp_path / "ft.onnx"
    finetune(dense_path, data_dir, out, FinetuneOptions(epochs=1, batch=8))  # leaves the dense model's checkpoint
    out.unlink()
    with pytest.raises(UserError, match="belongs to another model"):
        finetune(pruned_path, data_dir, out, FinetuneOptions(epochs=1, batch=8, resume=True))
    checkpoint_path(out).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be resumed"):
        finetune(pruned_path, data_dir, out, FinetuneOptions(epochs=1, batch=8, resume=True))
    assert not out.exists()


def test_a_second_sweep_on_the_same_folder_is_refused(capsys, dense_path, data_dir, tmp_path):
    import fcntl

    out = tmp_path / "sweep"
    out.mkdir()
    lock = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep holds its folder
        code, _, stderr = run_cli(capsys, "sweep", str(dense_path), "--data", str(data_dir), "-o", str(out))
    finally:
        os.close(lock)
    assert code == 2 and "another gpp-onnx sweep is writing to" in stderr and stderr.count("\n") == 1
    assert list(out.iterdir()) == []  # no results, no lock file


def test_sigterm_stops_a_command_cleanly_without_leftovers(data_dir, pruned_path, tmp_path):
    import shutil
    import signal
    import subprocess
    import time

    out = tmp_path / "out" / "ft.onnx"
    out.parent.mkdir()
    command = [shutil.which("gpp-onnx"), "finetune", str(pruned_path), "--data", str(data_dir), "-o", str(out)]
    process = subprocess.Popen(command + ["--epochs", "2000", "--batch", "1"], stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # well into training (or still importing torch: either way it must stop cleanly)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert [p.name for p in out.parent.iterdir()] in ([], ["ft.onnx.ckpt"])  # at most a whole checkpoint


def test_sigterm_during_finetune_leaves_the_checkpoint_and_resume_finishes(torch, pruned_path, data_dir, tmp_path):
    """A real SIGTERM to ``gpp-onnx finetune`` after its first checkpoint: exit 130 with one line, no
    output model, no temporary file; ``--resume`` then trains the remaining epochs to a valid model."""
    import os
    import shutil
    import signal
    import subprocess
    import time

    out, temp = tmp_path / "ft.onnx", tmp_path / "tmp"
    temp.mkdir()
    command = [shutil.which("gpp-onnx"), "finetune", str(pruned_path), "--data", str(data_dir), "-o", str(out)]
    command += ["--epochs", "40", "--batch", "8", "--eval-limit", "5"]
    env = dict(os.environ, TMPDIR=str(temp))
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "ft.onnx.ckpt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "fine-tuning finished before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and [line for line in stderr.splitlines() if line.strip()] == [
        "error: interrupted; no partial output was left behind"
    ], stderr
    assert not out.exists() and checkpoint.exists()
    leftovers = [p.name for p in temp.iterdir() if p.name.startswith(("gpp-onnx", ".ft"))]
    assert leftovers == [] and sorted(p.name for p in tmp_path.glob(".ft*")) == []
    done = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tuned = onnx.load(out)
    gpp_onnx.validate_annotation(tuned, gpp_onnx.read_annotation(tuned))


def test_sweep_empties_layers_only_when_allowed(capsys, dense_path, data_dir, tmp_path):
    """Block pruning at 95 % must zero whole layers of the tiny CNN; the sweep does so only when told."""
    achieved = {}
    for allow in (False, True):
        out = tmp_path / f"sweep-{allow}"
        flags = ["--allow-empty-layers"] if allow else []
        args = ["sweep", str(dense_path), "--data", str(data_dir), "-o", str(out), "--patterns", "block"]
        code, _, _ = run_cli(
            capsys, *args, "--sparsities", "0.95", "--layer-floor", "0", "--epochs", "0", "--eval-limit", "20", *flags
        )
        assert code == 0
        with open(out / "results.csv", newline="") as f:
            (row,) = list(csv.DictReader(f))
        assert not row["error"] and ("empty layers allowed" in row["recipe"]) == allow
        achieved[allow] = float(row["sparsity_achieved"])
    assert achieved[False] < 0.95 <= achieved[True] + 0.01
    code, _, stderr = run_cli(capsys, "sweep", str(dense_path), "--data", str(data_dir), "--allow-empty-layers")
    assert code == 2 and "pass --layer-floor 0 with it" in stderr  # the default floor would keep a unit anyway


def test_a_channels_last_model_is_recalibrated_and_finetuned_like_its_nchw_twin(torch, capsys, data_dir, tmp_path):
    """A TensorFlow-style [N, H, W, C] model gets the images in its layout in recalibration and
    fine-tuning (with the dense model as teacher): the same weights as the NCHW model's come out."""
    tuned = {}
    for layout, model in (("nchw", tiny_cnn()), ("nhwc", channels_last(tiny_cnn()))):
        dense, pruned, out = (tmp_path / f"{layout}-{name}.onnx" for name in ("dense", "pruned", "tuned"))
        onnx.save(model, dense)
        recalibrate_options = ["--recalibrate", str(data_dir), "--recalibrate-images", "25"]
        code, _, _ = run_cli(capsys, "prune", str(dense), "-o", str(pruned), "--exclude", "conv0", *recalibrate_options)
        assert code == 0
        tune = ["--epochs", "1", "--batch", "8", "--lr", "0.01", "--teacher", str(dense), "--no-restore-bn"]
        code, _, stderr = run_cli(capsys, "finetune", str(pruned), "--data", str(data_dir), "-o", str(out), *tune)
        assert code == 0, stderr
        tuned[layout] = weights(out)
    assert onnx.load(tmp_path / "nhwc-tuned.onnx").graph.input[0].type.tensor_type.shape.dim[3].dim_value == 3
    for name in ("w1", "b1", "w2"):
        np.testing.assert_allclose(tuned["nhwc"][name], tuned["nchw"][name], rtol=1e-4, atol=1e-5)


def test_recalibration_and_qat_feed_a_fixed_batch_model_its_own_batch_size(torch, capsys, data_dir, tmp_path):
    """A model exported for batches of 1 (common in model zoos) is recalibrated, and calibrated for QAT,
    one image at a time."""
    model = tiny_cnn()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    dense, pruned = tmp_path / "batch1.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, dense)
    args = ["prune", str(dense), "-o", str(pruned), "--exclude", "conv0", "--recalibrate", str(data_dir)]
    code, _, stderr = run_cli(capsys, *args, "--recalibrate-images", "5")
    assert code == 0, stderr
    plain = weights(gpp_onnx.prune(model, 0.5, exclude=["conv0"])[0])["w1"]
    recalibrated = weights(pruned)["w1"]
    assert not np.allclose(recalibrated, plain) and np.array_equal(recalibrated == 0, plain == 0)
    tune = ["--epochs", "1", "--qat-epochs", "1", "--batch", "8", "--eval-limit", "5", "-o", str(tmp_path / "q.onnx")]
    code, _, stderr = run_cli(capsys, "finetune", str(pruned), "--data", str(data_dir), *tune)
    assert code == 0, stderr
