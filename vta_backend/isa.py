"""VTA instructions and micro-ops, and their binary encodings.

Field order and widths follow ``include/vta/hw_spec.h``: every instruction is 128 bits,
laid out as C bit-fields of ``uint64_t`` (GCC): fields are packed from bit 0 upwards and
a field that would cross a 64-bit boundary starts at the next 64-bit word. Widths of the
index fields derive from the buffer depths of the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from functools import lru_cache

import numpy as np

from gpp_onnx.errors import UserError
from vta_backend.config import VTAConfig


class Opcode(IntEnum):
    """Instruction opcodes (``hw_spec.h``)."""

    LOAD = 0
    STORE = 1
    GEMM = 2
    FINISH = 3
    ALU = 4


class MemType(IntEnum):
    """Memory types of LOAD / STORE; ACC_8BIT loads int8 vectors sign-extended into the accumulator."""

    UOP = 0
    WGT = 1
    INP = 2
    ACC = 3
    OUT = 4
    ACC_8BIT = 5


class AluOp(IntEnum):
    """ALU operations."""

    MIN = 0
    MAX = 1
    ADD = 2
    SHR = 3
    MUL = 4  # fsim only


class FieldOverflow(UserError):
    """A value does not fit its instruction or micro-op field."""


@dataclass
class Deps:
    """Dependency-token flags: pop/push towards the previous and the next module."""

    pop_prev: bool = False
    pop_next: bool = False
    push_prev: bool = False
    push_next: bool = False


@dataclass
class MemInsn:
    """LOAD or STORE of a 2-D strided region, with zero padding on LOAD."""

    opcode: Opcode
    memory_type: MemType
    sram_base: int
    dram_base: int
    y_size: int
    x_size: int
    x_stride: int
    y_pad_0: int = 0
    y_pad_1: int = 0
    x_pad_0: int = 0
    x_pad_1: int = 0
    deps: Deps = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.deps = self.deps or Deps()


@dataclass
class GemmInsn:
    """GEMM over micro-ops [uop_bgn, uop_end) in a two-level loop (or an accumulator reset)."""

    reset: bool
    uop_bgn: int
    uop_end: int
    iter_out: int
    iter_in: int
    dst_factor_out: int
    dst_factor_in: int
    src_factor_out: int
    src_factor_in: int
    wgt_factor_out: int = 0
    wgt_factor_in: int = 0
    deps: Deps = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.deps = self.deps or Deps()

    @property
    def count(self) -> int:
        """Micro-op executions (cycles of the GEMM core)."""
        return self.iter_out * self.iter_in * (self.uop_end - self.uop_bgn)


@dataclass
class AluInsn:
    """ALU operation on accumulator vectors: with an immediate, or with a second accumulator operand."""

    alu_opcode: AluOp
    use_imm: bool
    imm: int
    uop_bgn: int
    uop_end: int
    iter_out: int
    iter_in: int
    dst_factor_out: int
    dst_factor_in: int
    src_factor_out: int = 0
    src_factor_in: int = 0
    reset: bool = False
    deps: Deps = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.deps = self.deps or Deps()

    @property
    def count(self) -> int:
        """Micro-op executions."""
        return self.iter_out * self.iter_in * (self.uop_end - self.uop_bgn)


@dataclass
class FinishInsn:
    """The end of the program."""

    deps: Deps = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.deps = self.deps or Deps()


Insn = MemInsn | GemmInsn | AluInsn | FinishInsn

LOOP_ITER_WIDTH = 14
_HEAD = [("opcode", 3), ("pop_prev", 1), ("pop_next", 1), ("push_prev", 1), ("push_next", 1)]


@dataclass(frozen=True)
class IndexWidths:
    """Bit widths of buffer indices: log2 of each buffer's depth."""

    uop: int
    inp: int
    wgt: int
    acc: int

    @classmethod
    def of(cls, config: VTAConfig) -> "IndexWidths":
        """The widths for a configuration's buffer depths."""
        return cls(*(int(np.log2(d)) for d in (config.uop_depth, config.inp_depth, config.wgt_depth, config.acc_depth)))


def _field_specs(w: IndexWidths) -> dict[Opcode, list[tuple[str, int]]]:
    """(field, width) per opcode, in ``hw_spec.h`` order."""
    loop = [
        ("reset", 1),
        ("uop_bgn", w.uop),
        ("uop_end", w.uop + 1),
        ("iter_out", LOOP_ITER_WIDTH),
        ("iter_in", LOOP_ITER_WIDTH),
    ]
    memory = [
        ("memory_type", 3),
        ("sram_base", 16),
        ("dram_base", 32),
        ("y_size", 16),
        ("x_size", 16),
        ("x_stride", 16),
        ("y_pad_0", 4),
        ("y_pad_1", 4),
        ("x_pad_0", 4),
        ("x_pad_1", 4),
    ]
    gemm = [
        ("dst_factor_out", w.acc),
        ("dst_factor_in", w.acc),
        ("src_factor_out", w.inp),
        ("src_factor_in", w.inp),
        ("wgt_factor_out", w.wgt),
        ("wgt_factor_in", w.wgt),
    ]
    alu = [
        ("dst_factor_out", w.acc),
        ("dst_factor_in", w.acc),
        ("src_factor_out", w.acc),
        ("src_factor_in", w.acc),
        ("alu_opcode", 3),
        ("use_imm", 1),
        ("imm", 16),
    ]
    return {
        Opcode.LOAD: _HEAD + memory,
        Opcode.STORE: _HEAD + memory,
        Opcode.GEMM: _HEAD + loop + gemm,
        Opcode.ALU: _HEAD + loop + alu,
        Opcode.FINISH: list(_HEAD),
    }


@lru_cache(maxsize=None)
def _layouts(w: IndexWidths) -> dict[Opcode, list[tuple[str, int, int]]]:
    """(field, bit offset, width) per opcode, with the no-straddle rule applied."""
    layouts = {}
    for opcode, spec in _field_specs(w).items():
        offset, placed = 0, []
        for name, width in spec:
            if offset // 64 != (offset + width - 1) // 64:
                offset = (offset // 64 + 1) * 64
            placed.append((name, offset, width))
            offset += width
        if offset > 128:
            raise UserError(
                f"VTA config: {opcode.name} instructions need {offset} bits, more than 128; reduce the buffer sizes"
            )
        layouts[opcode] = placed
    return layouts


def _values(insn: Insn) -> tuple[Opcode, dict[str, int]]:
    values = {f.name: getattr(insn, f.name) for f in fields(insn) if f.name != "deps"}
    values.update(
        pop_prev=insn.deps.pop_prev,
        pop_next=insn.deps.pop_next,
        push_prev=insn.deps.push_prev,
        push_next=insn.deps.push_next,
    )
    if isinstance(insn, MemInsn):
        opcode = insn.opcode
    elif isinstance(insn, GemmInsn):
        opcode = Opcode.GEMM
    elif isinstance(insn, AluInsn):
        opcode = Opcode.ALU
    else:
        opcode = Opcode.FINISH
    values["opcode"] = opcode
    return opcode, {k: int(v) for k, v in values.items()}


def encode(insn: Insn, config: VTAConfig) -> bytes:
    """The 16 little-endian bytes of one instruction; a value that does not fit raises FieldOverflow."""
    opcode, values = _values(insn)
    word = 0
    for name, offset, width in _layouts(IndexWidths.of(config))[opcode]:
        value = values.get(name, 0)
        if name == "imm":
            if not -(1 << (width - 1)) <= value < (1 << (width - 1)):
                raise FieldOverflow(f"ALU immediate {value} does not fit in {width} signed bits")
            value &= (1 << width) - 1
        elif not 0 <= value < (1 << width):
            raise FieldOverflow(f"{opcode.name} field {name}={value} does not fit in {width} bits")
        word |= value << offset
    return word.to_bytes(16, "little")


def decode(data: bytes, config: VTAConfig) -> Insn:
    """Inverse of :func:`encode`."""
    word = int.from_bytes(data, "little")
    opcode = Opcode(word & 0b111)
    values = {}
    for name, offset, width in _layouts(IndexWidths.of(config))[opcode]:
        value = (word >> offset) & ((1 << width) - 1)
        if name == "imm" and value >= 1 << (width - 1):
            value -= 1 << width
        values[name] = value
    deps = Deps(*(bool(values.pop(k)) for k in ("pop_prev", "pop_next", "push_prev", "push_next")))
    values.pop("opcode")
    if opcode in (Opcode.LOAD, Opcode.STORE):
        return MemInsn(opcode=opcode, memory_type=MemType(values.pop("memory_type")), deps=deps, **values)
    if opcode == Opcode.GEMM:
        return GemmInsn(reset=bool(values.pop("reset")), deps=deps, **values)
    if opcode == Opcode.ALU:
        return AluInsn(
            alu_opcode=AluOp(values.pop("alu_opcode")),
            use_imm=bool(values.pop("use_imm")),
            reset=bool(values.pop("reset")),
            deps=deps,
            **values,
        )
    return FinishInsn(deps=deps)


def encode_program(insns: list[Insn], config: VTAConfig) -> bytes:
    """The instructions' encodings, concatenated; a value that does not fit raises FieldOverflow."""
    return b"".join(encode(i, config) for i in insns)


def decode_program(data: bytes, config: VTAConfig) -> list[Insn]:
    """Inverse of :func:`encode_program`."""
    return [decode(data[i : i + 16], config) for i in range(0, len(data), 16)]


def uop_fields(config: VTAConfig) -> tuple[int, int, int]:
    """Bit widths of a micro-op's (dst, src, wgt) fields; src indexes the input buffer (GEMM)."""
    w = IndexWidths.of(config)
    src = max(w.inp, w.acc)  # the same field indexes the accumulator for ALU micro-ops
    if w.acc + src + w.wgt > 32:
        raise UserError(f"VTA config: micro-ops need {w.acc + src + w.wgt} bits, more than 32; reduce the buffer sizes")
    return w.acc, src, w.wgt


def encode_uops(dst: np.ndarray, src: np.ndarray, wgt: np.ndarray, config: VTAConfig) -> np.ndarray:
    """Pack micro-op index arrays into uint32 words (dst in the low bits, then src, then wgt)."""
    d_bits, s_bits, w_bits = uop_fields(config)
    for name, values, bits in (("dst", dst, d_bits), ("src", src, s_bits), ("wgt", wgt, w_bits)):
        values = np.asarray(values, np.int64)
        if values.size and (values.min() < 0 or values.max() >= 1 << bits):
            raise FieldOverflow(f"micro-op {name} index {int(values.max())} does not fit in {bits} bits")
    words = (
        np.asarray(dst, np.uint64)
        | (np.asarray(src, np.uint64) << np.uint64(d_bits))
        | (np.asarray(wgt, np.uint64) << np.uint64(d_bits + s_bits))
    )
    return words.astype(np.uint32)


def decode_uops(words: np.ndarray, config: VTAConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_uops`: the (dst, src, wgt) index arrays."""
    d_bits, s_bits, w_bits = uop_fields(config)
    words = np.asarray(words, np.int64)
    return (
        words & ((1 << d_bits) - 1),
        (words >> d_bits) & ((1 << s_bits) - 1),
        (words >> (d_bits + s_bits)) & ((1 << w_bits) - 1),
    )
