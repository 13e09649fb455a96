"""PNG heat maps of each pruned layer's tile map (kept tiles light, pruned dark)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from gpp_onnx.errors import UserError
from gpp_onnx.report import Report


def plot_tile_maps(report: Report, path: Path) -> None:
    """One panel per layer: rows are output-channel tiles (all groups), columns are
    input-channel tiles x kernel positions. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); choose a writable location") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
