"""Weights wherever they live: initializers, Constant nodes, shared, fp16, QDQ, integer convs,
external data, and every opset from 7 up; the rest of the graph is left as it was."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from helpers import ORT_MAX_OPSET, conv_model, make_model, run_ort, symbolic_shape, weight
from onnx import TensorProto, helper, numpy_helper

import gpp_onnx

X = "x"


def graph(nodes, inits, in_shape, in_type=TensorProto.FLOAT, out="y", out_type=TensorProto.FLOAT):
    return helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(X, in_type, in_shape)],
        [helper.make_tensor_value_info(out, out_type, symbolic_shape(len(in_shape)))],
        inits,
    )


def tiles_of(w: np.ndarray, zero) -> np.ndarray:
    """Which 16x16 groups of an OIHW weight differ from ``zero``: [OT, IT, kh*kw]."""
    o, i = w.shape[:2]
    nonzero = (w != zero).reshape(o, i, -1)
    padded = np.zeros((-(-o // 16) * 16, -(-i // 16) * 16, nonzero.shape[2]), bool)
    padded[:o, :i] = nonzero
    return padded.reshape(-(-o // 16), 16, -(-i // 16), 16, -1).any(axis=(1, 3))


def test_constant_node_weight(rng):
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W"), name="const"),
        helper.make_node("Conv", [X, "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = make_model(graph(nodes, [], [1, 16, 5, 5]))
    pruned, report = gpp_onnx.prune(model, 0.5)
    out = numpy_helper.to_array(pruned.graph.node[0].attribute[0].t)
    assert report.layers[0].status == "pruned" and (out == 0).mean() == pytest.approx(0.5)
    x = rng.standard_normal((1, 16, 5, 5)).astype(np.float32)
    assert run_ort(pruned, {X: x})[0].shape == (1, 32, 5, 5)
    gpp_onnx.validate_annotation(pruned, gpp_onnx.read_annotation(pruned))


def test_shared_initializer_gets_one_mask(rng):
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", [X, "W"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "W"], ["y"], name="convB", pads=[1, 1, 1, 1]),
    ]
    model = make_model(graph(nodes, [numpy_helper.from_array(w, "W")], [1, 16, 5, 5]))
    pruned, report = gpp_onnx.prune(model, 5 / 9)
    assert len(report.layers) == 1 and report.layers[0].name == "convA,convB"
    assert report.layers[0].tiles_kept == 4
    entry = gpp_onnx.read_annotation(pruned).weights[0]
    assert entry.nodes == ["convA", "convB"]


def test_weight_also_read_by_another_op_is_skipped_with_reason(rng):
    w = rng.standard_normal((16, 16, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((16, 16, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", [X, "W"], ["a"], name="conv"),
        helper.make_node("Conv", ["a", "W2"], ["b"], name="conv2"),
        helper.make_node("ReduceSum", ["W"], ["s"], name="reg", keepdims=0),
        helper.make_node("Add", ["b", "s"], ["y"], name="add"),
    ]
    model = make_model(
        graph(nodes, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w2, "W2")], [1, 16, 4, 4])
    )
    pruned, report = gpp_onnx.prune(model, 0.5)
    row = report.layers[0]
    assert row.status == "skipped" and "ReduceSum node 'reg'" in row.reason
    np.testing.assert_array_equal(weight(pruned, "W"), w)


def test_fp16_weights_stay_fp16(rng):
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float16)
    model = conv_model([w], [1, 32, 6, 6], attrs=[{"pads": [1] * 4}], weight_dtype=TensorProto.FLOAT16)
    pruned, report = gpp_onnx.prune(model, 0.5)
    out = weight(pruned, "W0")
    assert out.dtype == np.float16 and report.sparsity == pytest.approx(0.5)
    assert tiles_of(out, 0).sum() == 18
    run_ort(pruned, {X: rng.standard_normal((1, 32, 6, 6)).astype(np.float32)})


def qdq_model(rng, fake_quant: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    w = rng.integers(-100, 100, (32, 32, 3, 3)).astype(np.int8)
    zero_points = rng.integers(-3, 4, 32).astype(np.int8)
    scales = rng.uniform(0.001, 0.02, 32).astype(np.float32)
    inits = [numpy_helper.from_array(scales, "s"), numpy_helper.from_array(zero_points, "zp")]
    if fake_quant:
        wf = (w.astype(np.float32) - zero_points[:, None, None, None]) * scales[:, None, None, None]
        inits.append(numpy_helper.from_array(wf, "Wf"))
        nodes = [helper.make_node("QuantizeLinear", ["Wf", "s", "zp"], ["Wq"], axis=0, name="q")]
        w = wf
    else:
        inits.append(numpy_helper.from_array(w, "Wq"))
        nodes = []
    nodes += [
        helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["W"], axis=0, name="dq"),
        helper.make_node("Conv", [X, "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return make_model(graph(nodes, inits, [1, 32, 6, 6]), 13), w


def test_qdq_weights_are_pruned_to_their_zero_point(rng):
    model, w = qdq_model(rng)
    zero_points = numpy_helper.to_array(model.graph.initializer[1])
    pruned, report = gpp_onnx.prune(model, 0.6)
    out = weight(pruned, "Wq")
    assert out.dtype == np.int8
    zp = zero_points[:, None, None, None]
    row = report.layers[0]
    assert abs(report.sparsity - 0.6) <= 0.5 / 36  # within half a group of the target
    assert (~tiles_of(out, zp)).sum() == row.tiles_total - row.tiles_kept >= 21
    assert (out == zp).mean() == pytest.approx(row.sparsity)
    assert report.layers[0].weight == "Wq"
    gpp_onnx.validate_annotation(pruned, gpp_onnx.read_annotation(pruned))
    run_ort(pruned, {X: rng.standard_normal((1, 32, 6, 6)).astype(np.float32)})


def test_fake_quantized_float_weights_are_pruned_to_zero(rng):
    model, wf = qdq_model(rng, fake_quant=True)
    pruned, report = gpp_onnx.prune(model, 0.5)
    out = weight(pruned, "Wf")
    assert report.layers[0].weight == "Wf" and tiles_of(out, 0).sum() == 18
    run_ort(pruned, {X: rng.standard_normal((1, 32, 6, 6)).astype(np.float32)})


def test_qlinearconv_uint8_weights_use_the_zero_point(rng):
    w = rng.integers(0, 256, (32, 16, 3, 3)).astype(np.uint8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(w, "Wq"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
        numpy_helper.from_array(np.array(128, np.uint8), "wz"),
        numpy_helper.from_array(np.array(0.2, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    nodes = [
        helper.make_node(
            "QLinearConv", [X, "xs", "xz", "Wq", "ws", "wz", "ys", "yz"], ["y"], name="qconv", pads=[1] * 4
        )
    ]
    model = make_model(graph(nodes, inits, [1, 16, 5, 5], TensorProto.UINT8, out_type=TensorProto.UINT8), 13)
    pruned, report = gpp_onnx.prune(model, 0.5)
    out = weight(pruned, "Wq")
    assert tiles_of(out, 128).sum() == 9 and report.sparsity == pytest.approx(0.5, abs=0.01)
    run_ort(pruned, {X: rng.integers(0, 256, (1, 16, 5, 5)).astype(np.uint8)})


def test_convinteger_weights_use_the_zero_point(rng):
    w = rng.integers(0, 256, (16, 32, 1, 1)).astype(np.uint8)
    inits = [numpy_helper.from_array(w, "Wq"), numpy_helper.from_array(np.array(100, np.uint8), "wz")]
    nodes = [helper.make_node("ConvInteger", [X, "Wq", "", "wz"], ["y"], name="iconv")]
    model = make_model(graph(nodes, inits, [1, 32, 4, 4], TensorProto.UINT8, out_type=TensorProto.INT32), 13)
    pruned, report = gpp_onnx.prune(model, 0.5)
    assert tiles_of(weight(pruned, "Wq"), 100).sum() == 1
    run_ort(pruned, {X: rng.integers(0, 256, (1, 32, 4, 4)).astype(np.uint8)})


def test_weight_from_graph_input_is_skipped_and_reported(rng):
    nodes = [helper.make_node("Conv", [X, "W"], ["y"], name="conv")]
    g = graph(nodes, [], [1, 16, 4, 4])
    g.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [16, 16, 1, 1]))
    with pytest.raises(gpp_onnx.UserError, match="no prunable layer.*graph input"):
        gpp_onnx.prune(make_model(g), 0.5)


def file_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_external_data_in_external_data_out(tmp_path, rng):
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    model = conv_model([w], [1, 64, 6, 6], attrs=[{"pads": [1] * 4}])
    src = tmp_path / "model.onnx"
    onnx.save_model(model, src, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    before = file_hash(tmp_path / "model.onnx.data")
    loaded = gpp_onnx.load_model(src)
    assert loaded.had_external_data
    pruned, _ = gpp_onnx.prune(loaded, 0.7)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    gpp_onnx.save_model(pruned, out, external_data=loaded.had_external_data)
    assert (out.parent / "pruned.onnx.data").exists() and out.stat().st_size < 10_000
    assert file_hash(tmp_path / "model.onnx.data") == before
    reloaded = onnx.load(out)
    gpp_onnx.validate_annotation(reloaded, gpp_onnx.read_annotation(reloaded))
    assert abs(gpp_onnx.inspect(out).sparsity - 0.7) < 0.01
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]


@pytest.mark.parametrize("opset", list(range(7, onnx.defs.onnx_opset_version() + 1)))
def test_every_opset(rng, opset):
    ws = [
        rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((16, 32, 1, 1)).astype(np.float32),
    ]
    model = conv_model(ws, [1, 16, 6, 6], opset=opset, attrs=[{"pads": [1] * 4}, {}])
    pruned, report = gpp_onnx.prune(model, 0.5)
    onnx.checker.check_model(pruned, full_check=True)
    assert abs(report.sparsity - 0.5) <= 0.01
    if opset <= ORT_MAX_OPSET:
        run_ort(pruned, {X: rng.standard_normal((1, 16, 6, 6)).astype(np.float32)})


def test_sparsity_zero_gives_identical_inference_and_graph(rng):
    model, _ = qdq_model(rng)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
    model.graph.output[0].name = "z"
    pruned, _ = gpp_onnx.prune(model, 0.0)
    x = rng.standard_normal((1, 32, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(pruned, {X: x})[0], run_ort(model, {X: x})[0])
    stripped = onnx.ModelProto()
    stripped.CopyFrom(pruned)
    del stripped.metadata_props[:]
    assert stripped.SerializeToString() == model.SerializeToString()


def test_pruning_changes_only_the_weights(rng):
    model, _ = qdq_model(rng)
    pruned, _ = gpp_onnx.prune(model, 0.7)
    assert [n.SerializeToString() for n in pruned.graph.node] == [n.SerializeToString() for n in model.graph.node]
    changed = [
        a.name
        for a, b in zip(pruned.graph.initializer, model.graph.initializer)
        if a.SerializeToString() != b.SerializeToString()
    ]
    assert changed == ["Wq"]
    assert list(pruned.graph.input) == list(model.graph.input)
    assert list(pruned.graph.output) == list(model.graph.output)


def test_modelproto_argument_is_not_modified(rng):
    model = conv_model([rng.standard_normal((16, 16, 3, 3)).astype(np.float32)], [1, 16, 4, 4])
    before = model.SerializeToString()
    gpp_onnx.prune(model, 0.8)
    assert model.SerializeToString() == before


def test_a_graph_out_of_topological_order_is_loaded_in_order_and_its_file_left_alone(tmp_path):
    """keras2onnx wrote nodes in any order: ONNX Runtime runs such files, onnx.checker refuses them."""
    from helpers import tiny_cnn

    model = tiny_cnn()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    source = tmp_path / "unsorted.onnx"
    onnx.save(model, source)
    before = source.read_bytes()
    loaded = gpp_onnx.load_model(source)
    assert [n.name for n in loaded.model.graph.node] == [n.name for n in nodes]
    pruned, _ = gpp_onnx.prune(source, 0.5)
    onnx.checker.check_model(pruned)
    assert source.read_bytes() == before
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(run_ort(loaded.model, {"input": x})[0], run_ort(model, {"input": x})[0], rtol=1e-6)
