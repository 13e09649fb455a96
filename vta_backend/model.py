"""Compile every VTA-runnable conv of an ONNX model and report its simulated figures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal, TypeVar

import onnx

from gpp_onnx.annotation import KeptTiles, read_kept_tiles
from gpp_onnx.errors import UserError
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.weights import check_finite_weights
from vta_backend.config import VTAConfig
from vta_backend.importer import ConvSite, extract_convs
from vta_backend.integer_convs import expand_integer_convs
from vta_backend.layer import LayerStats, VtaConv
from vta_backend.quantization import DEFAULT_QUANTIZATION, QuantizationOptions
from vta_backend.report import Placement, VtaReport

T = TypeVar("T")
REASONS_LISTED = 5  # convs named in the "no Conv VTA can run" error


class KeptTilesSource(Enum):
    """Where the kept-tile maps come from when the caller does not pass them."""

    MODEL = "read and validate the model's own annotation"


READ_FROM_MODEL = KeptTilesSource.MODEL
KeptArgument = KeptTiles | None | Literal[KeptTilesSource.MODEL]


@dataclass
class CompiledModel:
    """Every Conv node of a model (``sites``, graph order) and the compiled VTA convs among them."""

    config: VTAConfig
    sites: list[ConvSite]
    layers: dict[str, VtaConv]  # node name -> compiled conv
    stats: dict[str, LayerStats]  # node name -> its simulated figures

    @property
    def placement(self) -> list[Placement]:
        """Where every Conv node runs, in graph order."""
        return placements(self.sites)

    def report(self) -> VtaReport:
        """Totals and per-layer figures for one image (all simulated), and every conv's placement."""
        return VtaReport.of(self.config, list(self.stats.values()), self.placement)


def compile_model(
    model: onnx.ModelProto,
    config: VTAConfig,
    input_shape: tuple[int, ...] | None = None,
    activation_shifts: Mapping[str, int] | None = None,
    quantization: QuantizationOptions = DEFAULT_QUANTIZATION,
    kept: KeptArgument = READ_FROM_MODEL,
    track: Track = no_progress,
) -> CompiledModel:
    """Compile every Conv of ``model`` that VTA can run, with the dense and fully pruned variants for comparison.

    ``activation_shifts`` maps tensor names to calibrated power-of-two shifts (others get
    ``quantization.activation_shift``). ``kept`` is :data:`READ_FROM_MODEL` (read and validate
    the model's annotation here), the caller's already validated
    :func:`gpp_onnx.annotation.read_kept_tiles` result, or None (no annotation: only all-zero
    tiles are skipped). ``track(items, description, total)`` may wrap the loop in a progress bar.
    """
    sites = conv_sites(model, config, input_shape, activation_shifts, quantization, kept)
    runnable = [s for s in sites if s.conv is not None]
    layers, stats = {}, {}
    for site in track(runnable, "compiling", len(runnable)):
        assert site.conv is not None and site.in_shape is not None
        layer = VtaConv.compile(site.conv, site.in_shape, config)
        layers[site.node] = layer
        stats[site.node] = layer.stats()
    return CompiledModel(config, sites, layers, stats)


def conv_sites(
    model: onnx.ModelProto,
    config: VTAConfig,
    input_shape: tuple[int, ...] | None = None,
    activation_shifts: Mapping[str, int] | None = None,
    quantization: QuantizationOptions = DEFAULT_QUANTIZATION,
    kept: KeptArgument = READ_FROM_MODEL,
) -> list[ConvSite]:
    """Every Conv node of ``model`` as :func:`compile_model` sees it (same arguments), not compiled;
    UserError when none can run on VTA (naming each conv's reason)."""
    check_finite_weights(model)
    if kept is READ_FROM_MODEL:
        kept = read_kept_tiles(model)
    model = expand_integer_convs(model)  # QLinearConv / ConvInteger as float convs between DQ and Q
    sites = extract_convs(model, config, input_shape, activation_shifts, quantization, kept)
    if not any(s.conv is not None for s in sites):
        raise UserError(_nothing_to_run(sites))
    return sites


def placements(sites: list[ConvSite]) -> list[Placement]:
    """Where every Conv node runs, in graph order."""
    return [Placement(s.node, "vta" if s.conv is not None else "cpu", s.reason) for s in sites]


def _nothing_to_run(sites: list[ConvSite]) -> str:
    """The error for a model without a runnable conv, naming each conv's reason (the first few)."""
    reasons = [f"{s.node}: {s.reason}" for s in sites[:REASONS_LISTED]]
    if len(sites) > REASONS_LISTED:
        reasons.append(f"and {len(sites) - REASONS_LISTED} more")
    found = "; ".join(reasons) if sites else "it has no Conv node"
    return f"the model has no Conv that VTA can run ({found}); pass a CNN with 2-D float Conv layers"
