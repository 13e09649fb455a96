"""Group pattern-wise pruning as a Microsoft Olive pass (the ``olive`` extra: ``pip install 'gpp-onnx[olive]'``).

Olive finds the pass through the package config shipped beside this module, :data:`PACKAGE_CONFIG`::

    olive run --config workflow.json --package-config "$(python -m gpp_app.olive_pass)"

It lists ``GroupPatternPruning`` and the Olive passes usually chained with it (ONNX conversion, ONNX Runtime
quantization), since ``--package-config`` replaces Olive's own list. The pass prunes with :func:`gpp_onnx.prune`,
or with :func:`vta_backend.latency.prune_for_latency` when ``target_speedup`` is given; its output model carries
the sparse-tile annotation. Bad settings fail with a ValueError carrying the library's one-line message.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import onnx
from olive.common.config_utils import ParamCategory
from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from gpp_app.sensitivity import DEFAULT_SENSITIVITY_IMAGES, LatencyAllocation
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import load_model
from gpp_onnx.patterns import pattern_names
from gpp_onnx.pruner import DEFAULT_PATTERN, DEFAULT_SCOPE, DEFAULT_SPARSITY, PruneOptions, prune
from vta_backend.config import BOARDS, VTAConfig
from vta_backend.latency import ALLOCATIONS, DEFAULT_ALLOCATION, LatencyTarget

PACKAGE_CONFIG = Path(__file__).with_name("olive_package_config.json")

logger = logging.getLogger(f"olive.{__name__}")  # under Olive's logger: shown in its log, at its level


def _target_params() -> dict[str, PassConfigParam]:
    """What to reach: a sparsity or a simulated VTA speedup, and the cycle model of the latter."""
    return {
        "sparsity": PassConfigParam(
            type_=float,
            default_value=None,
            description=f"Fraction of prunable weights to zero, in [0, 1) ({DEFAULT_SPARSITY} when neither "
            "sparsity nor target_speedup is given).",
        ),
        "target_speedup": PassConfigParam(
            type_=float,
            default_value=None,
            description="Instead of sparsity: prune the VTA convs until the simulated VTA speedup over the dense "
            "program is this (above 1); convs that stay on the CPU are left dense.",
        ),
        "vta_config": PassConfigParam(
            type_=str | Path,
            default_value=None,
            category=ParamCategory.PATH,
            description="A vta_config.json: its BLOCK_OUT x BLOCK_IN is the tile, and with target_speedup it "
            "is the cycle model (VTA's defaults without it).",
        ),
        "board": PassConfigParam(
            type_=str, default_value=None, description=f"With target_speedup: {', '.join(BOARDS)}; default pynq."
        ),
        "allocation": PassConfigParam(
            type_=str,
            default_value=DEFAULT_ALLOCATION,
            description=f"With target_speedup, how the cycles are spread over the layers: {', '.join(ALLOCATIONS)} "
            "(sensitivity, the most accurate, measures each layer on sensitivity_data's train images).",
        ),
        "sensitivity_data": PassConfigParam(
            type_=str | Path,
            default_value=None,
            category=ParamCategory.PATH,
            description="With allocation sensitivity: a CIFAR-10-style data folder whose first "
            f"{DEFAULT_SENSITIVITY_IMAGES} train images each layer's loss is measured on.",
        ),
    }


def _unit_params() -> dict[str, PassConfigParam]:
    """What to prune: the pattern, its scope and tile, and the layers and units kept dense."""
    return {
        "pattern": PassConfigParam(
            type_=str, default_value=DEFAULT_PATTERN, description=f"One of {', '.join(pattern_names())}."
        ),
        "scope": PassConfigParam(
            type_=str,
            default_value=None,
            description=f"layer (every layer at the sparsity) or global (one ranking); default {DEFAULT_SCOPE}.",
        ),
        "tile": PassConfigParam(type_=str, default_value=None, description="Tile shape OUTxIN; default 16x16."),
        "exclude": PassConfigParam(
            type_=list[str], default_value=[], description="Regexes; matching node or weight names stay dense."
        ),
        "include_fc": PassConfigParam(
            type_=bool, default_value=False, description="Also prune Gemm / MatMul layers with a constant weight."
        ),
        "layer_floor": PassConfigParam(
            type_=float,
            default_value=PruneOptions.layer_floor,
            description="Fraction of every layer's units (the best-scoring) never pruned.",
        ),
        "allow_empty_layers": PassConfigParam(
            type_=bool,
            default_value=False,
            description="Let a pruned layer lose every unit (by default each keeps at least its best one).",
        ),
    }


class GroupPatternPruning(Pass):
    """Zero the lowest-scoring VTA weight tiles of an ONNX CNN to a sparsity or a simulated VTA speedup."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        """The pass's settings: those of ``gpp-onnx prune``, and Olive's external-data options."""
        return {**_target_params(), **_unit_params(), **get_external_data_config()}

    def _run_for_config(
        self, model: ONNXModelHandler, config: BasePassConfig, output_model_path: str
    ) -> ONNXModelHandler:
        """Prune ``model`` as ``config`` says and write it, annotated, to ``output_model_path``."""
        if not isinstance(model, ONNXModelHandler):
            raise ValueError(f"GroupPatternPruning prunes ONNX models, not {type(model).__name__}; convert it first")
        try:
            pruned = _prune(model.model_path, config)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        output = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        return model_proto_to_olive_model(pruned, output, config)


def _prune(model_path: str | Path, config: BasePassConfig) -> onnx.ModelProto:
    """The pruned, annotated model of ``model_path`` for a :class:`GroupPatternPruning` ``config``
    (UserError on bad settings)."""
    if config.tile is not None and (config.vta_config is not None or config.tile.strip().endswith(".json")):
        raise UserError("tile takes OUTxIN; give a VTA config file as vta_config instead (it sets the tile)")
    vta = VTAConfig.from_json(config.vta_config) if config.vta_config is not None else None
    options = PruneOptions(
        DEFAULT_SPARSITY if config.sparsity is None else config.sparsity,
        config.pattern,
        config.scope or DEFAULT_SCOPE,
        config.tile or vta,
        tuple(config.exclude or ()),
        config.include_fc,
        config.layer_floor,
        config.allow_empty_layers,
    )
    if config.target_speedup is None:
        if config.board is not None or config.allocation != DEFAULT_ALLOCATION or config.sensitivity_data is not None:
            raise UserError(
                "board, allocation and sensitivity_data apply to target_speedup; give target_speedup or drop them"
            )
        pruned, report = prune(model_path, **options.arguments())
        logger.info("pruned %s to sparsity %.4f (%s, %s)", model_path, report.sparsity, options.pattern, options.scope)
        return pruned
    if config.sparsity is not None:
        raise UserError("give either sparsity or target_speedup, not both")
    if config.scope is not None or config.tile is not None:
        raise UserError("scope and tile do not apply with target_speedup (vta_config sets the tile); drop them")
    vta = vta or VTAConfig()
    vta = replace(vta, BOARD=config.board) if config.board is not None else vta
    target = LatencyTarget(speedup=config.target_speedup)
    data = Path(config.sensitivity_data) if config.sensitivity_data is not None else None
    allocation = LatencyAllocation(config.allocation, data)
    pruned, report, latency = allocation.prune(load_model(model_path), (target, vta), options)
    logger.info(
        "pruned %s to a simulated %.3fx on %s (target %.3fx), sparsity %.4f",
        *(model_path, latency.speedup, latency.board, config.target_speedup, report.sparsity),
    )
    return pruned


if __name__ == "__main__":
    print(PACKAGE_CONFIG)
