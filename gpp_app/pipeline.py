"""The recovery workflow, written once: prune -> recalibrate -> fine-tune -> evaluate.

Each step reads and writes ONNX files and returns a typed result; the CLI commands
(``prune``, ``recalibrate``, ``finetune``) run one step each and ``sweep`` chains them for
every point.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from gpp_app import data
from gpp_app.evaluate import EvalResult, RunOptions, check_fits, evaluate
from gpp_app.finetune import FinetuneOptions, FinetuneResult, StepCallback, finetune
from gpp_app.recalibrate import DEFAULT_RECALIBRATION_IMAGES, recalibrate_from_data
from gpp_app.sensitivity import DEFAULT_LATENCY_ALLOCATION, LatencyAllocation
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import LoadedModel, load_model, save_model
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.pruner import PruneOptions, prune
from gpp_onnx.report import Report
from gpp_onnx.sensitivity import Sensitivity
from gpp_onnx.weights import check_finite_weights
from vta_backend.config import VTAConfig
from vta_backend.latency import LatencyReport, LatencyTarget


def check_eval_limit(eval_limit: int | None) -> None:
    """Refuse an --eval-limit below 1 before any work is done (so no output is written)."""
    if eval_limit is not None and eval_limit < 1:
        raise UserError(f"--eval-limit {eval_limit} is below 1")


def _ort(eval_limit: int | None) -> RunOptions:
    """The evaluation every step reports: ONNX Runtime fp32 on the test split."""
    return RunOptions(backend="ort", limit=eval_limit)


def prune_file(
    model: Path,
    output: Path,
    options: PruneOptions,
    recalibrate_data: Path | None = None,
    recalibrate_images: int = DEFAULT_RECALIBRATION_IMAGES,
    track: Track = no_progress,
) -> Report:
    """Prune ``model`` into ``output`` (then recalibrate it on ``recalibrate_data`` when given)."""
    loaded = load_model(model)
    pruned, report = prune(loaded, **options.arguments(), track=track)
    _save_pruned(pruned, loaded, output, recalibrate_data, recalibrate_images, track)
    return report


def prune_latency_file(
    model: Path,
    output: Path,
    target: LatencyTarget,
    config: VTAConfig,
    options: PruneOptions,
    recalibrate_data: Path | None = None,
    recalibrate_images: int = DEFAULT_RECALIBRATION_IMAGES,
    track: Track = no_progress,
    allocation: LatencyAllocation = DEFAULT_LATENCY_ALLOCATION,
    measured: Sensitivity | None = None,
) -> tuple[Report, LatencyReport]:
    """Prune ``model`` into ``output`` to a simulated VTA latency ``target`` (then recalibrate it on
    ``recalibrate_data`` when given); ``options`` gives the pattern, exclusions and floor, ``allocation``
    how the pruning is spread (measuring the layers' sensitivity first where it says so, unless it was
    ``measured`` already)."""
    loaded = load_model(model)
    pruned, report, latency = allocation.prune(loaded, (target, config), options, measured, track)
    _save_pruned(pruned, loaded, output, recalibrate_data, recalibrate_images, track)
    return report, latency


def _save_pruned(
    pruned: onnx.ModelProto,
    dense: LoadedModel,
    output: Path,
    recalibrate_data: Path | None,
    recalibrate_images: int,
    track: Track,
) -> None:
    """Recalibrate the pruned model against ``dense`` when data are given, then write it."""
    if recalibrate_data is not None:
        pruned = recalibrate_from_data(pruned, dense.model, recalibrate_data, recalibrate_images, track=track)
    save_model(pruned, output, external_data=dense.had_external_data)


@dataclass
class RecalibrationResult:
    """Test accuracy (ONNX Runtime fp32) of a pruned model before and after recalibration."""

    model: str
    output: str
    images: int  # train images whose statistics were matched
    data: str
    test_images: int
    accuracy_before: float
    accuracy_after: float

    def to_dict(self) -> dict[str, object]:
        """JSON form (the ``recalibrate --json`` document)."""
        return dict(vars(self))


def recalibrate_file(
    pruned: Path,
    dense: Path,
    data_path: Path,
    output: Path,
    images: int = DEFAULT_RECALIBRATION_IMAGES,
    eval_limit: int | None = None,
    track: Track = no_progress,
) -> RecalibrationResult:
    """Recalibrate ``pruned`` against ``dense`` into ``output``; evaluate both on the test split."""
    check_eval_limit(eval_limit)
    loaded, dense_model = load_model(pruned), load_model(dense).model
    check_finite_weights(loaded.model)
    check_finite_weights(dense_model)
    result = recalibrate_from_data(loaded.model, dense_model, data_path, images, track=track)
    before = evaluate(pruned, data_path, _ort(eval_limit), track=track)
    after = evaluate(result, data_path, _ort(eval_limit), track=track)  # before writing: a failure leaves no file
    save_model(result, output, external_data=loaded.had_external_data)
    return RecalibrationResult(
        str(pruned), str(output), images, after.data, after.images, before.accuracy, after.accuracy
    )


def finetune_file(
    model: Path,
    data_path: Path,
    output: Path,
    options: FinetuneOptions,
    eval_limit: int | None = None,
    on_step: StepCallback = lambda *args: None,
    track: Track = no_progress,
) -> FinetuneResult:
    """Fine-tune ``model`` into ``output`` and report its test accuracy (ONNX Runtime fp32)."""
    check_eval_limit(eval_limit)
    check_fits(load_model(model).model, data.locate(data_path), ("test",))  # before training writes anything
    result = finetune(model, data_path, output, options, on_step=on_step)
    evaluation = evaluate(output, data_path, _ort(eval_limit), track=track)
    return replace(result, test_accuracy=evaluation.accuracy, test_images=evaluation.images)


def evaluate_on_vta(model: Path, data_path: Path, options: RunOptions, track: Track = no_progress) -> EvalResult:
    """The final step: accuracy with the convs on the VTA simulator, ORT fp32 beside it."""
    return evaluate(model, data_path, replace(options, backend="vta"), track=track)
