"""Synthetic ONNX models for the tests, built with onnx.helper."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def model_path(tmp_path):
    """A tiny CNN (first conv, two convs with bias / Relu / residual Add, GAP, FC) saved as a file."""
    from test_run import tiny_cnn

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), path)
    return path


@pytest.fixture
def data_dir(tmp_path):
    """25 CIFAR-10-shaped images in the python-pickle layout (test and one train batch)."""
    from test_data import write_pickle

    return write_pickle(tmp_path / "cifar", str_keys=False)
