"""What every command shares: the error contract, JSON output, progress bars and option parsing."""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import track as rich_track

from gpp_onnx.errors import UserError
from gpp_onnx.model_io import check_output_path
from gpp_onnx.tiles import TileShape

LOG_COLUMNS = 160  # the width of tables written to a file or a CI log (rich would wrap them at 80)


def _width(stream: object) -> int | None:
    """None (the terminal's own width) on a terminal or where COLUMNS says, else LOG_COLUMNS."""
    isatty = getattr(stream, "isatty", None)
    return None if os.environ.get("COLUMNS") or (isatty is not None and isatty()) else LOG_COLUMNS


stdout = Console(width=_width(sys.stdout))
stderr = Console(stderr=True, width=_width(sys.stderr))
T = TypeVar("T")


@dataclass
class Output:
    """What a command produced: the document ``--json`` prints and the human-readable rendering."""

    document: dict
    show: Callable[[], None]
    exit_code: int = 0
    exit_message: str | None = None  # printed on stderr with a nonzero exit_code


def fail(message: str) -> None:
    """Print a one-line error and exit with status 2."""
    stderr.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to flush (e.g. Windows)
        pass


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything printed to stdout, by Python or by C libraries (e.g. the onnx checker's
    warnings), to stderr, so that ``--json`` prints exactly one JSON document on stdout."""
    sys.stdout.flush()
    _flush_c_stdio()
    saved_fd, saved_stream = os.dup(1), sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        saved_stream.flush()  # written through a reference taken before the redirect: goes to stderr too
        _flush_c_stdio()
        sys.stdout = saved_stream
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def command(body: Callable[..., Output]) -> Callable[..., None]:
    """Run a command body: UserError becomes a one-line error with exit status 2; the Output is
    printed as one JSON document (``as_json``) or rendered for people."""

    @wraps(body)
    def wrapper(*args: object, **kwargs: object) -> None:
        as_json = bool(kwargs.get("as_json"))
        try:
            with _stdout_to_stderr() if as_json else nullcontext():
                output = body(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except MemoryError:
            fail("out of memory; use a smaller model, fewer images or a smaller --batch, or free memory")
        except OSError as exc:  # a path the system refuses (name too long, no permission, disk full, ...)
            where = f" ({exc.filename})" if exc.filename else ""
            fail(f"{exc.strerror or exc}{where}; check the paths given and the free space")
        if as_json:
            sys.stdout.write(json.dumps(output.document, indent=2) + "\n")
        else:
            output.show()
        if output.exit_code:
            if output.exit_message:
                stderr.print(output.exit_message, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(output.exit_code)

    return wrapper


def progress(items: Iterable[T], description: str, total: int) -> Iterable[T]:
    """A progress bar on stderr when it is a terminal (pipes and logs stay clean)."""
    if not stderr.is_terminal:
        return items
    return rich_track(items, description=description, total=total, console=stderr, transient=True)


def check_plot_path(plot: Path | None, inputs: list[Path]) -> None:
    """Refuse a --plot path that is not a writable .png beside no input."""
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise UserError(f"--plot {plot} must end in .png")
        check_output_path(plot, inputs)


def parse_tile(text: str | None) -> TileShape | None:
    """``--tile``: ``OUTxIN``, or a VTA config JSON whose BLOCK_OUT x BLOCK_IN is the tile."""
    if text is None:
        return None
    if text.strip().lower().endswith(".json"):
        from vta_backend.config import VTAConfig

        return TileShape.from_config(VTAConfig.from_json(Path(text)))
    return TileShape.parse(text)


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """Three comma-separated numbers (one per colour channel), or None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text!r} is not three numbers separated by commas, e.g. 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise UserError(f"{option} takes three values (one per channel), got {len(values)}")
    return values


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape NxCxHxW``, or None."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--input-shape {text!r} is not positive integers joined by x, e.g. 1x3x32x32")
    return tuple(int(p) for p in parts)


def parse_list(text: str, option: str, convert: Callable[[str], T], example: str) -> list[T]:
    """A comma-separated option value, each item converted; a bad item is a one-line error."""
    try:
        return [convert(item.strip()) for item in text.split(",")]
    except ValueError:
        raise UserError(f"{option} {text!r} is not a comma-separated list, e.g. {example}") from None


def load_vta_config(path: Path | None, board: str | None):
    """The VTA config of ``--vta-config`` (VTA's defaults without it), with ``--board`` applied."""
    from vta_backend.config import VTAConfig

    config = VTAConfig.from_json(path) if path is not None else VTAConfig()
    return replace(config, BOARD=board) if board is not None else config


ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)]
AllowEmptyOpt = Annotated[
    bool,
    typer.Option(
        "--allow-empty-layers",
        help="Let pruning zero a whole layer (by default each keeps its best unit); finetune: with --gradual.",
    ),
]
MeanOpt = Annotated[
    Optional[str], typer.Option("--mean", help="Per-channel mean of pixels in [0, 1] (default: model metadata).")
]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Per-channel std (default: model metadata).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")]
PlotOpt = Annotated[Optional[Path], typer.Option("--plot", help="Write each layer's tile map as a PNG heat map.")]
TileOpt = Annotated[
    Optional[str], typer.Option("--tile", help=f"Tile shape OUTxIN (default {TileShape()}) or a VTA config JSON.")
]
DataOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data",
        help="CIFAR-10 folder (default: $GPP_DATA_DIR/cifar10-jpeg; GPP_DATA_DIR unset: ../shared/data/cifar10-jpeg).",
    ),
]
EvalLimitOpt = Annotated[Optional[int], typer.Option("--eval-limit", help="Test images to report on (default: all).")]
VtaConfigOpt = Annotated[Optional[Path], typer.Option("--vta-config", help="VTA config JSON (vta_config.json).")]
BoardOpt = Annotated[Optional[str], typer.Option("--board", help="pynq, de10nano, ultra96 or zcu104.")]
PerChannelOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--per-channel/--per-tensor",
        help="One power-of-two weight scale per output channel, or one per conv (default: per channel).",
        show_default=False,
    ),
]
AllocationOpt = Annotated[
    str,
    typer.Option(
        "--allocation",
        help="With a latency target: global (the global scope's ranking, pruned until the cycles meet the target), "
        "sensitivity (each layer's loss measured on --data train images, priced in cycles: the most accurate), "
        "layer-share or magnitude (weight magnitude priced in cycles).",
    ),
]
SensitivityImagesOpt = Annotated[
    int, typer.Option("--sensitivity-images", help="Train images (the first) the sensitivity allocation measures on.")
]
