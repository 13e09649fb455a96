"""A conv layer on VTA: one program per conv group, their execution and their statistics."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vta_backend.compiler import Program, compile_conv
from vta_backend.config import VTAConfig
from vta_backend.layout import pack_activations, unpack_activations
from vta_backend.quant import QuantConv
from vta_backend.simulator import run_fast, run_isa
from vta_backend.timing import Timing, simulate_timing

REQUANTIZATION_PASSES = 3  # SHR, MIN and MAX touch every output vector at least once


@dataclass
class LayerStats:
    """Simulated cost of one conv layer (all groups, one image)."""

    name: str
    timing: Timing
    gemm_uops_weights: int  # executions that multiply conv weight tiles (timing.gemm_uops also counts the residual's)
    gemm_uops_dense: int
    tiles_total: int
    tiles_kept: int
    dense_cycles: int
    floor_cycles: int  # every weight tile pruned: what pruning can never remove
    lower_bound: int  # GEMM micro-ops executed + one-cycle SHR, MIN and MAX per output vector: no program does less
    residual_path: str | None  # how a fused Add reaches the accumulator (None: no fused Add)
    config: VTAConfig

    @property
    def gemm_uops_skipped(self) -> int:
        """Weight-tile GEMM micro-ops the dense program runs and this one does not."""
        return self.gemm_uops_dense - self.gemm_uops_weights

    @property
    def macs(self) -> int:
        """Multiply-accumulates with conv weights executed (padding lanes included)."""
        return self.gemm_uops_weights * self.config.BATCH * self.config.BLOCK_IN * self.config.BLOCK_OUT

    @property
    def tile_sparsity(self) -> float:
        """Fraction of weight tiles not issued."""
        return 1 - self.tiles_kept / self.tiles_total if self.tiles_total else 0.0

    @property
    def speedup(self) -> float:
        """Dense cycles over this program's cycles."""
        return self.dense_cycles / self.timing.cycles

    @property
    def amdahl_bound(self) -> float:
        """The most pruning can give: dense cycles over the cycles left with every weight tile
        pruned (bias loads, requantization ALU ops, stores)."""
        return self.dense_cycles / self.floor_cycles

    def to_dict(self) -> dict[str, object]:
        """The figures as JSON-ready data."""
        t = self.timing
        return {
            "name": self.name,
            "cycles": t.cycles,
            "simulated_ms": t.cycles / (self.config.clock_mhz * 1e3),
            "gemm_uops": t.gemm_uops,
            "gemm_uops_weights": self.gemm_uops_weights,
            "gemm_uops_skipped": self.gemm_uops_skipped,
            "alu_uops": t.alu_uops,
            "macs": self.macs,
            "tiles_total": self.tiles_total,
            "tiles_kept": self.tiles_kept,
            "gemm_utilization": t.gemm_uops / t.cycles if t.cycles else 0.0,
            "busy_cycles": dict(t.busy),
            "bytes": dict(t.bytes),
            "bound": t.bound,
            "dense_cycles": self.dense_cycles,
            "speedup": self.speedup,
            "amdahl_bound": self.amdahl_bound,
            "lower_bound": self.lower_bound,
            "gap_to_lower_bound": t.cycles / self.lower_bound if self.lower_bound else 1.0,
            "residual_path": self.residual_path,
        }


@dataclass
class VtaConv:
    """A QuantConv compiled for one input shape: one program per conv group."""

    conv: QuantConv
    in_shape: tuple[int, int, int]  # (C, H, W)
    programs: list[Program]

    @classmethod
    def compile(cls, conv: QuantConv, in_shape: tuple[int, int, int], config: VTAConfig) -> "VtaConv":
        """Compile every group of ``conv`` for an input of ``in_shape`` = (C, H, W)."""
        c, h, w = in_shape
        group_shape = (c // conv.groups, h, w)
        return cls(conv, in_shape, [compile_conv(conv, group_shape, config, g) for g in range(conv.groups)])

    @property
    def config(self) -> VTAConfig:
        """The configuration the programs were compiled for."""
        return self.programs[0].config

    def run(self, x: np.ndarray, path: str = "fast", residual: np.ndarray | None = None) -> np.ndarray:
        """int8 ``[B, C, H, W]`` -> int8 ``[B, OC, OH, OW]`` on the fast path or the ISA interpreter.

        ``residual`` (int8 ``[B, OC, OH, OW]``) is the other operand of a fused Add.
        """
        if path == "fast":
            res = None if residual is None else np.ascontiguousarray(residual.transpose(0, 2, 3, 1))
            out = self.run_nhwc(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), res)
            return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
        per_group = x.shape[1] // self.conv.groups
        outputs = []
        for g, program in enumerate(self.programs):  # the interpreter works on VTA's packed DRAM layouts
            oc = program.geometry.out_channels
            res = (
                None
                if residual is None
                else pack_activations(residual[:, g * oc : (g + 1) * oc], self.config.BLOCK_OUT)
            )
            packed = run_isa(
                program, pack_activations(x[:, g * per_group : (g + 1) * per_group], self.config.BLOCK_IN), res
            )
            outputs.append(unpack_activations(packed, oc))
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)

    def run_nhwc(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """The fast path on channels-last int8 activations: ``[B, H, W, C]`` -> ``[B, OH, OW, OC]``."""
        per_group = x.shape[3] // self.conv.groups
        outputs = []
        for g, program in enumerate(self.programs):
            oc = program.geometry.out_channels
            x_g = x if self.conv.groups == 1 else np.ascontiguousarray(x[..., g * per_group : (g + 1) * per_group])
            res = residual if residual is None or self.conv.groups == 1 else residual[..., g * oc : (g + 1) * oc]
            outputs.append(run_fast(program, x_g, res))
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=3)

    def timing(self) -> Timing:
        """Simulated cycles of all groups' programs, one after the other."""
        total = Timing()
        for program in self.programs:
            total.add(simulate_timing(program.insns, program.config))
        return total

    def stats(self) -> LayerStats:
        """Simulated cycles, with the dense and the fully pruned variants for comparison."""
        dense, floor = reference_cycles(self.conv, self.in_shape, self.config)
        timing = self.timing()
        requantization = REQUANTIZATION_PASSES * sum(p.geometry.output_vectors for p in self.programs)
        return LayerStats(
            name=self.conv.name,
            timing=timing,
            gemm_uops_weights=sum(p.stats["gemm_uops"] for p in self.programs),
            gemm_uops_dense=sum(p.stats["gemm_uops_dense"] for p in self.programs),
            tiles_total=sum(p.stats["tiles_total"] for p in self.programs),
            tiles_kept=sum(p.stats["tiles_kept"] for p in self.programs),
            dense_cycles=dense,
            floor_cycles=floor,
            lower_bound=timing.gemm_uops + requantization,
            residual_path=self.programs[0].residual_path,
            config=self.config,
        )


def reference_cycles(conv: QuantConv, in_shape: tuple[int, int, int], config: VTAConfig) -> tuple[int, int]:
    """Simulated cycles of ``conv`` with every weight tile issued (dense) and with none (every tile
    pruned: what pruning cannot remove). Cycles do not depend on weight values: all-ones issues
    every tile, all-zeros none."""
    every_tile = replace(conv, weight=np.ones_like(conv.weight), kept=None)
    no_tiles = replace(conv, weight=np.zeros_like(conv.weight), kept=None)
    dense = VtaConv.compile(every_tile, in_shape, config).timing().cycles
    return dense, VtaConv.compile(no_tiles, in_shape, config).timing().cycles
