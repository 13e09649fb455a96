"""The bias as a GEMM instead of an ALU pass: a constant input vector times one weight tile per
output-channel tile.

An ALU ADD with a tensor operand costs two cycles per output vector; a GEMM micro-op one. With
the constant input ``v = (1, 127, ..., 127)`` (one int8 vector, kept in the input buffer), a
bias ``b`` is ``v . w`` for int8 weights ``w = (b - 127 q, q_1, ..., q_15)`` where ``q`` (split
over the 127-lanes) is ``b`` rounded to a multiple of 127. Exact integer arithmetic, so any
``|b|`` up to ``63 + 127 * 127 * (BLOCK_IN - 1)`` (241,998 for 16 lanes) works; a conv with a
larger bias keeps the ALU ADD.
"""

from __future__ import annotations

import numpy as np

LANE = 127  # the constant in every lane but the first, and the largest symmetric int8 weight


def bias_input(block_in: int) -> np.ndarray:
    """The constant int8 input vector ``(1, 127, ..., 127)``."""
    vector = np.full(block_in, LANE, np.int8)
    vector[0] = 1
    return vector


def bias_weights(bias: np.ndarray, block_in: int) -> np.ndarray | None:
    """int8 ``[channels, block_in]`` rows ``w`` with ``bias_input . w == bias`` exactly, or None when some
    bias is too large (or there are fewer than two lanes)."""
    bias = np.asarray(bias, np.int64)
    remainder = (bias + LANE // 2) % LANE - LANE // 2  # in [-63, 63]
    multiple = (bias - remainder) // LANE
    lanes = block_in - 1
    if lanes < 1 or np.abs(multiple).max(initial=0) > LANE * lanes:
        return None
    base, extra = np.divmod(multiple, lanes)  # spread the multiple over the lanes: base or base + 1
    weights = np.empty((bias.size, block_in), np.int64)
    weights[:, 0] = remainder
    weights[:, 1:] = base[:, None] + (np.arange(lanes)[None, :] < extra[:, None])
    return weights.astype(np.int8)
