"""The cost of VTA instructions in cycles (simulated figures, not measured on hardware).

The one place the cycle model's constants live; the token-queue simulation
(:mod:`vta_backend.timing`) and the compiler's choice of tiling both price
instructions with these functions. Costs per instruction (from ``vta.md``):

* GEMM: 80 cycles + one cycle per micro-op execution (reset included);
* ALU: 46 cycles + one cycle per micro-op execution with an immediate, two with a tensor operand;
* LOAD / STORE: 150 cycles + one cycle per bus beat (bus width of the board), plus one
  cycle per padding element a LOAD writes as zero.

The fixed overheads are those of TVM's fitted cost model; the fetch module is not modelled.
"""

from __future__ import annotations

from vta_backend.config import VTAConfig
from vta_backend.isa import AluInsn, GemmInsn, Insn, MemInsn, MemType, Opcode

GEMM_OVERHEAD = 80
ALU_OVERHEAD = 46
DMA_OVERHEAD = 150


def gemm_cycles(uops: int) -> int:
    """Cycles of a GEMM instruction that executes ``uops`` micro-ops."""
    return GEMM_OVERHEAD + uops


def alu_cycles(uops: int, tensor_operand: bool) -> int:
    """Cycles of an ALU instruction: ``uops`` executions, two cycles each with a tensor operand."""
    return ALU_OVERHEAD + uops * (2 if tensor_operand else 1)


def bus_beats(nbytes: int, config: VTAConfig) -> int:
    """Bus beats that move ``nbytes`` on the board's memory bus."""
    return -(-nbytes // (config.bus_bits // 8))


def dma_cycles(nbytes: int, config: VTAConfig, padding: int = 0) -> int:
    """Cycles of a LOAD or STORE moving ``nbytes``, plus ``padding`` elements a LOAD writes as zero."""
    return DMA_OVERHEAD + bus_beats(nbytes, config) + padding


def element_bytes(memory_type: MemType, config: VTAConfig) -> tuple[str, int]:
    """(memory kind, bytes per element) of a memory type: what one LOAD / STORE element moves."""
    if memory_type == MemType.INP:
        return "inp", config.inp_vector_bytes
    if memory_type == MemType.WGT:
        return "wgt", config.wgt_tile_bytes
    if memory_type == MemType.ACC:
        return "acc", config.acc_vector_bytes
    if memory_type == MemType.UOP:
        return "uop", 4
    return "out", config.BATCH * config.BLOCK_OUT


def instruction_cost(insn: Insn, config: VTAConfig) -> tuple[int, str, int]:
    """(cycles, memory kind, bytes moved) of one instruction; kind is "" for GEMM, ALU and FINISH."""
    if isinstance(insn, MemInsn):
        kind, size = element_bytes(insn.memory_type, config)
        elements = insn.y_size * insn.x_size
        padding = 0
        if insn.opcode == Opcode.LOAD:
            total = (insn.y_size + insn.y_pad_0 + insn.y_pad_1) * (insn.x_size + insn.x_pad_0 + insn.x_pad_1)
            padding = total - elements
        return dma_cycles(elements * size, config, padding), kind, elements * size
    if isinstance(insn, GemmInsn):
        return gemm_cycles(insn.count), "", 0
    if isinstance(insn, AluInsn):
        return alu_cycles(insn.count, tensor_operand=not insn.use_imm), "", 0
    return 0, "", 0
