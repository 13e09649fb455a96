"""Cycle model of a VTA program (simulated figures, not measured on hardware).

VTA's load, compute and store modules each run their own instruction queue in order and
synchronise through dependency-token queues (load->compute, compute->load,
compute->store, store->compute). An instruction that pops a token cannot start before
the instruction that pushed it has finished. Costs per instruction (from ``vta.md``):

* GEMM: 80 cycles + one cycle per micro-op execution (reset included);
* ALU: 46 cycles + one cycle per micro-op execution with an immediate, two with a tensor operand;
* LOAD / STORE: 150 cycles + one cycle per bus beat (bus width of the board), plus one
  cycle per padding element a LOAD writes as zero.

The fixed overheads are those of TVM's fitted cost model; the fetch module is not modelled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vta_backend.config import VTAConfig
from vta_backend.isa import AluInsn, GemmInsn, Insn, MemInsn, MemType, Opcode

GEMM_OVERHEAD = 80
ALU_OVERHEAD = 46
DMA_OVERHEAD = 150

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
        self.cycles += other.cycles
        self.gemm_uops += other.gemm_uops
        self.alu_uops += other.alu_uops
        for key in self.busy:
            self.busy[key] += other.busy[key]
        for key in self.bytes:
            self.bytes[key] += other.bytes[key]


def _beats(nbytes: int, config: VTAConfig) -> int:
    bus_bytes = config.bus_bits // 8
    return -(-nbytes // bus_bytes)


def classify(insn: Insn) -> str:
    """The cost category (and so the module) of an instruction."""
    if isinstance(insn, MemInsn):
        if insn.opcode == Opcode.STORE:
            return "store"
        return {
            MemType.INP: "load_inp",
            MemType.WGT: "load_wgt",
            MemType.ACC: "load_acc",
            MemType.ACC_8BIT: "load_acc",
            MemType.UOP: "load_uop",
        }[insn.memory_type]
    if isinstance(insn, GemmInsn):
        return "gemm"
    if isinstance(insn, AluInsn):
        return "alu"
    return "finish"


def cost(insn: Insn, config: VTAConfig) -> tuple[int, str, int]:
    """(cycles, memory kind, bytes moved) of one instruction."""
    if isinstance(insn, MemInsn):
        elements = insn.y_size * insn.x_size
        kind, elem_bytes = {
            MemType.INP: ("inp", config.inp_vector_bytes),
            MemType.WGT: ("wgt", config.wgt_tile_bytes),
            MemType.ACC: ("acc", config.acc_vector_bytes),
            MemType.ACC_8BIT: ("acc", config.acc_vector_bytes // 4),
            MemType.UOP: ("uop", 4),
            MemType.OUT: ("out", config.BATCH * config.BLOCK_OUT),
        }[insn.memory_type]
        nbytes = elements * elem_bytes
        padding = 0
        if insn.opcode == Opcode.LOAD:
            total = (insn.y_size + insn.y_pad_0 + insn.y_pad_1) * (insn.x_size + insn.x_pad_0 + insn.x_pad_1)
            padding = total - elements
        return DMA_OVERHEAD + _beats(nbytes, config) + padding, kind, nbytes
    if isinstance(insn, GemmInsn):
        return GEMM_OVERHEAD + insn.count, "", 0
    if isinstance(insn, AluInsn):
        return ALU_OVERHEAD + insn.count * (1 if insn.use_imm else 2), "", 0
    return 0, "", 0


def simulate_timing(insns: list[Insn], config: VTAConfig) -> Timing:
    """Run the token protocol over the program in order; returns the simulated cycles.

    Raises ValueError when an instruction pops a token that no earlier instruction pushed
    (the program would deadlock on hardware).
    """
    clock = {"load": 0, "compute": 0, "store": 0}
    queues: dict[tuple[str, str], deque[int]] = {
        (a, b): deque()
        for a, b in (("load", "compute"), ("compute", "load"), ("compute", "store"), ("store", "compute"))
    }
    neighbours = {"load": (None, "compute"), "compute": ("load", "store"), "store": ("compute", None)}
    timing = Timing()
    for index, insn in enumerate(insns):
        category = classify(insn)
        module = MODULE_OF[category]
        prev, nxt = neighbours[module]
        start = clock[module]
        for flag, peer in ((insn.deps.pop_prev, prev), (insn.deps.pop_next, nxt)):
            if flag:
                queue = queues.get((peer, module)) if peer else None
                if not queue:
                    raise ValueError(f"instruction {index} ({category}) pops a token from {peer} that was never pushed")
                start = max(start, queue.popleft())
        cycles, kind, nbytes = cost(insn, config)
        end = start + cycles
        clock[module] = end
        for flag, peer in ((insn.deps.push_prev, prev), (insn.deps.push_next, nxt)):
            if flag:
                if peer is None:
                    raise ValueError(f"instruction {index} ({category}) pushes to a module that does not exist")
                queues[(module, peer)].append(end)
        if category != "finish":
            timing.busy[category] += cycles
        if kind:
            timing.bytes[kind] += nbytes
        if isinstance(insn, GemmInsn) and not insn.reset:
            timing.gemm_uops += insn.count
        elif isinstance(insn, AluInsn):
            timing.alu_uops += insn.count
    leftover = {k: len(q) for k, q in queues.items() if q}
    if leftover:
        raise ValueError(f"tokens left in queues at the end of the program: {leftover}")
    timing.cycles = max(clock.values())
    return timing
