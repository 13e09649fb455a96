"""Cycle model of a VTA program (simulated figures, not measured on hardware).

VTA's load, compute and store modules each run their own instruction queue in order and
synchronise through dependency-token queues (load->compute, compute->load,
compute->store, store->compute). An instruction that pops a token cannot start before
the instruction that pushed it has finished. What each instruction costs is
:mod:`vta_backend.cost`'s.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vta_backend.config import VTAConfig
from vta_backend.cost import instruction_cost
from vta_backend.isa import AluInsn, GemmInsn, Insn, MemInsn, MemType, Opcode

CATEGORIES = ("load_inp", "load_wgt", "load_acc", "load_uop", "gemm", "alu", "store")
MODULE_OF = {
    "load_inp": "load",
    "load_wgt": "load",
    "load_acc": "compute",
    "load_uop": "compute",
    "gemm": "compute",
    "alu": "compute",
    "store": "store",
    "finish": "compute",
}


@dataclass
class Timing:
    """Simulated cycles of one program."""

    cycles: int = 0
    busy: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("inp", "wgt", "acc", "uop", "out"), 0))
    gemm_uops: int = 0
    alu_uops: int = 0

    @property
    def module_busy(self) -> dict[str, int]:
        """Busy cycles per module (load, compute, store)."""
        totals = {"load": 0, "compute": 0, "store": 0}
        for category, cycles in self.busy.items():
            totals[MODULE_OF[category]] += cycles
        return totals

    @property
    def bound(self) -> str:
        """The module with the most busy cycles: what limits this program."""
        busy = self.module_busy
        return max(busy, key=busy.__getitem__)

    def add(self, other: "Timing") -> None:
        """Accumulate another program's figures (the programs run one after the other)."""
        self.cycles += other.cycles
        self.gemm_uops += other.gemm_uops
        self.alu_uops += other.alu_uops
        for key in self.busy:
            self.busy[key] += other.busy[key]
        for key in self.bytes:
            self.bytes[key] += other.bytes[key]

    def record(self, insn: Insn, category: str, cycles: int, kind: str, nbytes: int) -> None:
        """Count one instruction's busy cycles, bytes moved and micro-ops."""
        if category != "finish":
            self.busy[category] += cycles
        if kind:
            self.bytes[kind] += nbytes
        if isinstance(insn, GemmInsn) and not insn.reset:
            self.gemm_uops += insn.count
        elif isinstance(insn, AluInsn):
            self.alu_uops += insn.count


def classify(insn: Insn) -> str:
    """The cost category (and so the module) of an instruction."""
    if isinstance(insn, MemInsn):
        if insn.opcode == Opcode.STORE:
            return "store"
        return {
            MemType.INP: "load_inp",
            MemType.WGT: "load_wgt",
            MemType.ACC: "load_acc",
            MemType.UOP: "load_uop",
        }[insn.memory_type]
    if isinstance(insn, GemmInsn):
        return "gemm"
    if isinstance(insn, AluInsn):
        return "alu"
    return "finish"


class _TokenQueues:
    """The four dependency-token queues; each token is the cycle its pushing instruction ended."""

    NEIGHBOURS = {"load": (None, "compute"), "compute": ("load", "store"), "store": ("compute", None)}

    def __init__(self) -> None:
        pairs = (("load", "compute"), ("compute", "load"), ("compute", "store"), ("store", "compute"))
        self.queues: dict[tuple[str, str], deque[int]] = {pair: deque() for pair in pairs}

    def start(self, index: int, insn: Insn, category: str, module: str, ready: int) -> int:
        """When the instruction can start: after its module is free and the tokens it pops exist."""
        prev, nxt = self.NEIGHBOURS[module]
        for flag, peer in ((insn.deps.pop_prev, prev), (insn.deps.pop_next, nxt)):
            if flag:
                queue = self.queues.get((peer, module)) if peer else None
                if not queue:
                    raise ValueError(f"instruction {index} ({category}) pops a token from {peer} that was never pushed")
                ready = max(ready, queue.popleft())
        return ready

    def push(self, index: int, insn: Insn, category: str, module: str, end: int) -> None:
        """Push the instruction's tokens, stamped with its end cycle."""
        prev, nxt = self.NEIGHBOURS[module]
        for flag, peer in ((insn.deps.push_prev, prev), (insn.deps.push_next, nxt)):
            if flag:
                if peer is None:
                    raise ValueError(f"instruction {index} ({category}) pushes to a module that does not exist")
                self.queues[(module, peer)].append(end)

    def check_empty(self) -> None:
        """Every token pushed was popped (raises ValueError otherwise)."""
        leftover = {k: len(q) for k, q in self.queues.items() if q}
        if leftover:
            raise ValueError(f"tokens left in queues at the end of the program: {leftover}")


def simulate_timing(insns: list[Insn], config: VTAConfig) -> Timing:
    """Run the token protocol over the program in order; returns the simulated cycles.

    Raises ValueError when an instruction pops a token that no earlier instruction pushed
    (the program would deadlock on hardware).
    """
    clock = {"load": 0, "compute": 0, "store": 0}
    tokens = _TokenQueues()
    timing = Timing()
    for index, insn in enumerate(insns):
        category = classify(insn)
        module = MODULE_OF[category]
        start = tokens.start(index, insn, category, module, clock[module])
        cycles, kind, nbytes = instruction_cost(insn, config)
        clock[module] = start + cycles
        tokens.push(index, insn, category, module, clock[module])
        timing.record(insn, category, cycles, kind, nbytes)
    tokens.check_empty()
    timing.cycles = max(clock.values())
    return timing
