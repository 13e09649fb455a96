"""The sparse-tile annotation: bitmap encoding, validation, and surviving ONNX round trips."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import conv_model
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import numpy_helper

import gpp_onnx
from gpp_onnx.annotation import ANNOTATION_KEY, decode_bitmap, encode_bitmap


@given(arrays(np.bool_, st.integers(0, 600)))
def test_bitmap_round_trip(bits):
    assert np.array_equal(decode_bitmap(encode_bitmap(bits), bits.size), bits)


@given(arrays(np.bool_, st.integers(1, 100)), st.integers(1, 8))
def test_bitmap_rejects_wrong_counts(bits, extra):
    text = encode_bitmap(bits)
    with pytest.raises(ValueError):
        decode_bitmap(text, bits.size + 8 * extra)


@st.composite
def masked_conv(draw):
    """A conv weight with random channel counts and a random kept-tile map applied to it."""
    oc = draw(st.integers(1, 40))
    ic = draw(st.integers(1, 40))
    k = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.0, (oc, ic, k, k)).astype(np.float32) * rng.choice([-1, 1], (oc, ic, k, k))
    ot, it = -(-oc // 16), -(-ic // 16)
    kept = draw(arrays(np.bool_, (1, ot, it, k * k)))
    element_kept = kept.repeat(16, axis=1)[:, :oc].repeat(16, axis=2)[:, :, :ic]
    w = np.where(element_kept[0].reshape(oc, ic, k, k), w, 0).astype(np.float32)
    return w, kept


def annotated(w: np.ndarray, kept: np.ndarray) -> onnx.ModelProto:
    model = conv_model([w], [1, w.shape[1], 4, 4], attrs=[{"pads": [w.shape[2] // 2] * 4}])
    pruned, _ = gpp_onnx.prune(model, 0.0)
    ann = gpp_onnx.read_annotation(pruned)
    ann.weights[0].kept = kept
    gpp_onnx.write_annotation(pruned, ann)
    return pruned


@settings(max_examples=60, deadline=None)
@given(masked_conv())
def test_validator_accepts_exactly_the_consistent_annotations(case):
    w, kept = case
    model = annotated(w, kept)
    gpp_onnx.validate_annotation(model, gpp_onnx.read_annotation(model))  # consistent: accepted
    pruned_tiles = np.argwhere(~kept)
    if pruned_tiles.size:
        _, ot, it, p = pruned_tiles[0]
        k = w.shape[2]
        broken = w.copy()
        broken[ot * 16, it * 16, p // k, p % k] = 0.25
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(broken, "W0"))
        with pytest.raises(gpp_onnx.AnnotationError, match="layer conv0: 1 tile"):
            gpp_onnx.validate_annotation(model, gpp_onnx.read_annotation(model))


def pruned_model(rng) -> onnx.ModelProto:
    ws = [
        rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((32, 32, 3, 3)).astype(np.float32),
    ]
    model, _ = gpp_onnx.prune(conv_model(ws, [1, 16, 6, 6], attrs=[{"pads": [1] * 4}] * 2), 0.6)
    return model


def edit_document(model: onnx.ModelProto, change) -> None:
    prop = next(p for p in model.metadata_props if p.key == ANNOTATION_KEY)
    doc = json.loads(prop.value)
    change(doc)
    prop.value = json.dumps(doc)


def test_document_fields(rng):
    model = pruned_model(rng)
    assert [p.key for p in model.metadata_props] == [ANNOTATION_KEY]
    doc = json.loads(model.metadata_props[0].value)
    assert doc["version"] == 1 and doc["tool_version"] == gpp_onnx.__version__
    assert doc["tile"] == {"block_out": 16, "block_in": 16}
    assert (doc["pattern"], doc["scope"], doc["target_sparsity"]) == ("group", "layer", 0.6)
    entry = doc["weights"][1]
    assert entry["nodes"] == ["conv1"] and entry["weight"] == "W1" and entry["shape"] == [32, 32, 3, 3]
    assert entry["layout"] == "OIHW" and entry["kernel_positions"] == 9
    assert (entry["oc_tiles"], entry["ic_tiles"], entry["tiles_total"]) == (2, 2, 36)


def test_unknown_version_is_an_error(rng):
    model = pruned_model(rng)
    edit_document(model, lambda d: d.update(version=99))
    with pytest.raises(gpp_onnx.AnnotationError, match="version 99"):
        gpp_onnx.read_annotation(model)


def test_missing_weight_is_an_error_naming_the_layer(rng):
    model = pruned_model(rng)
    edit_document(model, lambda d: d["weights"][1].update(weight="gone"))
    with pytest.raises(gpp_onnx.AnnotationError, match="layer conv1: weight 'gone' no longer exists"):
        gpp_onnx.validate_annotation(model, gpp_onnx.read_annotation(model))


def test_shape_mismatch_is_an_error_naming_the_layer(rng):
    model = pruned_model(rng)
    edit_document(model, lambda d: d["weights"][0].update(shape=[16, 16, 3, 3]))
    with pytest.raises(gpp_onnx.AnnotationError, match="layer conv0: .*shape"):
        gpp_onnx.validate_annotation(model, gpp_onnx.read_annotation(model))


def test_inspect_refuses_an_annotation_that_lies(rng, tmp_path):
    model = pruned_model(rng)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[w == 0] = 1.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W0"))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(gpp_onnx.AnnotationError, match="layer conv0: .*marked pruned hold nonzero"):
        gpp_onnx.inspect(tmp_path / "m.onnx")


def test_survives_save_load_shape_inference_and_external_data(rng, tmp_path):
    model = pruned_model(rng)
    original = gpp_onnx.read_annotation(model)
    onnx.save(model, tmp_path / "a.onnx")
    inferred = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "a.onnx"))
    onnx.save_model(inferred, tmp_path / "b.onnx", save_as_external_data=True, location="b.data", size_threshold=0)
    reloaded = onnx.load(tmp_path / "b.onnx")
    ann = gpp_onnx.read_annotation(reloaded)
    gpp_onnx.validate_annotation(reloaded, ann)
    assert ann.to_json() == original.to_json()
    for a, b in zip(ann.weights, original.weights):
        assert np.array_equal(a.kept, b.kept)


def test_pruning_again_replaces_the_annotation(rng):
    model = pruned_model(rng)
    again, report = gpp_onnx.prune(model, 0.8, pattern="block")
    assert [p.key for p in again.metadata_props] == [ANNOTATION_KEY]
    assert gpp_onnx.read_annotation(again).pattern == "block"


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda d: d.update(weights=None), "must be lists"),
        (lambda d: d.update(weights=7), "must be lists"),
        (lambda d: d.update(skipped="x"), "must be lists"),
        (lambda d: d["weights"][0].update(kept_tiles=12), "layer \\['conv0'\\]: malformed annotation entry"),
        (lambda d: d["weights"].append(dict(d["weights"][0])), "lists weight 'W0' twice"),
    ],
)
def test_a_tampered_document_is_an_annotation_error(rng, change, expected):
    model = pruned_model(rng)
    edit_document(model, change)
    with pytest.raises(gpp_onnx.AnnotationError, match=expected):
        gpp_onnx.read_annotation(model)


def test_two_annotation_entries_are_an_error(rng):
    model = pruned_model(rng)
    model.metadata_props.add(key=ANNOTATION_KEY, value=model.metadata_props[0].value)
    with pytest.raises(gpp_onnx.AnnotationError, match="2 metadata entries"):
        gpp_onnx.read_annotation(model)


def quantize_weight(model: onnx.ModelProto, index: int) -> None:
    """What ONNX Runtime's static QDQ quantization does to a conv weight: int8 ``W_quantized`` behind a
    DequantizeLinear (per output channel), the conv node kept."""
    name = f"W{index}"
    init = next(i for i in model.graph.initializer if i.name == name)
    w = numpy_helper.to_array(init)
    scale = np.abs(w).reshape(len(w), -1).max(1) / 127
    q = np.round(w / np.maximum(scale, 1e-12)[:, None, None, None]).astype(np.int8)
    model.graph.initializer.remove(init)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(q, f"{name}_quantized"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.zeros(len(w), np.int8), f"{name}_zero_point"),
        ]
    )
    dq = onnx.helper.make_node(
        "DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"], [f"{name}_dq"], axis=0
    )
    conv = next(n for n in model.graph.node if n.name == f"conv{index}")
    conv.input[1] = f"{name}_dq"
    model.graph.node.insert(0, dq)


def test_the_annotation_survives_quantization_renaming_the_weights(rng):
    model = pruned_model(rng)
    quantize_weight(model, 1)
    kept = gpp_onnx.annotation.read_kept_tiles(model)  # validated: found by the node conv1
    assert kept.for_weight("W1_quantized") is not None and kept.for_weight("W1") is None
    statuses = {row.weight: row.status for row in gpp_onnx.inspect(model).layers}
    assert statuses == {"W0": "pruned", "W1_quantized": "pruned"}
    stored = next(i for i in model.graph.initializer if i.name == "W1_quantized")
    values = numpy_helper.to_array(stored).copy()
    pruned_tile = np.argwhere(~gpp_onnx.read_annotation(model).for_weight("W1").kept)[0]
    _, ot, it, p = pruned_tile
    values[ot * 16, it * 16, p // 3, p % 3] = 5  # a quantized weight back in a pruned tile
    stored.CopyFrom(numpy_helper.from_array(values, "W1_quantized"))
    with pytest.raises(gpp_onnx.AnnotationError, match="layer conv1: 1 tile"):
        gpp_onnx.validate_annotation(model, gpp_onnx.read_annotation(model))


def test_a_skipped_layer_keeps_its_reason_after_quantization(rng):
    ws = [
        rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((32, 32, 3, 3)).astype(np.float32),
    ]
    model, _ = gpp_onnx.prune(conv_model(ws, [1, 16, 6, 6], attrs=[{"pads": [1] * 4}] * 2), 0.6, exclude=["^W0$"])
    quantize_weight(model, 0)
    quantize_weight(model, 1)
    rows = {row.weight: (row.status, row.reason) for row in gpp_onnx.inspect(model).layers}
    assert rows["W1_quantized"] == ("pruned", None)
    assert rows["W0_quantized"][0] == "skipped" and "excluded" in rows["W0_quantized"][1]
