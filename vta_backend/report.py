"""The simulated figures of a compiled model, typed: totals, per-layer statistics and conv placement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vta_backend.config import VTAConfig
from vta_backend.layer import LayerStats

BYTE_KINDS = ("inp", "wgt", "acc", "uop", "out")


@dataclass(frozen=True)
class Placement:
    """Where one Conv node runs: on VTA, or on the CPU with the reason."""

    node: str
    device: Literal["vta", "cpu"]
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        """``{"node", "device", "reason"}``."""
        return {"node": self.node, "device": self.device, "reason": self.reason}


@dataclass(frozen=True)
class VtaReport:
    """Simulated VTA figures for one image: totals over the VTA convs, each layer, and every conv's placement."""

    board: str
    clock_mhz: float
    cycles: int
    simulated_ms: float
    gemm_uops: int  # every GEMM micro-op executed (the count VTA's simulator profiles)
    gemm_uops_weights: int  # those multiplying conv weight tiles: (1 - sparsity) of dense
    gemm_uops_skipped: int
    dense_cycles: int
    speedup: float  # dense cycles / cycles
    amdahl_bound: float  # dense cycles / cycles with every weight tile pruned: the most pruning can give
    bytes: dict[str, int]  # moved per memory kind: inp, wgt, acc, uop, out
    layers: list[LayerStats]
    placement: list[Placement]  # every Conv node in graph order

    @classmethod
    def of(cls, config: VTAConfig, layers: list[LayerStats], placement: list[Placement]) -> "VtaReport":
        """Sum the layers' figures."""
        cycles = sum(s.timing.cycles for s in layers)
        dense = sum(s.dense_cycles for s in layers)
        floor = sum(s.floor_cycles for s in layers)  # every weight tile pruned: what pruning cannot remove
        return cls(
            board=config.BOARD,
            clock_mhz=config.clock_mhz,
            cycles=cycles,
            simulated_ms=cycles / (config.clock_mhz * 1e3),
            gemm_uops=sum(s.timing.gemm_uops for s in layers),
            gemm_uops_weights=sum(s.gemm_uops_weights for s in layers),
            gemm_uops_skipped=sum(s.gemm_uops_skipped for s in layers),
            dense_cycles=dense,
            speedup=dense / cycles if cycles else 1.0,
            amdahl_bound=dense / floor if floor else 1.0,
            bytes={k: sum(s.timing.bytes[k] for s in layers) for k in BYTE_KINDS},
            layers=list(layers),
            placement=list(placement),
        )

    @property
    def not_on_vta(self) -> list[Placement]:
        """The convs that stay on the CPU, with their reasons."""
        return [p for p in self.placement if p.device == "cpu"]

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready data; ``simulated`` is always True (no figure is measured on hardware)."""
        return {
            "simulated": True,
            "board": self.board,
            "clock_mhz": self.clock_mhz,
            "cycles": self.cycles,
            "simulated_ms": self.simulated_ms,
            "gemm_uops": self.gemm_uops,
            "gemm_uops_weights": self.gemm_uops_weights,
            "gemm_uops_skipped": self.gemm_uops_skipped,
            "dense_cycles": self.dense_cycles,
            "speedup": self.speedup,
            "amdahl_bound": self.amdahl_bound,
            "bytes": dict(self.bytes),
            "layers": [s.to_dict() for s in self.layers],
            "placement": [p.to_dict() for p in self.placement],
        }
