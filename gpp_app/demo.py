"""``gpp-onnx demo``: the main job end to end on the embedded CNN and image sample.

Prune the small CIFAR-10 CNN shipped in ``demo_assets/`` (group pattern, 50 %, the first conv that
stays on the CPU left dense), recalibrate it, compile its convs to VTA programs, run it with the
convs on the VTA simulator beside dense ONNX Runtime, and write the pruned model, the programs, the
plots and ``summary.json`` into one folder. The data are the embedded sample (1,000 test and 500
train images, JPEG) unless a CIFAR-10 folder is given. Everything is computed and written into a
staging folder beside the output first, then moved into place, ``summary.json`` last.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import onnx

from gpp_app import data
from gpp_app.evaluate import EvalResult, RunOptions, calibrate_on_data, evaluate
from gpp_app.plots import plot_cycles, plot_tile_maps
from gpp_app.recalibrate import recalibrate_from_data
from gpp_onnx.errors import UserError
from gpp_onnx.files import publish, staging_folder, temporary_folder, write_text
from gpp_onnx.model_io import check_output_folder, load_model, save_model
from gpp_onnx.normalization import normalization_for
from gpp_onnx.progress import Track, no_progress
from gpp_onnx.pruner import PruneOptions, prune
from gpp_onnx.report import Report
from vta_backend.bundle import write_programs
from vta_backend.calibration import CalibrationOptions
from vta_backend.config import VTAConfig
from vta_backend.latency import cpu_exclusions
from vta_backend.model import compile_model

MODEL_ASSET = "cifar10-cnn.onnx"  # trained by tools/train_demo_model.py
SAMPLE_ASSET = "cifar10-sample.zip"  # first 100 test / 50 train JPEGs of each class of the shared JPEG copy
PRUNING = PruneOptions(sparsity=0.5, pattern="group", scope="global", layer_floor=0.05)
SAMPLE_DESCRIPTION = (
    "the embedded sample of the JPEG copy of CIFAR-10 (100 test and 50 train images per class; "
    "recompressed: pixels differ from the official release)"
)
IMAGES = 500  # train images for recalibration and for VTA's activation scales: the whole embedded train sample
FILES = ("pruned.onnx", "tile-maps.png", "cycles.png", "summary.json", "vta-programs/")


@dataclass
class DemoResult:
    """What the demo measured: the pruning, and the pruned model on VTA (simulated) against dense ORT."""

    output: str
    pruning: Report
    run: EvalResult  # the pruned model, VTA backend; ORT fp32 of it as reference, the dense model as baseline

    def to_dict(self) -> dict[str, object]:
        """JSON form (``demo --json`` and ``summary.json``)."""
        pruning = {"pattern": PRUNING.pattern, "scope": PRUNING.scope, "layer_floor": PRUNING.layer_floor}
        pruning.update(sparsity_target=PRUNING.sparsity, sparsity=self.pruning.sparsity, recalibration_images=IMAGES)
        files = [str(Path(self.output) / name) for name in FILES]
        return {"output": self.output, "pruning": pruning, "run": self.run.to_dict(), "files": files}


@contextmanager
def demo_asset(name: str) -> Iterator[Path]:
    """A file of ``demo_assets/`` as a path."""
    with resources.as_file(resources.files("gpp_app") / "demo_assets" / name) as path:
        if not path.is_file():
            raise UserError(f"the package lacks its demo asset {name}; reinstall gpp-onnx")
        yield path


@contextmanager
def demo_data(data_dir: Path | None) -> Iterator[Path]:
    """``data_dir``, or the embedded sample unpacked into a temporary folder (removed on every exit path)."""
    if data_dir is not None:
        data.locate(data_dir)  # a bad folder fails here, before any work
        yield data_dir
        return
    with ExitStack() as stack:
        archive = stack.enter_context(demo_asset(SAMPLE_ASSET))
        folder = stack.enter_context(temporary_folder("gpp-demo-"))
        with zipfile.ZipFile(archive) as sample:
            sample.extractall(folder)
        yield folder


def _publish_all(staging: Path, output: Path) -> None:
    """Move the staged results into ``output``; ``summary.json`` last, so it always describes the files beside it."""
    output.mkdir(exist_ok=True)
    programs = output / "vta-programs"
    if programs.exists():
        os.replace(programs, staging / "previous-programs")  # removed with the staging folder
    os.replace(staging / "vta-programs", programs)
    for name in ("pruned.onnx", "tile-maps.png", "cycles.png", "summary.json"):
        publish(staging / name, output / name)


def _prune(dense: onnx.ModelProto, config: VTAConfig, track: Track) -> tuple[onnx.ModelProto, Report]:
    """The demo's pruning: convs that stay on the CPU are left dense (pruning them saves no VTA cycle)."""
    options = replace(PRUNING, exclude=cpu_exclusions(dense, config), tile=config)
    return prune(dense, **options.arguments(), track=track)


def run_demo(output: Path, data_dir: Path | None = None, track: Track = no_progress) -> DemoResult:
    """Prune, recalibrate, compile and run the embedded CNN; write the results into ``output``."""
    check_output_folder(output, [])  # before any work
    config = VTAConfig()
    calibration = CalibrationOptions(images=IMAGES)
    with demo_asset(MODEL_ASSET) as dense_path, demo_data(data_dir) as data_path:
        dense = load_model(dense_path).model
        pruned, report = _prune(dense, config, track)
        pruned = recalibrate_from_data(pruned, dense, data_path, IMAGES, track=track)
        options = RunOptions(backend="vta", calibration=calibration, baseline=dense_path, vta_config=config)
        result = evaluate(pruned, data_path, options, track=track)
        dataset = data.locate(data_path)
        shifts, _ = calibrate_on_data(pruned, dataset, normalization_for(pruned), calibration)  # the run's, cached
        compiled = compile_model(pruned, config, activation_shifts=shifts)
        if data_dir is None:
            result.data = SAMPLE_DESCRIPTION
        result.model = str(output / "pruned.onnx")
    demo = DemoResult(str(output), report, result)
    writable = output / "summary.json" if output.is_dir() else output  # the staging folder goes beside this
    with staging_folder(writable) as staging:
        save_model(pruned, staging / "pruned.onnx", external_data=False)
        write_programs(compiled, staging / "vta-programs")
        plot_tile_maps(report, staging / "tile-maps.png")
        title = f"demo CNN, group {PRUNING.sparsity:.0%} ({result.images} images)"
        plot_cycles(result.vta, staging / "cycles.png", title)
        write_text(staging / "summary.json", json.dumps(demo.to_dict(), indent=2) + "\n")
        _publish_all(staging, output)
    return demo
