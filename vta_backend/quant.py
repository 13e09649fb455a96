"""VTA's integer arithmetic: power-of-two int8 quantization and the requantization rule.

Values are int8 in [-127, 127] with real value ``q * 2**-shift``. A conv accumulates
int8 x int8 products in int32; with input shift ``s_in`` and weight shift ``s_w`` the
accumulator holds ``real * 2**(s_in + s_w)``. Requantizing to the output shift ``s_out``
is, exactly as VTA's ALU does it (and as TVM's quantizer emits it for VTA):

    acc = acc + bias                      # ALU ADD (bias in accumulator units)
    acc = acc + 2**(r - 1)   if r > 0     # ALU ADD of the rounding constant
    acc = acc >> r                        # ALU SHR, arithmetic; r = s_in + s_w - s_out
    acc = min(acc, 127)                   # ALU MIN
    acc = max(acc, -127)  or  max(acc, 0) with a fused ReLU   # ALU MAX
    out = low 8 bits of acc               # STORE

All additions wrap at 32 bits. The rounding constant is folded into the bias vector. A
fused residual Add (ResNet's shortcut) loads the int8 residual into the accumulator,
aligns its scale with a shift (``SHR`` by a negative amount shifts left) and adds it
before the bias, as TVM does on VTA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gpp_onnx.errors import UserError

QMAX = 127
SHIFT_LIMIT = 24  # power-of-two shifts are kept within +-SHIFT_LIMIT


def shift_for(max_abs: float | np.ndarray, limit: int = SHIFT_LIMIT) -> np.ndarray:
    """Largest power-of-two shift ``s`` with ``max_abs * 2**s <= 127`` (clamped to +-limit)."""
    max_abs = np.asarray(max_abs, np.float64)
    safe = np.where(max_abs > 0, max_abs, 1.0)
    shift = np.floor(np.log2(QMAX / safe)).astype(np.int64)
    return np.clip(np.where(max_abs > 0, shift, limit), -limit, limit)


def weight_shifts(weights: np.ndarray, per_channel: bool) -> np.ndarray:
    """Power-of-two shifts for a weight (one, or one per output channel along axis 0).

    Of ``shift_for(max |w|)`` (never clips) and one finer (clips the largest weights), the one
    with the lower squared quantization error of these very weights. An all-zero channel takes
    the coarsest shift of the layer, so that its bias, scaled by ``2**(s_in + s_w)``, fits int32."""
    groups = weights.reshape(weights.shape[0] if per_channel else 1, -1).astype(np.float64)
    max_abs = np.abs(groups).max(axis=1)
    coarse = shift_for(max_abs)
    if (max_abs == 0).any():  # an all-zero (fully pruned) channel: any scale is exact; take the layer's
        coarse[max_abs == 0] = coarse[max_abs > 0].min() if (max_abs > 0).any() else 0  # so its bias still fits
    candidates = np.stack([coarse, coarse + 1])
    errors = np.stack(
        [((dequantize(quantize(groups, s[:, None]), s[:, None]) - groups) ** 2).sum(axis=1) for s in candidates]
    )
    best = candidates[np.argmin(errors, axis=0), np.arange(groups.shape[0])]
    return best if per_channel else best.reshape(())


def quantize(x: np.ndarray, shift: int | np.ndarray) -> np.ndarray:
    """Round ``x * 2**shift`` to the nearest integer (half away from zero) and clip to int8 [-127, 127]."""
    scaled = np.asarray(x, np.float64) * np.exp2(shift)
    return np.clip(np.sign(scaled) * np.floor(np.abs(scaled) + 0.5), -QMAX, QMAX).astype(np.int8)


def dequantize(q: np.ndarray, shift: int | np.ndarray) -> np.ndarray:
    """The real values ``q * 2**-shift`` as float32."""
    return q.astype(np.float32) * np.float32(2.0) ** -np.asarray(shift, np.float32)


def shift_right(values: np.ndarray, amounts: int | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """VTA's ALU SHR: arithmetic shift right of int32 ``values`` by ``amounts`` (broadcast); a negative
    amount shifts left. Results are int32 (a left shift wraps); ``out`` may be ``values`` itself."""
    amounts = np.asarray(amounts)
    if amounts.min() >= 0:
        uniform = amounts.size == 1 or bool((amounts == amounts.flat[0]).all())
        return np.right_shift(values, int(amounts.flat[0]) if uniform else amounts, out=out, dtype=np.int32)
    if amounts.max() <= 0:
        return np.left_shift(values, -amounts, out=out, dtype=np.int32)
    wide = np.asarray(values, np.int32)
    result = np.where(amounts >= 0, wide >> np.maximum(amounts, 0), wide << np.maximum(-amounts, 0))
    if out is None:
        return result
    out[...] = result
    return out


def wrap32(x: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of integers to int32 (numpy's narrowing cast keeps the low 32 bits)."""
    return np.asarray(x, np.int64).astype(np.int32)


@dataclass(eq=False)  # compared and hashed by identity: what the compiler derives from one is cached per conv
class QuantConv:
    """One quantized convolution as VTA runs it.

    ``weight`` is int8 ``[OC, IC/groups, KH, KW]``; ``bias`` int32 per output channel in
    accumulator units (or None); ``shift`` the requantization shift, one int or one per
    output channel; ``kept`` the kept-tile map ``[groups, OT, IT, KH*KW]`` from the
    sparse-tile annotation (None = dense).
    """

    name: str
    weight: np.ndarray
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: np.ndarray | None = None
    shift: int | np.ndarray = 0
    relu: bool = False
    kept: np.ndarray | None = None
    residual_shift: int | np.ndarray | None = None  # a fused Add: residual * 2**residual_shift joins the sum

    def __post_init__(self) -> None:
        if self.weight.dtype != np.int8 or self.weight.ndim != 4:
            raise UserError(f"layer {self.name}: weight must be int8 OIHW, got {self.weight.dtype} {self.weight.shape}")
        if self.weight.shape[0] % self.groups:
            raise UserError(
                f"layer {self.name}: {self.weight.shape[0]} output channels do not split into {self.groups} groups"
            )
        for name in ("shift", "residual_shift"):
            values = np.asarray(getattr(self, name) if getattr(self, name) is not None else 0)
            if values.ndim > 1 or (values.ndim == 1 and values.size != self.weight.shape[0]):
                raise UserError(f"layer {self.name}: {name} must be one int or one per output channel")
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.pads) < 0:
            raise UserError(f"layer {self.name}: stride and dilation must be >= 1 and pads >= 0")

    @property
    def out_channels(self) -> int:
        """Output channels of all groups."""
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        """Input channels of all groups."""
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, int]:
        """(KH, KW)."""
        return self.weight.shape[2], self.weight.shape[3]

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """(OH, OW) for an input of ``height`` x ``width``; a UserError when the kernel does not fit."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, left, bottom, right = self.pads
        oh = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
        ow = (width + left + right - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            raise UserError(f"layer {self.name}: a {height}x{width} input is smaller than the {kh}x{kw} kernel")
        return oh, ow

    def shifts(self) -> np.ndarray:
        """The requantization shift of every output channel."""
        return np.broadcast_to(np.asarray(self.shift, np.int64), (self.out_channels,)).copy()

    def residual_shifts(self) -> np.ndarray:
        """Per output channel, the power of two a fused residual is multiplied by (0 without one)."""
        shift = 0 if self.residual_shift is None else self.residual_shift
        return np.broadcast_to(np.asarray(shift, np.int64), (self.out_channels,)).copy()

    def bias_with_rounding(self) -> np.ndarray:
        """int32 per output channel: bias plus the rounding constant ``2**(r-1)`` (r > 0), wrapped."""
        r = self.shifts()
        rounding = np.where(r > 0, np.left_shift(1, np.maximum(r - 1, 0)), 0)
        bias = np.zeros(self.out_channels, np.int64) if self.bias is None else self.bias.astype(np.int64)
        return wrap32(bias + rounding)


def requantize(
    acc: np.ndarray, bias_with_rounding: np.ndarray, shifts: np.ndarray, relu: bool, channel_axis: int
) -> np.ndarray:
    """VTA's ALU sequence on int32 accumulators (modified in place): add bias+rounding, shift, clip; int8 result."""
    if channel_axis in (-1, acc.ndim - 1) and acc.flags.c_contiguous:
        # channels last: view many pixels per row so the per-channel operands broadcast over long rows
        channels = acc.shape[-1]
        per_row = math.gcd(acc.size // channels, 256)
        flat = acc.reshape(-1, channels * per_row)
        bias_row = np.tile(bias_with_rounding.astype(np.int32), per_row)
        shift_row = np.tile(shifts.astype(np.int32), per_row)
    else:
        shape = [1] * acc.ndim
        shape[channel_axis] = -1
        flat, bias_row, shift_row = (
            acc,
            bias_with_rounding.astype(np.int32).reshape(shape),
            shifts.astype(np.int32).reshape(shape),
        )
    np.add(flat, bias_row, out=flat)  # wraps at 32 bits
    shift_right(flat, shift_row, out=flat)
    np.clip(acc, 0 if relu else -QMAX, QMAX, out=acc)
    return acc.astype(np.int8)
