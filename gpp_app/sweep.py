"""Sweep patterns x sparsities: prune, recalibrate, fine-tune, evaluate on ONNX Runtime and VTA.

Every point runs the recovery workflow of :mod:`gpp_app.pipeline`, writes its models under
``OUT/points/PATTERN-SPARSITY/`` and its row into ``OUT/results.csv`` as soon as it is done,
so a sweep can be stopped and resumed (points already in the CSV with the same epochs are
skipped) and run over several processes, or as Ray tasks (:mod:`gpp_app.sweep_executors`). A
point that fails is reported in the ``error`` column and the others go on. The plots
``accuracy.png`` (accuracy against sparsity per pattern, dense as a reference line - the paper's
Figure 7) and ``speedup.png`` (simulated VTA speedup) are redrawn at the end.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import get_type_hints

import onnx

from gpp_app import data
from gpp_app.evaluate import RunOptions, check_fits, evaluate
from gpp_app.finetune import FinetuneOptions
from gpp_app.pipeline import (
    check_eval_limit,
    evaluate_on_vta,
    finetune_file,
    prune_file,
    prune_latency_file,
    recalibrate_file,
)
from gpp_app.recalibrate import DEFAULT_RECALIBRATION_IMAGES
from gpp_app.sensitivity import DEFAULT_SENSITIVITY_IMAGES, LatencyAllocation
from gpp_app.sweep_executors import Dispatch, check_executor, dispatcher
from gpp_onnx.annotation import read_kept_tiles
from gpp_onnx.errors import UserError
from gpp_onnx.files import write_text
from gpp_onnx.model_io import load_model
from gpp_onnx.normalization import normalization_for
from gpp_onnx.patterns import pattern_names
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.pruner import PruneOptions, inspect
from gpp_onnx.sensitivity import Sensitivity
from gpp_onnx.weights import check_finite_weights, find_layers
from vta_backend.calibration import CalibrationOptions
from vta_backend.config import VTAConfig
from vta_backend.latency import DEFAULT_ALLOCATION, MEASURED_ALLOCATION, LatencyTarget

DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
_PARSERS = {str: str, float: float, int: lambda text: int(float(text))}  # CSV cell -> field type


@dataclass(frozen=True)
class SweepOptions:
    """The grid and the recipe of a sweep."""

    patterns: tuple[str, ...] = field(default_factory=pattern_names)
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    speedups: tuple[float, ...] = ()  # simulated VTA speedup targets (latency-target allocation), besides sparsities
    allocation: str = DEFAULT_ALLOCATION  # how a speedup target spreads the pruning (vta_backend.latency)
    sensitivity_images: int = DEFAULT_SENSITIVITY_IMAGES  # train images the sensitivity allocation measures on
    seeds: tuple[int, ...] = (0,)
    scope: str = "global"
    exclude: tuple[str, ...] = ()
    layer_floor: float = 0.05  # every layer keeps 5 % of its units: at 90 % global ranking emptied layers
    allow_empty_layers: bool = False  # else every pruned layer keeps at least its best unit
    recalibration_images: int = DEFAULT_RECALIBRATION_IMAGES
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)  # epochs 0: no fine-tuning
    distil: bool = True  # the swept (dense) model is the fine-tuning teacher
    gradual: bool = False  # fine-tune the dense model while pruning gradually (else: one-shot, then fine-tune)
    calibration: CalibrationOptions = CalibrationOptions()
    eval_limit: int | None = None
    workers: int = 1  # local executor: points run in parallel processes
    executor: str = "local"  # local (this process or `workers` processes) or ray (one Ray task per point)
    address: str | None = None  # ray: the cluster to join (None: a local Ray instance for the sweep)
    cpus_per_point: float = 1  # ray: the resources each point's task asks for
    gpus_per_point: float = 0

    @property
    def epochs(self) -> int:
        """Fine-tuning epochs per point."""
        return self.finetune.epochs

    @property
    def recipe(self) -> str:
        """The recovery recipe in a few words (a column of the CSV: rows of other recipes are other points)."""
        tune = self.finetune
        parts = [
            f"{self.scope} floor {self.layer_floor:g}" + (", empty layers allowed" if self.allow_empty_layers else ""),
            f"lr {tune.lr:g}",
            "bn" if tune.restore_bn else "folded bn",
        ]
        if self.distil and tune.kd_weight > 0:
            parts.append(f"kd T{tune.kd_temperature:g} w{tune.kd_weight:g}")
        if self.gradual:
            parts.append(f"gradual until {tune.gradual_until:g}")
        if tune.qat_epochs:
            parts.append(f"qat {tune.qat_epochs}")
        defaults = SweepOptions()
        for name in ("recalibration_images", "eval_limit"):
            if getattr(self, name) != getattr(defaults, name):
                parts.append(f"{name} {getattr(self, name)}")
        if self.calibration != defaults.calibration:
            parts.append(f"calibration {self.calibration.method} on {self.calibration.images} images")
        return ", ".join(parts)

    def point_recipe(self, speedup: float | None) -> str:
        """The recipe of a point: a speedup target's names its allocation where it is not the default."""
        if speedup is None or self.allocation == DEFAULT_ALLOCATION:
            return self.recipe
        default_images = self.sensitivity_images == DEFAULT_SENSITIVITY_IMAGES
        images = "" if default_images else f" on {self.sensitivity_images} images"
        return f"{self.recipe}, {self.allocation} allocation{images}"

    @property
    def points(self) -> list["Point"]:
        """Every point: (pattern, sparsity target, speedup target, seed), one of the targets None."""
        targets = [(s, None) for s in self.sparsities] + [(None, x) for x in self.speedups]
        return [(p, s, x, seed) for p in self.patterns for s, x in targets for seed in self.seeds]

    def pruning(self, pattern: str, sparsity: float) -> PruneOptions:
        """How one point prunes (sparsity 0 where a speedup target sets it)."""
        return PruneOptions(
            sparsity,
            pattern,
            self.scope,
            exclude=self.exclude,
            layer_floor=self.layer_floor,
            allow_empty_layers=self.allow_empty_layers,
        )

    def check(self) -> None:
        """Reject a bad grid or recipe up front, before any point runs."""
        if not self.sparsities and not self.speedups:
            raise UserError("give sparsity targets (--sparsities) or speedup targets (--speedups)")
        for pattern in self.patterns:
            for sparsity in self.sparsities or (0.0,):
                self.pruning(pattern, sparsity).check()
        for speedup in self.speedups:
            LatencyTarget(speedup=speedup).check()
        if self.speedups and self.gradual:
            raise UserError("--gradual ramps a sparsity target; it does not combine with --speedups")
        LatencyAllocation(self.allocation, images=self.sensitivity_images).check_settings()
        if not self.speedups and self.allocation != DEFAULT_ALLOCATION:
            raise UserError("--allocation spreads the pruning of --speedups targets; give --speedups or drop it")
        if self.workers < 1 or self.epochs < 0 or not self.seeds:
            raise UserError("--workers must be 1 or more, --epochs 0 or more, and --seeds name at least one seed")
        if self.gradual and self.epochs == 0:
            raise UserError("--gradual prunes while fine-tuning: give --epochs 1 or more")
        if self.epochs > 0:
            replace(self.finetune, epochs=max(self.epochs, 1)).check()
        check_eval_limit(self.eval_limit)
        self.calibration.check()
        check_executor(self.executor, self.workers, self.address, self.cpus_per_point, self.gpus_per_point)


@dataclass
class SweepRow:
    """One point of the sweep: a row of ``results.csv``."""

    pattern: str
    sparsity_target: float | None
    epochs: int
    seed: int = 0
    recipe: str = ""
    speedup_target: float | None = None  # a latency-target point (then no sparsity target)
    sparsity_achieved: float | None = None
    accuracy_before_ort: float | None = None
    accuracy_recalibrated_ort: float | None = None
    accuracy_after_ort: float | None = None
    accuracy_after_vta: float | None = None
    vta_cycles: int | None = None
    vta_speedup: float | None = None
    error: str = ""

    @property
    def key(self) -> tuple[str, float | None, float | None, int, int, str]:
        """What identifies a point across runs."""
        targets = _rounded(self.sparsity_target), _rounded(self.speedup_target)
        return self.pattern, *targets, self.epochs, self.seed, self.recipe

    @property
    def target(self) -> str:
        """The point's target in words: ``0.7`` or ``1.5x``."""
        return f"{self.speedup_target:g}x" if self.speedup_target is not None else f"{self.sparsity_target:g}"

    def to_dict(self) -> dict[str, object]:
        """JSON form; the CSV has the same columns."""
        return asdict(self)

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> "SweepRow":
        """Read a CSV row back (empty cells are None, or the field's default)."""
        hints = get_type_hints(cls)
        parsers = {f.name: _PARSERS[getattr(hints[f.name], "__args__", (hints[f.name],))[0]] for f in fields(cls)}
        optional = {name for name, hint in hints.items() if type(None) in getattr(hint, "__args__", ())}
        values = {k: parsers[k](v) for k, v in row.items() if k in parsers and v not in (None, "")}
        return cls(**{name: None for name in optional} | values)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


COLUMNS = [  # the CSV's column order (every field of SweepRow)
    "pattern",
    "sparsity_target",
    "speedup_target",
    "sparsity_achieved",
    "epochs",
    "seed",
    "recipe",
    "accuracy_before_ort",
    "accuracy_recalibrated_ort",
    "accuracy_after_ort",
    "accuracy_after_vta",
    "vta_cycles",
    "vta_speedup",
    "error",
]


def read_rows(path: Path) -> list[SweepRow]:
    """The rows of a results CSV (none when it does not exist)."""
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            return [SweepRow.from_csv(row) for row in csv.DictReader(f)]
    except (ValueError, TypeError, KeyError, csv.Error) as exc:
        raise UserError(f"{path} is not a results file of gpp-onnx sweep ({exc}); move it away or fix it") from None


def write_rows(path: Path, rows: list[SweepRow]) -> None:
    """Rewrite the CSV atomically, rows sorted by pattern then sparsity."""
    order = {p: i for i, p in enumerate(pattern_names())}
    rows = sorted(
        rows,
        key=lambda r: (
            order.get(r.pattern, len(order)),
            r.speedup_target or 0.0,
            r.sparsity_target or 0.0,
            r.epochs,
            r.seed,
            r.recipe,
        ),
    )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.to_dict().items()} for row in rows)
    write_text(path, text.getvalue())


Point = tuple[str, float | None, float | None, int]  # pattern, sparsity target, speedup target, seed


def run_point(
    model_path: str, data_path: str, out_dir: str, point: Point, options: SweepOptions, sensitivity: Sensitivity | None
) -> SweepRow:
    """One sweep point (pattern, sparsity or speedup target, seed), in a worker process; never raises:
    failures go into the row's ``error``. ``sensitivity``: the pattern's, for the sensitivity allocation."""
    row = _new_row(point, options)
    recipe = hashlib.sha256(row.recipe.encode()).hexdigest()[:8]  # allocations at one speed: folders of their own
    folder = Path(out_dir) / "points" / f"{row.pattern}-{row.target}-seed{row.seed}-{recipe}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _recover(Path(model_path), Path(data_path), folder, row, (options, sensitivity))
    except Exception as exc:  # a failed point is reported, the sweep goes on
        row.error = _error_text(exc)
        if folder.is_dir():
            write_text(folder / "error.txt", traceback.format_exc())
    return row


def _new_row(point: Point, options: SweepOptions) -> SweepRow:
    """The row of a point, before it runs."""
    pattern, sparsity, speedup, seed = point
    return SweepRow(pattern, sparsity, options.epochs, seed, options.point_recipe(speedup), speedup)


def _error_text(exc: BaseException) -> str:
    """An exception as the ``error`` cell: its type and first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _recover(
    dense: Path, data_path: Path, folder: Path, row: SweepRow, recipe: tuple[SweepOptions, Sensitivity | None]
) -> None:
    """The pipeline for one point: prune, recalibrate, fine-tune, evaluate on ORT and VTA; fills ``row``.
    ``recipe``: the sweep's options and the pattern's measured sensitivity (sensitivity allocation)."""
    options, sensitivity = recipe
    prune_options = options.pruning(row.pattern, row.sparsity_target or 0.0)
    final = dense  # gradual: fine-tuning prunes the dense model itself (no one-shot columns)
    if not options.gradual:
        if row.speedup_target is not None:
            target = LatencyTarget(speedup=row.speedup_target)
            allocation = LatencyAllocation(options.allocation, data_path if sensitivity is not None else None)
            pruned = folder / "pruned.onnx"
            latency_options = dict(allocation=allocation, measured=sensitivity)
            report, _ = prune_latency_file(dense, pruned, target, VTAConfig(), prune_options, **latency_options)
        else:
            report = prune_file(dense, folder / "pruned.onnx", prune_options)
        row.sparsity_achieved = round(report.sparsity, 6)
        final = folder / "recalibrated.onnx"
        recalibrated = recalibrate_file(
            folder / "pruned.onnx", dense, data_path, final, options.recalibration_images, options.eval_limit
        )
        row.accuracy_before_ort, row.accuracy_after_ort = recalibrated.accuracy_before, recalibrated.accuracy_after
        row.accuracy_recalibrated_ort = recalibrated.accuracy_after
    if options.epochs > 0:
        teacher = str(dense) if options.distil else None
        tune = replace(
            options.finetune, seed=row.seed, teacher=teacher, gradual=prune_options if options.gradual else None
        )
        source, final = final, folder / "finetuned.onnx"
        row.accuracy_after_ort = finetune_file(source, data_path, final, tune, options.eval_limit).test_accuracy
        row.sparsity_achieved = round(inspect(final).sparsity, 6)
    vta = evaluate_on_vta(final, data_path, RunOptions(limit=options.eval_limit, calibration=options.calibration))
    row.accuracy_after_vta, row.vta_cycles, row.vta_speedup = vta.accuracy, vta.vta.cycles, round(vta.vta.speedup, 4)


@dataclass
class SweepResult:
    """The dense reference and every row of the results CSV."""

    dense: dict
    rows: list[SweepRow]
    csv: str

    def to_dict(self) -> dict[str, object]:
        """JSON form (the ``sweep --json`` document)."""
        return {"dense": self.dense, "rows": [r.to_dict() for r in self.rows], "csv": self.csv}


def _dense_reference(model_path: Path, data_path: Path, out_dir: Path, eval_limit: int | None) -> dict:
    """The dense model's ORT accuracy, cached in ``dense.json`` for the same evaluation limit."""
    path = out_dir / "dense.json"
    try:
        cached = json.loads(path.read_text()) if path.exists() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        cached = None  # unreadable: measured again and rewritten
    if isinstance(cached, dict) and cached.get("eval_limit") == eval_limit and _is_accuracy(cached.get("accuracy_ort")):
        return cached
    accuracy = evaluate(model_path, data_path, RunOptions(backend="ort", limit=eval_limit)).accuracy
    dense = {"accuracy_ort": accuracy, "eval_limit": eval_limit, "model": str(model_path)}
    write_text(path, json.dumps(dense, indent=2))
    return dense


def _is_accuracy(value: object) -> bool:
    """A number in [0, 1] (a cached accuracy that can be trusted)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def sweep(
    model_path: Path,
    data_path: Path,
    out_dir: Path,
    options: SweepOptions,
    on_point: Callable[[SweepRow], None] = lambda row: None,
    track: Track = no_progress,
) -> SweepResult:
    """Run every missing point; returns the dense reference and all rows (``track``: the progress of
    the sensitivity measurements)."""
    options.check()
    dataset = data.locate(data_path)
    check_sweep_inputs(load_model(model_path).model, dataset, out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    try:
        with _exclusive(out_dir):
            return _sweep(model_path, data_path, dataset, out_dir, options, (on_point, track))
    except BaseException:
        if created and not any(out_dir.iterdir()):  # stopped before anything was written: leave no folder
            out_dir.rmdir()
        raise


def check_sweep_inputs(model: onnx.ModelProto, dataset: data.Dataset, out_dir: Path) -> None:
    """Everything that would fail every point, checked before the results folder is touched: finite
    weights, a valid annotation and normalisation, a prunable layer, one image input that fits the train
    and test images, class scores as output; and a results folder that is a folder in an existing one."""
    check_finite_weights(model)
    read_kept_tiles(model)
    normalization_for(model)
    if not any(layer.skip_reason is None and not layer.is_fc for layer in find_layers(model)):
        raise UserError("the model has no prunable layer (conv, or FC with a constant weight); pass a CNN")
    check_fits(model, dataset, ("train", "test"))
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} is a file; give the path of a results folder")
    if not out_dir.parent.is_dir():
        raise UserError(f"the folder {out_dir.parent} of -o {out_dir} does not exist; create it or choose another")


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold a lock on the folder ``OUT`` itself for the sweep (no lock file is written): a second sweep
    on the same folder is refused, not run twice."""
    try:
        folder = os.open(out_dir, os.O_RDONLY)
    except OSError as exc:
        raise UserError(f"cannot open the results folder {out_dir} ({exc.strerror}); choose another -o") from None
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another gpp-onnx sweep is writing to {out_dir}; wait for it or choose another -o"
            ) from None
        yield
    finally:
        os.close(folder)


def _sweep(
    model_path: Path, data_path: Path, dataset, out_dir: Path, options: SweepOptions, callbacks: tuple
) -> SweepResult:
    """The body of :func:`sweep`, run while holding the folder's lock; ``callbacks``: on_point, track."""
    on_point, track = callbacks
    from gpp_app.plots import plot_sweep

    csv_path = out_dir / "results.csv"
    rows = [r for r in read_rows(csv_path) if not r.error]
    done = {r.key for r in rows}
    todo = [
        (p, s, x, seed)
        for p, s, x, seed in options.points
        if (p, _rounded(s), _rounded(x), options.epochs, seed, options.point_recipe(x)) not in done
    ]
    measured = _sensitivities(model_path, data_path, todo, options, track)
    executor = (options.executor, options.workers, options.address, options.cpus_per_point, options.gpus_per_point)
    with dispatcher(*executor) as dispatch:  # Ray is reached (or refused) before the dense model is evaluated
        dense = _dense_reference(model_path, data_path, out_dir, options.eval_limit)
        for row in _run_points(dispatch, (model_path, data_path, out_dir), todo, (options, measured)):
            rows.append(row)
            write_rows(csv_path, rows)
            on_point(row)
    rows = read_rows(csv_path)
    plot_sweep(rows, dense["accuracy_ort"], out_dir, f"{model_path.name}, {dataset.describe().split(' at ')[0]}")
    return SweepResult(dense, rows, str(csv_path))


def _sensitivities(
    model_path: Path, data_path: Path, todo: list[Point], options: SweepOptions, track: Track
) -> dict[str, Sensitivity]:
    """Pattern -> its measured sensitivity, for the patterns with speedup points still to run under the
    sensitivity allocation: measured once here, not once per point."""
    if options.allocation != MEASURED_ALLOCATION:
        return {}
    model = load_model(model_path)
    allocation = LatencyAllocation(options.allocation, data_path, options.sensitivity_images)
    patterns = dict.fromkeys(p for p, _, speedup, _ in todo if speedup is not None)
    return {p: allocation.sensitivity(model, options.pruning(p, 0.0), VTAConfig(), track) or {} for p in patterns}


def _run_points(
    dispatch: Dispatch, paths: tuple[Path, Path, Path], todo: list[Point], recipe: tuple[SweepOptions, dict]
) -> Iterator[SweepRow]:
    """Rows of the points in ``todo``, as ``dispatch`` finishes them (absolute paths: a Ray worker runs
    elsewhere); a point whose task was lost gets a row with the error. ``paths``: model, data, results
    folder; ``recipe``: the options and the patterns' measured sensitivities."""
    args = tuple(str(path.resolve()) for path in paths)
    options, measured = recipe
    calls = [(*args, point, options, measured.get(point[0]) if point[2] is not None else None) for point in todo]
    for (*_, point, _, _), outcome in dispatch(run_point, calls):
        lost = isinstance(outcome, Exception)
        yield replace(_new_row(point, options), error=_error_text(outcome)) if lost else outcome
