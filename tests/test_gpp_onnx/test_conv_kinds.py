"""Conv kinds: 1x1, strided, dilated, padded, 1-D, 3-D, grouped, depthwise, transposed, FC."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import conv_model, make_model, run_ort, symbolic_shape, weight
from onnx import TensorProto, helper, numpy_helper

import gpp_onnx


def kept_map(model) -> np.ndarray:
    return gpp_onnx.read_annotation(model).weights[0].kept


def tile_nonzero(w2d: np.ndarray, o0: int, i0: int) -> bool:
    return bool(w2d[o0 : o0 + 16, i0 : i0 + 16].any())


@pytest.mark.parametrize(
    "shape,attrs,input_shape",
    [
        ((32, 32, 1, 1), {}, [1, 32, 5, 5]),
        ((32, 16, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, [1, 16, 9, 9]),
        ((32, 16, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, [1, 16, 9, 9]),
        ((32, 16, 3, 5), {"pads": [1, 2, 1, 2]}, [1, 16, 7, 7]),
        ((32, 16, 5), {"pads": [2, 2]}, [1, 16, 12]),
        ((32, 16, 3, 3, 3), {"pads": [1] * 6}, [1, 16, 4, 4, 4]),
    ],
    ids=["1x1", "strided", "dilated", "rect-padded", "conv1d", "conv3d"],
)
def test_conv_variants_prune_and_run(rng, shape, attrs, input_shape):
    w = rng.standard_normal(shape).astype(np.float32)
    model = conv_model([w], input_shape, attrs=[attrs])
    pruned, report = gpp_onnx.prune(model, 0.5, pattern="group")
    positions = int(np.prod(shape[2:]))
    entry = gpp_onnx.read_annotation(pruned).weights[0]
    assert entry.kernel_positions == positions
    assert entry.layout == {3: "OIW", 4: "OIHW", 5: "OIDHW"}[len(shape)]
    assert report.layers[0].tiles_total == 2 * (shape[1] // 16) * positions
    out = weight(pruned, "W0").reshape(32, shape[1], positions)
    for ot in range(2):
        for it in range(shape[1] // 16):
            for p in range(positions):
                assert tile_nonzero(out[:, :, p], ot * 16, it * 16) == entry.kept[0, ot, it, p]
    run_ort(pruned, {"x": rng.standard_normal(input_shape).astype(np.float32)})


def test_grouped_conv_tiles_stay_inside_each_group(rng):
    # group=2, 20 output and 24 input channels per group: tiles never straddle two groups.
    w = rng.standard_normal((40, 24, 3, 3)).astype(np.float32)
    model = conv_model([w], [1, 48, 6, 6], attrs=[{"group": 2, "pads": [1] * 4}])
    pruned, report = gpp_onnx.prune(model, 0.5, pattern="group")
    kept = kept_map(pruned)
    assert kept.shape == (2, 2, 2, 9) and report.layers[0].tiles_total == 72
    out = weight(pruned, "W0").reshape(40, 24, 9)
    for g in range(2):
        for ot, (o0, o1) in enumerate([(0, 16), (16, 20)]):
            for it, (i0, i1) in enumerate([(0, 16), (16, 24)]):
                for p in range(9):
                    block = out[g * 20 + o0 : g * 20 + o1, i0:i1, p]
                    original = w.reshape(40, 24, 9)[g * 20 + o0 : g * 20 + o1, i0:i1, p]
                    assert block.any() == kept[g, ot, it, p]
                    assert not block.any() or np.array_equal(block, original)
    run_ort(pruned, {"x": rng.standard_normal((1, 48, 6, 6)).astype(np.float32)})


@pytest.mark.parametrize("pattern", ["group", "block"])
def test_depthwise_conv_is_skipped_for_tile_patterns(rng, pattern):
    ws = [rng.standard_normal((32, 1, 3, 3)).astype(np.float32), rng.standard_normal((32, 32, 1, 1)).astype(np.float32)]
    model = conv_model(ws, [1, 32, 6, 6], attrs=[{"group": 32, "pads": [1] * 4}, {}])
    pruned, report = gpp_onnx.prune(model, 0.5, pattern=pattern)
    assert report.layers[0].status == "skipped" and "depthwise" in report.layers[0].reason
    assert report.layers[1].status == "pruned"
    np.testing.assert_array_equal(weight(pruned, "W0"), ws[0])
    skipped = gpp_onnx.read_annotation(pruned).skipped
    assert [s.weight for s in skipped] == ["W0"]


@pytest.mark.parametrize("pattern", ["channel", "element"])
def test_depthwise_conv_takes_channel_and_element_patterns(rng, pattern):
    w = rng.standard_normal((32, 1, 3, 3)).astype(np.float32)
    model = conv_model([w], [1, 32, 6, 6], attrs=[{"group": 32, "pads": [1] * 4}])
    pruned, report = gpp_onnx.prune(model, 0.5, pattern=pattern)
    assert report.layers[0].status == "pruned" and report.sparsity == pytest.approx(0.5)


def test_conv_transpose_uses_iohw_axes(rng):
    # ConvTranspose stores W[in, out/group, kh, kw]: output channels are axis 1.
    w = rng.standard_normal((20, 40, 3, 3)).astype(np.float32)
    model = conv_model([w], [1, 20, 5, 5], op="ConvTranspose")
    pruned, report = gpp_onnx.prune(model, 0.5, pattern="group")
    entry = gpp_onnx.read_annotation(pruned).weights[0]
    assert entry.layout == "IOHW" and entry.kept.shape == (1, 3, 2, 9)
    out = weight(pruned, "W0").reshape(20, 40, 9)
    for ot in range(3):
        for it in range(2):
            for p in range(9):
                assert tile_nonzero(out[:, :, p].T, ot * 16, it * 16) == entry.kept[0, ot, it, p]
    run_ort(pruned, {"x": rng.standard_normal((1, 20, 5, 5)).astype(np.float32)})


def test_grouped_conv_transpose(rng):
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)  # 2 groups of 16 in -> 16 out
    model = conv_model([w], [1, 32, 5, 5], op="ConvTranspose", attrs=[{"group": 2}])
    pruned, report = gpp_onnx.prune(model, 0.5)
    assert kept_map(pruned).shape == (2, 1, 1, 9) and report.sparsity == pytest.approx(5 / 9, abs=0.06)
    run_ort(pruned, {"x": rng.standard_normal((1, 32, 5, 5)).astype(np.float32)})


def fc_model(rng, op: str) -> tuple:
    conv_w = rng.standard_normal((16, 16, 1, 1)).astype(np.float32)
    if op == "Gemm":
        fc_w = rng.standard_normal((32, 48)).astype(np.float32)  # transB=1: [out, in]
        fc = helper.make_node("Gemm", ["flat", "F"], ["y"], transB=1, name="fc")
    else:
        fc_w = rng.standard_normal((48, 32)).astype(np.float32)  # x @ W: [in, out]
        fc = helper.make_node("MatMul", ["flat", "F"], ["y"], name="fc")
    nodes = [
        helper.make_node("Conv", ["x", "C"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["flat"], name="flatten"),
        fc,
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, symbolic_shape(2))],
        [numpy_helper.from_array(conv_w, "C"), numpy_helper.from_array(fc_w, "F")],
    )
    return make_model(g), fc_w


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_fully_connected_only_with_include_fc(rng, op):
    model, fc_w = fc_model(rng, op)
    pruned, report = gpp_onnx.prune(model, 0.5)
    fc_row = report.layers[1]
    assert fc_row.status == "skipped" and "--include-fc" in fc_row.reason
    np.testing.assert_array_equal(weight(pruned, "F"), fc_w)

    pruned, report = gpp_onnx.prune(model, 0.5, include_fc=True)
    entry = gpp_onnx.read_annotation(pruned).for_weight("F")
    assert entry.layout == ("OI" if op == "Gemm" else "IO") and entry.kept.shape == (1, 2, 3, 1)
    out = weight(pruned, "F")
    out_in = out if op == "Gemm" else out.T
    for ot in range(2):
        for it in range(3):
            assert tile_nonzero(out_in, ot * 16, it * 16) == entry.kept[0, ot, it, 0]
    run_ort(pruned, {"x": rng.standard_normal((1, 16, 1, 3)).astype(np.float32)})


def test_exclude_keeps_layers_dense_with_reason(rng):
    ws = [
        rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((32, 32, 3, 3)).astype(np.float32),
    ]
    model = conv_model(ws, [1, 16, 6, 6], attrs=[{"pads": [1] * 4}] * 2)
    pruned, report = gpp_onnx.prune(model, 0.5, exclude=["^conv0$"])
    assert report.layers[0].status == "skipped" and "--exclude" in report.layers[0].reason
    np.testing.assert_array_equal(weight(pruned, "W0"), ws[0])
    assert report.layers[1].sparsity == pytest.approx(0.5)
    _, by_weight = gpp_onnx.prune(model, 0.5, exclude=["W1"])
    assert by_weight.layers[1].status == "skipped"
