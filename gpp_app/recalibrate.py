"""Recover a pruned model's accuracy without training: match each pruned conv's output statistics
to the dense model's, on ONNX alone (ONNX Runtime, no torch).

One-shot tile pruning shifts the statistics of every later layer. With batch-norm the fix
is to re-estimate its statistics; exported models have batch-norm folded into the convs,
so this does the equivalent: for each pruned conv in graph order, given the already
corrected convs before it, a per-output-channel scale ``a`` and bias ``b`` make the
mean and standard deviation of its output on the calibration images equal to those of
the dense model's same conv, and are folded into the conv's weights and bias. Pruned
tiles stay zero (they are scaled), so the sparse-tile annotation stays valid.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from gpp_app import data
from gpp_app.evaluate import check_data_fits, model_batches
from gpp_onnx.annotation import read_annotation, validate_annotation
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import image_input
from gpp_onnx.normalization import normalization_for
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.weights import GraphIndex

DEFAULT_RECALIBRATION_IMAGES = 2000  # train images whose statistics are matched
# The largest per-channel scale recalibration folds in. Where pruning emptied the conv before,
# the input is (nearly) constant and matching the dense std would scale the weights by 100s.
MAX_SCALE = 10.0


def channel_stats(model: onnx.ModelProto, input_name: str, tensors: list[str], images: list[np.ndarray]) -> dict:
    """Per-channel mean and variance of ``tensors`` (NCHW) over all images and pixels."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sums = {t: 0.0 for t in tensors}
    squares = {t: 0.0 for t in tensors}
    counts = {t: 0 for t in tensors}  # values per channel: each tensor has its own spatial size
    for batch in images:
        outputs = session.run(None, {input_name: batch})
        for name, out in zip(tensors, outputs):
            values = out.astype(np.float64)
            sums[name] = sums[name] + values.sum(axis=(0, 2, 3))
            squares[name] = squares[name] + (values**2).sum(axis=(0, 2, 3))
            counts[name] += out.shape[0] * out.shape[2] * out.shape[3]
    stats = {}
    for name in tensors:
        mean = sums[name] / counts[name]
        stats[name] = (mean, np.maximum(squares[name] / counts[name] - mean**2, 0.0))
    return stats


def _pruned_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    annotation = read_annotation(model)
    if annotation is None:
        raise UserError("the model has no sparse-tile annotation; recalibrate a model written by gpp-onnx prune")
    validate_annotation(model, annotation)
    pruned = {name for entry in annotation.weights for name in entry.nodes}
    index = GraphIndex(model.graph)
    return [node for name, node in zip(index.names, model.graph.node) if name in pruned and node.op_type == "Conv"]


def recalibrate(
    pruned: onnx.ModelProto,
    dense: onnx.ModelProto,
    input_name: str,
    dataset: data.Dataset,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    images: int = DEFAULT_RECALIBRATION_IMAGES,
    batch: int = 500,
    track: Track = no_progress,
) -> tuple[onnx.ModelProto, list[dict]]:
    """The recalibrated copy of ``pruned`` and, per conv, the scales and biases it folded in."""
    if images < 1:
        raise UserError(f"--images {images} is below 1")
    convs = _pruned_convs(pruned)
    if not convs:
        raise UserError("no pruned Conv with float weights to recalibrate")
    dense_outputs = {o for node in dense.graph.node for o in node.output}
    missing = [node.output[0] for node in convs if node.output[0] not in dense_outputs]
    if missing:
        raise UserError(f"the dense model has no tensor {missing[0]!r}; pass the model the pruned one was made from")
    model_input = (input_name, *data.model_input(dense)[1:])  # the dense model's dims and type
    batch, images = model_batches(model_input[1], batch, images)  # a model made for batches of N gets those
    calibration = [feed[input_name] for feed in data.feeds(dataset, model_input, mean, std, "train", batch, images)]
    if not calibration:
        raise UserError(f"no train images in {dataset.root} to recalibrate on; {data.LAYOUTS_HELP}")
    outputs = [node.output[0] for node in convs]
    target = channel_stats(dense, input_name, outputs, calibration)
    result = onnx.ModelProto()
    result.CopyFrom(pruned)
    nodes = {node.output[0]: node for node in result.graph.node}
    folded = [
        match_statistics(result, nodes[name], (input_name, calibration), target[name])
        for name in track(outputs, "recalibrating", len(outputs))
    ]
    return result, folded


def match_statistics(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    calibration: tuple[str, list[np.ndarray]],
    target: tuple[np.ndarray, np.ndarray],
) -> dict:
    """Fold into ``node``'s weight and bias (in ``model``, in place) the per-output-channel scale and
    shift that give its output on the ``calibration`` batches (input name, batches) the ``target``
    mean and variance; what was folded, or why nothing was."""
    initializers = {t.name: t for t in model.graph.initializer}
    weight = initializers.get(node.input[1])
    if weight is None or numpy_helper.to_array(weight).dtype.kind != "f":
        return {"node": node.name, "skipped": "weight is not a float initializer"}
    input_name, images = calibration
    current_mean, current_var = channel_stats(model, input_name, [node.output[0]], images)[node.output[0]]
    target_mean, target_var = target
    scale = np.where(current_var > 1e-12, np.sqrt(target_var / np.maximum(current_var, 1e-12)), 1.0)
    scale = np.minimum(scale, MAX_SCALE)  # an input left (nearly) constant by pruning would blow it up
    shift = target_mean - scale * current_mean
    w = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array((w * scale.reshape(-1, 1, 1, 1)).astype(w.dtype), weight.name))
    _set_bias(model, node, initializers, scale, shift, w.dtype)
    return {"node": node.name, "scale_mean": float(scale.mean()), "shift_mean": float(shift.mean())}


def _set_bias(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    initializers: dict,
    scale: np.ndarray,
    shift: np.ndarray,
    dtype: np.dtype,
) -> None:
    """bias <- scale * bias + shift; a conv without a bias gets one."""
    if len(node.input) > 2 and node.input[2] in initializers:
        tensor = initializers[node.input[2]]
        bias = numpy_helper.to_array(tensor).astype(np.float64)
        tensor.CopyFrom(numpy_helper.from_array((scale * bias + shift).astype(dtype), tensor.name))
        return
    name = f"{node.output[0]}/recalibrated_bias"
    tensor = numpy_helper.from_array(shift.astype(dtype), name)
    model.graph.initializer.append(tensor)
    initializers[name] = model.graph.initializer[-1]
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name


def recalibrate_from_data(
    pruned: onnx.ModelProto,
    dense: onnx.ModelProto,
    data_path,
    images: int = DEFAULT_RECALIBRATION_IMAGES,
    track: Track = no_progress,
) -> onnx.ModelProto:
    """:func:`recalibrate` with the input name and normalisation taken from the dense model."""
    mean, std = normalization_for(dense)
    name, dims = image_input(dense, "the dense model must take one image input [N, C, H, W]")
    if image_input(pruned, "the pruned model must take one image input [N, C, H, W]") != (name, dims):
        raise UserError(
            f"the pruned model's input differs from the dense model's {name} {dims}; "
            "pass the dense model the pruned one was made from"
        )
    dataset = data.locate(data_path)
    check_data_fits(dataset, "train", dims, name)
    result, _ = recalibrate(pruned, dense, name, dataset, mean, std, images, track=track)
    return result
