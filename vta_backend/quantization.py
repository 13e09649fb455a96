"""How a float conv becomes VTA's int8 conv: the quantization options and the one rule applying them.

Weights are quantized to int8 with power-of-two scales (per output channel, or per conv),
as TVM's quantizer does for VTA. Activation shifts are inputs (calibration chooses them;
tensors without one get :attr:`QuantizationOptions.activation_shift`). With input shift
``s_in``, weight shift ``s_w`` and output shift ``s_out``, the bias is stored in
accumulator units (``bias * 2**(s_in + s_w)``), the requantization shift is
``s_in + s_w - s_out``, and a fused residual with shift ``s_res`` is aligned to the
accumulator by ``2**(s_in + s_w - s_res)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gpp_onnx.errors import UserError
from vta_backend.quant import SHIFT_LIMIT, QuantConv, quantize, weight_shifts
from vta_backend.tiling import SHR_RANGE


@dataclass(frozen=True)
class QuantizationOptions:
    """How weights and uncalibrated activations are quantized; the one place their defaults live."""

    per_channel: bool = True  # one power-of-two weight scale per output channel (False: per conv)
    activation_shift: int = 4  # shift of activations without a calibrated one (scale 2**-4, range +-8)

    def __post_init__(self) -> None:
        shift = self.activation_shift
        if not isinstance(shift, (int, np.integer)) or isinstance(shift, bool):
            raise UserError(f"--activation-shift must be an integer, got {shift!r}")
        if not -SHIFT_LIMIT <= shift <= SHIFT_LIMIT:
            raise UserError(f"--activation-shift {shift} is outside -{SHIFT_LIMIT}..{SHIFT_LIMIT}")

    def shift_of(self, tensor: str, activation_shifts: Mapping[str, int]) -> int:
        """The power-of-two shift of an activation tensor: its calibrated one, else the default."""
        return int(activation_shifts.get(tensor, self.activation_shift))


DEFAULT_QUANTIZATION = QuantizationOptions()


@dataclass(frozen=True)
class FloatConv:
    """A Conv node VTA can run, as the importer read it: float weight and bias, attributes, tensors."""

    name: str
    weight: np.ndarray  # float32 [OC, IC/groups, KH, KW]
    bias: np.ndarray | None  # float per output channel
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int
    relu: bool  # a fused Relu
    kept: np.ndarray | None  # the annotation's kept-tile map [groups, OT, IT, KH*KW], None = dense
    input: str
    output: str  # the last fused node's output
    residual: str | None  # the other operand of a fused Add


def quantize_conv(conv: FloatConv, activation_shifts: Mapping[str, int], options: QuantizationOptions) -> QuantConv:
    """The int8 conv VTA runs: int8 weights, int32 bias, requantization shift and residual alignment."""
    s_in = options.shift_of(conv.input, activation_shifts)
    s_out = options.shift_of(conv.output, activation_shifts)
    # A weight scale so fine that the requantization shift passes the SHR field of VTA's HLS design
    # (a nearly dead channel) would cost extra SHR passes; such channels keep the coarser scale.
    s_w = np.minimum(weight_shifts(conv.weight, options.per_channel), s_out - s_in + SHR_RANGE[1])
    weight = quantize(conv.weight, s_w.reshape(-1, 1, 1, 1) if options.per_channel else int(s_w))
    residual_shift = None
    if conv.residual is not None:  # residual * 2**(s_in + s_w - s_res) is in accumulator units
        residual_shift = _per_channel_or_one(s_in + s_w - options.shift_of(conv.residual, activation_shifts), options)
    return QuantConv(
        name=conv.name,
        weight=weight,
        stride=conv.stride,
        pads=conv.pads,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=None if conv.bias is None else _quantize_bias(conv.bias, s_in + s_w),
        shift=_per_channel_or_one(s_in + s_w - s_out, options),
        relu=conv.relu,
        kept=conv.kept,
        residual_shift=residual_shift,
    )


def _per_channel_or_one(shifts: np.ndarray, options: QuantizationOptions) -> int | np.ndarray:
    return shifts.astype(np.int64) if options.per_channel else int(shifts)


def _quantize_bias(bias: np.ndarray, accumulator_shift: np.ndarray) -> np.ndarray:
    """int32 bias in accumulator units: ``round(bias * 2**(s_in + s_w))``, saturated."""
    scaled = np.round(bias.astype(np.float64) * np.exp2(accumulator_shift.astype(np.float64)))
    return np.clip(scaled, -(2**31), 2**31 - 1).astype(np.int32)
