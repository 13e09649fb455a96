"""compile_model: eligibility with reasons, the kept-tiles convention, and the typed report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import conv_model, make_model, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

import gpp_onnx
from gpp_onnx import UserError
from gpp_onnx.annotation import AnnotationError, read_kept_tiles
from vta_backend import QuantizationOptions, VTAConfig
from vta_backend.model import READ_FROM_MODEL, compile_model
from vta_backend.report import Placement, VtaReport

CONFIG = VTAConfig()
REPORT_KEYS = {
    "simulated",
    "board",
    "clock_mhz",
    "cycles",
    "simulated_ms",
    "gemm_uops",
    "gemm_uops_weights",
    "gemm_uops_skipped",
    "dense_cycles",
    "speedup",
    "amdahl_bound",
    "bytes",
    "layers",
    "placement",
}


def pruned_model(rng, sparsity: float = 0.6):
    weights = [
        rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((32, 32, 3, 3)).astype(np.float32),
    ]
    model = conv_model(weights, [1, 16, 8, 8], attrs=[{"pads": [1] * 4}, {"pads": [1] * 4}])
    return gpp_onnx.prune(model, sparsity)[0]


def test_report_is_typed_and_places_every_conv():
    compiled = compile_model(tiny_cnn(), CONFIG, activation_shifts={"r0": 3})
    report = compiled.report()
    assert isinstance(report, VtaReport)
    assert report.placement == [
        Placement("conv0", "cpu", compiled.sites[0].reason),
        Placement("conv1", "vta"),
        Placement("conv2", "vta"),
    ]
    assert (
        report.not_on_vta == report.placement[:1] and "first conv with 3 input channels" in report.not_on_vta[0].reason
    )
    assert [layer.name for layer in report.layers] == ["conv1", "conv2"]
    assert report.cycles == sum(layer.timing.cycles for layer in report.layers)
    data = report.to_dict()
    assert set(data) == REPORT_KEYS and data["simulated"] is True
    assert data["placement"][1] == {"node": "conv1", "device": "vta", "reason": None}
    assert data["layers"][0]["name"] == "conv1" and data["bytes"] == report.bytes
    assert compiled.sites[1].input_shift == 3 and compiled.sites[2].input_shift == 4  # calibrated, default


def transposed_chain(first_conv: bool, count: int) -> onnx.ModelProto:
    """An optional 3-channel first Conv, then ``count`` 16-channel 1x1 ConvTranspose nodes."""
    rng = np.random.default_rng(0)
    nodes, inits, source = [], [], "x"
    if first_conv:
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv0"))
        source = "c"
    for i in range(count):
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 16, 1, 1)).astype(np.float32), f"t{i}"))
        nodes.append(helper.make_node("ConvTranspose", [source, f"t{i}"], [f"y{i}"], name=f"up{i}"))
        source = f"y{i}"
    channels = 3 if first_conv else 16
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info(source, TensorProto.FLOAT, [1, 16, 8, 8])],
        inits,
    )
    return make_model(graph)


def test_no_runnable_conv_names_each_reason():
    with pytest.raises(UserError) as error:
        compile_model(transposed_chain(True, 1), CONFIG)
    message = str(error.value)
    assert message.startswith("the model has no Conv that VTA can run (conv0: first conv with 3 input channels")
    assert "; up0: ConvTranspose: VTA's conv2d schedule runs convolutions, not transposed ones" in message


def test_no_runnable_conv_lists_the_first_five():
    with pytest.raises(UserError) as error:
        compile_model(transposed_chain(False, 7), CONFIG)
    listed = str(error.value).split("(", 1)[1]
    assert [f"up{i}: ConvTranspose" in listed for i in range(7)] == [True] * 5 + [False] * 2
    assert "; and 2 more)" in listed


def test_auto_pad_becomes_the_padding_onnx_specifies(rng):
    """SAME_UPPER puts the odd padding pixel at the end, SAME_LOWER at the start, VALID none."""
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    explicit = {"SAME_UPPER": [0, 0, 1, 1], "SAME_LOWER": [1, 1, 0, 0], "VALID": [0, 0, 0, 0]}
    for mode, pads in explicit.items():
        auto = conv_model([w, w], [1, 16, 8, 8], attrs=[{"pads": [1] * 4}, {"auto_pad": mode, "strides": [2, 2]}])
        given = conv_model([w, w], [1, 16, 8, 8], attrs=[{"pads": [1] * 4}, {"pads": pads, "strides": [2, 2]}])
        assert compile_model(auto, CONFIG).layers["conv1"].conv.pads == tuple(pads), mode
        assert compile_model(given, CONFIG).report().cycles == compile_model(auto, CONFIG).report().cycles


def test_kept_tiles_read_here_given_by_the_caller_or_none(rng):
    model = pruned_model(rng)
    read_here = compile_model(model, CONFIG).report()
    given = compile_model(model, CONFIG, kept=read_kept_tiles(model)).report()
    assert read_here.gemm_uops_skipped > 0
    assert (
        given.to_dict() == read_here.to_dict() == compile_model(model, CONFIG, kept=READ_FROM_MODEL).report().to_dict()
    )
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[w == 0] = 0.5  # pruned tiles no longer zero: the annotation is stale
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    with pytest.raises(AnnotationError, match="marked pruned hold nonzero"):
        compile_model(model, CONFIG)
    dense = compile_model(model, CONFIG, kept=None).report()  # no annotation: every nonzero tile is issued
    assert dense.layers[0].gemm_uops_skipped == 0


def test_annotation_for_another_tile_is_an_error(rng):
    with pytest.raises(UserError, match="pruned for 16x16 tiles but the VTA config has 8x8"):
        compile_model(pruned_model(rng), VTAConfig(LOG_BLOCK=3))


def test_quantization_options_reach_every_conv(rng):
    model = pruned_model(rng)
    per_conv = compile_model(model, CONFIG, quantization=QuantizationOptions(per_channel=False, activation_shift=2))
    per_channel = compile_model(model, CONFIG)
    assert all(isinstance(layer.conv.shift, int) for layer in per_conv.layers.values())
    assert all(np.ndim(layer.conv.shift) == 1 for layer in per_channel.layers.values())
    assert {site.input_shift for site in per_conv.sites} == {2}


def test_with_tiles_that_are_not_square_the_add_stays_on_the_cpu():
    compiled = compile_model(tiny_cnn(), VTAConfig(LOG_BLOCK_IN=4, LOG_BLOCK_OUT=5))
    assert compiled.layers["conv2"].conv.residual_shift is None  # conv2 + Add + Relu: only the conv on VTA
    assert compile_model(tiny_cnn(), CONFIG).layers["conv2"].conv.residual_shift is not None
