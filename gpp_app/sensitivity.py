"""Sensitivity analysis: how much loss each prunable layer alone adds when pruned, per unit count.

For every layer that the pruning options let prune and for up to :data:`LEVELS` unit counts spread
over its ranking, the layer alone is pruned (every other layer dense), its conv's output
statistics are matched to the dense model's on the same images as :mod:`gpp_app.recalibrate`
does (so the figure is the damage a mean and scale shift cannot undo), and the model's
cross-entropy on the first train images is compared with the dense model's. A latency-target
allocation (``--allocation sensitivity``) then prunes where the least loss buys the most cycles.
As in every sensitivity analysis (Han et al. 2015; SparseML, Distiller), the layers' losses are
taken to add up. Only train images are read: never the test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gpp_app import data
from gpp_app.evaluate import check_data_fits, check_scores, model_batches, run_in_model_batches
from gpp_app.recalibrate import channel_stats, match_statistics
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import LoadedModel, image_input
from gpp_onnx.normalization import normalization_for
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.pruner import LayerRanking, PruneOptions, prune_counts, rank_layers
from gpp_onnx.report import Report
from gpp_onnx.sensitivity import LayerSensitivity, Sensitivity
from gpp_onnx.weights import GraphIndex, Layer
from vta_backend.config import VTAConfig
from vta_backend.latency import (
    DEFAULT_ALLOCATION,
    MEASURED_ALLOCATION,
    LatencyReport,
    LatencyTarget,
    check_allocation,
    cpu_layers,
    prune_for_latency,
)
from vta_backend.model import conv_sites

DEFAULT_SENSITIVITY_IMAGES = 1000  # train images the loss and the statistics are measured on
LEVELS = 10  # unit counts measured per layer (every count in smaller layers), 0 and all included
BATCH = 500


def measure_sensitivity(
    model: LoadedModel,
    options: PruneOptions,
    skip: Mapping[str, str],
    data_path: str | Path,
    images: int = DEFAULT_SENSITIVITY_IMAGES,
    track: Track = no_progress,
) -> dict[str, LayerSensitivity]:
    """Weight name -> the loss its layer alone adds at unit counts of its ranking (:func:`rank_layers`
    with ``options`` and ``skip``), measured on the first ``images`` train images of ``data_path``."""
    name, dims = image_input(model.model, "the model must take one image input [N, C, H, W]")
    dataset = data.locate(data_path)
    check_data_fits(dataset, "train", dims, name)
    batches = _batches(model.model, dataset, images)
    inputs = [x for x, _ in batches]
    rankings = rank_layers(model, options, skip)
    index = GraphIndex(model.model.graph)
    convs = {r.layer.weight: _single_conv(model.model, index, r.layer) for r in rankings}
    outputs = [conv.output[0] for conv in convs.values() if conv is not None]
    target = channel_stats(model.model, name, outputs, inputs)
    dense_loss = _loss(model.model, batches)
    plan = [(ranking, int(k)) for ranking in rankings for k in _levels(ranking) if k > 0]
    losses: dict[str, list[float]] = {ranking.layer.weight: [0.0] for ranking in rankings}
    for ranking, count in track(plan, "sensitivity", len(plan)):
        weight = ranking.layer.weight
        pruned, _ = prune_counts(model, {weight: count}, options, skip)
        conv = convs[weight]
        if conv is not None:
            node = next(n for n in pruned.graph.node if n.output[:1] == conv.output[:1])
            match_statistics(pruned, node, (name, inputs), target[conv.output[0]])
        losses[weight].append(_loss(pruned, batches) - dense_loss)
    return {
        ranking.layer.weight: LayerSensitivity(_levels(ranking), np.array(losses[ranking.layer.weight]))
        for ranking in rankings
    }


def _levels(ranking: LayerRanking) -> np.ndarray:
    """The unit counts measured: up to :data:`LEVELS`, evenly spread from 0 to every prunable unit."""
    units = int(ranking.order.size)
    return np.unique(np.linspace(0, units, min(LEVELS, units + 1)).round().astype(int))


def _batches(model: onnx.ModelProto, dataset: data.Dataset, images: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first train images as (model input, labels) batches of the model's batch size."""
    model_input = data.model_input(model)
    mean, std = normalization_for(model)
    batch, images = model_batches(model_input[1], BATCH, images)
    batches = [
        (data.model_feed(*model_input, x, mean, std)[model_input[0]], labels)
        for x, labels in data.iter_uint8(dataset, "train", batch, images)
    ]
    if not batches:
        raise UserError(f"no train images in {dataset.root} to measure the sensitivity on; {data.LAYOUTS_HELP}")
    return batches


def _single_conv(model: onnx.ModelProto, index: GraphIndex, layer: Layer) -> onnx.NodeProto | None:
    """The one float Conv that consumes the layer's weight, whose statistics can be matched; None for
    a shared, quantized or other weight (its sensitivity is then measured without the matching).
    ``index``: the model graph's."""
    nodes = [node for node_name, node in zip(index.names, model.graph.node) if node_name in layer.nodes]
    float_2d = layer.stored is not None and layer.stored.values.dtype.kind == "f" and len(layer.shape) == 4
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == "Conv" and float_2d else None


def _loss(model: onnx.ModelProto, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean cross-entropy of the model's first output on ``batches`` (scores taken as probabilities
    where they already are, else as logits)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    total, count = 0.0, 0
    for x, labels in batches:
        scores = run_in_model_batches(session, {input_name: x}).astype(np.float64)
        check_scores(scores, labels)
        total += float(-_log_probabilities(scores)[np.arange(len(labels)), labels].sum())
        count += len(labels)
    return total / count


def _log_probabilities(scores: np.ndarray) -> np.ndarray:
    """Log class probabilities of [N, classes] scores: of a softmax output as is, else log-softmax."""
    if (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.maximum(scores, 1e-12))
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class LatencyAllocation:
    """How a latency target spreads the pruning (:data:`vta_backend.latency.ALLOCATIONS`) and, for the
    ``sensitivity`` allocation, the train images it is measured on."""

    name: str = DEFAULT_ALLOCATION
    data: Path | None = None
    images: int = DEFAULT_SENSITIVITY_IMAGES

    def check_settings(self) -> None:
        """A known allocation and an image count of 1 or more (UserError otherwise)."""
        check_allocation(self.name)
        if self.images < 1:
            raise UserError(f"--sensitivity-images {self.images} is below 1")

    def check(self) -> None:
        """The settings, and data exactly when the allocation measures (UserError otherwise), before any work."""
        self.check_settings()
        if self.name == MEASURED_ALLOCATION and self.data is None:
            raise UserError(
                "the sensitivity allocation measures each layer on train images: give their folder (--data)"
            )
        if self.name != MEASURED_ALLOCATION and self.data is not None:
            raise UserError(
                "data are read by the sensitivity allocation only (--allocation sensitivity); add it or drop them"
            )

    def sensitivity(
        self, model: LoadedModel, options: PruneOptions, config: VTAConfig, track: Track = no_progress
    ) -> dict[str, LayerSensitivity] | None:
        """The measured sensitivity of the layers a latency target on ``config`` prunes (None when the
        allocation measures nothing): ``options`` with the config's tile, the CPU's convs left dense."""
        self.check()
        if self.data is None:
            return None
        skip = cpu_layers(model.model, conv_sites(model.model, config))
        return measure_sensitivity(model, replace(options, tile=config), skip, self.data, self.images, track)

    def prune(
        self,
        model: LoadedModel,
        goal: tuple[LatencyTarget, VTAConfig],
        options: PruneOptions,
        measured: Sensitivity | None = None,
        track: Track = no_progress,
    ) -> tuple[onnx.ModelProto, Report, LatencyReport]:
        """:func:`vta_backend.latency.prune_for_latency` to ``goal`` (the target and its cycle model) with
        this allocation, measuring the sensitivity first where it needs one and none was ``measured``."""
        target, config = goal
        target.check()
        self.check()
        sensitivity = measured if measured is not None else self.sensitivity(model, options, config, track)
        return prune_for_latency(
            model, target, config, options, track=track, allocation=self.name, sensitivity=sensitivity
        )


DEFAULT_LATENCY_ALLOCATION = LatencyAllocation()  # the default allocation, measuring nothing
