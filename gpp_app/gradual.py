"""Gradual pruning during fine-tuning: the sparsity rises along Zhu & Gupta's cubic schedule.

At evenly spaced steps of the ramp the current weights (scaled by any restored batch-norm,
so that they are the weights the exported model will hold) go through the core's
:func:`gpp_onnx.prune` at the scheduled sparsity; the units it zeroes become the frozen
masks. After the ramp the masks stay fixed for the remaining steps. Weights already pruned
are zero, cost nothing and are chosen again first, so the masks only grow.
"""

from __future__ import annotations

import onnx

from gpp_app.torch_model import Trainable, write_arrays
from gpp_onnx.errors import UserError
from gpp_onnx.pruner import PruneOptions, prune
from gpp_onnx.weights import find_layers

UPDATES = 16  # mask updates over the ramp


def current_sparsity(model: onnx.ModelProto, options: PruneOptions) -> float:
    """The zero fraction of the layers ``options`` would prune (what the schedule starts from)."""
    _, report = prune(model, 0.0, **{k: v for k, v in options.arguments().items() if k != "sparsity"})
    return report.sparsity


class GradualPruner:
    """Recomputes a Trainable's frozen masks on a cubic sparsity schedule."""

    def __init__(
        self, model: onnx.ModelProto, trainable: Trainable, options: PruneOptions, total_steps: int, until: float
    ) -> None:
        self.model, self.trainable, self.options = model, trainable, options
        self.start = current_sparsity(model, options)
        if options.sparsity < self.start:
            raise UserError(
                f"the gradual schedule ends at sparsity {options.sparsity:g}, below the model's {self.start:.3f}; "
                "give a higher target or fine-tune without --gradual"
            )
        self.ramp = max(1, round(total_steps * until))
        self.updates = {round(self.ramp * (i + 1) / UPDATES) for i in range(UPDATES)}

    def sparsity_at(self, step: int) -> float:
        """Zhu & Gupta: ``s_f + (s_i - s_f) * (1 - t)^3`` with ``t`` the fraction of the ramp done."""
        t = min(step / self.ramp, 1.0)
        return self.options.sparsity + (self.start - self.options.sparsity) * (1.0 - t) ** 3

    def after_step(self, step: int) -> None:
        """Update the masks when ``step`` (1-based, steps done) is one of the scheduled updates."""
        if step in self.updates:
            self.update(self.sparsity_at(step))

    def update(self, sparsity: float) -> None:
        """Prune a snapshot of the current weights at ``sparsity``; its zeros become the frozen masks."""
        import torch

        snapshot = onnx.ModelProto()
        snapshot.CopyFrom(self.model)
        write_arrays(snapshot, self.trainable.effective_values())
        arguments = {**self.options.arguments(), "sparsity": min(sparsity, self.options.sparsity)}
        pruned, report = prune(snapshot, **arguments)
        names = {row.weight for row in report.layers if row.status == "pruned"}
        for layer in find_layers(pruned):
            name = layer.weight
            if name not in names or name not in self.trainable.parameters or layer.stored is None:
                continue
            param, transposed = self.trainable.parameters[name]
            zero = torch.from_numpy(layer.stored.values == 0)
            mask = (zero.T if transposed else zero).to(param.device)
            self.trainable.frozen[name] = mask | self.trainable.frozen[name] if name in self.trainable.frozen else mask
        self.trainable.apply_masks()
