"""VTA backend: compile the convs of an ONNX CNN for VTA, simulate them bit-exactly, and model their cycles.

Modules, from the hardware up:

* :mod:`~vta_backend.config` the VTA build (``vta_config.json``) and board;
  :mod:`~vta_backend.isa` instructions, micro-ops and their binary encodings;
  :mod:`~vta_backend.cost` what each instruction costs in cycles (the cycle model's constants).
* :mod:`~vta_backend.quant` VTA's integer arithmetic; :mod:`~vta_backend.quantization` how a
  float conv becomes an int8 one (:class:`QuantizationOptions`).
* :mod:`~vta_backend.shapes` and :mod:`~vta_backend.importer` the Conv nodes of an ONNX model,
  which of them VTA runs (with fused bias, Add and Relu) and why the others stay on the CPU.
* :mod:`~vta_backend.tiling` and :mod:`~vta_backend.compiler` one conv group to a VTA program
  (pruned tiles neither loaded nor issued); :mod:`~vta_backend.layer` all groups of a conv.
* :mod:`~vta_backend.simulator` runs programs (ISA interpreter and a bit-identical fast path);
  :mod:`~vta_backend.timing` simulates their cycles through VTA's dependency-token queues.
* :mod:`~vta_backend.model` compiles a whole model (:func:`~vta_backend.model.compile_model`),
  :mod:`~vta_backend.report` its typed figures, :mod:`~vta_backend.bundle` writes the programs out,
  :mod:`~vta_backend.session` runs the model in ONNX Runtime with its convs on the simulator
  (through the custom ops of :mod:`~vta_backend.ort_op`), :mod:`~vta_backend.calibration`
  measures activation scales.

This package imports the core package ``gpp_onnx`` only (never the application).
"""

from vta_backend.config import BOARDS, VTAConfig
from vta_backend.quantization import QuantizationOptions

__all__ = ["BOARDS", "QuantizationOptions", "VTAConfig"]
