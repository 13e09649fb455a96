"""Turn the Conv nodes of an ONNX model into VTA convs: shapes, int8 weights, masks, fusion.

Weights are quantized to int8 with power-of-two scales (per tensor, or per output
channel), as TVM's quantizer does for VTA. Activation shifts are inputs (calibration
chooses them); the requantization shift of a conv is ``s_in + s_w - s_out``. A Relu that
is the only reader of a conv's output is fused (ALU MAX 0). The kept-tile maps come
from the sparse-tile annotation, which is validated first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from gpp_onnx.annotation import read_annotation, validate_annotation
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import single_input
from gpp_onnx.weights import GraphIndex, find_layers, node_attribute
from vta_backend.config import VTAConfig
from vta_backend.quant import QuantConv, quantize, weight_shifts

DEFAULT_ACTIVATION_SHIFT = 4  # int8 activations with scale 2**-4 (range +-8) when none are given


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


def static_shapes(
    model: onnx.ModelProto, input_shape: tuple[int, ...] | None, needed: list[str]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``needed`` tensors for the model input's shape (batch 1 by default).

    ONNX shape inference first; tensors it leaves unknown (e.g. after a Pad whose pads are
    computed) are measured by running the model once on zeros in ONNX Runtime.
    """
    inputs = _image_inputs(model)
    dims = inputs[0].type.tensor_type.shape.dim
    if input_shape is None:
        input_shape = tuple(1 if i == 0 else d.dim_value for i, d in enumerate(dims))
        if any(v <= 0 for v in input_shape):
            raise UserError(f"input '{inputs[0].name}' has no fixed shape; pass --input-shape, e.g. 1x3x32x32")
    if len(input_shape) != len(dims):
        raise UserError(f"--input-shape has {len(input_shape)} dimensions, the model input has {len(dims)}")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for d, v in zip(_image_inputs(fixed)[0].type.tensor_type.shape.dim, input_shape):
        d.Clear()
        d.dim_value = v
    del fixed.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor_dims = info.type.tensor_type.shape.dim
        if tensor_dims and all(d.HasField("dim_value") for d in tensor_dims):
            shapes[info.name] = tuple(d.dim_value for d in tensor_dims)
    unknown = [name for name in dict.fromkeys(needed) if name not in shapes]
    if unknown:
        shapes.update(_measured_shapes(fixed, inputs[0].name, input_shape, unknown))
    return shapes


def _image_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [single_input(model, "VTA compilation expects one image input")]


def _measured_shapes(
    model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...], names: list[str]
) -> dict[str, tuple[int, ...]]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {input_name: np.zeros(input_shape, np.float32)})
    return {name: tuple(out.shape) for name, out in zip(names, outputs)}


def extract_convs(
    model: onnx.ModelProto,
    config: VTAConfig,
    input_shape: tuple[int, ...] | None = None,
    activation_shifts: Mapping[str, int] | None = None,
    per_channel: bool = False,
    default_shift: int = DEFAULT_ACTIVATION_SHIFT,
) -> list[ConvSite]:
    """Every Conv node of the model in graph order, as a VTA conv or with the reason it is not one.

    ``activation_shifts`` maps tensor names to their power-of-two shifts (from calibration);
    tensors not in it get ``default_shift``.
    """
    annotation = read_annotation(model)
    if annotation is not None:
        validate_annotation(model, annotation)
        if (annotation.tile.block_out, annotation.tile.block_in) != (config.BLOCK_OUT, config.BLOCK_IN):
            raise UserError(
                f"the model was pruned for {annotation.tile} tiles but the VTA config has "
                f"{config.BLOCK_OUT}x{config.BLOCK_IN}; prune again with --tile matching the config"
            )
    constants = {t.name for t in model.graph.initializer}
    needed = [n.input[0] for n in model.graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]
    needed += [
        t
        for n in model.graph.node
        if n.op_type in ("Conv", "Add")
        for t in (n.output if n.op_type == "Conv" else n.input)
        if t not in constants
    ]
    shapes = static_shapes(model, input_shape, needed)
    index = GraphIndex(model.graph)
    layers = {name: layer for layer in find_layers(model) for name in layer.nodes}
    shifts = dict(activation_shifts or {})
    graph_inputs = {i.name for i in model.graph.input}
    sites = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = index.names[i]
        layer = layers.get(name)
        site = ConvSite(name, node.input[0], node.output[0], None, None, replaced=(name,))
        sites.append(site)
        if layer is None or layer.stored is None or layer.skip_reason:
            site.reason = layer.skip_reason if layer and layer.skip_reason else "weight is not a constant"
            continue
        if layer.stored.values.dtype.kind != "f":
            site.reason = "quantized weights; compile the float model"
            continue
        if len(layer.shape) != 4:
            site.reason = f"{len(layer.shape) - 2}-D conv; VTA runs 2-D convs"
            continue
        in_shape = shapes.get(node.input[0])
        if in_shape is None or len(in_shape) != 4:
            site.reason = "input shape unknown after shape inference"
            continue
        if node.input[0] in graph_inputs and in_shape[1] < config.BLOCK_IN:
            site.reason = (
                f"first conv with {in_shape[1]} input channels: stays on the CPU, as TVM keeps it "
                f"(VTA would pad them to {config.BLOCK_IN})"
            )
            continue
        fused = _fusion(index, node.output[0], shapes)
        s_in = shifts.get(node.input[0], default_shift)
        s_out = shifts.get(fused.output, default_shift)
        weights = layer.stored.values.astype(np.float32)
        s_w = weight_shifts(weights, per_channel)
        q = quantize(weights, s_w.reshape(-1, 1, 1, 1) if per_channel else int(s_w))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            b = index.constant_array(node.input[2])
            if b is None:
                site.reason = "bias is not a constant"
                continue
            bias_scale = np.exp2(s_in + s_w.astype(np.float64))
            bias = np.clip(np.round(b.astype(np.float64) * bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
        pads = list(node_attribute(node, "pads", [0, 0, 0, 0]))  # type: ignore[arg-type]
        if node_attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            site.reason = "auto_pad is not supported; export with explicit pads"
            continue
        entry = annotation.for_weight(layer.weight) if annotation else None
        requant = s_in + s_w - s_out
        residual_shift = None
        if fused.residual is not None:  # residual * 2**(s_in + s_w - s_res) is in accumulator units
            site.residual_input_shift = int(shifts.get(fused.residual, default_shift))
            align = s_in + s_w - site.residual_input_shift
            residual_shift = align.astype(np.int64) if per_channel else int(align)
        site.conv = QuantConv(
            name=name,
            weight=q,
            stride=tuple(node_attribute(node, "strides", [1, 1])),  # type: ignore[arg-type]
            pads=(pads[0], pads[1], pads[2], pads[3]),
            dilation=tuple(node_attribute(node, "dilations", [1, 1])),  # type: ignore[arg-type]
            groups=int(node_attribute(node, "group", 1)),  # type: ignore[arg-type]
            bias=bias,
            shift=requant.astype(np.int64) if per_channel else int(requant),
            relu=fused.relu,
            kept=None if entry is None else entry.kept,
            residual_shift=residual_shift,
        )
        site.in_shape = (in_shape[1], in_shape[2], in_shape[3])
        site.input_shift, site.output_shift = int(s_in), int(s_out)
        site.output, site.residual = fused.output, fused.residual
        site.replaced = (name, *fused.nodes)
    return sites


@dataclass
class Fusion:
    """What follows a conv and joins its VTA program: an Add of a residual tensor, then a Relu."""

    output: str  # the last fused node's output
    residual: str | None = None
    relu: bool = False
    nodes: tuple[str, ...] = ()  # names of the fused nodes after the conv


def _sole_reader(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    readers = index.consumers.get(tensor, [])
    if len(readers) == 1 and tensor not in index.graph_outputs:
        return index.graph.node[readers[0]]
    return None


def _fusion(index: GraphIndex, conv_output: str, shapes: Mapping[str, tuple[int, ...]]) -> Fusion:
    """Conv + Add(residual of the same shape) + Relu, Conv + Add, Conv + Relu, or the conv alone."""
    fusion = Fusion(conv_output)
    reader = _sole_reader(index, conv_output)
    if reader is not None and reader.op_type == "Add" and reader.domain in ("", "ai.onnx") and len(reader.input) == 2:
        other = reader.input[1] if reader.input[0] == conv_output else reader.input[0]
        if other != conv_output and shapes.get(other) is not None and shapes.get(other) == shapes.get(conv_output):
            fusion = Fusion(reader.output[0], other, False, (index.names[_node_index(index, reader)],))
            reader = _sole_reader(index, fusion.output)
    if reader is not None and reader.op_type == "Relu" and reader.domain in ("", "ai.onnx"):
        fusion = Fusion(
            reader.output[0], fusion.residual, True, fusion.nodes + (index.names[_node_index(index, reader)],)
        )
    return fusion


def _node_index(index: GraphIndex, node: onnx.NodeProto) -> int:
    return index.producer[node.output[0]]
