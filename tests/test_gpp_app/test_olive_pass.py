"""The Olive pass (the ``olive`` extra): the example workflow runs through ``olive run`` with the shipped package
config (prune -> ONNX Runtime QDQ static quantization -> accuracy), and bad settings fail with the library's
one-line message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

try:
    pytest.importorskip("olive", reason="needs the olive extra (pip install -e '.[olive]')")
except RuntimeError as exc:  # olive imports torchmetrics, which imports any installed torchvision
    reason = "PyPI's torchvision does not load beside the CPU torch; uninstall it (onnx2torch has a stand-in)"
    pytest.fail(f"olive does not import ({exc}): {reason}", pytrace=False)

from olive.model import ONNXModelHandler  # noqa: E402
from olive.package_config import OlivePackageConfig  # noqa: E402
from olive.passes.olive_pass import create_pass_from_dict  # noqa: E402

import gpp_onnx  # noqa: E402
from gpp_app.olive_pass import PACKAGE_CONFIG, GroupPatternPruning  # noqa: E402
from gpp_onnx.tiles import TileShape  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "olive"


@pytest.fixture
def workflow(tmp_path, model_path, data_dir) -> Path:
    """The example workflow on the tiny CNN and the 25-image CIFAR-10 fixture, writing under ``tmp_path``."""
    config = json.loads((EXAMPLE / "workflow.json").read_text())
    config["input_model"]["model_path"] = str(model_path)
    for data_config in config["data_configs"]:
        data_config["user_script"] = str(EXAMPLE / "user_script.py")
        data_config["load_dataset_config"]["params"]["data_dir"] = str(data_dir)
    config.update(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "output"))
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(config))
    return path


def run_olive(workflow: Path) -> subprocess.CompletedProcess:
    """``olive run --config WORKFLOW --package-config "$(python -m gpp_app.olive_pass)"``, as the example's README
    says, offline."""
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1"}
    printed = subprocess.run([sys.executable, "-m", "gpp_app.olive_pass"], env=env, capture_output=True, text=True)
    assert printed.stdout.strip() == str(PACKAGE_CONFIG), printed.stderr
    command = [sys.executable, "-m", "olive", "run", "--config", str(workflow), "--package-config", str(PACKAGE_CONFIG)]
    return subprocess.run(command, cwd=workflow.parent, env=env, capture_output=True, text=True, timeout=300)


def pruned_model_path(footprint: Path) -> Path:
    """Where the footprint says the pruning pass wrote its model."""
    run = next(r for r in json.loads(footprint.read_text()).values() if r["from_pass"] == "grouppatternpruning")
    return Path(run["model_config_data"]["config"]["model_path"])


def test_example_workflow_prunes_quantizes_and_evaluates(workflow):
    result = run_olive(workflow)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = workflow.parent / "output"
    pruned = gpp_onnx.inspect(pruned_model_path(output / "footprint.json"))
    assert pruned.pattern == "group" and abs(pruned.sparsity - 0.5) < 0.02
    assert [r.status for r in pruned.layers] == ["pruned", "pruned", "pruned", "skipped"]  # FC needs include_fc

    final = onnx.load(output / "model.onnx")
    annotation = gpp_onnx.read_annotation(final)
    assert annotation is not None and annotation.target_sparsity == 0.5
    assert annotation.achieved_sparsity == pytest.approx(pruned.sparsity)
    gpp_onnx.validate_annotation(final, annotation)  # the pruned tiles are still zero after quantization
    producers = {out: n.op_type for n in final.graph.node for out in n.output}
    convs = [n for n in final.graph.node if n.op_type == "Conv"]
    assert convs and all(producers[c.input[0]] == producers[c.input[1]] == "DequantizeLinear" for c in convs)

    for name in ("input_model_metrics.json", "metrics.json"):  # the dense model's and the pruned int8 model's
        assert 0.0 <= json.loads((output / name).read_text())["accuracy-accuracy_score"]["value"] <= 1.0


def run_pass(model_path: Path, out: Path, **config: object) -> onnx.ModelProto:
    """Run the pass through Olive's API on ``model_path``; the model it wrote."""
    the_pass = create_pass_from_dict(GroupPatternPruning, config, disable_search=True)
    written = the_pass.run(ONNXModelHandler(str(model_path)), str(out))
    return onnx.load(written.model_path)


def test_latency_target_and_vta_config(model_path, tmp_path):
    fast = gpp_onnx.read_annotation(run_pass(model_path, tmp_path / "fast", target_speedup=1.3))
    assert fast.scope == "latency" and fast.achieved_sparsity > 0
    vta_config = tmp_path / "vta_config.json"
    vta_config.write_text(json.dumps({"LOG_BLOCK": 3}))
    small = run_pass(model_path, tmp_path / "small", sparsity=0.7, scope="global", vta_config=str(vta_config))
    annotation = gpp_onnx.read_annotation(small)
    assert annotation.tile == TileShape(8, 8) and annotation.scope == "global"
    gpp_onnx.validate_annotation(small, annotation)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"sparsity": 0.5, "target_speedup": 1.5}, "give either sparsity or target_speedup, not both"),
        ({"pattern": "diagonal"}, "unknown pattern 'diagonal'; use one of group, block, channel, element"),
        ({"sparsity": 1.5}, "sparsity 1.5 is outside [0, 1)"),
        ({"tile": "vta_config.json"}, "tile takes OUTxIN; give a VTA config file as vta_config instead"),
        ({"board": "pynq"}, "board, allocation and sensitivity_data apply to target_speedup"),
        ({"allocation": "magnitude"}, "board, allocation and sensitivity_data apply to target_speedup"),
        ({"sensitivity_data": "data"}, "board, allocation and sensitivity_data apply to target_speedup"),
        ({"target_speedup": 1.2, "allocation": "sensitivity"}, "the sensitivity allocation measures each layer"),
        ({"target_speedup": 1.2, "scope": "global"}, "scope and tile do not apply with target_speedup"),
    ],
)
def test_bad_settings_fail_with_one_line(model_path, tmp_path, config, message):
    with pytest.raises(ValueError) as caught:
        run_pass(model_path, tmp_path / "out", **config)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_package_config_lists_our_pass_and_olive_s_own_entries_unchanged():
    ours = OlivePackageConfig.parse_file_or_obj(PACKAGE_CONFIG)
    assert ours.import_pass_module("GroupPatternPruning") is GroupPatternPruning
    olive_defaults = OlivePackageConfig.load_default_config().passes
    for name, entry in ours.passes.items():
        if name != "grouppatternpruning":
            assert entry == olive_defaults[name], f"{name} differs from the installed Olive's entry"


def test_example_dataset_feeds_channels_last_models(data_dir):
    """``"channels_last": true`` in the example's data configs gives a TensorFlow-exported model HWC images,
    the same values as the CHW ones."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("olive_user_script", EXAMPLE / "user_script.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    chw = script.cifar10_dataset(str(data_dir), limit=4)
    hwc = script.cifar10_dataset(str(data_dir), limit=4, channels_last=True, input_name="x")
    (feed_chw, label_chw), (feed_hwc, label_hwc) = chw[3], hwc[3]
    assert feed_chw["input"].shape == (3, 32, 32) and feed_hwc["x"].shape == (32, 32, 3)
    assert (feed_hwc["x"] == feed_chw["input"].permute(1, 2, 0)).all() and label_chw == label_hwc
