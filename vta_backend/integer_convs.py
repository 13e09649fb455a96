"""Already-quantized convs (QLinearConv, ConvInteger) rewritten as float convs between DequantizeLinear
and QuantizeLinear, so that VTA runs them like the convs of a QDQ model.

``QLinearConv(x, xs, xz, w, ws, wz, ys, yz, B)`` becomes ``QuantizeLinear(Conv(DequantizeLinear(x),
DequantizeLinear(w), DequantizeLinear(B, xs * ws)), ys, yz)`` - the same function up to float
rounding - and ``ConvInteger(x, w, xz, wz)`` becomes ``Cast(Round(Conv(x - xz, w - wz)))`` through
DequantizeLinear with scale 1 (exact in float for the products' sums below 2**24). The int8
weights stay where they are (behind DequantizeLinear: the importer reads and prunes them as a QDQ
weight); the Conv keeps the node's name, so placement, annotation and reports name the same node.
VTA then re-quantizes the conv's input to its own power-of-two scale: that rounding is what running
these models on VTA costs (measured in tests/test_vta_backend/test_session_zoo.py). The rewrite
needs opset 13 (per-channel DequantizeLinear); older models keep these nodes on the CPU.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx.weights import GraphIndex

INTEGER_CONVS = ("QLinearConv", "ConvInteger")
MIN_OPSET = 13
CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def expand_integer_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every QLinearConv / ConvInteger whose scales are constants rewritten (a copy; the
    model itself when there is nothing to rewrite or its opset is below :data:`MIN_OPSET`)."""
    if opset(model) < MIN_OPSET or not any(n.op_type in INTEGER_CONVS for n in model.graph.node):
        return model
    index = GraphIndex(model.graph)
    expanded = onnx.ModelProto()
    expanded.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for name, node in zip(index.names, model.graph.node):
        rewrite = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        replacement = rewrite(name, node, index, expanded.graph) if rewrite is not None else None
        nodes.extend(replacement or [node])
    del expanded.graph.node[:]
    expanded.graph.node.extend(nodes)
    return expanded


def _conv(name: str, node: onnx.NodeProto, inputs: list[str], output: str) -> onnx.NodeProto:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in CONV_ATTRIBUTES}
    for key in ("auto_pad",):
        if isinstance(attributes.get(key), bytes):
            attributes[key] = attributes[key].decode()
    return helper.make_node("Conv", inputs, [output], name=name, **attributes)


def _weight_axis(index: GraphIndex, scale: str) -> dict[str, int]:
    """``axis=0`` for a per-output-channel weight scale."""
    value = index.constant_array(scale)
    return {"axis": 0} if value is not None and np.ndim(value) == 1 and np.size(value) > 1 else {}


def _qlinear(name: str, node: onnx.NodeProto, index: GraphIndex, graph: onnx.GraphProto) -> list[onnx.NodeProto] | None:
    x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero = node.input[:8]
    bias = node.input[8] if len(node.input) > 8 else ""
    scales = [index.constant_array(t) for t in (x_scale, w_scale)]
    if any(s is None for s in scales):
        return None  # computed scales: the node stays as it is (on the CPU)
    prefix = f"{name}/float"
    nodes = [
        helper.make_node("DequantizeLinear", [x, x_scale, x_zero], [f"{prefix}/x"], name=f"{prefix}/x"),
        helper.make_node(
            "DequantizeLinear",
            [w, w_scale, w_zero],
            [f"{prefix}/w"],
            name=f"{prefix}/w",
            **_weight_axis(index, w_scale),
        ),
    ]
    inputs = [f"{prefix}/x", f"{prefix}/w"]
    if bias:
        bias_scale = (np.asarray(scales[0], np.float32) * np.asarray(scales[1], np.float32)).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(bias_scale, f"{prefix}/b_scale"))
        axis = {"axis": 0} if bias_scale.ndim == 1 and bias_scale.size > 1 else {}
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [bias, f"{prefix}/b_scale"], [f"{prefix}/b"], name=f"{prefix}/b", **axis
            )
        )
        inputs.append(f"{prefix}/b")
    nodes.append(_conv(name, node, inputs, f"{prefix}/y"))
    nodes.append(
        helper.make_node("QuantizeLinear", [f"{prefix}/y", y_scale, y_zero], [node.output[0]], name=f"{prefix}/q")
    )
    return nodes


def _integer(name: str, node: onnx.NodeProto, index: GraphIndex, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    x, w = node.input[0], node.input[1]
    x_zero = node.input[2] if len(node.input) > 2 else ""
    w_zero = node.input[3] if len(node.input) > 3 else ""
    prefix = f"{name}/float"
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), f"{prefix}/one"))
    w_axis = _weight_axis(index, w_zero) if w_zero else {}
    if w_axis:  # a per-channel zero point needs a per-channel scale of ones
        ones = np.ones(np.size(index.constant_array(w_zero)), np.float32)
        graph.initializer.append(numpy_helper.from_array(ones, f"{prefix}/ones"))
    w_scale = f"{prefix}/ones" if w_axis else f"{prefix}/one"
    x_inputs = [x, f"{prefix}/one"] + ([x_zero] if x_zero else [])
    w_inputs = [w, w_scale] + ([w_zero] if w_zero else [])
    return [
        helper.make_node("DequantizeLinear", x_inputs, [f"{prefix}/x"], name=f"{prefix}/x"),
        helper.make_node("DequantizeLinear", w_inputs, [f"{prefix}/w"], name=f"{prefix}/w", **w_axis),
        _conv(name, node, [f"{prefix}/x", f"{prefix}/w"], f"{prefix}/y"),
        helper.make_node("Round", [f"{prefix}/y"], [f"{prefix}/rounded"], name=f"{prefix}/round"),
        helper.make_node("Cast", [f"{prefix}/rounded"], [node.output[0]], name=f"{prefix}/cast", to=TensorProto.INT32),
    ]


_REWRITES = {"QLinearConv": _qlinear, "ConvInteger": _integer}
