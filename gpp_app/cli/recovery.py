"""``gpp-onnx recalibrate``, ``finetune`` and ``sweep``: recovering accuracy after pruning."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress, TextColumn
from rich.table import Table

from gpp_app.cli.common import (
    AllocationOpt,
    AllowEmptyOpt,
    DataOpt,
    EvalLimitOpt,
    JsonOpt,
    ModelArg,
    Output,
    SensitivityImagesOpt,
    command,
    parse_list,
    progress,
    stderr,
    stdout,
)
from gpp_app.data import default_data_dir
from gpp_app.finetune import FinetuneOptions
from gpp_app.recalibrate import DEFAULT_RECALIBRATION_IMAGES
from gpp_app.sweep import DEFAULT_SPARSITIES, SweepOptions
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import check_input_path, check_output_path
from gpp_onnx.patterns import pattern_names
from gpp_onnx.pruner import DEFAULT_PATTERN, DEFAULT_SCOPE, PruneOptions
from vta_backend.calibration import CalibrationOptions

EpochsOpt = Annotated[int, typer.Option("--epochs", help="Fine-tuning passes over the train split (sweep: 0 = none).")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (SGD, momentum 0.9, wd 1e-4).")]
RestoreBnOpt = Annotated[
    bool,
    typer.Option("--restore-bn/--no-restore-bn", help="Train with a BatchNorm after each conv, folded back after."),
]
KdTemperatureOpt = Annotated[
    float, typer.Option("--kd-temperature", help="Softening of both models' outputs for distillation.")
]
KdWeightOpt = Annotated[float, typer.Option("--kd-weight", help="Share of the distillation loss (the rest: labels).")]
LayerFloorOpt = Annotated[float, typer.Option("--layer-floor", help="Fraction of each layer's units never pruned.")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", "-x", help="Layers kept dense (regex).")]
GradualPatternOpt = Annotated[
    Optional[str],
    typer.Option("--pattern", "-p", help=f"With --gradual: {', '.join(pattern_names())} (default: {DEFAULT_PATTERN})."),
]
GradualScopeOpt = Annotated[
    Optional[str], typer.Option("--scope", help=f"With --gradual: layer or global (default: {DEFAULT_SCOPE}).")
]
GradualFloorOpt = Annotated[
    Optional[float],
    typer.Option(
        "--layer-floor",
        help=f"With --gradual: fraction of each layer's units kept (default: {PruneOptions.layer_floor}).",
    ),
]
GradualExcludeOpt = Annotated[
    Optional[list[str]], typer.Option("--exclude", "-x", help="With --gradual: layers kept dense (regex).")
]
GradualUntilOpt = Annotated[
    Optional[float],
    typer.Option(
        "--gradual-until",
        help=f"With --gradual: share of training over which the sparsity rises "
        f"(default: {FinetuneOptions.gradual_until}).",
    ),
]
QatEpochsOpt = Annotated[int, typer.Option("--qat-epochs", help="Last epochs trained through VTA's int8 rounding.")]


@command
def recalibrate_command(
    model: ModelArg,
    dense: Annotated[Path, typer.Option("--dense", help="The unpruned model MODEL was pruned from.")],
    data_dir: DataOpt = None,
    images: Annotated[
        int, typer.Option("--images", help="Train images to match statistics on.")
    ] = DEFAULT_RECALIBRATION_IMAGES,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output model (default: MODEL-recal.onnx).")
    ] = None,
    eval_limit: EvalLimitOpt = None,
    as_json: JsonOpt = False,
) -> Output:
    """Fit each pruned conv's output statistics to the dense model's (ONNX only); report test accuracy."""
    from gpp_app.pipeline import recalibrate_file

    check_input_path(model)
    output = output or model.with_name(model.stem + "-recal.onnx")
    check_output_path(output, [model, dense])
    result = recalibrate_file(model, dense, data_dir or default_data_dir(), output, images, eval_limit, progress)

    def show() -> None:
        stdout.print(
            f"{output}: test accuracy (ONNX Runtime fp32, {result.test_images:,} images of {result.data}) "
            f"{result.accuracy_before:.2%} -> {result.accuracy_after:.2%} after recalibrating on {images} train images"
        )

    return Output(result.to_dict(), show)


@command
def finetune(
    model: ModelArg,
    data_dir: DataOpt = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output model (default: MODEL-ft.onnx).")
    ] = None,
    epochs: EpochsOpt = FinetuneOptions.epochs,
    lr: LrOpt = FinetuneOptions.lr,
    batch: Annotated[int, typer.Option("--batch", help="Images per step.")] = FinetuneOptions.batch,
    schedule: Annotated[str, typer.Option("--schedule", help="onecycle or cosine.")] = FinetuneOptions.schedule,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda if available).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = FinetuneOptions.seed,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.ckpt.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on the first N images only.")] = None,
    restore_bn: RestoreBnOpt = FinetuneOptions.restore_bn,
    teacher: Annotated[
        Optional[Path], typer.Option("--teacher", help="Distil from this ONNX model (the dense one MODEL came from).")
    ] = None,
    kd_temperature: KdTemperatureOpt = FinetuneOptions.kd_temperature,
    kd_weight: KdWeightOpt = FinetuneOptions.kd_weight,
    gradual: Annotated[Optional[float], typer.Option("--gradual", help="Prune gradually to this sparsity.")] = None,
    pattern: GradualPatternOpt = None,
    scope: GradualScopeOpt = None,
    layer_floor: GradualFloorOpt = None,
    allow_empty_layers: AllowEmptyOpt = False,
    exclude: GradualExcludeOpt = None,
    gradual_until: GradualUntilOpt = None,
    qat_epochs: QatEpochsOpt = FinetuneOptions.qat_epochs,
    eval_limit: EvalLimitOpt = None,
    as_json: JsonOpt = False,
) -> Output:
    """Fine-tune MODEL on the train split with its pruned tiles frozen at zero; evaluate on the test split."""
    from gpp_app.pipeline import finetune_file

    check_input_path(model)
    output = output or model.with_name(model.stem + "-ft.onnx")
    check_output_path(output, [model] + ([teacher] if teacher else []))
    shaping = {"--pattern": pattern, "--scope": scope, "--layer-floor": layer_floor, "--exclude": exclude}
    shaping |= {"--allow-empty-layers": allow_empty_layers or None, "--gradual-until": gradual_until}
    options = FinetuneOptions(
        **dict(epochs=epochs, lr=lr, batch=batch, schedule=schedule, device=device, seed=seed, resume=resume),
        **dict(limit=limit, restore_bn=restore_bn, teacher=None if teacher is None else str(teacher)),
        **dict(kd_temperature=kd_temperature, kd_weight=kd_weight, qat_epochs=qat_epochs),
        gradual=_gradual_pruning(gradual, shaping),
        gradual_until=FinetuneOptions.gradual_until if gradual_until is None else gradual_until,
    )
    options.check()
    with training_progress(epochs) as on_step:
        result = finetune_file(model, data_dir or default_data_dir(), output, options, eval_limit, on_step, progress)
    return Output(result.to_dict(), lambda: _print_finetune(result, output))


def _gradual_pruning(gradual: float | None, shaping: dict[str, object]) -> PruneOptions | None:
    """The pruning ``finetune --gradual`` runs, from the options that shape it (None where not given); those
    options without --gradual are a UserError (they would be ignored)."""
    given = [flag for flag, value in shaping.items() if value is not None]
    if gradual is None:
        if given:
            them = "it" if len(given) == 1 else "them"
            raise UserError(
                f"without --gradual, {', '.join(given)} would be ignored; add --gradual SPARSITY or leave {them} out"
            )
        return None

    def given_or(flag: str, default: object) -> object:
        return default if shaping[flag] is None else shaping[flag]

    return PruneOptions(
        gradual,
        given_or("--pattern", DEFAULT_PATTERN),
        given_or("--scope", DEFAULT_SCOPE),
        exclude=tuple(given_or("--exclude", ())),
        layer_floor=given_or("--layer-floor", PruneOptions.layer_floor),
        allow_empty_layers=bool(shaping["--allow-empty-layers"]),
    )


def _print_finetune(result, output: Path) -> None:
    last = result.history[-1]
    stdout.print(
        f"{output}: {result.epochs} epochs, last train loss {last['loss']:.3f}, train accuracy "
        f"{last['train_accuracy']:.2%}; test accuracy (ONNX Runtime fp32, {result.test_images:,} "
        f"images of {result.data}) {result.test_accuracy:.2%}"
    )


def _print_sweep(result, output: Path) -> None:
    table = Table(title=f"{output}/results.csv (dense ORT {result.dense['accuracy_ort']:.2%})")
    columns = {
        "pattern": "pattern",
        "target": "target",
        "achieved": "sparsity_achieved",
        "before": "accuracy_before_ort",
        "recalibrated": "accuracy_recalibrated_ort",
        "after ORT": "accuracy_after_ort",
        "after VTA": "accuracy_after_vta",
        "VTA speedup (sim.)": "vta_speedup",
        "error": "error",
    }
    for column in columns:
        table.add_column(column)
    for row in result.rows:
        table.add_row(*["" if getattr(row, key) is None else str(getattr(row, key)) for key in columns.values()])
    stdout.print(table)


SparsitiesOpt = Annotated[
    Optional[str],
    typer.Option(
        "--sparsities",
        help="Comma-separated sparsity targets "
        f"[{','.join(f'{s:g}' for s in DEFAULT_SPARSITIES)} unless --speedups is given].",
    ),
]
SpeedupsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--speedups",
        help="Comma-separated simulated VTA speedup targets (latency-target pruning on the pynq cycle model).",
    ),
]
CalibrationImagesOpt = Annotated[
    int, typer.Option("--calibration-images", help="Train images to calibrate VTA's activation scales on.")
]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Points run in parallel processes (--executor local).")]
ExecutorOpt = Annotated[
    str, typer.Option("--executor", help="local (this machine's processes) or ray (one Ray task per point).")
]
AddressOpt = Annotated[
    Optional[str],
    typer.Option(
        "--address",
        help="Ray cluster to join, e.g. auto or HEAD:6379 (default: a local Ray instance for the sweep); "
        "model, data and -o must be at the same paths on every node.",
        show_default=False,
    ),
]
CpusPerPointOpt = Annotated[float, typer.Option("--cpus-per-point", help="CPUs each point's Ray task reserves.")]
GpusPerPointOpt = Annotated[
    float, typer.Option("--gpus-per-point", help="GPUs each point's Ray task reserves (fractions share a GPU).")
]


@command
def sweep_command(
    model: ModelArg,
    data_dir: DataOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Results folder.")] = Path("results"),
    patterns: Annotated[str, typer.Option("--patterns", help="Comma-separated patterns.")] = ",".join(pattern_names()),
    sparsities: SparsitiesOpt = None,
    speedups: SpeedupsOpt = None,
    allocation: AllocationOpt = SweepOptions.allocation,
    sensitivity_images: SensitivityImagesOpt = SweepOptions.sensitivity_images,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated fine-tuning seeds per point.")] = "0",
    epochs: EpochsOpt = FinetuneOptions.epochs,
    lr: LrOpt = FinetuneOptions.lr,
    restore_bn: RestoreBnOpt = FinetuneOptions.restore_bn,
    qat_epochs: QatEpochsOpt = FinetuneOptions.qat_epochs,
    distil: Annotated[
        bool, typer.Option("--distil/--no-distil", help="Distil from MODEL (the dense model) while fine-tuning.")
    ] = SweepOptions.distil,
    kd_temperature: KdTemperatureOpt = FinetuneOptions.kd_temperature,
    kd_weight: KdWeightOpt = FinetuneOptions.kd_weight,
    scope: Annotated[str, typer.Option("--scope", help="layer or global.")] = SweepOptions.scope,
    layer_floor: LayerFloorOpt = SweepOptions.layer_floor,
    allow_empty_layers: AllowEmptyOpt = SweepOptions.allow_empty_layers,
    gradual: Annotated[bool, typer.Option("--gradual/--one-shot", help="Prune gradually while fine-tuning.")] = (
        SweepOptions.gradual
    ),
    exclude: ExcludeOpt = None,
    workers: WorkersOpt = SweepOptions.workers,
    executor: ExecutorOpt = SweepOptions.executor,
    address: AddressOpt = SweepOptions.address,
    cpus_per_point: CpusPerPointOpt = SweepOptions.cpus_per_point,
    gpus_per_point: GpusPerPointOpt = SweepOptions.gpus_per_point,
    calibration_images: CalibrationImagesOpt = CalibrationOptions.images,
    eval_limit: EvalLimitOpt = None,
    as_json: JsonOpt = False,
) -> Output:
    """Prune, recalibrate, fine-tune and evaluate (ORT and VTA) every pattern x sparsity; CSV and plots."""
    from gpp_app.sweep import sweep

    check_input_path(model)
    options = SweepOptions(
        patterns=tuple(parse_list(patterns, "--patterns", str, "group,block")),
        sparsities=_sparsities(sparsities, speedups),
        speedups=tuple(parse_list(speedups, "--speedups", float, "1.3,1.5,1.7")) if speedups else (),
        allocation=allocation,
        sensitivity_images=sensitivity_images,
        seeds=tuple(parse_list(seeds, "--seeds", int, "0,1")),
        finetune=FinetuneOptions(
            **dict(epochs=epochs, lr=lr, restore_bn=restore_bn, qat_epochs=qat_epochs),
            **dict(kd_temperature=kd_temperature, kd_weight=kd_weight),
        ),
        **dict(distil=distil, scope=scope, layer_floor=layer_floor, gradual=gradual, exclude=tuple(exclude or ())),
        allow_empty_layers=allow_empty_layers,
        **dict(workers=workers, executor=executor, address=address),
        **dict(cpus_per_point=cpus_per_point, gpus_per_point=gpus_per_point),
        calibration=CalibrationOptions(images=calibration_images),
        eval_limit=eval_limit,
    )
    result = sweep(model, data_dir or default_data_dir(), output, options, _report_point, progress)
    return Output(result.to_dict(), lambda: _print_sweep(result, output))


def _sparsities(sparsities: str | None, speedups: str | None) -> tuple[float, ...]:
    """The sparsity targets: those given, else the defaults unless speedup targets replace them."""
    if sparsities is None:
        return () if speedups else DEFAULT_SPARSITIES
    return tuple(parse_list(sparsities, "--sparsities", float, "0.5,0.7,0.9"))


def _report_point(row) -> None:
    status = row.error or f"after {row.accuracy_after_ort:.2%} (VTA {row.accuracy_after_vta:.2%})"
    stderr.print(f"{row.pattern} {row.target} seed {row.seed}: {status}", markup=False, highlight=False)


@contextmanager
def training_progress(epochs: int) -> Iterator:
    """A progress bar with the running loss and accuracy (on a terminal), as an on_step callback."""
    if not stderr.is_terminal:
        yield lambda *args: None
        return
    columns = (*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%}"))
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: dict[int, object] = {}

        def on_step(epoch: int, step: int, steps: int, loss: float, accuracy: float) -> None:
            if epoch not in tasks:
                tasks[epoch] = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, loss=0.0, acc=0.0)
            bar.update(tasks[epoch], completed=step + 1, loss=loss, acc=accuracy)

        yield on_step
