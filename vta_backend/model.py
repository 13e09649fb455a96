"""Compile every VTA-runnable conv of an ONNX model; summarise and write the programs."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from gpp_onnx.errors import UserError
from vta_backend.config import VTAConfig
from vta_backend.layer import LayerStats, VtaConv
from vta_backend.onnx_import import DEFAULT_ACTIVATION_SHIFT, ConvSite, extract_convs


@dataclass
class CompiledModel:
    config: VTAConfig
    sites: list[ConvSite]
    layers: dict[str, VtaConv]  # node name -> compiled conv
    stats: dict[str, LayerStats]

    def summary(self) -> dict[str, object]:
        """Totals and per-layer figures for one image (all simulated)."""
        stats = list(self.stats.values())
        cycles = sum(s.timing.cycles for s in stats)
        dense = sum(s.dense_cycles for s in stats)
        floor = sum(s.floor_cycles for s in stats)  # every weight tile pruned: what pruning cannot remove
        return {
            "simulated": True,
            "board": self.config.BOARD,
            "clock_mhz": self.config.clock_mhz,
            "cycles": cycles,
            "simulated_ms": cycles / (self.config.clock_mhz * 1e3),
            "gemm_uops": sum(s.timing.gemm_uops for s in stats),
            "gemm_uops_skipped": sum(s.gemm_uops_skipped for s in stats),
            "dense_cycles": dense,
            "speedup": dense / cycles if cycles else 1.0,
            "amdahl_bound": dense / floor if floor else 1.0,
            "bytes": {k: sum(s.timing.bytes[k] for s in stats) for k in ("inp", "wgt", "acc", "uop", "out")},
            "layers": [s.to_dict() for s in stats],
            "not_on_vta": [{"node": site.node, "reason": site.reason} for site in self.sites if site.conv is None],
        }


def compile_model(
    model: onnx.ModelProto,
    config: VTAConfig,
    input_shape: tuple[int, ...] | None = None,
    activation_shifts: Mapping[str, int] | None = None,
    per_channel: bool = False,
    default_shift: int = DEFAULT_ACTIVATION_SHIFT,
    track: Callable[[Iterable, str, int], Iterable] = lambda items, description, total: items,
) -> CompiledModel:
    sites = extract_convs(model, config, input_shape, activation_shifts, per_channel, default_shift)
    runnable = [s for s in sites if s.conv is not None]
    if not runnable:
        raise UserError("the model has no Conv that VTA can run; pass a CNN with 2-D float Conv layers")
    layers, stats = {}, {}
    for site in track(runnable, "compiling", len(runnable)):
        assert site.conv is not None and site.in_shape is not None
        layer = VtaConv.compile(site.conv, site.in_shape, config)
        layers[site.node] = layer
        stats[site.node] = layer.stats()
    return CompiledModel(config, sites, layers, stats)


def _file_stem(index: int, name: str) -> str:
    return f"{index:03d}_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "conv")


def write_programs(compiled: CompiledModel, out_dir: Path) -> list[str]:
    """Write per conv (and group) the instruction, micro-op, weight and bias binaries plus summary.json.

    Files are written to a temporary folder first and moved into ``out_dir`` one by one.
    """
    out_dir.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gpp-compile.", dir=out_dir))
    written = []
    try:
        summary = compiled.summary()
        files = {}
        for i, layer in enumerate(compiled.layers.values()):
            for program in layer.programs:
                stem = _file_stem(i, program.name)
                for suffix, data in (
                    (".insn.bin", program.binary()),
                    (".uop.bin", program.uops.tobytes()),
                    (".wgt.bin", program.weights.tobytes()),
                    (".acc.bin", program.acc_image.tobytes()),
                ):
                    (tmp / (stem + suffix)).write_bytes(data)
                    written.append(stem + suffix)
                files[program.name] = {
                    "stem": stem,
                    "instructions": len(program.insns),
                    "uops": len(program.uops),
                    "weight_tiles": len(program.weights),
                    "tiling": vars(program.tiling),
                }
        summary["files"] = files
        summary["config"] = compiled.config.to_dict()
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        written.append("summary.json")
        for name in written:
            os.replace(tmp / name, out_dir / name)
    except OSError as exc:
        raise UserError(f"cannot write to {out_dir} ({exc.strerror or exc}); choose a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
