"""ONNX model <-> trainable torch module (onnx2torch), with the pruned weights frozen at zero.

torch and onnx2torch are the optional ``train`` extra. Trained values go back into the
ONNX model's own initializers, so the graph, the sparse-tile annotation and all metadata
stay exactly as they were.
"""

from __future__ import annotations

import importlib.machinery
import io
import sys
import types
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from gpp_onnx.annotation import read_annotation
from gpp_onnx.errors import UserError
from gpp_onnx.normalization import write_normalization

INSTALL_HINT = "fine-tuning needs torch and onnx2torch: pip install -e '.[train]' (torch==2.13.0, the CPU build)"


def _torchvision_stand_in() -> None:
    """onnx2torch imports torchvision for its NMS and RoiAlign converters only. PyPI's torchvision
    does not load beside the CPU build of torch (``operator torchvision::nms does not exist``), so
    when it fails, a stand-in that refuses just those two ops takes its place."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]

    def unavailable(*args: object, **kwargs: object) -> None:
        raise UserError("this model uses NMS or RoiAlign, which need a working torchvision")

    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.box_convert = ops.roi_align = unavailable  # type: ignore[attr-defined]
    stand_in = types.ModuleType("torchvision")
    stand_in.ops = ops  # type: ignore[attr-defined]
    for module in (stand_in, ops):  # importlib.util.find_spec (transformers asks it) fails on a module without one
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    sys.modules.update({"torchvision": stand_in, "torchvision.ops": ops})


def import_training():
    """``(torch, onnx2torch)``, or a UserError saying what to install."""
    try:
        import torch
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    try:
        import onnx2torch
    except ImportError as exc:
        if "onnx2torch" in str(exc):
            raise UserError(INSTALL_HINT) from None
        _torchvision_stand_in()
        import onnx2torch
    except RuntimeError:
        _torchvision_stand_in()
        import onnx2torch
    return torch, onnx2torch


def export_image_classifier(
    module: object, normalization: tuple[tuple[float, ...], tuple[float, ...]]
) -> onnx.ModelProto:
    """A torch image classifier as ONNX, in memory: input ``input`` [batch, 3, 32, 32], output ``logits``,
    dynamic batch, opset 17 (the TorchScript exporter), the input normalisation in the metadata."""
    torch, _ = import_training()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notes
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, 32, 32),),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    exported = onnx.load_from_string(buffer.getvalue())
    write_normalization(exported, *normalization)
    onnx.checker.check_model(exported)
    return exported


@dataclass
class RestoredBatchNorm:
    """A BatchNorm2d inserted after a conv for training, to be folded back into its weight and bias."""

    path: str  # the conv's module path in the converted graph
    conv: object  # torch.nn.Conv2d
    norm: object  # torch.nn.BatchNorm2d


@dataclass
class Trainable:
    """A torch module converted from an ONNX model, with the way back to its initializers."""

    module: object  # torch.nn.Module
    parameters: dict[str, tuple[object, bool]] = field(default_factory=dict)  # initializer -> (param, transposed)
    frozen: dict[str, object] = field(default_factory=dict)  # initializer -> bool mask of weights kept at zero
    convs: dict[str, tuple[str, object]] = field(default_factory=dict)  # module path -> (bias initializer, Conv2d)
    batchnorms: list[RestoredBatchNorm] = field(default_factory=list)

    def trainable_parameters(self) -> list:
        """Everything the optimizer updates: the mapped initializers and any restored batch-norm."""
        extra = [p for bn in self.batchnorms for p in (bn.norm.weight, bn.norm.bias)]
        return [p for p, _ in self.parameters.values()] + extra

    def restore_batchnorm(self, batches: list) -> None:
        """Insert a BatchNorm2d after every conv with a trainable weight and bias, initialised from
        the data (running statistics = the conv output's, affine = their inverse), so that the
        function is unchanged at step 0 while training sees normalised activations again."""
        import torch

        stats = _conv_output_stats(self.module, [conv for _, conv in self.convs.values()], batches)
        for path, (_, conv) in self.convs.items():
            mean, var = stats[id(conv)]
            norm = torch.nn.BatchNorm2d(conv.out_channels).to(conv.weight.device)
            with torch.no_grad():
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.weight.copy_(torch.sqrt(var + norm.eps))
                norm.bias.copy_(mean)
            replace_submodule(self.module, path, torch.nn.Sequential(conv, norm))
            self.batchnorms.append(RestoredBatchNorm(path, conv, norm))

    def fold_batchnorm(self) -> None:
        """Fold each restored batch-norm (running statistics) back into its conv's weight and bias."""
        import torch

        with torch.no_grad():
            for bn in self.batchnorms:
                scale = bn.norm.weight / torch.sqrt(bn.norm.running_var + bn.norm.eps)
                bn.conv.weight.mul_(scale.view(-1, 1, 1, 1))
                bn.conv.bias.copy_((bn.conv.bias - bn.norm.running_mean) * scale + bn.norm.bias)
                replace_submodule(self.module, bn.path, bn.conv)
        self.batchnorms = []
        self.apply_masks()

    def apply_masks(self) -> None:
        """Put the frozen weights back to exactly zero (after an optimizer step)."""
        import torch

        with torch.no_grad():
            for name, mask in self.frozen.items():
                self.parameters[name][0].masked_fill_(mask, 0.0)

    def effective_values(self) -> dict[str, np.ndarray]:
        """Each mapped initializer's current value as the ONNX model would hold it: conv weights
        scaled by a restored batch-norm's factor (its bias is not folded here)."""
        import torch

        scales = {}
        with torch.no_grad():
            for bn in self.batchnorms:
                scales[id(bn.conv.weight)] = (bn.norm.weight / torch.sqrt(bn.norm.running_var + bn.norm.eps)).view(
                    -1, 1, 1, 1
                )
            values = {}
            for name, (param, transposed) in self.parameters.items():
                value = param.detach() * scales[id(param)] if id(param) in scales else param.detach()
                value = value.cpu().numpy()
                values[name] = value.T if transposed else value
        return values

    def write_back(self, model: onnx.ModelProto) -> None:
        """Copy the trained values (restored batch-norms folded first) into the model's float
        initializers of the same names."""
        self.fold_batchnorm()
        write_arrays(model, self.effective_values())


def write_arrays(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> None:
    """Replace the values of the named initializers (each keeps its dtype)."""
    initializers = {t.name: t for t in model.graph.initializer}
    for name, value in arrays.items():
        tensor = initializers[name]
        dtype = numpy_helper.to_array(tensor).dtype
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value).astype(dtype), name))


def to_trainable(model: onnx.ModelProto) -> Trainable:
    """Convert with onnx2torch; map every Conv / Gemm weight and bias back to its initializer.

    In the layers the annotation lists as pruned, every weight that is zero (all of the
    pruned tiles) is frozen at zero.
    """
    torch, onnx2torch = import_training()
    try:
        module = onnx2torch.convert(model, attach_onnx_mapping=True)
    except Exception as exc:  # onnx2torch raises NotImplementedError and others for ops it lacks
        raise UserError(f"onnx2torch cannot convert this model ({str(exc).splitlines()[0][:200]})") from None
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    trainable = Trainable(module)
    for sub in module.modules():
        mapping = getattr(sub, "onnx_mapping", None)
        node = producers.get(mapping.outputs[0]) if mapping is not None and mapping.outputs else None
        if node is None:
            continue
        for index, attr in ((1, "weight"), (2, "bias")):  # Conv / Gemm: the weight and bias inputs
            param = getattr(sub, attr, None)
            if len(node.input) <= index or not isinstance(param, torch.nn.Parameter):
                continue
            name = node.input[index]
            original = initializers.get(name)
            if original is None or original.dtype.kind != "f":
                continue
            transposed = tuple(param.shape) != original.shape and tuple(param.shape[::-1]) == original.shape
            trainable.parameters[name] = (param, transposed)
        _note_conv(trainable, module, sub, node)
    annotation = read_annotation(model)
    for entry in annotation.weights if annotation else []:
        if entry.weight in trainable.parameters:
            param, _ = trainable.parameters[entry.weight]
            trainable.frozen[entry.weight] = param.detach() == 0
    return trainable


def _note_conv(trainable: Trainable, module: object, sub: object, node: onnx.NodeProto) -> None:
    """Remember a 2-D conv whose weight and bias are both trainable initializers (batch-norm can follow it)."""
    import torch

    if not isinstance(sub, torch.nn.Conv2d) or len(node.input) < 3:
        return
    if node.input[1] in trainable.parameters and node.input[2] in trainable.parameters:
        path = next(name for name, candidate in module.named_modules() if candidate is sub)
        trainable.convs[path] = (node.input[2], sub)


def replace_submodule(module: object, path: str, replacement: object) -> None:
    """Put ``replacement`` where the submodule at ``path`` (dotted) was."""
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, replacement)


def _conv_output_stats(module: object, convs: list, batches: list) -> dict[int, tuple]:
    """Per-channel mean and (biased) variance of each conv's output over the batches (eval mode)."""
    import torch

    sums: dict[int, list] = {id(conv): [0.0, 0.0, 0] for conv in convs}

    def hook(conv, inputs, output) -> None:
        values = output.detach().double()
        entry = sums[id(conv)]
        entry[0] = entry[0] + values.sum(dim=(0, 2, 3))
        entry[1] = entry[1] + (values**2).sum(dim=(0, 2, 3))
        entry[2] += values.shape[0] * values.shape[2] * values.shape[3]

    handles = [conv.register_forward_hook(hook) for conv in convs]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                module(batch)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    stats = {}
    for key, (total, squares, count) in sums.items():
        mean = total / count
        stats[key] = (mean.float(), torch.clamp(squares / count - mean**2, min=0.0).float())
    return stats
