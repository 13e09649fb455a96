"""The VTA compiler and both execution paths against a plain numpy integer convolution."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpp_onnx.annotation import AnnotationError
from vta_backend import VTAConfig
from vta_backend.compiler import CompileError, compile_conv, issued_tiles
from vta_backend.layer import VtaConv
from vta_backend.quant import QuantConv

CONFIG = VTAConfig()


def reference_conv(conv: QuantConv, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """int64 accumulation, then 32-bit wrap, residual, bias, rounding shift and clip - written out plainly."""
    b, c, h, w = x.shape
    top, left, bottom, right = conv.pads
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    oc, icg, kh, kw = conv.weight.shape
    oh, ow = conv.out_size(h, w)
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    ocg = oc // conv.groups
    acc = np.zeros((b, oc, oh, ow), np.int64)
    for g in range(conv.groups):
        for i in range(kh):
            for j in range(kw):
                window = xp[
                    :,
                    g * icg : (g + 1) * icg,
                    i * dh : i * dh + (oh - 1) * sh + 1 : sh,
                    j * dw : j * dw + (ow - 1) * sw + 1 : sw,
                ]
                acc[:, g * ocg : (g + 1) * ocg] += np.einsum(
                    "bchw,oc->bohw", window, conv.weight[g * ocg : (g + 1) * ocg, :, i, j].astype(np.int64)
                )
    acc = ((acc + 2**31) % 2**32) - 2**31  # int32 wrap-around
    if residual is not None:
        align = np.broadcast_to(np.asarray(conv.residual_shift), (oc,)).astype(np.int64)[None, :, None, None]
        r = residual.astype(np.int64)
        acc = acc + np.where(align >= 0, r << np.maximum(align, 0), r >> np.maximum(-align, 0))
        acc = ((acc + 2**31) % 2**32) - 2**31
    shifts = np.broadcast_to(np.asarray(conv.shift), (oc,)).astype(np.int64)
    bias = np.zeros(oc, np.int64) if conv.bias is None else conv.bias.astype(np.int64)
    rounding = np.where(shifts > 0, 2 ** np.maximum(shifts - 1, 0), 0)
    acc = ((acc + (bias + rounding)[None, :, None, None] + 2**31) % 2**32) - 2**31
    s = shifts[None, :, None, None]
    acc = np.where(s >= 0, acc >> np.maximum(s, 0), acc << np.maximum(-s, 0))
    return np.clip(acc, 0 if conv.relu else -127, 127).astype(np.int8)


def random_kept(rng, groups, oc, ic, positions, fraction):
    grid = (groups, -(-oc // 16), -(-ic // 16), positions)
    return rng.random(grid) >= fraction


def masked_weight(rng, kept, oc_per_group, ic_per_group, kh, kw):
    groups = kept.shape[0]
    w = rng.integers(-127, 128, (groups * oc_per_group, ic_per_group, kh, kw)).astype(np.int8)
    element = kept.repeat(16, axis=1)[:, :oc_per_group].repeat(16, axis=2)[:, :, :ic_per_group]
    element = element.reshape(groups * oc_per_group, ic_per_group, kh, kw)
    return np.where(element, w, 0).astype(np.int8)


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    ocg = draw(st.integers(1, 40))
    icg = draw(st.integers(1, 40))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, min(2, d * (k - 1)))) for d, k in ((dilation[0], kh), (dilation[1], kw)) * 2)
    pads = (pads[0], pads[1], pads[2], pads[3])
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - pads[0] - pads[2]), 12))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - pads[1] - pads[3]), 12))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    kept = random_kept(rng, groups, ocg, icg, kh * kw, draw(st.sampled_from([0.0, 0.5, 0.9])))
    weight = masked_weight(rng, kept, ocg, icg, kh, kw)
    per_channel = draw(st.booleans())
    shift = rng.integers(-3, 14, groups * ocg) if per_channel else int(rng.integers(-3, 14))
    bias = rng.integers(-5000, 5000, groups * ocg).astype(np.int32) if draw(st.booleans()) else None
    residual_shift = None
    if draw(st.booleans()):
        residual_shift = rng.integers(-2, 10, groups * ocg) if per_channel else int(rng.integers(-2, 10))
        if draw(st.booleans()):  # output and residual scales one power of two apart for every channel
            residual_shift = shift + int(rng.integers(-4, 8))
    conv = QuantConv(
        "conv",
        weight,
        stride=stride,
        pads=pads,
        dilation=dilation,
        groups=groups,
        bias=bias,
        shift=shift,
        relu=draw(st.booleans()),
        kept=kept,
        residual_shift=residual_shift,
    )
    x = rng.integers(-127, 128, (draw(st.integers(1, 3)), groups * icg, h, w)).astype(np.int8)
    residual = None
    if residual_shift is not None:
        residual = rng.integers(-128, 128, (x.shape[0], groups * ocg) + conv.out_size(h, w)).astype(np.int8)
    return conv, x, residual


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_isa_interpreter_and_fast_path_are_bit_exact(case):
    conv, x, residual = case
    layer = VtaConv.compile(conv, x.shape[1:], CONFIG)
    expected = reference_conv(conv, x, residual)
    np.testing.assert_array_equal(layer.run(x, "isa", residual), expected)
    np.testing.assert_array_equal(layer.run(x, "fast", residual), expected)


@settings(max_examples=15, deadline=None)
@given(conv_cases())
def test_small_buffers_force_tiling_and_stay_exact(case):
    conv, x, residual = case
    small = VTAConfig(LOG_INP_BUFF_SIZE=10, LOG_WGT_BUFF_SIZE=14, LOG_ACC_BUFF_SIZE=11)  # 64 inp, 64 wgt, 32 acc
    try:
        layer = VtaConv.compile(conv, x.shape[1:], small)
    except CompileError:
        return  # some windows legitimately do not fit 64 input vectors
    for program in layer.programs:
        program.check()  # every SRAM index inside the small buffers, no hazard
    np.testing.assert_array_equal(layer.run(x, "isa", residual), reference_conv(conv, x, residual))


def test_pruned_tiles_are_neither_loaded_nor_issued():
    rng = np.random.default_rng(0)
    kept = random_kept(rng, 1, 64, 64, 9, 0.7)
    conv = QuantConv("c", masked_weight(rng, kept, 64, 64, 3, 3), pads=(1, 1, 1, 1), shift=8, kept=kept)
    program = compile_conv(conv, (64, 8, 8), CONFIG)
    assert program.tiling.bias_by_gemm  # the weight image: only the kept tiles, and a bias tile per output tile
    assert len(program.weights) == kept.sum() + 4
    gemm_uops = sum(i.count for i in program.insns if type(i).__name__ == "GemmInsn" and not i.reset)
    assert gemm_uops - program.stats["gemm_uops_bias"] == kept.sum() * 64 == program.stats["gemm_uops"]


def test_pruned_tile_with_nonzero_weights_is_an_error_naming_the_layer():
    rng = np.random.default_rng(0)
    kept = np.ones((1, 1, 1, 1), bool)
    kept[0, 0, 0, 0] = False
    conv = QuantConv("layer3.conv", rng.integers(1, 5, (16, 16, 1, 1)).astype(np.int8), kept=kept)
    with pytest.raises(AnnotationError, match=r"layer layer3.conv: 1 tile\(s\) marked pruned hold nonzero"):
        compile_conv(conv, (16, 4, 4), CONFIG)


def test_kept_map_of_another_grid_is_an_error_naming_the_layer():
    conv = QuantConv("c", np.ones((32, 16, 3, 3), np.int8), kept=np.ones((1, 1, 1, 9), bool))
    with pytest.raises(CompileError, match=r"layer c: the annotation's tile map \(1, 1, 1, 9\) does not match"):
        compile_conv(conv, (16, 4, 4), CONFIG)


def test_issued_tiles_are_the_kept_ones_holding_a_nonzero():
    weight = np.zeros((32, 16, 1, 2), np.int8)
    weight[0, 0, 0, 1] = weight[20, 3, 0, 0] = 1  # tiles (oc 0, position 1) and (oc 1, position 0)
    kept = np.ones((1, 2, 1, 2), bool)
    kept[0, 0, 0, 0] = False
    issued = issued_tiles(QuantConv("c", weight, kept=kept), CONFIG)
    np.testing.assert_array_equal(issued[0, :, 0], [[False, True], [True, False]])


def test_conv_that_cannot_fit_the_buffers_is_an_error_naming_the_limit():
    tiny = VTAConfig(LOG_INP_BUFF_SIZE=8)  # 16 input vectors
    conv = QuantConv("big_kernel", np.ones((16, 16, 7, 7), np.int8))
    with pytest.raises(CompileError, match="big_kernel: does not fit .* 49 of 16 input vectors"):
        compile_conv(conv, (16, 20, 20), tiny)


def test_padding_beyond_the_pad_field_is_an_error():
    conv = QuantConv("wide_pad", np.ones((16, 16, 3, 3), np.int8), pads=(16, 16, 16, 16))
    with pytest.raises(CompileError, match="wide_pad: padding 16 exceeds"):
        compile_conv(conv, (16, 4, 4), CONFIG)


@pytest.mark.parametrize("shift", [-2, 0, np.array([-1, 0, 3, 7] * 4)])
def test_left_shifts_and_zero_shift(shift):
    rng = np.random.default_rng(1)
    conv = QuantConv("c", rng.integers(-3, 4, (16, 20, 3, 3)).astype(np.int8), pads=(1, 1, 1, 1), shift=shift)
    x = rng.integers(-4, 5, (2, 20, 5, 5)).astype(np.int8)
    layer = VtaConv.compile(conv, x.shape[1:], CONFIG)
    expected = reference_conv(conv, x)
    np.testing.assert_array_equal(layer.run(x, "isa"), expected)
    np.testing.assert_array_equal(layer.run(x, "fast"), expected)


def test_accumulator_wraps_at_32_bits():
    # A bias next to the int32 limit: adding the (positive) products wraps to negative, as on VTA.
    weight = np.full((16, 16, 1, 1), 127, np.int8)
    conv = QuantConv("c", weight, bias=np.full(16, 2**31 - 1000, np.int32), shift=0)
    x = np.full((1, 16, 2, 2), 127, np.int8)
    expected = reference_conv(conv, x)
    assert (expected == -127).all()  # wrapped past 2**31 - 1 into the negative range
    layer = VtaConv.compile(conv, x.shape[1:], CONFIG)
    np.testing.assert_array_equal(layer.run(x, "isa"), expected)
    np.testing.assert_array_equal(layer.run(x, "fast"), expected)


def test_an_all_zero_channel_keeps_a_scale_its_bias_fits():
    from vta_backend.quant import weight_shifts

    w = np.random.default_rng(3).standard_normal((32, 16, 3, 3)).astype(np.float32)
    w[5] = 0  # a fully pruned output channel
    shifts = weight_shifts(w, per_channel=True)
    assert shifts[5] == shifts[np.arange(32) != 5].min()  # not the 24 of an empty range

    from vta_backend.quant import dequantize, quantize, shift_for

    channel = np.random.default_rng(4).uniform(-0.99, 0.99, (16, 3, 3)).astype(np.float32)
    channel[0, 0, 0] = 1.02  # just past 127/128: clipping this one weight beats doubling every step

    def error(shift: int) -> float:
        return float(((dequantize(quantize(channel, shift), shift) - channel) ** 2).sum())

    chosen = int(weight_shifts(channel[None], per_channel=False))
    assert chosen == int(shift_for(np.abs(channel).max())) + 1
    assert error(chosen) < error(chosen - 1)


@pytest.mark.parametrize(("shift", "residual_shift"), [(-2, -2), (-3, -1), (2, -1), (8, 8)])
def test_a_residual_with_negative_or_wide_alignments_stays_exact(shift, residual_shift):
    """Where the residual's alignment is negative its low bits are dropped before the sum, so it may
    not join after the shift; the other cases take the cheaper path. Both match the reference."""
    rng = np.random.default_rng(3)
    conv = QuantConv(
        "c", rng.integers(-127, 128, (16, 16, 1, 1)).astype(np.int8), shift=shift, residual_shift=residual_shift
    )
    x = rng.integers(-127, 128, (2, 16, 4, 4)).astype(np.int8)
    residual = rng.integers(-128, 128, (2, 16, 4, 4)).astype(np.int8)
    layer = VtaConv.compile(conv, (16, 4, 4), CONFIG)
    expected = reference_conv(conv, x, residual)
    np.testing.assert_array_equal(layer.run(x, "isa", residual), expected)
    np.testing.assert_array_equal(layer.run(x, "fast", residual), expected)


def test_a_sum_that_wraps_at_32_bits_wraps_before_the_shift_as_the_reference():
    conv = QuantConv(
        "c",
        np.eye(16, dtype=np.int8).reshape(16, 16, 1, 1),
        bias=np.full(16, 2**31 - 200, np.int32),
        shift=8,
        residual_shift=8,
    )
    x = np.zeros((1, 16, 2, 2), np.int8)
    residual = np.full((1, 16, 2, 2), 127, np.int8)
    layer = VtaConv.compile(conv, (16, 2, 2), CONFIG)
    assert layer.programs[0].residual_path.startswith("gemm-before-shift")  # after the shift the wrap is lost
    np.testing.assert_array_equal(layer.run(x, "isa", residual), reference_conv(conv, x, residual))


def test_a_fused_add_needs_square_tiles():
    wide = VTAConfig(LOG_BLOCK_IN=4, LOG_BLOCK_OUT=5)
    conv = QuantConv("c", np.ones((32, 32, 3, 3), np.int8), pads=(1, 1, 1, 1), shift=8, residual_shift=2)
    with pytest.raises(CompileError, match="layer c: a fused Add needs square tiles.*32x16"):
        compile_conv(conv, (32, 4, 4), wide)
