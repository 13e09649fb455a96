"""VTA's packed tensor layouts: activations NCHW1n16c, weights OIHW16o16i (channels zero-padded)."""

from __future__ import annotations

import numpy as np


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


def pack_activations(x: np.ndarray, block: int) -> np.ndarray:
    """``[B, C, H, W]`` -> ``[B, ceil(C/block), H, W, block]`` (batch stays outermost: BATCH = 1 per run)."""
    b, c, h, w = x.shape
    ct = ceil_div(c, block)
    padded = np.zeros((b, ct * block, h, w), x.dtype)
    padded[:, :c] = x
    return np.ascontiguousarray(padded.reshape(b, ct, block, h, w).transpose(0, 1, 3, 4, 2))


def unpack_activations(packed: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`pack_activations`, dropping the padding channels."""
    b, ct, h, w, block = packed.shape
    return np.ascontiguousarray(packed.transpose(0, 1, 4, 2, 3).reshape(b, ct * block, h, w)[:, :channels])


def pack_weights(w: np.ndarray, block_out: int, block_in: int) -> np.ndarray:
    """``[OC, IC, KH, KW]`` -> ``[OT, IT, KH, KW, block_out, block_in]`` (OIHW16o16i)."""
    oc, ic, kh, kw = w.shape
    ot, it = ceil_div(oc, block_out), ceil_div(ic, block_in)
    padded = np.zeros((ot * block_out, it * block_in, kh, kw), w.dtype)
    padded[:oc, :ic] = w
    return np.ascontiguousarray(padded.reshape(ot, block_out, it, block_in, kh, kw).transpose(0, 2, 4, 5, 1, 3))
