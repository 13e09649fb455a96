"""VTA instruction and micro-op encodings: round trips, the documented bit layout, overflow."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vta_backend import VTAConfig
from vta_backend.isa import (
    AluInsn,
    AluOp,
    Deps,
    FieldOverflow,
    FinishInsn,
    GemmInsn,
    MemInsn,
    MemType,
    Opcode,
    decode,
    decode_uops,
    encode,
    encode_uops,
)

CONFIG = VTAConfig()
deps = st.builds(Deps, st.booleans(), st.booleans(), st.booleans(), st.booleans())
u = lambda bits: st.integers(0, (1 << bits) - 1)  # noqa: E731

mem_insns = st.builds(
    MemInsn,
    st.sampled_from([Opcode.LOAD, Opcode.STORE]),
    st.sampled_from(list(MemType)),
    u(16),
    u(32),
    u(16),
    u(16),
    u(16),
    u(4),
    u(4),
    u(4),
    u(4),
    deps,
)
gemm_insns = st.builds(
    GemmInsn, st.booleans(), u(13), u(14), u(14), u(14), u(11), u(11), u(11), u(11), u(10), u(10), deps
)
alu_insns = st.builds(
    AluInsn,
    st.sampled_from(list(AluOp)),
    st.booleans(),
    st.integers(-(1 << 15), (1 << 15) - 1),
    u(13),
    u(14),
    u(14),
    u(14),
    u(11),
    u(11),
    u(11),
    u(11),
    st.booleans(),
    deps,
)


@given(st.one_of(mem_insns, gemm_insns, alu_insns, st.builds(FinishInsn, deps)))
def test_instruction_round_trip(insn):
    data = encode(insn, CONFIG)
    assert len(data) == 16
    assert decode(data, CONFIG) == insn


@given(st.lists(st.tuples(u(11), u(11), u(10)), min_size=1, max_size=50))
def test_uop_round_trip(rows):
    dst, src, wgt = (np.array(col) for col in zip(*rows))
    words = encode_uops(dst, src, wgt, CONFIG)
    assert words.dtype == np.uint32
    for got, want in zip(decode_uops(words, CONFIG), (dst, src, wgt)):
        np.testing.assert_array_equal(got, want)


def test_documented_bit_positions():
    # GEMM: opcode bits 0-2, pop_prev 3, reset 7, uop_bgn from 8; the second word starts with dst_factor_out.
    insn = GemmInsn(True, 5, 6, 1, 1, 3, 0, 0, 0, deps=Deps(pop_prev=True))
    word = int.from_bytes(encode(insn, CONFIG), "little")
    assert word & 0b111 == Opcode.GEMM and (word >> 3) & 1 == 1 and (word >> 7) & 1 == 1
    assert (word >> 8) & 0x1FFF == 5 and (word >> 64) & 0x7FF == 3
    # LOAD: y_size cannot straddle the 64-bit boundary, so it starts the second word.
    load = MemInsn(Opcode.LOAD, MemType.INP, 1, 2, 7, 9, 11, 1, 2, 3, 4)
    word = int.from_bytes(encode(load, CONFIG), "little")
    assert (word >> 7) & 0b111 == MemType.INP and (word >> 10) & 0xFFFF == 1 and (word >> 26) & 0xFFFFFFFF == 2
    assert (word >> 64) & 0xFFFF == 7 and (word >> 80) & 0xFFFF == 9 and (word >> 96) & 0xFFFF == 11
    assert [(word >> s) & 0xF for s in (112, 116, 120, 124)] == [1, 2, 3, 4]
    # micro-op: accumulator index bits 0-10, input index 11-21, weight index 22-31
    assert int(encode_uops(np.array([1]), np.array([2]), np.array([3]), CONFIG)[0]) == 1 | 2 << 11 | 3 << 22


@pytest.mark.parametrize(
    "insn,field",
    [
        (MemInsn(Opcode.LOAD, MemType.INP, 0, 0, 1, 1 << 16, 1), "x_size"),
        (MemInsn(Opcode.LOAD, MemType.INP, 0, 0, 1, 1, 1, y_pad_0=16), "y_pad_0"),
        (GemmInsn(False, 0, 1, 1 << 14, 1, 0, 0, 0, 0), "iter_out"),
        (AluInsn(AluOp.ADD, True, 1 << 15, 0, 1, 1, 1, 0, 0), "immediate"),
    ],
)
def test_values_that_do_not_fit_are_errors(insn, field):
    with pytest.raises(FieldOverflow, match=field):
        encode(insn, CONFIG)


def test_uop_index_overflow_is_an_error():
    with pytest.raises(FieldOverflow, match="dst index 2048"):
        encode_uops(np.array([2048]), np.array([0]), np.array([0]), CONFIG)
