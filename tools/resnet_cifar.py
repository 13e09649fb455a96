"""CIFAR ResNet-N graphs (N = 6n + 2: 20, 32, 44, 56, 110) with random weights, for benchmarks.

The architecture of He et al. 2016's CIFAR networks as ``examples/export_resnet20.py`` exports
them (batch-norm folded into the convs): a 3x3 stem of 16 channels, three stages of ``n`` basic
blocks with 16, 32 and 64 channels, option-A shortcuts (stride-2 subsampling by Slice, the new
channels zero-padded by Pad), global average pooling and a 10-way Gemm. Weights are He-normal,
biases small: the figures a benchmark takes from these graphs are cycles and times, not accuracy.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Graph:
    """Nodes and initializers of the graph being built."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def conv(self, name: str, source: str, cin: int, cout: int, stride: int, relu: bool) -> str:
        weight = self.rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))
        inputs = [
            source,
            self.constant(f"{name}.weight", weight.astype(np.float32)),
            self.constant(f"{name}.bias", (self.rng.standard_normal(cout) * 0.05).astype(np.float32)),
        ]
        out = f"{name}.out"
        self.nodes.append(
            helper.make_node("Conv", inputs, [out], name=f"/{name}/Conv", pads=[1] * 4, strides=[stride] * 2)
        )
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"]))
            return f"{name}.relu"
        return out

    def shortcut(self, name: str, source: str, cin: int, cout: int) -> str:
        """Option A: every second pixel, channels zero-padded on both sides."""
        starts, ends = self.constant(f"{name}.starts", np.array([0, 0], np.int64)), f"{name}.ends"
        self.constant(ends, np.array([1 << 30, 1 << 30], np.int64))
        axes, steps = self.constant(f"{name}.axes", np.array([2, 3], np.int64)), f"{name}.steps"
        self.constant(steps, np.array([2, 2], np.int64))
        self.nodes.append(helper.make_node("Slice", [source, starts, ends, axes, steps], [f"{name}.sub"]))
        pad = (cout - cin) // 2
        pads = self.constant(f"{name}.pads", np.array([0, pad, 0, 0, 0, pad, 0, 0], np.int64))
        self.nodes.append(helper.make_node("Pad", [f"{name}.sub", pads], [f"{name}.padded"]))
        return f"{name}.padded"

    def block(self, name: str, source: str, cin: int, cout: int, stride: int) -> str:
        out = self.conv(f"{name}/conv1", source, cin, cout, stride, relu=True)
        out = self.conv(f"{name}/conv2", out, cout, cout, 1, relu=False)
        residual = source if stride == 1 and cin == cout else self.shortcut(f"{name}/shortcut", source, cin, cout)
        self.nodes.append(helper.make_node("Add", [out, residual], [f"{name}.add"]))
        self.nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"]))
        return f"{name}.out"


def resnet_cifar(depth: int = 20, seed: int = 0) -> onnx.ModelProto:
    """CIFAR ResNet-``depth`` (``depth = 6n + 2``) with random weights, input ``[N, 3, 32, 32]``."""
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), not {depth}")
    blocks = (depth - 2) // 6
    g = _Graph(seed)
    out = g.conv("conv1", "input", 3, 16, 1, relu=True)
    channels = 16
    for stage, width in enumerate((16, 32, 64), start=1):
        for index in range(blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            out = g.block(f"layer{stage}/layer{stage}.{index}", out, channels, width, stride)
            channels = width
    g.nodes.append(helper.make_node("GlobalAveragePool", [out], ["pooled"]))
    g.nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    fc = g.constant("fc.weight", (g.rng.standard_normal((10, 64)) * 0.1).astype(np.float32))
    g.nodes.append(
        helper.make_node("Gemm", ["flat", fc, g.constant("fc.bias", np.zeros(10, np.float32))], ["logits"], transB=1)
    )
    graph = helper.make_graph(
        g.nodes,
        f"resnet{depth}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
