"""``VtaSession``: an ONNX Runtime session whose convs run on the VTA simulator.

A graph rewrite replaces every Conv that VTA runs (and the Relu fused into it) with one
``VtaConv`` custom-domain node, executed by the Python kernel of :mod:`vta_backend.ort_op`;
everything else stays on ONNX Runtime's CPU kernels. The session behaves like
``onnxruntime.InferenceSession`` (``run(output_names, feeds)``, ``get_inputs()``,
``get_outputs()``) and adds ``report()``: the simulated VTA statistics and where every
conv ran.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from gpp_onnx.errors import UserError
from gpp_onnx.model_io import load_model
from gpp_onnx.weights import GraphIndex
from vta_backend import ort_op
from vta_backend.config import VTAConfig
from vta_backend.model import CompiledModel, compile_model

_SESSION_IDS = itertools.count()


def rewrite(model: onnx.ModelProto, compiled: CompiledModel, prefix: str) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the model with each VTA conv (and its fused Add / Relu) as one int8 custom node.

    Activations stay int8 and channels-last (as in VTA's NCHW1n16c DRAM layout) between VTA
    convs; QuantizeLinear / DequantizeLinear (scale ``2**-shift``, zero point 0) and a
    Transpose convert where a float NCHW operator produces or reads them.
    Returns the model and the keys of the kernels it registered.
    """
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    index = GraphIndex(model.graph)
    # each VTA node goes where the last node it replaces was, so that all its inputs exist by then
    sites = {site.replaced[-1]: site for site in compiled.sites if site.conv is not None}
    replaced = {name for site in sites.values() for name in site.replaced}
    int8_reads = {(site.replaced[0], site.input) for site in sites.values()}  # (reader, tensor) pairs VTA serves
    int8_reads |= {(site.replaced[1], site.residual) for site in sites.values() if site.residual is not None}
    nodes, keys, initializers = [], [], []
    int8: dict[str, str] = {}  # tensor -> its int8 twin

    def scale(shift: int) -> str:
        name = f"{prefix}/scale_{shift}"
        if not any(t.name == name for t in initializers):
            initializers.append(numpy_helper.from_array(np.array(2.0**-shift, np.float32), name))
        return name

    zero = f"{prefix}/zero_point"
    initializers.append(numpy_helper.from_array(np.array(0, np.int8), zero))

    def as_int8(tensor: str, shift: int) -> str:
        """The channels-last int8 twin of a float NCHW tensor (quantized once, then transposed)."""
        if tensor not in int8:
            int8[tensor] = f"{tensor}/int8_nhwc"
            nodes.append(
                helper.make_node(
                    "QuantizeLinear", [tensor, scale(shift), zero], [f"{tensor}/int8"], name=f"{tensor}/quantize"
                )
            )
            nodes.append(
                helper.make_node(
                    "Transpose", [f"{tensor}/int8"], [int8[tensor]], perm=[0, 2, 3, 1], name=f"{tensor}/to_nhwc"
                )
            )
        return int8[tensor]

    for name, node in zip(index.names, model.graph.node):
        site = sites.get(name)
        if site is None:
            if name not in replaced:
                nodes.append(node)
            continue
        name = site.node
        key = f"{prefix}:{name}"
        ort_op.register(key, ort_op.VtaKernel(compiled.layers[name]))
        keys.append(key)
        inputs = [as_int8(site.input, site.input_shift)]
        if site.residual is not None:
            inputs.append(as_int8(site.residual, site.residual_input_shift))
        int8[site.output] = f"{site.output}/int8_nhwc"
        op_type = ort_op.OP_TYPE_ADD if site.residual is not None else ort_op.OP_TYPE
        nodes.append(
            helper.make_node(op_type, inputs, [int8[site.output]], name=f"{name}/vta", domain=ort_op.DOMAIN, key=key)
        )
        float_readers = [
            i for i in index.consumers.get(site.output, []) if (index.names[i], site.output) not in int8_reads
        ]
        if float_readers or site.output in index.graph_outputs:
            nodes.append(
                helper.make_node(
                    "Transpose",
                    [int8[site.output]],
                    [f"{site.output}/int8"],
                    perm=[0, 3, 1, 2],
                    name=f"{site.output}/to_nchw",
                )
            )
            nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{site.output}/int8", scale(site.output_shift), zero],
                    [site.output],
                    name=f"{site.output}/dequantize",
                )
            )
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    if not any(o.domain == ort_op.DOMAIN for o in rewritten.opset_import):
        rewritten.opset_import.append(helper.make_opsetid(ort_op.DOMAIN, 1))
    used = {i for n in nodes for i in n.input}
    kept = [t for t in rewritten.graph.initializer if t.name in used]  # the int8 weights live in the kernels
    del rewritten.graph.initializer[:]
    rewritten.graph.initializer.extend(kept + initializers)
    return rewritten, keys


class VtaSession:
    """Run an ONNX model with its convs on the VTA simulator (see module doc)."""

    def __init__(
        self,
        model: str | os.PathLike[str] | onnx.ModelProto,
        activation_shifts: Mapping[str, int],
        config: VTAConfig | None = None,
        per_channel: bool = False,
    ) -> None:
        loaded = load_model(model)
        self.config = config or VTAConfig()
        missing = _uncalibrated(loaded.model, activation_shifts)
        if missing:
            raise UserError(f"no activation scale for tensor(s) {', '.join(missing[:3])}; calibrate the model first")
        self.compiled = compile_model(
            loaded.model, self.config, activation_shifts=activation_shifts, per_channel=per_channel
        )
        rewritten, self._keys = rewrite(loaded.model, self.compiled, f"s{next(_SESSION_IDS)}")
        options = ort.SessionOptions()
        options.register_custom_ops_library(ort_op.LIBRARY_PATH)
        self._session = ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray], run_options=None) -> list:
        return self._session.run(output_names, feeds, run_options)

    def get_inputs(self) -> list:
        return self._session.get_inputs()

    def get_outputs(self) -> list:
        return self._session.get_outputs()

    def report(self) -> dict[str, object]:
        """Simulated VTA figures per image (cycles, GEMM micro-ops, bytes, per layer) and placement."""
        summary = self.compiled.summary()
        summary["placement"] = [
            {"node": site.node, "device": "vta" if site.conv is not None else "cpu", "reason": site.reason}
            for site in self.compiled.sites
        ]
        return summary

    def close(self) -> None:
        ort_op.unregister(self._keys)
        self._keys = []

    def __del__(self) -> None:
        self.close()


def _uncalibrated(model: onnx.ModelProto, shifts: Mapping[str, int]) -> list[str]:
    """Conv inputs and outputs without a shift (a first-conv input is exempt: it may stay on the CPU)."""
    graph_inputs = {i.name for i in model.graph.input}
    needed = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            needed += [name for name in (node.input[0], node.output[0]) if name not in graph_inputs]
    return [name for name in needed if name not in shifts]
