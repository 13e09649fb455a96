"""Sweep patterns x sparsities: prune, recalibrate, fine-tune, evaluate on ONNX Runtime and VTA.

Every point writes its models under ``OUT/points/PATTERN-SPARSITY/`` and its row into
``OUT/results.csv`` as soon as it is done, so a sweep can be stopped and resumed (points
already in the CSV with the same epochs are skipped) and run over several processes. A
point that fails is reported in the ``error`` column and the others go on. The plots
``accuracy.png`` (accuracy against sparsity per pattern, dense as a reference line - the
paper's Figure 7) and ``speedup.png`` (simulated VTA speedup) are redrawn at the end.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpp_onnx.errors import UserError

COLUMNS = [
    "pattern",
    "sparsity_target",
    "sparsity_achieved",
    "epochs",
    "accuracy_before_ort",
    "accuracy_recalibrated_ort",
    "accuracy_after_ort",
    "accuracy_after_vta",
    "vta_cycles",
    "vta_speedup",
    "error",
]


@dataclass
class SweepOptions:
    patterns: list[str] = field(default_factory=lambda: ["group", "block", "channel", "element"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    epochs: int = 3
    scope: str = "global"
    exclude: list[str] = field(default_factory=list)
    recalibration_images: int = 2000
    calibration_images: int = 2000
    eval_limit: int | None = None
    lr: float = 0.01
    workers: int = 1


def _key(row: dict) -> tuple[str, float, int]:
    return row["pattern"], round(float(row["sparsity_target"]), 6), int(row["epochs"])


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rewrite the CSV atomically, rows sorted by pattern then sparsity."""
    order = {p: i for i, p in enumerate(["group", "block", "channel", "element"])}
    rows = sorted(rows, key=lambda r: (order.get(r["pattern"], 9), float(r["sparsity_target"]), int(r["epochs"])))
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".csv", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in COLUMNS} for row in rows)
    os.replace(tmp, path)


def run_point(model_path: str, data_path: str, out_dir: str, pattern: str, sparsity: float, options: dict) -> dict:
    """One sweep point (in a worker process); never raises: failures go into the row's ``error``."""
    from gpp_onnx.evaluate import RunOptions, evaluate
    from gpp_onnx.finetune import FinetuneOptions, finetune
    from gpp_onnx.model_io import load_model, save_model
    from gpp_onnx.pruner import prune
    from gpp_onnx.recalibrate import recalibrate_from_data

    opts = SweepOptions(**options)
    row = {"pattern": pattern, "sparsity_target": sparsity, "epochs": opts.epochs}
    folder = Path(out_dir) / "points" / f"{pattern}-{sparsity:g}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        dense = load_model(model_path).model
        pruned, report = prune(dense, sparsity, pattern=pattern, scope=opts.scope, exclude=opts.exclude)
        row["sparsity_achieved"] = round(report.sparsity, 6)
        save_model(pruned, folder / "pruned.onnx", external_data=False)
        evaluation = RunOptions(backend="ort", limit=opts.eval_limit)
        row["accuracy_before_ort"] = evaluate(folder / "pruned.onnx", Path(data_path), evaluation)["accuracy"]
        recalibrated = recalibrate_from_data(pruned, dense, data_path, opts.recalibration_images)
        save_model(recalibrated, folder / "recalibrated.onnx", external_data=False)
        row["accuracy_recalibrated_ort"] = evaluate(folder / "recalibrated.onnx", Path(data_path), evaluation)[
            "accuracy"
        ]
        final = folder / "recalibrated.onnx"
        if opts.epochs > 0:
            final = folder / "finetuned.onnx"
            finetune(
                folder / "recalibrated.onnx", Path(data_path), final, FinetuneOptions(epochs=opts.epochs, lr=opts.lr)
            )
        row["accuracy_after_ort"] = evaluate(final, Path(data_path), evaluation)["accuracy"]
        vta = evaluate(
            final,
            Path(data_path),
            RunOptions(backend="vta", limit=opts.eval_limit, calibration_images=opts.calibration_images),
        )
        row["accuracy_after_vta"] = vta["accuracy"]
        row["vta_cycles"] = vta["vta"]["cycles"]
        row["vta_speedup"] = round(vta["vta"]["speedup"], 4)
    except Exception as exc:  # a failed point is reported, the sweep goes on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        (folder / "error.txt").write_text(traceback.format_exc())
    return row


def sweep(
    model_path: Path,
    data_path: Path,
    out_dir: Path,
    options: SweepOptions,
    on_point: Callable[[dict], None] = lambda row: None,
) -> dict:
    """Run every missing point; returns the dense reference and all rows."""
    from gpp_onnx.evaluate import RunOptions, evaluate
    from gpp_onnx.model_io import load_model
    from gpp_onnx.patterns import PATTERNS

    for pattern in options.patterns:
        if pattern not in PATTERNS:
            raise UserError(f"unknown pattern {pattern!r}; use some of {', '.join(PATTERNS)}")
    for sparsity in options.sparsities:
        if not 0 <= sparsity < 1:
            raise UserError(f"sparsity {sparsity} is outside [0, 1)")
    if options.workers < 1 or options.epochs < 0:
        raise UserError("--workers must be 1 or more and --epochs 0 or more")
    load_model(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    rows = read_rows(csv_path)
    done = {_key(r) for r in rows if not r.get("error")}
    rows = [r for r in rows if _key(r) in done]
    dense_path = out_dir / "dense.json"
    dense = json.loads(dense_path.read_text()) if dense_path.exists() else None
    if dense is None or dense.get("eval_limit") != options.eval_limit:
        dense = {
            "accuracy_ort": evaluate(model_path, data_path, RunOptions(backend="ort", limit=options.eval_limit))[
                "accuracy"
            ],
            "eval_limit": options.eval_limit,
            "model": str(model_path),
        }
        dense_path.write_text(json.dumps(dense, indent=2))
    todo = [
        (p, s) for p in options.patterns for s in options.sparsities if (p, round(s, 6), options.epochs) not in done
    ]
    args = (str(model_path), str(data_path), str(out_dir))
    if options.workers == 1:
        results = (run_point(*args, p, s, asdict(options)) for p, s in todo)
        for row in results:
            rows.append(row)
            write_rows(csv_path, rows)
            on_point(row)
    else:
        with ProcessPoolExecutor(max_workers=options.workers) as pool:
            futures = [pool.submit(run_point, *args, p, s, asdict(options)) for p, s in todo]
            for future in as_completed(futures):
                row = future.result()
                rows.append(row)
                write_rows(csv_path, rows)
                on_point(row)
    from gpp_onnx import data

    title = f"{model_path.name}, {data.locate(data_path).describe().split(' at ')[0]}"
    plot_sweep(read_rows(csv_path), dense["accuracy_ort"], out_dir, title)
    return {"dense": dense, "rows": read_rows(csv_path), "csv": str(csv_path)}


def plot_sweep(rows: list[dict], dense_accuracy: float, out_dir: Path, title: str) -> None:
    """accuracy.png and speedup.png against sparsity, one line per pattern (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if not r.get("error") and r.get("accuracy_after_ort") not in (None, "")]
    patterns = list(dict.fromkeys(r["pattern"] for r in good))
    for name, column, ylabel, reference in (
        ("accuracy.png", "accuracy_after_ort", "top-1 accuracy after fine-tuning (ORT fp32)", dense_accuracy),
        ("speedup.png", "vta_speedup", "VTA speedup over dense (simulated cycles)", 1.0),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for pattern in patterns:
            points = sorted(
                (float(r["sparsity_target"]), float(r[column]))
                for r in good
                if r["pattern"] == pattern and r.get(column) not in (None, "")
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=pattern)
        ax.axhline(reference, color="gray", linestyle="--", label="dense" if column != "vta_speedup" else "1x")
        epochs = sorted({r["epochs"] for r in good})
        ax.set_xlabel("target sparsity")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\ntest split; fine-tuning epochs: {', '.join(epochs)}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png", dir=out_dir)
        os.close(fd)
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, out_dir / name)
