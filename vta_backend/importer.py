"""Turn the Conv nodes of an ONNX model into VTA convs: eligibility, fusion and quantization.

Every Conv node becomes a :class:`ConvSite`: either the VTA conv it becomes (quantized by
:func:`vta_backend.quantization.quantize_conv`) or the reason it stays on the CPU. An Add
of a residual tensor of the same shape and a Relu that are the only readers of a conv's
output are fused into it. The kept-tile maps come from the sparse-tile annotation, which
the caller has read and validated (:func:`gpp_onnx.annotation.read_kept_tiles`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from gpp_onnx.annotation import KeptTiles
from gpp_onnx.errors import UserError
from gpp_onnx.weights import GraphIndex, Layer, find_layers, node_attribute
from vta_backend.config import VTAConfig
from vta_backend.quant import QuantConv
from vta_backend.quantization import DEFAULT_QUANTIZATION, FloatConv, QuantizationOptions, quantize_conv
from vta_backend.shapes import conv_tensors, static_shapes


@dataclass
class ConvSite:
    """One Conv node: the VTA conv it becomes, or why it stays off VTA."""

    node: str
    input: str
    output: str  # the fused Relu's output when there is one
    conv: QuantConv | None
    in_shape: tuple[int, int, int] | None
    reason: str | None = None
    input_shift: int = 0  # power-of-two scales of the int8 input and output activations
    output_shift: int = 0
    replaced: tuple[str, ...] = ()  # names of the nodes the VTA conv stands for (Conv, fused Add, Relu)
    residual: str | None = None  # the other operand of a fused Add
    residual_input_shift: int = 0  # its power-of-two scale


@dataclass
class Fusion:
    """What follows a conv and joins its VTA program: an Add of a residual tensor, then a Relu."""

    output: str  # the last fused node's output
    residual: str | None = None
    relu: bool = False
    nodes: tuple[str, ...] = ()  # names of the fused nodes after the conv


def check_tile(kept: KeptTiles | None, config: VTAConfig) -> None:
    """The annotation's tile must be the config's BLOCK_OUT x BLOCK_IN (UserError otherwise)."""
    if kept is not None and (kept.tile.block_out, kept.tile.block_in) != (config.BLOCK_OUT, config.BLOCK_IN):
        raise UserError(
            f"the model was pruned for {kept.tile} tiles but the VTA config has "
            f"{config.BLOCK_OUT}x{config.BLOCK_IN}; prune again with --tile matching the config"
        )


def unsupported_reason(
    node: onnx.NodeProto,
    layer: Layer | None,
    in_shape: tuple[int, ...] | None,
    index: GraphIndex,
    graph_inputs: set[str],
    config: VTAConfig,
) -> str | None:
    """Why a Conv node cannot run on VTA, or None when it can."""
    if layer is None or layer.stored is None or layer.skip_reason:
        return layer.skip_reason if layer and layer.skip_reason else "weight is not a constant"
    if len(layer.shape) != 4:
        return f"{len(layer.shape) - 2}-D conv; VTA runs 2-D convs"
    if in_shape is None or len(in_shape) != 4:
        return "input shape unknown after shape inference"
    if _source_tensor(node.input[0], index) in graph_inputs and in_shape[1] < config.BLOCK_IN:
        return (
            f"first conv with {in_shape[1]} input channels: stays on the CPU, as TVM keeps it "
            f"(VTA would pad them to {config.BLOCK_IN})"
        )
    per_group = layer.shape[1]  # a conv weight's dim 1: input channels per group
    if int(node_attribute(node, "group", 1)) > 1 and per_group < config.BLOCK_IN:  # type: ignore[arg-type]
        return (
            f"grouped conv with {per_group} input channel{'s' if per_group > 1 else ''} per group (depthwise when 1): "
            f"stays on the CPU (VTA would pad each group to {config.BLOCK_IN} input channels and run one program "
            "per group)"
        )
    if len(node.input) > 2 and node.input[2] and index.dequantized_constant(node.input[2]) is None:
        return "bias is not a constant (nor a DequantizeLinear of constants)"
    if _auto_pad(node) not in AUTO_PADS:
        return f"auto_pad {_auto_pad(node)} is not an ONNX padding mode"
    return None


AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
# Ops between the graph input and the first conv that move or re-encode the image without computing on it
PASS_THROUGH_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Transpose", "Cast", "Identity")
# Elementwise ops that, with a constant operand, normalise the image inside the graph (Keras exports)
NORMALIZING_OPS = ("Add", "Sub", "Mul", "Div")


def _source_tensor(tensor: str, index: GraphIndex) -> str:
    """The tensor ``tensor`` is computed from through :data:`PASS_THROUGH_OPS` and in-graph normalisation
    (:data:`NORMALIZING_OPS` with a constant operand): a QDQ model's conv input is the graph input quantized
    and dequantized; a TensorFlow export's, the input transposed to NCHW and perhaps scaled."""
    while tensor in index.producer:
        producer = index.graph.node[index.producer[tensor]]
        if producer.domain not in ("", "ai.onnx"):
            break
        if producer.op_type in PASS_THROUGH_OPS:
            tensor = producer.input[0]
            continue
        variable = [name for name in producer.input if index.constant_array(name) is None]
        if producer.op_type not in NORMALIZING_OPS or len(variable) != 1:
            break
        tensor = variable[0]
    return tensor


def _auto_pad(node: onnx.NodeProto) -> str:
    mode = node_attribute(node, "auto_pad", "NOTSET")
    return mode.decode() if isinstance(mode, bytes) else str(mode)


def explicit_pads(node: onnx.NodeProto, spatial: tuple[int, int], kernel: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right): the ``pads`` attribute, or what ``auto_pad`` means for this input size
    (SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the start, as ONNX specifies)."""
    mode = _auto_pad(node)
    if mode == "NOTSET":
        pads = list(node_attribute(node, "pads", [0, 0, 0, 0]))  # type: ignore[arg-type]
        return (pads[0], pads[1], pads[2], pads[3])
    if mode == "VALID":
        return (0, 0, 0, 0)
    strides = list(node_attribute(node, "strides", [1, 1]))  # type: ignore[arg-type]
    dilations = list(node_attribute(node, "dilations", [1, 1]))  # type: ignore[arg-type]
    begin, end = [], []
    for size, k, stride, dilation in zip(spatial, kernel, strides, dilations):
        total = max(0, (-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


class _Importer:
    """What every Conv node of one model needs: the graph, layers, shapes, annotation and shifts."""

    def __init__(
        self,
        model: onnx.ModelProto,
        shapes: Mapping[str, tuple[int, ...]],
        config: VTAConfig,
        kept: KeptTiles | None,
        activation_shifts: Mapping[str, int],
        quantization: QuantizationOptions,
    ) -> None:
        self.index = GraphIndex(model.graph)
        self.layers = {name: layer for layer in find_layers(model) for name in layer.nodes}
        self.graph_inputs = {i.name for i in model.graph.input}
        self.shapes, self.config, self.kept = shapes, config, kept
        self.shifts, self.quantization = activation_shifts, quantization

    def site(self, name: str, node: onnx.NodeProto) -> ConvSite:
        """The Conv node as a VTA conv, or with the reason it stays on the CPU."""
        site = ConvSite(name, node.input[0], node.output[0], None, None, replaced=(name,))
        layer, in_shape = self.layers.get(name), self.shapes.get(node.input[0])
        site.reason = unsupported_reason(node, layer, in_shape, self.index, self.graph_inputs, self.config)
        if site.reason is not None:
            return site
        assert layer is not None and layer.stored is not None and in_shape is not None
        fused = fusion(self.index, node.output[0], self.shapes, self.config.BLOCK_IN == self.config.BLOCK_OUT)
        float_conv = self.float_conv(name, node, layer, fused, (in_shape[2], in_shape[3]))
        site.conv = quantize_conv(float_conv, self.shifts, self.quantization)
        site.in_shape = (in_shape[1], in_shape[2], in_shape[3])
        site.input_shift = self.quantization.shift_of(node.input[0], self.shifts)
        site.output_shift = self.quantization.shift_of(fused.output, self.shifts)
        if fused.residual is not None:
            site.residual_input_shift = self.quantization.shift_of(fused.residual, self.shifts)
        site.output, site.residual = fused.output, fused.residual
        site.replaced = (name, *fused.nodes)
        return site

    def float_conv(
        self, name: str, node: onnx.NodeProto, layer: Layer, fused: Fusion, spatial: tuple[int, int]
    ) -> FloatConv:
        """The node's float weight, bias and attributes (padding for an input of ``spatial`` size) with
        its fused Add / Relu and kept-tile map."""
        assert layer.stored is not None
        bias = self.index.dequantized_constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return FloatConv(
            name=name,
            weight=layer.stored.dequantized(),  # a QDQ model's int8 weight, dequantized (VTA re-quantizes it)
            bias=bias,
            stride=tuple(node_attribute(node, "strides", [1, 1])),  # type: ignore[arg-type]
            pads=explicit_pads(node, spatial, layer.shape[2:]),
            dilation=tuple(node_attribute(node, "dilations", [1, 1])),  # type: ignore[arg-type]
            groups=int(node_attribute(node, "group", 1)),  # type: ignore[arg-type]
            relu=fused.relu,
            kept=None if self.kept is None else self.kept.for_weight(layer.weight),
            input=node.input[0],
            output=fused.output,
            residual=fused.residual,
        )


def extract_convs(
    model: onnx.ModelProto,
    config: VTAConfig,
    input_shape: tuple[int, ...] | None = None,
    activation_shifts: Mapping[str, int] | None = None,
    quantization: QuantizationOptions = DEFAULT_QUANTIZATION,
    kept: KeptTiles | None = None,
) -> list[ConvSite]:
    """Every Conv node of the model in graph order, as a VTA conv or with the reason it is not one,
    and the other conv nodes (ConvTranspose, QLinearConv, ConvInteger) with theirs.

    ``activation_shifts`` maps tensor names to their power-of-two shifts (from calibration);
    ``kept`` is the validated annotation (None: dense, only all-zero tiles are skipped).
    """
    check_tile(kept, config)
    shapes = static_shapes(model, input_shape, conv_tensors(model))
    importer = _Importer(model, shapes, config, kept, dict(activation_shifts or {}), quantization)
    sites = []
    for name, node in zip(importer.index.names, model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Conv":
            sites.append(importer.site(name, node))
        elif node.op_type in OTHER_CONVS:
            reason = OTHER_CONVS[node.op_type]
            sites.append(ConvSite(name, node.input[0], node.output[0], None, None, reason, replaced=(name,)))
    return sites


OTHER_CONVS = {  # conv nodes listed with why they stay on the CPU
    "ConvTranspose": "ConvTranspose: VTA's conv2d schedule runs convolutions, not transposed ones; stays on the CPU",
    "QLinearConv": "QLinearConv with computed scales or in an opset below 13 is not mapped to VTA; stays on the CPU "
    "(convert the model to opset 13, or export it in QDQ format)",
    "ConvInteger": "ConvInteger with computed zero points or in an opset below 13 is not mapped to VTA; stays on the "
    "CPU (convert the model to opset 13, or export the float or QDQ model)",
}


def _sole_reader(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    readers = index.consumers.get(tensor, [])
    if len(readers) == 1 and tensor not in index.graph_outputs:
        return index.graph.node[readers[0]]
    return None


def fusion(index: GraphIndex, conv_output: str, shapes: Mapping[str, tuple[int, ...]], add: bool = True) -> Fusion:
    """Conv + Add(residual of the same shape) + Relu, Conv + Add, Conv + Relu, or the conv alone;
    no Add unless ``add`` (VTA adds a residual through the input buffer: square tiles only)."""
    fused = Fusion(conv_output)
    reader = _sole_reader(index, conv_output)
    if (
        add
        and reader is not None
        and reader.op_type == "Add"
        and reader.domain in ("", "ai.onnx")
        and len(reader.input) == 2
    ):
        other = reader.input[1] if reader.input[0] == conv_output else reader.input[0]
        if other != conv_output and shapes.get(other) is not None and shapes.get(other) == shapes.get(conv_output):
            fused = Fusion(reader.output[0], other, False, (index.names[_node_index(index, reader)],))
            reader = _sole_reader(index, fused.output)
    if reader is not None and reader.op_type == "Relu" and reader.domain in ("", "ai.onnx"):
        fused = Fusion(reader.output[0], fused.residual, True, fused.nodes + (index.names[_node_index(index, reader)],))
    return fused


def _node_index(index: GraphIndex, node: onnx.NodeProto) -> int:
    return index.producer[node.output[0]]
