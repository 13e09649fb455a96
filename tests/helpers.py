"""Shared test helpers: synthetic ONNX models, CIFAR-10 files in each layout, and the CLI runner."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from gpp_app import data
from gpp_onnx.normalization import write_normalization

ORT_MAX_OPSET = 21  # every released onnxruntime the project supports runs opset 21


def conv_model(
    weights: Sequence[np.ndarray],
    input_shape: Sequence[int],
    op: str = "Conv",
    opset: int = 17,
    attrs: Sequence[dict] | None = None,
    weight_dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A chain of convs (Relu between them) whose weights are initializers ``W0``, ``W1``, ..."""
    nodes, inits = [], []
    current = "x"
    for i, w in enumerate(weights):
        extra = (attrs[i] if attrs else {}) or {}
        name = f"W{i}"
        inits.append(numpy_helper.from_array(w, name))
        inputs = [current, name]
        if weight_dtype != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT, name=f"cast{i}"))
            inputs = [current, f"{name}_f"]
        nodes.append(helper.make_node(op, inputs, [f"c{i}"], name=f"conv{i}", **extra))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        current = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, symbolic_shape(len(input_shape)))],
        inits,
    )
    return make_model(graph, opset)


def symbolic_shape(rank: int) -> list[str]:
    return [f"d{i}" for i in range(rank)]


def make_model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    if model.ir_version < 4:  # IR 3 lists initializers among the graph inputs
        model.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
        )
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv 3->16 (stays on the CPU), two 3x3 convs with bias and Relu on VTA, a residual Add, GAP, FC."""
    rng = np.random.default_rng(seed)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)

    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [
            (he(16, 3, 3, 3), "w0"),
            (he(32, 16, 3, 3), "w1"),
            (rng.standard_normal(32).astype(np.float32) * 0.1, "b1"),
            (he(32, 32, 3, 3), "w2"),
            (he(10, 32), "fc"),
        ]
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Add", ["c2", "r1"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    write_normalization(model, data.IMAGENET_MEAN, data.IMAGENET_STD)
    return model


def channels_last(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as TensorFlow exports take images: [N, H, W, C], transposed to NCHW in the graph."""
    graph = model.graph
    name = graph.input[0].name
    n, c, h, w = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    elem = graph.input[0].type.tensor_type.elem_type
    graph.input[0].CopyFrom(helper.make_tensor_value_info(f"{name}_nhwc", elem, [n, h, w, c]))
    graph.node.insert(0, helper.make_node("Transpose", [f"{name}_nhwc"], [name], name="to_nchw", perm=[0, 3, 1, 2]))
    return model


IMAGES = np.random.default_rng(0).integers(0, 256, (25, 3, 32, 32)).astype(np.uint8)


LABELS = np.arange(25) % 10


def write_pickle(root: Path, str_keys: bool) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(
            {key("data"): IMAGES.reshape(25, -1), key("labels"): LABELS.tolist(), key("batch_label"): "test"}, f
        )
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({key("data"): IMAGES[::-1].reshape(25, -1), key("labels"): LABELS[::-1].tolist()}, f)
    return folder


def write_binary(root: Path) -> Path:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    records = np.concatenate([LABELS[:, None].astype(np.uint8), IMAGES.reshape(25, -1)], axis=1)
    records.tofile(folder / "test_batch.bin")
    return folder


def write_folders(root: Path, suffix: str = ".png") -> Path:
    for i, (image, label) in enumerate(zip(IMAGES, LABELS)):
        folder = root / "test" / data.CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}{suffix}")
    return root


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``gpp-onnx ARGS`` in this process; returns the exit status, stdout and stderr."""
    from gpp_app.cli import main

    old = sys.argv
    sys.argv = ["gpp-onnx", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err
