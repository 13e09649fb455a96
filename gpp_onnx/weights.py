"""Find the prunable weight tensors of an ONNX graph, wherever their values are stored.

A weight is reached from its consumer (Conv, ConvTranspose, QLinearConv, ConvInteger,
Gemm / MatMul with a constant 2-D weight) by walking back through Identity, Cast,
DequantizeLinear and QuantizeLinear to the tensor that holds the values: an
initializer or a Constant node. Pruning writes "zero" into that stored tensor, where
zero is the zero point when the values are quantized.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from gpp_onnx.errors import UserError

# op_type -> (weight input index, weight-scale input index, weight-zero-point input index)
CONV_OPS: dict[str, tuple[int, int | None, int | None]] = {
    "Conv": (1, None, None),
    "ConvTranspose": (1, None, None),
    "QLinearConv": (3, 4, 5),
    "ConvInteger": (1, None, 3),
}
FC_OPS = ("Gemm", "MatMul")
_PASS_THROUGH = ("Identity", "Cast")
_SUPPORTED_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "uint8", "int16", "uint16")}
_SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}


@dataclass
class StoredTensor:
    """Where a weight's values live and what 'zero' means for them."""

    name: str
    storage: str  # "initializer" or "constant"
    proto: onnx.TensorProto  # the tensor in the graph, rewritten in place by pruning
    values: np.ndarray
    zero: np.ndarray  # broadcastable to values, in the stored dtype
    scale: np.ndarray  # broadcastable float32 factor that turns |values - zero| into magnitudes

    def magnitude(self) -> np.ndarray:
        """|dequantized value| of every element, float32."""
        diff = np.abs(self.values.astype(np.float32) - self.zero.astype(np.float32))
        return diff if self.scale.size == 1 and self.scale.item() == 1.0 else diff * self.scale

    def dequantized(self) -> np.ndarray:
        """The float32 values the graph computes with: ``(values - zero) * scale`` (the values for floats)."""
        if self.values.dtype.kind == "f":
            return self.values.astype(np.float32)
        return ((self.values.astype(np.float32) - self.zero.astype(np.float32)) * self.scale).astype(np.float32)

    def nonzero(self) -> np.ndarray:
        """True where an element differs from zero (the zero point)."""
        return self.values != self.zero

    def replace_values(self, values: np.ndarray) -> None:
        """Write new values (same shape and dtype) into the graph's tensor."""
        doc = self.proto.doc_string
        self.proto.CopyFrom(numpy_helper.from_array(values, self.proto.name))
        self.proto.doc_string = doc
        self.values = values


@dataclass
class Layer:
    """One weight tensor and the node(s) that consume it."""

    weight: str
    nodes: list[str]
    op_type: str
    layout: str  # e.g. OIHW, IOHW (ConvTranspose), OI / IO (fully connected)
    groups: int
    shape: tuple[int, ...]
    stored: StoredTensor | None = None
    skip_reason: str | None = None
    is_fc: bool = False
    positions: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        self.positions = int(np.prod(self.shape[2:], dtype=np.int64)) if len(self.shape) > 2 else 1

    @property
    def name(self) -> str:
        """The consuming node names, comma-joined."""
        return ",".join(self.nodes)

    @property
    def in_major(self) -> bool:
        """True when the stored layout has input channels on axis 0 (IOHW, IO)."""
        return self.layout.startswith("I")

    @property
    def in_channels_per_group(self) -> int:
        """Input channels each output channel sees (1 for a depthwise conv)."""
        if self.is_fc:
            return self.shape[1] if self.layout == "OI" else self.shape[0]
        return self.shape[0] // self.groups if self.in_major else self.shape[1]


def node_names(graph: onnx.GraphProto) -> list[str]:
    """A name for every node: its own, or ``op_type_index`` where it has none."""
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(graph.node)]


def node_attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    """The value of a node attribute, or ``default`` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside If/Loop/Scan bodies (which may capture outer tensors)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subs:
                names.update(i for n in sub.node for i in n.input)
                names |= _subgraph_inputs(sub)
    return names


class GraphIndex:
    """Producers, consumers and constant tensors of a graph, for walking weights back."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.names = node_names(graph)
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(graph.node):
            for out in node.output:
                self.producer[out] = i
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(i)
        self.graph_outputs = {o.name for o in graph.output}
        self.captured = _subgraph_inputs(graph)

    def constant_tensor(self, name: str) -> tuple[onnx.TensorProto, str] | None:
        """The TensorProto holding ``name`` and its storage kind, if it is a constant."""
        if name in self.initializers:
            return self.initializers[name], "initializer"
        i = self.producer.get(name)
        if i is not None and self.graph.node[i].op_type == "Constant":
            for attr in self.graph.node[i].attribute:
                if attr.name == "value":
                    return attr.t, "constant"
        return None

    def constant_array(self, name: str) -> np.ndarray | None:
        """The values of a constant tensor (initializer or Constant output), or None."""
        found = self.constant_tensor(name) if name else None
        return None if found is None else numpy_helper.to_array(found[0])

    def dequantized_constant(self, name: str) -> np.ndarray | None:
        """A constant tensor, or the float32 output of a DequantizeLinear of constants (a QDQ model's
        bias), or None."""
        value = self.constant_array(name)
        if value is not None or name not in self.producer:
            return value
        node = self.graph.node[self.producer[name]]
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            return None
        values, scale = self.constant_array(node.input[0]), self.constant_array(node.input[1])
        zero = self.constant_array(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.int64)
        if values is None or scale is None or zero is None:
            return None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale, zero = _broadcast_along(scale, axis, values.ndim), _broadcast_along(zero, axis, values.ndim)
        return ((values.astype(np.float64) - zero) * scale).astype(np.float32)


def _broadcast_along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a per-axis (1-D) quantization parameter to broadcast along ``axis``."""
    if values.ndim == 0 or values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def _trace(index: GraphIndex, name: str) -> tuple[StoredTensor | None, list[str], str | None]:
    """Walk from a weight input back to its stored tensor.

    Returns the stored tensor, the intermediate tensor names passed on the way, and a
    reason when the weight cannot be pruned.
    """
    path: list[str] = []
    zero_name = scale_name = None
    axis = 1
    quantized = False
    while True:
        found = index.constant_tensor(name)
        if found is not None:
            break
        i = index.producer.get(name)
        if i is None:
            return None, path, "weight is a graph input, not a constant"
        node = index.graph.node[i]
        path.append(name)
        if node.op_type in _PASS_THROUGH:
            name = node.input[0]
        elif node.op_type == "DequantizeLinear" and not quantized:
            if node_attribute(node, "block_size", 0):
                return None, path, "blocked DequantizeLinear (block_size) is not supported"
            quantized = True
            scale_name = node.input[1]
            zero_name = node.input[2] if len(node.input) > 2 else ""
            axis = int(node_attribute(node, "axis", 1))  # type: ignore[arg-type]
            name = node.input[0]
        elif node.op_type == "QuantizeLinear" and quantized:
            # Q -> DQ on float weights (fake quantization): zero the float weight itself.
            quantized = False
            zero_name = scale_name = None
            name = node.input[0]
        else:
            return None, path, f"weight is computed by a {node.op_type} node, not stored as a constant"
    tensor, storage = found
    values = numpy_helper.to_array(tensor)
    if values.dtype not in _SUPPORTED_DTYPES:
        return None, path, f"weight data type {values.dtype} is not supported"
    zero = np.zeros((), values.dtype)
    scale = np.ones((), np.float32)
    if quantized:
        scale_arr = index.constant_array(scale_name or "")
        if scale_arr is None:
            return None, path, "DequantizeLinear scale is not a constant"
        scale = _broadcast_along(scale_arr.astype(np.float32), axis, values.ndim)
        if zero_name:
            zero_arr = index.constant_array(zero_name)
            if zero_arr is None:
                return None, path, "DequantizeLinear zero point is not a constant"
            zero = _broadcast_along(zero_arr.astype(values.dtype), axis, values.ndim)
    return StoredTensor(tensor.name or name, storage, tensor, values, zero, scale), path, None


def _quant_params(index: GraphIndex, node: onnx.NodeProto, stored: StoredTensor) -> str | None:
    """Attach the zero point and scale of an integer conv's weight (per tensor or per output channel)."""
    _, scale_i, zero_i = CONV_OPS[node.op_type]
    for i, attr in ((zero_i, "zero"), (scale_i, "scale")):
        if i is None or len(node.input) <= i or not node.input[i]:
            continue
        arr = index.constant_array(node.input[i])
        if arr is None:
            return f"{node.op_type} weight {attr} input is not a constant"
        arr = arr.astype(stored.values.dtype if attr == "zero" else np.float32)
        setattr(stored, attr, _broadcast_along(arr, 0, stored.values.ndim))
    return None


def _layout(op_type: str, node: onnx.NodeProto, ndim: int) -> str | None:
    if op_type == "Gemm":
        return "OI" if node_attribute(node, "transB", 0) else "IO"
    if op_type == "MatMul":
        return "IO"
    spatial = _SPATIAL_LETTERS.get(ndim - 2, "K" * (ndim - 2))
    return ("IO" if op_type == "ConvTranspose" else "OI") + spatial


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every weight consumed by a conv or fully connected node, in graph order.

    Layers that cannot be pruned carry ``skip_reason``; nothing is left out silently.
    """
    index = GraphIndex(model.graph)
    by_stored: dict[str, Layer] = {}
    layers: list[Layer] = []
    paths: dict[str, set[str]] = defaultdict(set)
    users: dict[str, set[int]] = defaultdict(set)
    for i, node in enumerate(model.graph.node):
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op in CONV_OPS:
            w_input = CONV_OPS[op][0]
        elif op in FC_OPS:
            w_input = 1
        else:
            continue
        if len(node.input) <= w_input:
            continue
        stored, path, reason = _trace(index, node.input[w_input])
        if op in FC_OPS:
            if stored is None or stored.values.ndim != 2:
                continue  # a MatMul/Gemm between activations is not a layer
        if stored is not None and op in ("QLinearConv", "ConvInteger") and reason is None:
            reason = _quant_params(index, node, stored)
        shape = tuple(stored.values.shape) if stored is not None else ()
        layout = _layout(op, node, len(shape)) if shape else ""
        groups = int(node_attribute(node, "group", 1))  # type: ignore[arg-type]
        key = stored.name if stored is not None else f"<{index.names[i]}>"
        users[key].add(i)
        paths[key].update(path)
        if key in by_stored:
            layer = by_stored[key]
            layer.nodes.append(index.names[i])
            if (layer.layout, layer.groups, layer.op_type) != (layout, groups, op):
                layer.skip_reason = "weight is shared by nodes that read it differently"
            continue
        layer = Layer(
            weight=stored.name if stored is not None else node.input[w_input],
            nodes=[index.names[i]],
            op_type=op,
            layout=layout,
            groups=groups,
            shape=shape,
            stored=stored,
            skip_reason=reason,
            is_fc=op in FC_OPS,
        )
        if reason is None:
            layer.skip_reason = _shape_problem(layer)
        by_stored[key] = layer
        layers.append(layer)
    for key, layer in by_stored.items():
        if layer.skip_reason is None:
            layer.skip_reason = _foreign_use(index, key, paths[key], users[key])
    return layers


def _shape_problem(layer: Layer) -> str | None:
    if min(layer.shape, default=0) == 0:
        return "weight has no elements"
    if len(layer.shape) < 2:
        return f"weight has rank {len(layer.shape)}, expected at least 2"
    if layer.shape[0] % layer.groups:  # axis 0 is split into groups in OIHW and IOHW alike
        return f"weight axis 0 ({layer.shape[0]}) is not divisible by group={layer.groups}"
    return None


def _foreign_use(index: GraphIndex, key: str, path: set[str], users: set[int]) -> str | None:
    """A reason to skip when the stored tensor (or a tensor on the way) is read elsewhere."""
    for name in {key} | path:
        if name in index.graph_outputs:
            return f"tensor '{name}' is also a graph output"
        if name in index.captured:
            return f"tensor '{name}' is also read inside a subgraph"
        for i in index.consumers.get(name, []):
            produced = set(index.graph.node[i].output)
            if i not in users and not produced & path:
                node = index.graph.node[i]
                return f"tensor '{name}' is also read by {node.op_type} node '{index.names[i]}'"
    return None


def check_finite_weights(model: onnx.ModelProto) -> None:
    """UserError naming the first conv / FC weight or bias that holds NaN or infinity."""
    for layer in find_layers(model):
        if layer.stored is not None and not np.isfinite(layer.stored.dequantized()).all():
            raise UserError(
                f"weight {layer.weight} of {layer.name} holds NaN or infinite values; "
                "fix or re-export the model (training may have diverged)"
            )
    index = GraphIndex(model.graph)
    for name, node in zip(index.names, model.graph.node):
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
            bias = index.dequantized_constant(node.input[2])
            if bias is not None and bias.dtype.kind == "f" and not np.isfinite(bias).all():
                raise UserError(f"the bias of {name} holds NaN or infinite values; fix or re-export the model")
