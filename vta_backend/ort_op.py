"""The ``VtaConv`` / ``VtaConvAdd`` custom ops: Python kernels registered with ONNX Runtime
through onnxruntime-extensions.

Each rewritten conv carries a ``key`` attribute naming its compiled :class:`VtaKernel` in
this process's registry. The kernel takes int8 activations (and, for a fused Add, the int8
residual), runs the VTA program over the whole batch (fast path) and returns int8
activations, as VTA keeps them in DRAM between layers; the session places ONNX Runtime's
QuantizeLinear / DequantizeLinear at the borders with float operators. A model of opset
below 10 has no QuantizeLinear: there the border ops of this module do the same arithmetic
(scale ``2**-shift``, round half to even, saturate) fused with the layout change,
``VtaQuantize`` (float32 NCHW -> int8 NHWC) and ``VtaDequantize`` (int8 NHWC -> float32 NCHW).

onnxruntime-extensions returns a Python kernel's outputs to ONNX Runtime as
``array.flatten().tolist()``, about 50 ns per element; its native side accepts the flat
numpy array itself, so this module installs an invocation hook that does exactly what the
library's does except for that conversion (1 M floats: 51 ms -> 0.4 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
from onnxruntime_extensions import _ocos as ocos

from vta_backend.layer import VtaConv

DOMAIN = "ai.onnx.contrib"
OP_TYPE = "VtaConv"  # int8 input -> int8 output
OP_TYPE_ADD = "VtaConvAdd"  # int8 input, int8 residual -> int8 output


@dataclass
class VtaKernel:
    """A compiled conv (with its fused Relu / residual Add): channels-last int8 activations in and out."""

    layer: VtaConv

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        return self.layer.run_nhwc(x, residual)


_KERNELS: dict[str, VtaKernel] = {}


def register(key: str, kernel: VtaKernel) -> None:
    """Make ``kernel`` the one custom nodes with this ``key`` run."""
    _KERNELS[key] = kernel


def unregister(keys: list[str]) -> None:
    """Forget these kernels (missing keys are ignored)."""
    for key in keys:
        _KERNELS.pop(key, None)


def _kernel(key: str) -> VtaKernel:
    kernel = _KERNELS.get(key)
    if kernel is None:
        raise RuntimeError(f"VTA kernel {key!r} is not registered in this process; build the session with VtaSession")
    return kernel


@onnx_op(
    op_type=OP_TYPE,
    domain=DOMAIN,
    inputs=[PyCustomOpDef.dt_int8],
    outputs=[PyCustomOpDef.dt_int8],
    attrs={"key": PyCustomOpDef.dt_string},
)
def _vta_conv(x: np.ndarray, key: str) -> np.ndarray:
    return _kernel(key)(x)


@onnx_op(
    op_type=OP_TYPE_ADD,
    domain=DOMAIN,
    inputs=[PyCustomOpDef.dt_int8, PyCustomOpDef.dt_int8],
    outputs=[PyCustomOpDef.dt_int8],
    attrs={"key": PyCustomOpDef.dt_string},
)
def _vta_conv_add(x: np.ndarray, residual: np.ndarray, key: str) -> np.ndarray:
    return _kernel(key)(x, residual)


QUANTIZE, DEQUANTIZE = "VtaQuantize", "VtaDequantize"  # float32 NCHW <-> int8 NHWC, for opsets below 10


@onnx_op(
    op_type=QUANTIZE,
    domain=DOMAIN,
    inputs=[PyCustomOpDef.dt_float],
    outputs=[PyCustomOpDef.dt_int8],
    attrs={"shift": PyCustomOpDef.dt_int64},
)
def quantize_nchw(x: np.ndarray, shift: int) -> np.ndarray:
    """QuantizeLinear with scale ``2**-shift`` and zero point 0 (round half to even, saturate), then NCHW -> NHWC."""
    q = np.clip(np.rint(x * np.float32(2.0**shift)), -128, 127).astype(np.int8)
    return np.ascontiguousarray(q.transpose(0, 2, 3, 1))


@onnx_op(
    op_type=DEQUANTIZE,
    domain=DOMAIN,
    inputs=[PyCustomOpDef.dt_int8],
    outputs=[PyCustomOpDef.dt_float],
    attrs={"shift": PyCustomOpDef.dt_int64},
)
def dequantize_nhwc(q: np.ndarray, shift: int) -> np.ndarray:
    """NHWC -> NCHW, then DequantizeLinear with scale ``2**-shift``."""
    return np.ascontiguousarray(q.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(2.0**-shift))


def _invoke(k_id: int, feed: tuple, attributes: dict) -> tuple:
    """onnxruntime-extensions' invocation hook, returning flat arrays instead of Python lists."""
    if k_id not in ocos.Opdef._odlist:
        raise RuntimeError(f"Unable to find function id={k_id}. Did you decorate the operator with @onnx_op?")
    op = ocos.Opdef._odlist[k_id]
    result = op.body(*feed, **op.cast_attributes(attributes))
    outputs = result if isinstance(result, tuple) else (result,)
    flat: list = []
    for array in outputs:
        array = np.asarray(array)
        flat += [array.shape, np.ascontiguousarray(array).reshape(-1)]
    return (k_id, *flat)


PyCustomOpDef.install_hooker(_invoke)
LIBRARY_PATH = get_library_path()
