"""The static program checker, and GEMM micro-op orders that are hazard-free by construction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vta_backend import VTAConfig
from vta_backend.compiler import compile_conv
from vta_backend.isa import GemmInsn, MemInsn, MemType, Opcode, decode_program, decode_uops, encode_uops
from vta_backend.quant import QuantConv
from vta_backend.tiling import CompileError

CONFIG = VTAConfig()
SMALL = VTAConfig(LOG_INP_BUFF_SIZE=10, LOG_WGT_BUFF_SIZE=14, LOG_ACC_BUFF_SIZE=11)


def gemm_row_sequences(program):
    """Per GEMM instruction, the accumulator row of every micro-op execution in order (a plain loop)."""
    dst, _, _ = decode_uops(program.uops, program.config)
    for insn in decode_program(program.binary(), program.config):
        if isinstance(insn, GemmInsn):
            rows = []
            for i in range(insn.iter_out):
                for j in range(insn.iter_in):
                    for u in range(insn.uop_bgn, insn.uop_end):
                        rows.append(int(dst[u]) + i * insn.dst_factor_out + j * insn.dst_factor_in)
            yield rows


@st.composite
def pruned_convs(draw):
    oc, ic = draw(st.integers(1, 48)), draw(st.integers(1, 40))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    h, w = draw(st.integers(kh, 9)), draw(st.integers(kw, 9))  # outputs down to 1x1
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    ot, it = -(-oc // 16), -(-ic // 16)
    kept = rng.random((1, ot, it, kh * kw)) >= draw(st.sampled_from([0.0, 0.5, 0.9]))
    element = kept[0].repeat(16, axis=0)[:oc].repeat(16, axis=1)[:, :ic].reshape(oc, ic, kh, kw)
    weight = np.where(element, rng.integers(1, 128, (oc, ic, kh, kw)), 0).astype(np.int8)
    residual = draw(st.sampled_from([None, 0, 3, -1]))
    conv = QuantConv("conv", weight, stride=(stride, stride), shift=8, kept=kept, residual_shift=residual)
    return conv, (ic, h, w), draw(st.sampled_from([CONFIG, SMALL]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pruned_convs())
def test_no_gemm_writes_an_accumulator_row_twice_within_three_executions(case):
    conv, in_shape, config = case
    try:
        program = compile_conv(conv, in_shape, config)
    except CompileError as exc:
        assert "buffers" in str(exc)  # only a conv too large for the small buffers may be refused
        return
    for rows in gemm_row_sequences(program):
        for t in range(1, len(rows)):
            assert rows[t] not in rows[max(0, t - 2) : t], f"execution {t} writes row {rows[t]} again"


def test_the_checker_refuses_a_gemm_with_a_pipeline_hazard():
    conv = QuantConv("c", np.ones((16, 16, 3, 3), np.int8), pads=(1, 1, 1, 1), shift=8)
    program = compile_conv(conv, (16, 4, 4), CONFIG)
    gemm = next(i for i in program.insns if isinstance(i, GemmInsn) and not i.reset)
    dst, src, wgt = decode_uops(program.uops, CONFIG)
    dst[gemm.uop_bgn : gemm.uop_end] = dst[gemm.uop_bgn]  # every micro-op writes one row, as (tile, position) order did
    tampered = dataclasses.replace(program, uops=encode_uops(dst, src, wgt, CONFIG))
    with pytest.raises(CompileError, match=r"layer c: instruction \d+ GEMM writes accumulator row .* pipeline hazard"):
        tampered.check()


def test_the_checker_refuses_a_load_the_boards_design_does_not_implement():
    conv = QuantConv("c", np.ones((16, 16, 1, 1), np.int8), shift=8)
    program = compile_conv(conv, (16, 4, 4), CONFIG)
    load = next(i for i in program.insns if isinstance(i, MemInsn) and i.memory_type == MemType.INP)
    insns = [dataclasses.replace(i, memory_type=MemType.ACC_8BIT) if i is load else i for i in program.insns]
    with pytest.raises(CompileError, match="ACC_8BIT, which the xilinx-hls design does not implement.*pynq"):
        dataclasses.replace(program, insns=insns).check()


def test_the_checker_refuses_an_index_past_a_buffer():
    conv = QuantConv("c", np.ones((16, 16, 1, 1), np.int8), shift=8)
    program = compile_conv(conv, (16, 4, 4), CONFIG)
    insns = [
        dataclasses.replace(i, sram_base=CONFIG.inp_depth - 1)
        if isinstance(i, MemInsn) and i.opcode == Opcode.LOAD and i.memory_type == MemType.INP
        else i
        for i in program.insns
    ]
    with pytest.raises(CompileError, match=f"INP buffer entry .* past its {CONFIG.inp_depth} entries"):
        dataclasses.replace(program, insns=insns).check()


def test_one_pixel_outputs_are_separated_by_scratch_micro_ops():
    conv = QuantConv("c", np.ones((16, 16, 3, 3), np.int8), pads=(1, 1, 1, 1), shift=8)  # 9 taps, one pixel
    program = compile_conv(conv, (16, 1, 1), CONFIG)
    assert program.stats["gemm_uops_padding"] > 0
    for rows in gemm_row_sequences(program):
        assert all(rows[t] not in rows[max(0, t - 2) : t] for t in range(1, len(rows)))


def test_a_wide_pruned_conv_fits_the_micro_op_buffer_hazard_free():
    """512 channels at 7x7, half the tiles pruned: interleaving output-channel tiles in the micro-op
    list keeps it one entry per tap (covering sub-blocks of pixels instead would need 7 per tap)."""
    rng = np.random.default_rng(0)
    kept = rng.random((1, 32, 32, 9)) >= 0.5
    element = kept[0].repeat(16, axis=0).repeat(16, axis=1).reshape(512, 512, 3, 3)
    weight = np.where(element, rng.integers(1, 128, (512, 512, 3, 3)), 0).astype(np.int8)
    conv = QuantConv("wide", weight, pads=(1, 1, 1, 1), shift=10, kept=kept)
    program = compile_conv(conv, (512, 7, 7), CONFIG)
    assert len(program.uops) <= CONFIG.uop_depth
    for rows in gemm_row_sequences(program):
        assert all(rows[t] not in rows[max(0, t - 2) : t] for t in range(1, len(rows)))
