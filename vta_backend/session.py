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
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx.errors import UserError
from gpp_onnx.model_io import load_model
from gpp_onnx.weights import GraphIndex
from vta_backend import ort_op
from vta_backend.calibration import missing_shifts
from vta_backend.config import VTAConfig
from vta_backend.importer import ConvSite
from vta_backend.integer_convs import expand_integer_convs
from vta_backend.model import READ_FROM_MODEL, CompiledModel, KeptArgument, compile_model
from vta_backend.quantization import DEFAULT_QUANTIZATION, QuantizationOptions
from vta_backend.report import VtaReport

_SESSION_IDS = itertools.count()
QUANTIZE_LINEAR_OPSET = 10  # the first opset with QuantizeLinear / DequantizeLinear
INITIALIZERS_NEED_NO_INPUT = 4  # IR version from which an initializer need not be a graph input


class _Rewrite:
    """The new graph being built: its nodes, its extra initializers and the int8 twins of float tensors."""

    def __init__(self, prefix: str, float_types: Mapping[str, str], native_borders: bool) -> None:
        self.prefix = prefix
        self.float_types = float_types  # tensor -> "float32" / "float16"
        self.native_borders = native_borders  # the model's opset has QuantizeLinear / DequantizeLinear
        self.zero = f"{prefix}/zero_point"
        self.nodes: list[onnx.NodeProto] = []
        self.initializers = [numpy_helper.from_array(np.array(0, np.int8), self.zero)]
        self.int8: dict[str, str] = {}  # tensor -> its channels-last int8 twin

    def scale(self, shift: int) -> str:
        """The name of the float scale ``2**-shift``, added once."""
        name = f"{self.prefix}/scale_{shift}"
        if not any(t.name == name for t in self.initializers):
            self.initializers.append(numpy_helper.from_array(np.array(2.0**-shift, np.float32), name))
        return name

    def as_int8(self, tensor: str, shift: int) -> str:
        """The channels-last int8 twin of a float NCHW tensor (a float16 one cast to float32 first)."""
        if tensor in self.int8:
            return self.int8[tensor]
        self.int8[tensor] = f"{tensor}/int8_nhwc"
        source = tensor
        if self.float_types.get(tensor) == "float16":
            source = f"{tensor}/float32"
            self.nodes.append(helper.make_node("Cast", [tensor], [source], to=TensorProto.FLOAT, name=source))
        if not self.native_borders:
            self.nodes.append(
                helper.make_node(
                    ort_op.QUANTIZE,
                    [source],
                    [self.int8[tensor]],
                    name=f"{tensor}/quantize",
                    domain=ort_op.DOMAIN,
                    shift=shift,
                )
            )
            return self.int8[tensor]
        inputs = [source, self.scale(shift), self.zero]
        self.nodes.append(helper.make_node("QuantizeLinear", inputs, [f"{tensor}/int8"], name=f"{tensor}/quantize"))
        self.nodes.append(
            helper.make_node(
                "Transpose", [f"{tensor}/int8"], [self.int8[tensor]], perm=[0, 2, 3, 1], name=f"{tensor}/to_nhwc"
            )
        )
        return self.int8[tensor]

    def vta_node(self, site: ConvSite, key: str) -> None:
        """The custom node running the compiled conv on int8 channels-last activations."""
        inputs = [self.as_int8(site.input, site.input_shift)]
        if site.residual is not None:
            inputs.append(self.as_int8(site.residual, site.residual_input_shift))
        self.int8[site.output] = f"{site.output}/int8_nhwc"
        op_type = ort_op.OP_TYPE_ADD if site.residual is not None else ort_op.OP_TYPE
        self.nodes.append(
            helper.make_node(
                op_type, inputs, [self.int8[site.output]], name=f"{site.node}/vta", domain=ort_op.DOMAIN, key=key
            )
        )

    def as_float(self, site: ConvSite) -> None:
        """Transpose and dequantize a VTA conv's output back to the float NCHW tensor of the original graph
        (cast back to float16 where the original is)."""
        output, shift = site.output, site.output_shift
        target = f"{output}/float32" if self.float_types.get(output) == "float16" else output
        if self.native_borders:
            self.nodes.append(
                helper.make_node(
                    "Transpose", [self.int8[output]], [f"{output}/int8"], perm=[0, 3, 1, 2], name=f"{output}/to_nchw"
                )
            )
            inputs = [f"{output}/int8", self.scale(shift), self.zero]
            self.nodes.append(helper.make_node("DequantizeLinear", inputs, [target], name=f"{output}/dequantize"))
        else:
            self.nodes.append(
                helper.make_node(
                    ort_op.DEQUANTIZE,
                    [self.int8[output]],
                    [target],
                    name=f"{output}/dequantize",
                    domain=ort_op.DOMAIN,
                    shift=shift,
                )
            )
        if target != output:
            self.nodes.append(
                helper.make_node("Cast", [target], [output], to=TensorProto.FLOAT16, name=f"{output}/cast")
            )

    def model(self, original: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``original`` with the new nodes, its initializers still read, and the new ones."""
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(original)
        del rewritten.graph.node[:]
        rewritten.graph.node.extend(self.nodes)
        if not any(o.domain == ort_op.DOMAIN for o in rewritten.opset_import):
            rewritten.opset_import.append(helper.make_opsetid(ort_op.DOMAIN, 1))
        used = {i for n in self.nodes for i in n.input}
        dropped = {t.name for t in rewritten.graph.initializer if t.name not in used}  # int8 weights: in the kernels
        new = [t for t in self.initializers if t.name in used]
        kept = [t for t in rewritten.graph.initializer if t.name in used]
        del rewritten.graph.initializer[:]
        rewritten.graph.initializer.extend(kept + new)
        inputs = [i for i in rewritten.graph.input if i.name not in dropped]  # older exports list weights as inputs
        if rewritten.ir_version < INITIALIZERS_NEED_NO_INPUT:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new]
        del rewritten.graph.input[:]
        rewritten.graph.input.extend(inputs)
        return rewritten


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _float_types(model: onnx.ModelProto) -> dict[str, str]:
    """Every tensor whose element type shape inference knows: "float16" or "float32" (others left out)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError:
        inferred = model
    graph = inferred.graph
    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
    return {
        v.name: names[v.type.tensor_type.elem_type]
        for v in (*graph.input, *graph.value_info, *graph.output)
        if v.type.tensor_type.elem_type in names
    }


def rewrite(
    model: onnx.ModelProto, compiled: CompiledModel, prefix: str
) -> tuple[onnx.ModelProto, dict[str, ort_op.VtaKernel]]:
    """A copy of the model with each VTA conv (and its fused Add / Relu) as one int8 custom node.

    Activations stay int8 and channels-last (as in VTA's NCHW1n16c DRAM layout) between VTA
    convs; QuantizeLinear / DequantizeLinear (scale ``2**-shift``, zero point 0) and a
    Transpose convert where a float NCHW operator produces or reads them. Returns the model
    and the kernels its custom nodes name (by key), for the caller to register.
    """
    index = GraphIndex(model.graph)
    # each VTA node goes where the last node it replaces was, so that all its inputs exist by then
    sites = {site.replaced[-1]: site for site in compiled.sites if site.conv is not None}
    replaced = {name for site in sites.values() for name in site.replaced}
    int8_reads = {(site.replaced[0], site.input) for site in sites.values()}  # (reader, tensor) pairs VTA serves
    int8_reads |= {(site.replaced[1], site.residual) for site in sites.values() if site.residual is not None}
    graph, kernels = _Rewrite(prefix, _float_types(model), _opset(model) >= QUANTIZE_LINEAR_OPSET), {}
    for name, node in zip(index.names, model.graph.node):
        site = sites.get(name)
        if site is None:
            if name not in replaced:
                graph.nodes.append(node)
            continue
        key = f"{prefix}:{site.node}"
        kernels[key] = ort_op.VtaKernel(compiled.layers[site.node])
        graph.vta_node(site, key)
        float_readers = [
            i for i in index.consumers.get(site.output, []) if (index.names[i], site.output) not in int8_reads
        ]
        if float_readers or site.output in index.graph_outputs:
            graph.as_float(site)
    return graph.model(model), kernels


class VtaSession:
    """Run an ONNX model with its convs on the VTA simulator (see module doc).

    ``quantization`` and ``kept`` are as for :func:`vta_backend.model.compile_model`.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | onnx.ModelProto,
        activation_shifts: Mapping[str, int],
        config: VTAConfig | None = None,
        quantization: QuantizationOptions = DEFAULT_QUANTIZATION,
        kept: KeptArgument = READ_FROM_MODEL,
    ) -> None:
        self._keys: list[str] = []  # first: close() must work however far __init__ got
        source = expand_integer_convs(load_model(model).model)  # QLinearConv / ConvInteger as QDQ convs
        self.config = config or VTAConfig()
        missing = missing_shifts(source, activation_shifts)
        if missing:
            raise UserError(f"no activation scale for tensor(s) {', '.join(missing[:3])}; calibrate the model first")
        self.compiled = compile_model(
            source, self.config, activation_shifts=activation_shifts, quantization=quantization, kept=kept
        )
        rewritten, kernels = rewrite(source, self.compiled, f"s{next(_SESSION_IDS)}")
        for key, kernel in kernels.items():
            self._keys.append(key)
            ort_op.register(key, kernel)
        options = ort.SessionOptions()
        options.register_custom_ops_library(ort_op.LIBRARY_PATH)
        self._session = ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray], run_options=None) -> list:
        """As ``onnxruntime.InferenceSession.run``."""
        return self._session.run(output_names, feeds, run_options)

    def get_inputs(self) -> list:
        """As ``onnxruntime.InferenceSession.get_inputs``."""
        return self._session.get_inputs()

    def get_outputs(self) -> list:
        """As ``onnxruntime.InferenceSession.get_outputs``."""
        return self._session.get_outputs()

    def report(self) -> VtaReport:
        """Simulated VTA figures per image (cycles, GEMM micro-ops, bytes, per layer) and every conv's placement."""
        return self.compiled.report()

    def close(self) -> None:
        """Unregister this session's kernels (the session cannot run afterwards); safe to call twice."""
        ort_op.unregister(self._keys)
        self._keys = []

    def __del__(self) -> None:
        if hasattr(self, "_keys"):  # absent only when the arguments did not even bind to __init__
            self.close()
