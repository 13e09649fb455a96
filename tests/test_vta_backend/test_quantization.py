"""Quantization options, the one conv quantizer, and the signed shift rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpp_onnx import UserError
from vta_backend.quant import quantize, shift_right
from vta_backend.quantization import FloatConv, QuantizationOptions, quantize_conv


def float_conv(rng, residual: str | None = None, bias: bool = True) -> FloatConv:
    return FloatConv(
        name="c",
        weight=rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * np.linspace(0.1, 3, 32)[:, None, None, None],
        bias=rng.standard_normal(32).astype(np.float32) if bias else None,
        stride=(1, 1),
        pads=(1, 1, 1, 1),
        dilation=(1, 1),
        groups=1,
        relu=True,
        kept=None,
        input="x",
        output="y",
        residual=residual,
    )


def test_defaults_and_validation():
    options = QuantizationOptions()
    assert options.per_channel and options.activation_shift == 4
    assert options.shift_of("calibrated", {"calibrated": 7}) == 7 and options.shift_of("other", {}) == 4
    for bad in (25, -25, True, 2.5):
        with pytest.raises(UserError, match="--activation-shift"):
            QuantizationOptions(activation_shift=bad)


def test_per_channel_and_per_conv_shifts(rng):
    conv = float_conv(rng)
    per_channel = quantize_conv(conv, {}, QuantizationOptions())
    per_conv = quantize_conv(conv, {}, QuantizationOptions(per_channel=False))
    assert np.ndim(per_channel.shift) == 1 and len(set(per_channel.shift)) > 1
    assert isinstance(per_conv.shift, int)
    assert per_channel.weight.dtype == np.int8 and np.abs(per_channel.weight).max() <= 127


def test_shifts_follow_the_activation_scales(rng):
    conv = float_conv(rng, residual="r")
    shifts = {"x": 5, "y": 3, "r": 2}
    q = quantize_conv(conv, shifts, QuantizationOptions(per_channel=False))
    s_w = q.shift - 5 + 3  # requantization shift = s_in + s_w - s_out
    np.testing.assert_array_equal(q.weight, quantize(conv.weight, s_w))
    assert q.residual_shift == 5 + s_w - 2
    np.testing.assert_array_equal(q.bias, np.round(conv.bias.astype(np.float64) * 2.0 ** (5 + s_w)))
    default = quantize_conv(conv, {}, QuantizationOptions(per_channel=False, activation_shift=6))
    assert default.shift == s_w and default.residual_shift == s_w  # every activation at 2**-6


def test_bias_saturates_at_int32(rng):
    conv = float_conv(rng)
    conv.bias[0] = 1e12
    q = quantize_conv(conv, {}, QuantizationOptions())
    assert q.bias.dtype == np.int32 and q.bias[0] == 2**31 - 1


def signed_shift(values: np.ndarray, amounts: np.ndarray) -> np.ndarray:
    """The rule written out: arithmetic shift right, a negative amount shifts left (int32, wrapping)."""
    v, a = values.astype(np.int64), np.broadcast_to(amounts, values.shape).astype(np.int64)
    shifted = np.where(a >= 0, v >> np.clip(a, 0, 31), v << np.clip(-a, 0, 31))
    return ((shifted + 2**31) % 2**32 - 2**31).astype(np.int32)


@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=8, max_size=8),
    st.sampled_from(["uniform", "non-negative", "non-positive", "mixed"]),
    st.integers(0, 2**16),
)
def test_shift_right_fast_paths_agree_with_the_rule(values, kind, seed):
    rng = np.random.default_rng(seed)
    low, high = {"uniform": (0, 31), "non-negative": (0, 31), "non-positive": (-31, 0), "mixed": (-31, 31)}[kind]
    amounts = np.full(8, rng.integers(low, high + 1)) if kind == "uniform" else rng.integers(low, high + 1, 8)
    x = np.array(values, np.int32)
    expected = signed_shift(x, amounts)
    np.testing.assert_array_equal(shift_right(x, amounts.astype(np.int32)), expected)
    in_place = x.copy()
    shift_right(in_place, amounts.astype(np.int32), out=in_place)
    np.testing.assert_array_equal(in_place, expected)


def test_shift_right_of_int8_widens_first():
    x = np.array([-128, 127, 3], np.int8)
    np.testing.assert_array_equal(shift_right(x, -np.array([8, 8, 2])), [-128 * 256, 127 * 256, 12])
    assert shift_right(x, 1).dtype == np.int32
