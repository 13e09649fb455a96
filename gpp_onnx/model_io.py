"""Loading ONNX models with clear errors, and writing them atomically."""

from __future__ import annotations

import heapq
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from gpp_onnx.errors import UserError
from gpp_onnx.files import publish, staging_folder

# Protobuf cannot serialise a message of 2 GiB or more; such models need external data.
PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class LoadedModel:
    """A model as loaded from a file (or taken as given), and whether it used external data."""

    model: onnx.ModelProto
    path: Path | None
    had_external_data: bool


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors of a graph and all its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in _graph_tensors(model.graph))


def check_input_path(source: str | os.PathLike[str]) -> Path:
    """Refuse a model path that is missing, a directory or an empty file."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the model path")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass the path of an .onnx file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes); pass a complete ONNX model file")
    return path


def load_model(source: str | os.PathLike[str] | onnx.ModelProto) -> LoadedModel:
    """Load a model from a path (with its external data) or take a ModelProto as it is."""
    if isinstance(source, onnx.ModelProto):
        if _uses_external_data(source):
            raise UserError(
                "the ModelProto refers to external data that is not loaded; "
                "pass the model's path instead, or load it with load_external_data=True"
            )
        return LoadedModel(source, None, False)
    path = check_input_path(source)
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, json_format.ParseError, text_format.ParseError, RuntimeError, ValueError) as exc:
        raise UserError(  # onnx.load reads .json and .txt / .textproto files in those formats
            f"{path} is not a readable ONNX model ({first_line(exc)}); "
            "pass an ONNX file, re-exporting it if it was truncated"
        ) from None
    if not model.graph.node or not model.opset_import or model.ir_version < 1:
        raise UserError(
            f"{path} is not an ONNX model (no graph, opset or IR version found); "
            "pass an ONNX file, re-exporting it if it was truncated"
        )
    had_external = _uses_external_data(model)
    if had_external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, onnx.checker.ValidationError, ValueError) as exc:
            raise UserError(
                f"{path}: its external data could not be read ({first_line(exc)}); "
                "keep the .data file beside the model under the name the model records"
            ) from None
    reordered = sort_nodes(model.graph)  # then the file on disk is not what is checked
    try:
        onnx.checker.check_model(path if (had_external or _too_big(model)) and not reordered else model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise UserError(
            f"{path} is not a valid ONNX model ({first_line(exc)}); "
            "re-export it, or fix the model so that onnx.checker accepts it"
        ) from None
    return LoadedModel(model, path, had_external)


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put the graph's nodes in topological order, in place, where an exporter did not (ONNX Runtime
    accepts such graphs, onnx.checker does not); returns whether it reordered them. A node depends on the
    producers of its inputs and of the outer tensors its subgraphs read; independent nodes keep their
    order. A graph already in order, with a cycle or with a tensor produced twice is left to the checker."""
    outputs = [out for node in graph.node for out in node.output if out]
    if len(set(outputs)) != len(outputs):
        return False
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    users: dict[int, list[int]] = {}
    waiting = []
    for i, node in enumerate(graph.node):
        needs = {producer[name] for name in (*node.input, *_subgraph_reads(node)) if name in producer} - {i}
        waiting.append(len(needs))
        for j in needs:
            users.setdefault(j, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users.get(i, ()):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) < len(graph.node) or order == sorted(order):
        return False
    nodes = [onnx.NodeProto() for _ in order]
    for copy, i in zip(nodes, order):
        copy.CopyFrom(graph.node[i])
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name the node's subgraphs (If / Loop / Scan bodies, nested) read."""
    names: set[str] = set()
    for attr in node.attribute:
        for body in (*attr.graphs, *([attr.g] if attr.HasField("g") else [])):
            for inner in body.node:
                names.update(name for name in inner.input if name)
                names |= _subgraph_reads(inner)
    return names


def _too_big(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > PROTOBUF_LIMIT


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (at most 200 characters), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def check_output_folder(output: str | os.PathLike[str], inputs: list[Path]) -> Path:
    """Refuse an output folder that is a file, or that (or whose parent, when it does not exist yet) cannot
    be written, or whose ``summary.json`` would overwrite an input."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; give a folder path")
    check_output_path(out / "summary.json" if out.is_dir() else out, inputs)
    return out


def check_output_path(output: str | os.PathLike[str], inputs: list[Path]) -> Path:
    """Refuse an output that would overwrite an input or cannot be written."""
    out = Path(output)
    data_file = out.parent / (out.name + ".data")
    for path in inputs:
        resolved = path.resolve()
        if out.resolve() == resolved or data_file.resolve() == resolved:
            raise UserError(f"output {out} would overwrite the input {path}; choose another output path")
    if out.is_dir():
        raise UserError(f"output {out} is a directory; give a file path such as {out}/pruned.onnx")
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist; create it or choose another")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(
            f"output folder {folder} is not writable ({exc.strerror or exc}); choose a writable folder"
        ) from None
    return out


def save_model(model: onnx.ModelProto, output: str | os.PathLike[str], external_data: bool) -> None:
    """Write ``model`` atomically; with ``external_data`` (or above 2 GiB) as ``OUT`` + ``OUT.data``.

    Everything goes to a temporary folder beside the output first and is moved into
    place, so a failure never leaves a half-written file.
    """
    out = Path(output)
    external_data = external_data or _too_big(model)
    with staging_folder(out) as tmp_dir:
        tmp_model = tmp_dir / out.name
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(
                copy, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data"
            )
            data = tmp_dir / (out.name + ".data")
            if data.exists():
                publish(data, out.parent / data.name)
        else:
            onnx.save_model(model, tmp_model)
        publish(tmp_model, out)


def single_input(model: onnx.ModelProto, purpose: str) -> onnx.ValueInfoProto:
    """The model's one data input (initializers listed as inputs do not count); ``purpose`` ends the error."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"the model has {len(inputs)} inputs; {purpose}")
    return inputs[0]


def image_input(
    model: onnx.ModelProto, purpose: str = "gpp-onnx expects one image input [N, C, H, W]"
) -> tuple[str, list]:
    """The model's image input: its name and dims (int, or the symbolic name); one float32 or float16
    4-D input (NCHW, or NHWC as TensorFlow exports take), else an error."""
    tensor_input = single_input(model, purpose)
    tensor = tensor_input.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    if tensor.elem_type not in IMAGE_DTYPES or len(dims) != 4:
        raise UserError(
            f"input '{tensor_input.name}' is not an image tensor (float [N, C, H, W]); got "
            f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} {dims}"
        )
    return tensor_input.name, dims


IMAGE_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def image_dtype(model: onnx.ModelProto) -> type:
    """The numpy type of the model's image input (float32 or float16)."""
    return IMAGE_DTYPES[single_input(model, "gpp-onnx expects one image input").type.tensor_type.elem_type]
