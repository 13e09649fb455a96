"""Static checks of a compiled VTA program: what a sequential simulator cannot show.

The compiler runs :func:`check_program` on every program it produces:

* **GEMM pipeline hazards.** VTA's HLS design pipelines the GEMM micro-op loop at II = 1 with
  the accumulator dependency declared false, so a GEMM must never write one accumulator row
  twice within :data:`~vta_backend.tiling.HAZARD_DISTANCE` consecutive micro-op executions,
  loop iterations included (TVM's runtime refuses such kernels: ``UopKernel::VerifyDep``).
* **What the board's design implements.** LOADs only of memory types the design loads
  (:data:`vta_backend.config.DESIGN_LOADS`), STOREs only of OUT.
* **Buffer bounds.** Every SRAM index a LOAD, STORE, GEMM or ALU instruction touches lies in its
  buffer, and every micro-op range lies in the micro-ops loaded.
* **Shift amounts.** An immediate SHR stays within the 5-bit signed amount the HLS design reads
  (the compiler splits larger shifts into passes, per-channel shift vectors too).

A failure is a :class:`ProgramCheckError` (a CompileError) naming the layer, the instruction,
the board and the limit.
"""

from __future__ import annotations

import numpy as np

from vta_backend.config import VTAConfig
from vta_backend.isa import AluInsn, AluOp, GemmInsn, Insn, MemInsn, MemType, Opcode, decode_program, decode_uops
from vta_backend.tiling import HAZARD_DISTANCE, SHR_RANGE, CompileError


class ProgramCheckError(CompileError):
    """A compiled program breaks a rule the hardware needs (a compiler fault, never retried)."""


def executed_rows(insn: GemmInsn | AluInsn, dst: np.ndarray) -> np.ndarray:
    """The accumulator row of every micro-op execution, in execution order (outer loop, inner loop, list)."""
    i = np.arange(insn.iter_out, dtype=np.int64)[:, None, None] * insn.dst_factor_out
    j = np.arange(insn.iter_in, dtype=np.int64)[None, :, None] * insn.dst_factor_in
    return (i + j + dst[insn.uop_bgn : insn.uop_end][None, None, :]).ravel()


def first_hazard(rows: np.ndarray) -> int | None:
    """Index of the first execution that writes a row written within the HAZARD_DISTANCE - 1 before it."""
    for distance in range(1, HAZARD_DISTANCE):
        same = np.flatnonzero(rows[distance:] == rows[:-distance])
        if same.size:
            return int(same[0]) + distance
    return None


def _extent(insn: GemmInsn | AluInsn, base: np.ndarray, factor_out: int, factor_in: int) -> int:
    """One past the largest buffer index the instruction reaches through ``base`` and its loops."""
    span = base[insn.uop_bgn : insn.uop_end]
    return int(span.max()) + (insn.iter_out - 1) * factor_out + (insn.iter_in - 1) * factor_in + 1


def _depths(config: VTAConfig) -> dict[MemType, int]:
    return {
        MemType.UOP: config.uop_depth,
        MemType.INP: config.inp_depth,
        MemType.WGT: config.wgt_depth,
        MemType.ACC: config.acc_depth,
        MemType.OUT: config.acc_depth,
    }


def _memory_problem(insn: MemInsn, config: VTAConfig) -> str | None:
    kind = insn.memory_type
    if insn.opcode == Opcode.STORE and kind != MemType.OUT:
        return f"stores memory type {kind.name}; VTA stores only OUT"
    if insn.opcode == Opcode.LOAD and kind.name not in config.loadable:
        return f"loads memory type {kind.name}, which the {config.design} design does not implement"
    size = (insn.y_size + insn.y_pad_0 + insn.y_pad_1) * (insn.x_size + insn.x_pad_0 + insn.x_pad_1)
    depth = _depths(config)[kind]
    if insn.sram_base + size > depth:
        return f"reaches {kind.name} buffer entry {insn.sram_base + size - 1}, past its {depth} entries"
    return None


def _compute_problem(
    insn: GemmInsn | AluInsn, uops: tuple[np.ndarray, ...], loaded: int, config: VTAConfig
) -> str | None:
    if not 0 <= insn.uop_bgn < insn.uop_end <= loaded:
        return f"runs micro-ops [{insn.uop_bgn}, {insn.uop_end}) of the {loaded} loaded"
    if insn.count == 0:
        return None
    dst, src, wgt = uops
    reach = [("accumulator", _extent(insn, dst, insn.dst_factor_out, insn.dst_factor_in), config.acc_depth)]
    if isinstance(insn, GemmInsn):
        reach.append(("input", _extent(insn, src, insn.src_factor_out, insn.src_factor_in), config.inp_depth))
        reach.append(("weight", _extent(insn, wgt, insn.wgt_factor_out, insn.wgt_factor_in), config.wgt_depth))
        hazard = first_hazard(executed_rows(insn, dst))
        if hazard is not None:
            return (
                f"GEMM writes accumulator row {executed_rows(insn, dst)[hazard]} again within "
                f"{HAZARD_DISTANCE} consecutive micro-op executions (execution {hazard}), a pipeline hazard"
            )
    elif not insn.use_imm:
        reach.append(("accumulator", _extent(insn, src, insn.src_factor_out, insn.src_factor_in), config.acc_depth))
    elif insn.alu_opcode == AluOp.SHR and not SHR_RANGE[0] <= insn.imm <= SHR_RANGE[1]:
        return f"shifts by {insn.imm}, beyond the SHR amount field's {SHR_RANGE[0]}..{SHR_RANGE[1]}"
    for buffer, extent, depth in reach:
        if extent > depth:
            return f"reaches {buffer} buffer entry {extent - 1}, past its {depth} entries"
    return None


def check_program(name: str, binary: bytes, uop_words: np.ndarray, config: VTAConfig) -> None:
    """Raise CompileError naming the layer, instruction and board when the encoded program (instructions
    ``binary``, micro-op image ``uop_words``) breaks a rule above."""
    insns: list[Insn] = decode_program(binary, config)
    uops = decode_uops(uop_words, config)
    loaded = 0
    for index, insn in enumerate(insns):
        problem = None
        if isinstance(insn, MemInsn):
            problem = _memory_problem(insn, config)
            if insn.opcode == Opcode.LOAD and insn.memory_type == MemType.UOP:
                loaded = max(loaded, insn.sram_base + insn.y_size * insn.x_size)
        elif isinstance(insn, (GemmInsn, AluInsn)):
            problem = _compute_problem(insn, uops, loaded, config)
        if problem is not None:
            raise ProgramCheckError(
                f"layer {name}: instruction {index} {problem}; the {config.BOARD} board cannot run it"
            )
