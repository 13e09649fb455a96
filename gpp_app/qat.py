"""Quantization-aware final epochs for VTA: train through VTA's int8 rounding.

For the last epochs of fine-tuning every conv that runs on VTA computes with its input
activation and its weights rounded as VTA will hold them: activations to int8 at the
power-of-two shift calibrated (as ``gpp-onnx run`` calibrates) on the current weights,
weights per output channel at the power-of-two shifts of :func:`vta_backend.quant.weight_shifts`,
both clipped to [-127, 127]. Gradients pass straight through the rounding. Restored
batch-norm is folded first, so the rounded weights are the exported ones. What this does not
model: the requantization of a conv's own output (it is the next conv's input, which is
modelled) and the fused residual's alignment.
"""

from __future__ import annotations

import numpy as np
import onnx

from gpp_app.torch_model import Trainable, replace_submodule, write_arrays
from vta_backend.calibration import CalibrationOptions, calibrate
from vta_backend.quant import QMAX, weight_shifts

CALIBRATION = CalibrationOptions(images=1000)  # train images the QAT activation shifts are measured on


def _round_clip(x, scale):
    """``clip(round_half_away(x * scale), -127, 127) / scale`` with a straight-through gradient."""
    import torch

    scaled = x * scale
    rounded = torch.clamp(torch.sign(scaled) * torch.floor(scaled.abs() + 0.5), -QMAX, QMAX) / scale
    return x + (rounded - x).detach()


def _make_wrapper(conv, input_shift: int | None, weight_shift: np.ndarray):
    import torch

    class RoundedConv(torch.nn.Module):
        """A conv computing with VTA-rounded input activations and weights."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = conv
            self.register_buffer("weight_scale", torch.exp2(torch.as_tensor(weight_shift, dtype=torch.float32)))
            # a buffer, so that a checkpoint restores it; NaN: the input is not rounded (no calibrated shift)
            self.register_buffer("input_scale", torch.tensor(float("nan") if input_shift is None else 2.0**input_shift))

        def forward(self, x):
            if not torch.isnan(self.input_scale):
                x = _round_clip(x, self.input_scale)
            weight = _round_clip(self.conv.weight, self.weight_scale.view(-1, 1, 1, 1))
            return self.conv._conv_forward(x, weight, self.conv.bias)

    return RoundedConv().to(conv.weight.device)


class VtaRounding:
    """Attaches and detaches VTA rounding on a Trainable's convs."""

    def __init__(self, trainable: Trainable) -> None:
        self.trainable = trainable
        self.wrapped: dict[str, object] = {}  # module path -> the original conv

    def attach(self, model: onnx.ModelProto, feeds, data: str) -> None:
        """Fold batch-norm, calibrate activation shifts on ``feeds`` for the current weights, and wrap
        every conv whose input is not a graph input (those stay on the CPU on VTA)."""
        self.trainable.fold_batchnorm()
        snapshot = onnx.ModelProto()
        snapshot.CopyFrom(model)
        write_arrays(snapshot, self.trainable.effective_values())
        shifts, _ = calibrate(snapshot, feeds, CALIBRATION, data=f"qat snapshot; {data}")
        graph_inputs = {i.name for i in model.graph.input}
        for path, sub in list(self.trainable.module.named_modules()):
            mapping = getattr(sub, "onnx_mapping", None)
            if mapping is None or not hasattr(sub, "_conv_forward") or sub.weight.dim() != 4:
                continue
            source = mapping.inputs[0] if mapping.inputs else None
            if source is None or source in graph_inputs:
                continue
            weight_shift = weight_shifts(sub.weight.detach().cpu().numpy(), per_channel=True)
            replace_submodule(self.trainable.module, path, _make_wrapper(sub, shifts.get(source), weight_shift))
            self.wrapped[path] = sub

    def detach(self) -> None:
        """Put the plain convs back (the trained float weights stay)."""
        for path, conv in self.wrapped.items():
            replace_submodule(self.trainable.module, path, conv)
        self.wrapped = {}
