"""The PNG figures: each pruned layer's tile map, and the sweep's accuracy and speedup curves."""

from __future__ import annotations

import math
from pathlib import Path

from gpp_onnx.errors import UserError
from gpp_onnx.files import atomic_path
from gpp_onnx.report import Report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a figure as a PNG atomically (the user's umask decides its mode) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        _pyplot().close(fig)


def plot_tile_maps(report: Report, path: Path) -> None:
    """One panel per layer: rows are output-channel tiles (all groups), columns are
    input-channel tiles x kernel positions."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    rows = [r for r in report.layers if r.kept is not None and r.status != "skipped"]
    if not rows:
        raise UserError("no layer has a tile map to plot")
    cols = min(4, len(rows))
    lines = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 2.6 * lines), squeeze=False)
    for ax in axes.ravel()[len(rows) :]:
        ax.axis("off")
    for ax, row in zip(axes.ravel(), rows):
        g, ot, it, p = row.kept.shape
        image = row.kept.reshape(g * ot, it * p).astype(float)
        ax.imshow(image, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"{row.name[:28]}\n{row.tiles_kept}/{row.tiles_total} tiles kept", fontsize=8)
        ax.set_xlabel(f"ic_tile x position ({it}x{p})", fontsize=7)
        ax.set_ylabel(f"oc_tile ({g * ot})", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(
        f"Kept weight tiles (tile {report.tile}; yellow kept, purple pruned); overall sparsity {report.sparsity:.1%}",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path)


def _curves(rows: list, column: str) -> dict[str, list[tuple[float, float]]]:
    """Per pattern (and recipe, when the rows hold several) the column against the weight sparsity each target
    reached (a layer floor can stop a pattern short of its target), both averaged over seeds."""
    recipes = {r.recipe for r in rows}
    points: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for r in rows:
        if getattr(r, column) is None or r.sparsity_target is None:  # latency-target points: against cycles only
            continue
        label = r.pattern if len(recipes) == 1 else f"{r.pattern} ({r.recipe})"
        reached = r.sparsity_target if r.sparsity_achieved is None else r.sparsity_achieved
        points.setdefault(label, {}).setdefault(r.sparsity_target, []).append((reached, float(getattr(r, column))))
    return {
        label: sorted(tuple(sum(axis) / len(axis) for axis in zip(*seeds)) for seeds in by.values())
        for label, by in points.items()
    }


def plot_sweep(rows: list, dense_accuracy: float, out_dir: Path, title: str) -> None:
    """accuracy.png and speedup.png against sparsity, one line per pattern (``rows``: SweepRow), seeds averaged."""
    plt = _pyplot()
    good = [r for r in rows if not r.error and r.accuracy_after_ort is not None]
    epochs = ", ".join(str(e) for e in sorted({r.epochs for r in good}))
    seeds = len({r.seed for r in good})
    for name, column, ylabel, reference in (
        ("accuracy.png", "accuracy_after_ort", "top-1 accuracy after fine-tuning (ORT fp32)", dense_accuracy),
        ("speedup.png", "vta_speedup", "VTA speedup over dense (simulated cycles)", 1.0),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in _curves(good, column).items():
            ax.plot(*zip(*points), marker="o", label=label)
        ax.axhline(reference, color="gray", linestyle="--", label="dense" if column != "vta_speedup" else "1x")
        ax.set_xlabel("weight sparsity reached")
        ax.set_ylabel(ylabel)
        averaged = f"; mean of {seeds} seeds where run" if seeds > 1 else ""
        ax.set_title(f"{title}\ntest split; fine-tuning epochs: {epochs}{averaged}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out_dir / name)
    plot_accuracy_vs_cycles(good, dense_accuracy, out_dir / "accuracy-vs-cycles.png", title)


def plot_accuracy_vs_cycles(rows: list, dense_accuracy: float, path: Path, title: str) -> None:
    """Accuracy (ORT fp32 and VTA int8) against simulated VTA cycles per image: the Pareto view."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, marker, kind in (("accuracy_after_ort", "o", "ORT fp32"), ("accuracy_after_vta", "x", "VTA int8")):
        by_pattern: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r.vta_cycles is not None and getattr(r, column) is not None:
                label = r.pattern + (", latency target" if getattr(r, "speedup_target", None) is not None else "")
                by_pattern.setdefault(label, []).append((r.vta_cycles, float(getattr(r, column))))
        for pattern, points in by_pattern.items():
            ax.scatter(*zip(*sorted(points)), marker=marker, label=f"{pattern}, {kind}")
    ax.axhline(dense_accuracy, color="gray", linestyle="--", label="dense (ORT fp32)")
    ax.set_xlabel("simulated VTA cycles per image")
    ax.set_ylabel("top-1 accuracy (test split)")
    ax.set_title(f"{title}\naccuracy against simulated latency (every seed a point)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


BUSY_UNITS = {  # the cycle model's categories, grouped as the plot stacks them
    "GEMM": ("gemm",),
    "ALU": ("alu",),
    "input + weight loads": ("load_inp", "load_wgt"),
    "micro-op + accumulator loads": ("load_uop", "load_acc"),
    "stores": ("store",),
}


def _short_name(node: str) -> str:
    """An exporter's node path without its op-type tail: ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0/conv1``."""
    parts = [p for p in node.strip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] in ("Conv", "Relu", "Add"):
        parts = parts[:-1]
    return "/".join(parts[-2:]) or node


def plot_cycles(report, path: Path, title: str) -> None:
    """Per VTA conv (``report``: a ``VtaReport``): the simulated cycles of the dense, this and the
    every-tile-pruned program, and this program's busy cycles by unit (the load, compute and store
    modules overlap, so a stack can exceed the cycles)."""
    plt = _pyplot()
    layers = report.layers
    names = [_short_name(layer.name) for layer in layers]
    x = range(len(layers))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(layers) + 2), 7), sharex=True)
    top.bar(x, [layer.dense_cycles for layer in layers], color="#cccccc", label="dense program")
    top.bar(x, [layer.timing.cycles for layer in layers], width=0.5, color="tab:blue", label="this model")
    floors = [layer.floor_cycles for layer in layers]
    top.scatter(x, floors, marker="_", s=200, color="black", label="every tile pruned")
    top.set_ylabel("simulated cycles per image")
    top.set_title(
        f"{title}\nsimulated on VTA ({report.board}): {report.cycles:,} cycles, {report.speedup:.2f}x the dense "
        f"program;\nbound with every weight tile pruned {report.amdahl_bound:.2f}x",
        fontsize=8,
    )
    top.legend(fontsize=7)
    base = [0.0] * len(layers)
    for unit, categories in BUSY_UNITS.items():
        values = [float(sum(layer.timing.busy[c] for c in categories)) for layer in layers]
        bottom.bar(x, values, bottom=base, label=unit)
        base = [b + v for b, v in zip(base, values)]
    bottom.scatter(x, [layer.timing.cycles for layer in layers], marker="_", s=200, color="black", label="cycles")
    bottom.set_ylabel("busy cycles by unit (modules overlap)")
    bottom.set_xticks(list(x), names, rotation=70, fontsize=7)
    bottom.legend(fontsize=7)
    cpu = [_short_name(p.node) for p in report.not_on_vta]
    if cpu:
        listed = ", ".join(cpu[:8]) + (" ..." if len(cpu) > 8 else "")
        fig.text(0.01, 0.005, f"on the CPU (not drawn): {listed}", fontsize=7)
    for axis in (top, bottom):
        axis.grid(alpha=0.3, axis="y")
    fig.tight_layout(rect=(0, 0.03 if cpu else 0, 1, 1))
    save_figure(fig, path)
