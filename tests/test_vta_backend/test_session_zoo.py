"""VtaSession on ONNX CNNs exported unlike ours: old opsets, float16, fixed batch, weights listed as
graph inputs, every auto_pad, ConvTranspose, one input channel, NHWC input, a depthwise conv.

Each small model, written here, is calibrated on random inputs, run through ``VtaSession`` and
compared with plain ONNX Runtime on the same input: the largest error is at most 5 % of the
largest output (int8 activations with power-of-two scales on two convs), every Conv and
ConvTranspose is listed with where it runs, and the second conv runs on VTA.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vta_backend import VTAConfig
from vta_backend.calibration import CalibrationOptions, calibrate
from vta_backend.session import VtaSession

RELATIVE_ERROR = 0.05


def zoo_model(
    opset: int = 13,
    float16: bool = False,
    batch: int | str = "N",
    weights_as_inputs: bool = False,
    auto_pad: str | None = None,
    transposed: bool = False,
    channels: int = 3,
    channels_last: bool = False,
    depthwise: bool = False,
) -> onnx.ModelProto:
    """[Transpose from NHWC], Conv(3x3) + Relu, Conv(3x3, stride 2) + Relu, [depthwise Conv(3x3)],
    [ConvTranspose], GlobalAveragePool, Flatten."""
    rng = np.random.default_rng(0)
    dtype, elem = (np.float16, TensorProto.FLOAT16) if float16 else (np.float32, TensorProto.FLOAT)
    arrays = {
        "w1": rng.standard_normal((16, channels, 3, 3)) * 0.3,
        "b1": rng.standard_normal(16) * 0.1,
        "w2": rng.standard_normal((32, 16, 3, 3)) * 0.1,
        "b2": rng.standard_normal(32) * 0.1,
    }
    padding = {"auto_pad": auto_pad} if auto_pad else {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **padding),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", strides=[2, 2], **padding),
        helper.make_node("Relu", ["c2"], ["features"]),
    ]
    if channels_last:  # as TensorFlow exports: the graph takes NHWC, transposes and normalises it for its convs
        arrays["mean"], arrays["std"] = np.full((1, channels, 1, 1), 0.5), np.full((1, channels, 1, 1), 0.25)
        nodes[:0] = [
            helper.make_node("Transpose", ["x_nhwc"], ["x_t"], name="to_nchw", perm=[0, 3, 1, 2]),
            helper.make_node("Sub", ["x_t", "mean"], ["x_c"], name="centre"),
            helper.make_node("Div", ["x_c", "std"], ["x"], name="scale"),
        ]
    if depthwise:
        arrays["wd"] = rng.standard_normal((32, 1, 3, 3)) * 0.3
        nodes[-1].output[0] = "features_dw_in"
        nodes += [
            helper.make_node("Conv", ["features_dw_in", "wd"], ["dw"], name="dw", group=32, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["dw"], ["features"]),
        ]
    if transposed:
        arrays["wt"] = rng.standard_normal((32, 16, 2, 2)) * 0.1
        nodes.append(helper.make_node("ConvTranspose", ["features", "wt"], ["up"], name="up", strides=[2, 2]))
    nodes += [
        helper.make_node("GlobalAveragePool", ["up" if transposed else "features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a.astype(dtype), name) for name, a in arrays.items()]
    shape = [batch, 16, 16, channels] if channels_last else [batch, channels, 16, 16]
    inputs = [helper.make_tensor_value_info("x_nhwc" if channels_last else "x", elem, shape)]
    if weights_as_inputs:  # as exporters before IR version 4 wrote them
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "zoo", inputs, [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset <= 7 else 4 if opset <= 9 else 8
    return model


CASES = {
    "opset 7 (IR 3)": zoo_model(opset=7),
    "opset 9": zoo_model(opset=9),
    "opset 13": zoo_model(),
    "float16": zoo_model(float16=True),
    "fixed batch 1": zoo_model(batch=1),
    "weights as graph inputs": zoo_model(opset=9, weights_as_inputs=True),
    "auto_pad SAME_UPPER": zoo_model(auto_pad="SAME_UPPER"),
    "auto_pad SAME_LOWER": zoo_model(auto_pad="SAME_LOWER"),
    "auto_pad VALID": zoo_model(auto_pad="VALID"),
    "ConvTranspose": zoo_model(transposed=True),
    "one input channel": zoo_model(channels=1),
    "channels last (TensorFlow export)": zoo_model(channels_last=True),
    "depthwise conv": zoo_model(depthwise=True),
}


@pytest.mark.parametrize("model", CASES.values(), ids=CASES.keys())
def test_vta_session_runs_the_model_close_to_onnx_runtime(model, tmp_path):
    placement = run_close_to_onnx_runtime(model, tmp_path)
    convs = [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert list(placement) == convs and placement["conv2"] == "vta"
    assert placement["conv1"] == "cpu"  # 3 (or 1) input channels from the graph input, through its Transpose
    assert placement.get("dw", "cpu") == "cpu"  # one input channel per group: VTA would pad each group to 16


def test_placement_gives_the_reason_for_a_depthwise_conv_and_a_transposed_first_conv():
    from vta_backend.model import compile_model

    reasons = {
        p.node: p.reason for p in compile_model(zoo_model(channels_last=True, depthwise=True), VTAConfig()).placement
    }
    assert reasons["conv1"].startswith("first conv with 3 input channels")
    assert reasons["dw"].startswith("grouped conv with 1 input channel per group (depthwise")
    assert reasons["conv2"] is None


def run_close_to_onnx_runtime(model: onnx.ModelProto, tmp_path) -> dict[str, str]:
    """Calibrate on 4 random batches, run a fifth through VtaSession and plain ONNX Runtime: the outputs
    agree within RELATIVE_ERROR of the largest output; returns where each conv ran."""
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    declared = reference.get_inputs()[0]
    shape = [d if isinstance(d, int) else 2 for d in declared.shape]
    dtype = np.float16 if declared.type == "tensor(float16)" else np.float32
    inputs = [np.random.default_rng(seed).standard_normal(shape).astype(dtype) for seed in range(5)]
    options = CalibrationOptions(method="minmax", images=4 * shape[0], batch=shape[0])
    name = declared.name
    shifts, _ = calibrate(model, ({name: x} for x in inputs[:4]), options, data="zoo", cache_dir=tmp_path)
    session = VtaSession(model, shifts, VTAConfig())
    try:
        ours = session.run(None, {name: inputs[4]})[0]
        placement = {p.node: p.device for p in session.report().placement}
    finally:
        session.close()
    expected = reference.run(None, {name: inputs[4]})[0]
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    error = np.abs(ours.astype(np.float32) - expected.astype(np.float32)).max()
    assert error <= RELATIVE_ERROR * np.abs(expected.astype(np.float32)).max()
    return placement


def quantized(model: onnx.ModelProto, tmp_path, quant_format) -> onnx.ModelProto:
    """The model quantized by onnxruntime.quantization (its convs only), as third-party int8 models are."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(7)
            self.feeds = iter([{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(model, source)
    quantize_static(source, target, Reader(), quant_format=quant_format, op_types_to_quantize=["Conv"])
    return onnx.load(target)


def test_a_qdq_model_runs_on_vta_from_its_dequantized_weights_and_bias(tmp_path):
    """QDQ format: int8 weights and an int32 bias behind DequantizeLinear; VTA re-quantizes the
    dequantized weights to its power-of-two scales."""
    from onnxruntime.quantization import QuantFormat

    model = quantized(zoo_model(transposed=True), tmp_path, QuantFormat.QDQ)
    assert [n.op_type for n in model.graph.node].count("DequantizeLinear") >= 4  # weights and biases
    placement = run_close_to_onnx_runtime(model, tmp_path)
    # the 3-channel first conv reads the quantized-dequantized graph input: it stays on the CPU as in
    # the float model (VTA would pad its 3 channels to 16)
    assert (placement["conv1"], placement["conv2"]) == ("cpu", "vta")


def test_qlinearconv_and_convinteger_models_run_on_vta(tmp_path):
    """QOperator format (QLinearConv) and dynamic quantization (ConvInteger): rewritten as float convs
    between DequantizeLinear and QuantizeLinear, run on VTA from the model's own int8 weights - but for the
    3-channel first conv, which stays on the CPU as in the float model."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic

    static = quantized(zoo_model(), tmp_path, QuantFormat.QOperator)
    onnx.save(zoo_model(), tmp_path / "float.onnx")
    dynamic_path = tmp_path / "dynamic.onnx"
    quantize_dynamic(tmp_path / "float.onnx", dynamic_path, op_types_to_quantize=["Conv"], weight_type=QuantType.QInt8)
    dynamic = onnx.load(dynamic_path)
    for model, op in ((static, "QLinearConv"), (dynamic, "ConvInteger")):
        convs = [n.name for n in model.graph.node if n.op_type == op]
        assert len(convs) == 2
        assert run_close_to_onnx_runtime(model, tmp_path) == {convs[0]: "cpu", convs[1]: "vta"}


def test_qlinearconv_below_opset_13_is_listed_with_its_reason(tmp_path):
    from onnxruntime.quantization import QuantFormat

    from gpp_onnx import UserError
    from vta_backend.model import compile_model

    model = quantized(zoo_model(), tmp_path, QuantFormat.QOperator)
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 11
    with pytest.raises(UserError, match=r"conv1_quant: QLinearConv .* opset below 13 .* stays on the CPU"):
        compile_model(model, VTAConfig())
