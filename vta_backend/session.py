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
from onnx import helper

from gpp_onnx.errors import UserError
from gpp_onnx.model_io import load_model
from vta_backend import ort_op
from vta_backend.config import VTAConfig
from vta_backend.model import CompiledModel, compile_model

_SESSION_IDS = itertools.count()


def rewrite(model: onnx.ModelProto, compiled: CompiledModel, prefix: str) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the model with each VTA conv (+ fused Relu) as a VtaConv node; returns it and the kernel keys."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]
    by_first = {site.replaced[0]: site for site in compiled.sites if site.conv is not None}
    dropped = {name for site in by_first.values() for name in site.replaced[1:]}
    nodes, keys = [], []
    for name, node in zip(names, model.graph.node):
        site = by_first.get(name)
        if site is None:
            if name not in dropped:
                nodes.append(node)
            continue
        key = f"{prefix}:{name}"
        ort_op.register(key, ort_op.VtaKernel(compiled.layers[name], site.input_shift, site.output_shift))
        keys.append(key)
        nodes.append(
            helper.make_node(
                ort_op.OP_TYPE, [site.input], [site.output], name=f"{name}/vta", domain=ort_op.DOMAIN, key=key
            )
        )
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    if not any(o.domain == ort_op.DOMAIN for o in rewritten.opset_import):
        rewritten.opset_import.append(helper.make_opsetid(ort_op.DOMAIN, 1))
    used = {i for n in nodes for i in n.input}
    kept = [t for t in rewritten.graph.initializer if t.name in used]  # the int8 weights live in the kernels
    del rewritten.graph.initializer[:]
    rewritten.graph.initializer.extend(kept)
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
