"""Static tensor shapes of an ONNX model for one input shape (batch 1 by default)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from gpp_onnx.errors import UserError
from gpp_onnx.model_io import single_input


def conv_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors whose shapes the importer needs: Conv inputs and outputs, non-constant Add inputs."""
    constants = {t.name for t in model.graph.initializer}
    needed = [n.input[0] for n in model.graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]
    needed += [
        t
        for n in model.graph.node
        if n.op_type in ("Conv", "Add")
        for t in (n.output if n.op_type == "Conv" else n.input)
        if t not in constants
    ]
    return needed


def static_shapes(
    model: onnx.ModelProto, input_shape: tuple[int, ...] | None, needed: list[str]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``needed`` tensors (and every other one inference fixes) for the model input's shape.

    ONNX shape inference first; tensors it leaves unknown (e.g. after a Pad whose pads are
    computed) are measured by running the model once on zeros in ONNX Runtime.
    """
    fixed, input_shape = _with_fixed_input(model, input_shape)
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor_dims = info.type.tensor_type.shape.dim
        if tensor_dims and all(d.HasField("dim_value") for d in tensor_dims):
            shapes[info.name] = tuple(d.dim_value for d in tensor_dims)
    unknown = [name for name in dict.fromkeys(needed) if name not in shapes]
    if unknown:
        shapes.update(_measured_shapes(fixed, _image_input(fixed).name, input_shape, unknown))
    return shapes


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    return single_input(model, "VTA compilation expects one image input")


def _with_fixed_input(
    model: onnx.ModelProto, input_shape: tuple[int, ...] | None
) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A copy of the model whose input has ``input_shape`` (default: the model's, batch 1), without value_info."""
    image = _image_input(model)
    dims = image.type.tensor_type.shape.dim
    if input_shape is None:
        input_shape = tuple(1 if i == 0 else d.dim_value for i, d in enumerate(dims))
        if any(v <= 0 for v in input_shape):
            raise UserError(f"input '{image.name}' has no fixed shape; pass --input-shape, e.g. 1x3x32x32")
    if len(input_shape) != len(dims):
        raise UserError(f"--input-shape has {len(input_shape)} dimensions, the model input has {len(dims)}")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for d, v in zip(_image_input(fixed).type.tensor_type.shape.dim, input_shape):
        d.Clear()
        d.dim_value = v
    del fixed.graph.value_info[:]
    return fixed, input_shape


def _measured_shapes(
    model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...], names: list[str]
) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` measured by running the model once on zeros."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {input_name: np.zeros(input_shape, np.float32)})
    return {name: tuple(out.shape) for name, out in zip(names, outputs)}
