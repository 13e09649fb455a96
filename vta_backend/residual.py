"""How a fused residual Add joins a conv's sum on VTA, exactly, and the requantization shift that goes with it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from vta_backend.quant import QuantConv

RESIDUAL_WEIGHT_EXPONENT = 6  # 2**6 = 64: the largest power of two an int8 weight holds


@dataclass(frozen=True)
class ResidualAlignment:
    """How a fused residual joins the sum: the int8 residual goes through a GEMM with a diagonal weight
    tile of ``2**exponents[c]`` per channel, either after the requantization shift or before it.

    With ``r`` the requantization shift, ``a = r + d`` the residual's alignment (``d = s_out - s_res``,
    one value for every channel) and ``X`` the conv plus bias and rounding, VTA must compute
    ``floor((X + res * 2**a) / 2**r)``. Exactly the same integer is

    * ``floor(X / 2**r) + res * 2**d`` for ``0 <= d <= 6``: requantization SHR by ``r``, then the
      residual GEMM with weights ``2**d``;
    * ``floor((floor(X / 2**a) + res) / 2**-d)`` for ``d < 0`` and every ``a >= 0``: SHR by ``a``,
      the residual GEMM with weights 1, then SHR by ``-d`` (immediate);

    so the residual joins *after* the shift with no per-channel alignment pass - where every
    ``a >= 0`` (else the residual's low bits are dropped first) and ``X + res * 2**a`` can never wrap
    at 32 bits (the sum is taken modulo 2**32 before the shift). Otherwise it joins
    before the conv's GEMMs: weights ``2**(a - min a)``, then SHR by ``-min a`` (immediate), or,
    where the alignments span more than an int8 weight holds, by per-channel vectors."""

    exponents: np.ndarray  # per output channel
    shift: int | None  # SHR immediate after the residual GEMM (negative: left); None: per-channel tensor SHR
    after_requantization: bool
    requantization_shifts: np.ndarray  # per output channel: the requantization SHR before MIN / MAX

    @classmethod
    def of(cls, conv: QuantConv) -> "ResidualAlignment | None":
        """The alignment of ``conv``'s fused residual, None without one (computed once per conv: the
        tiling search asks for it thousands of times)."""
        if conv not in _ALIGNMENTS:
            _ALIGNMENTS[conv] = cls._compute(conv)
        return _ALIGNMENTS[conv]

    @classmethod
    def _compute(cls, conv: QuantConv) -> "ResidualAlignment | None":
        if conv.residual_shift is None:
            return None
        a, r = conv.residual_shifts(), conv.shifts()
        d = np.unique(a - r)
        if d.size == 1 and a.min() >= 0 and _never_wraps(conv, a):
            if 0 <= d[0] <= RESIDUAL_WEIGHT_EXPONENT:
                return cls(np.full_like(a, d[0]), 0, True, r)
            if d[0] < 0:
                return cls(np.zeros_like(a), -int(d[0]), True, a)
        if a.max() - a.min() <= RESIDUAL_WEIGHT_EXPONENT:
            return cls(a - a.min(), -int(a.min()), False, r)
        return cls(np.zeros_like(a), None, False, r)


_ALIGNMENTS: "weakref.WeakKeyDictionary[QuantConv, ResidualAlignment | None]" = weakref.WeakKeyDictionary()


def _never_wraps(conv: QuantConv, alignments: np.ndarray) -> bool:
    """Whether ``conv + bias + rounding + residual * 2**a`` stays inside int32 for every int8 input."""
    weights = np.abs(conv.weight.astype(np.int64)).reshape(conv.weight.shape[0], -1).sum(axis=1)
    bound = 128 * weights + np.abs(conv.bias_with_rounding().astype(np.int64)) + 128 * (1 << alignments)
    return bool(bound.max() < 2**31)


def requantization_shifts(conv: QuantConv) -> np.ndarray:
    """Per output channel, the shift of the requantization SHR (see :class:`ResidualAlignment`)."""
    alignment = ResidualAlignment.of(conv)
    return conv.shifts() if alignment is None else alignment.requantization_shifts
