"""Sweep patterns x sparsities: prune, recalibrate, fine-tune, evaluate on ONNX Runtime and VTA.

Every point runs the recovery workflow of :mod:`gpp_app.pipeline`, writes its models under
``OUT/points/PATTERN-SPARSITY/`` and its row into ``OUT/results.csv`` as soon as it is done,
so a sweep can be stopped and resumed (points already in the CSV with the same epochs are
skipped) and run over several processes. A point that fails is reported in the ``error``
column and the others go on. The plots ``accuracy.png`` (accuracy against sparsity per
pattern, dense as a reference line - the paper's Figure 7) and ``speedup.png`` (simulated
VTA speedup) are redrawn at the end.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import get_type_hints

from gpp_app import data
from gpp_app.evaluate import RunOptions, evaluate
from gpp_app.finetune import FinetuneOptions
from gpp_app.pipeline import check_eval_limit, evaluate_on_vta, finetune_file, prune_file, recalibrate_file
from gpp_app.recalibrate import DEFAULT_RECALIBRATION_IMAGES
from gpp_onnx.errors import UserError
from gpp_onnx.files import write_text
from gpp_onnx.model_io import load_model
from gpp_onnx.patterns import pattern_names
from gpp_onnx.pruner import PruneOptions, inspect
from vta_backend.calibration import CalibrationOptions

DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
_PARSERS = {str: str, float: float, int: lambda text: int(float(text))}  # CSV cell -> field type


@dataclass(frozen=True)
class SweepOptions:
    """The grid and the recipe of a sweep."""

    patterns: tuple[str, ...] = field(default_factory=pattern_names)
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    seeds: tuple[int, ...] = (0,)
    scope: str = "global"
    exclude: tuple[str, ...] = ()
    layer_floor: float = 0.05  # every layer keeps 5 % of its units: at 90 % global ranking emptied layers
    recalibration_images: int = DEFAULT_RECALIBRATION_IMAGES
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)  # epochs 0: no fine-tuning
    distil: bool = True  # the swept (dense) model is the fine-tuning teacher
    gradual: bool = False  # fine-tune the dense model while pruning gradually (else: one-shot, then fine-tune)
    calibration: CalibrationOptions = CalibrationOptions()
    eval_limit: int | None = None
    workers: int = 1

    @property
    def epochs(self) -> int:
        """Fine-tuning epochs per point."""
        return self.finetune.epochs

    @property
    def recipe(self) -> str:
        """The recovery recipe in a few words (a column of the CSV: rows of other recipes are other points)."""
        tune = self.finetune
        parts = [
            f"{self.scope} floor {self.layer_floor:g}",
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
        for name in ("recalibration_images", "calibration", "eval_limit"):
            if getattr(self, name) != getattr(defaults, name):
                parts.append(f"{name} {getattr(self, name)}")
        return ", ".join(parts)

    def check(self) -> None:
        """Reject a bad grid or recipe up front, before any point runs."""
        for pattern in self.patterns:
            for sparsity in self.sparsities:
                PruneOptions(sparsity, pattern, self.scope, exclude=self.exclude, layer_floor=self.layer_floor).check()
        if self.workers < 1 or self.epochs < 0 or not self.seeds:
            raise UserError("--workers must be 1 or more, --epochs 0 or more, and --seeds name at least one seed")
        if self.gradual and self.epochs == 0:
            raise UserError("--gradual prunes while fine-tuning: give --epochs 1 or more")
        if self.epochs > 0:
            replace(self.finetune, epochs=max(self.epochs, 1)).check()
        check_eval_limit(self.eval_limit)
        self.calibration.check()


@dataclass
class SweepRow:
    """One point of the sweep: a row of ``results.csv``."""

    pattern: str
    sparsity_target: float
    epochs: int
    seed: int = 0
    recipe: str = ""
    sparsity_achieved: float | None = None
    accuracy_before_ort: float | None = None
    accuracy_recalibrated_ort: float | None = None
    accuracy_after_ort: float | None = None
    accuracy_after_vta: float | None = None
    vta_cycles: int | None = None
    vta_speedup: float | None = None
    error: str = ""

    @property
    def key(self) -> tuple[str, float, int, int, str]:
        """What identifies a point across runs."""
        return self.pattern, round(self.sparsity_target, 6), self.epochs, self.seed, self.recipe

    def to_dict(self) -> dict[str, object]:
        """JSON form; the CSV has the same columns."""
        return asdict(self)

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> "SweepRow":
        """Read a CSV row back (empty cells are None)."""
        hints = get_type_hints(cls)
        parsers = {f.name: _PARSERS[getattr(hints[f.name], "__args__", (hints[f.name],))[0]] for f in fields(cls)}
        return cls(**{k: parsers[k](v) for k, v in row.items() if k in parsers and v not in (None, "")})


COLUMNS = [  # the CSV's column order (every field of SweepRow)
    "pattern",
    "sparsity_target",
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
    rows = sorted(rows, key=lambda r: (order.get(r.pattern, len(order)), r.sparsity_target, r.epochs, r.seed, r.recipe))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.to_dict().items()} for row in rows)
    write_text(path, text.getvalue())


def run_point(model_path: str, data_path: str, out_dir: str, point: tuple[str, float, int], options: SweepOptions):
    """One sweep point (pattern, sparsity, seed), in a worker process; never raises: failures go
    into the row's ``error``."""
    pattern, sparsity, seed = point
    row = SweepRow(pattern, sparsity, options.epochs, seed, options.recipe)
    recipe = hashlib.sha256(options.recipe.encode()).hexdigest()[:8]
    folder = Path(out_dir) / "points" / f"{pattern}-{sparsity:g}-seed{seed}-{recipe}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _recover(Path(model_path), Path(data_path), folder, row, options)
    except Exception as exc:  # a failed point is reported, the sweep goes on
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if folder.is_dir():
            write_text(folder / "error.txt", traceback.format_exc())
    return row


def _recover(dense: Path, data_path: Path, folder: Path, row: SweepRow, options: SweepOptions) -> None:
    """The pipeline for one point: prune, recalibrate, fine-tune, evaluate on ORT and VTA; fills ``row``."""
    prune_options = PruneOptions(
        row.sparsity_target, row.pattern, options.scope, exclude=options.exclude, layer_floor=options.layer_floor
    )
    final = dense  # gradual: fine-tuning prunes the dense model itself (no one-shot columns)
    if not options.gradual:
        row.sparsity_achieved = round(prune_file(dense, folder / "pruned.onnx", prune_options).sparsity, 6)
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
    if isinstance(cached, dict) and cached.get("eval_limit") == eval_limit and "accuracy_ort" in cached:
        return cached
    accuracy = evaluate(model_path, data_path, RunOptions(backend="ort", limit=eval_limit)).accuracy
    dense = {"accuracy_ort": accuracy, "eval_limit": eval_limit, "model": str(model_path)}
    write_text(path, json.dumps(dense, indent=2))
    return dense


def sweep(
    model_path: Path,
    data_path: Path,
    out_dir: Path,
    options: SweepOptions,
    on_point: Callable[[SweepRow], None] = lambda row: None,
) -> SweepResult:
    """Run every missing point; returns the dense reference and all rows."""
    options.check()
    load_model(model_path)
    dataset = data.locate(data_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        return _sweep(model_path, data_path, dataset, out_dir, options, on_point)


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold ``OUT/.sweep.lock`` for the sweep: a second sweep on the same folder is refused, not run twice."""
    with open(out_dir / ".sweep.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another gpp-onnx sweep is writing to {out_dir}; wait for it or choose another -o"
            ) from None
        yield


def _sweep(model_path: Path, data_path: Path, dataset, out_dir: Path, options: SweepOptions, on_point) -> SweepResult:
    """The body of :func:`sweep`, run while holding the folder's lock."""
    from gpp_app.plots import plot_sweep

    csv_path = out_dir / "results.csv"
    rows = [r for r in read_rows(csv_path) if not r.error]
    done = {r.key for r in rows}
    dense = _dense_reference(model_path, data_path, out_dir, options.eval_limit)
    todo = [
        (p, s, seed)
        for p in options.patterns
        for s in options.sparsities
        for seed in options.seeds
        if (p, round(s, 6), options.epochs, seed, options.recipe) not in done
    ]
    for row in _run_points(model_path, data_path, out_dir, todo, options):
        rows.append(row)
        write_rows(csv_path, rows)
        on_point(row)
    rows = read_rows(csv_path)
    plot_sweep(rows, dense["accuracy_ort"], out_dir, f"{model_path.name}, {dataset.describe().split(' at ')[0]}")
    return SweepResult(dense, rows, str(csv_path))


def _run_points(model_path: Path, data_path: Path, out_dir: Path, todo: list, options: SweepOptions):
    """Rows of the points in ``todo``, as they finish (in this process, or over ``options.workers``)."""
    args = (str(model_path), str(data_path), str(out_dir))
    if options.workers == 1:
        yield from (run_point(*args, point, options) for point in todo)
        return
    with ProcessPoolExecutor(max_workers=options.workers) as pool:
        futures = [pool.submit(run_point, *args, point, options) for point in todo]
        for future in as_completed(futures):
            yield future.result()
