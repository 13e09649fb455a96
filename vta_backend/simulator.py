"""Execute compiled convs with VTA's exact integer semantics, over a whole batch at once.

Two paths give bit-identical results:

* :func:`run_isa` - an interpreter of the encoded program: it decodes the 128-bit
  instructions and 32-bit micro-ops and runs LOAD / GEMM / ALU / STORE as VTA's
  functional simulator does (int8 x int8 products summed into int32 with wrap-around,
  LOAD padding, STORE keeping the low 8 bits). Each memory type has its own DRAM array
  addressed in elements of that type.
* :func:`run_fast` - a tile-level path for real workloads: per output-channel tile it
  gathers only the kept (input-channel tile, kernel position) columns and multiplies
  them with float32 BLAS in chunks of at most 1024 products per sum, which float32
  holds exactly (|sum| <= 2**24), then wraps to int32 and requantizes.

The instruction stream does not depend on the data, so both run every image of the
batch through the same program (VTA runs them one at a time, BATCH = 1).
"""

from __future__ import annotations

import numpy as np

from vta_backend.compiler import Program
from vta_backend.isa import AluInsn, AluOp, GemmInsn, MemInsn, MemType, Opcode, decode_program, decode_uops
from vta_backend.layout import pack_activations, unpack_activations
from vta_backend.quant import requantize

EXACT_F32_TERMS = 1024  # 1024 * 127 * 128 < 2**24


class _Machine:
    """SRAM buffers and DRAM arrays of one program run over a batch."""

    def __init__(self, program: Program, packed_input: np.ndarray) -> None:
        c = program.config
        g = program.geometry
        batch = packed_input.shape[0]
        self.config = c
        self.inp = np.zeros((batch, c.inp_depth, c.BLOCK_IN), np.int8)
        self.wgt = np.zeros((c.wgt_depth, c.BLOCK_OUT, c.BLOCK_IN), np.int8)
        self.acc = np.zeros((batch, c.acc_depth, c.BLOCK_OUT), np.int32)
        self.uop = np.zeros(c.uop_depth, np.uint32)
        self.dram = {
            MemType.INP: packed_input.reshape(batch, -1, c.BLOCK_IN),
            MemType.WGT: program.weights,
            MemType.ACC: program.acc_image,
            MemType.UOP: program.uops,
        }
        self.out = np.zeros((batch, g.oc_tiles * g.out_height * g.out_width, c.BLOCK_OUT), np.int8)

    def load(self, insn: MemInsn) -> None:
        if insn.x_size == 0:
            return
        xtotal = insn.x_pad_0 + insn.x_size + insn.x_pad_1
        ytotal = insn.y_pad_0 + insn.y_size + insn.y_pad_1
        rows = np.arange(insn.y_size)[:, None]
        cols = np.arange(insn.x_size)[None, :]
        src = (insn.dram_base + rows * insn.x_stride + cols).ravel()
        dst = (insn.sram_base + (rows + insn.y_pad_0) * xtotal + insn.x_pad_0 + cols).ravel()
        region = slice(insn.sram_base, insn.sram_base + xtotal * ytotal)
        dram = self.dram[insn.memory_type]
        if insn.memory_type == MemType.INP:
            self.inp[:, region] = 0
            self.inp[:, dst] = dram[:, src]
        elif insn.memory_type == MemType.WGT:
            self.wgt[region] = 0
            self.wgt[dst] = dram[src]
        elif insn.memory_type == MemType.ACC:
            self.acc[:, region] = 0
            self.acc[:, dst] = dram[src]
        elif insn.memory_type == MemType.UOP:
            self.uop[region] = 0
            self.uop[dst] = dram[src]
        else:
            raise ValueError(f"LOAD of memory type {insn.memory_type.name} is not supported")

    def store(self, insn: MemInsn) -> None:
        rows = np.arange(insn.y_size)[:, None]
        cols = np.arange(insn.x_size)[None, :]
        src = (insn.sram_base + rows * insn.x_size + cols).ravel()
        dst = (insn.dram_base + rows * insn.x_stride + cols).ravel()
        self.out[:, dst] = self.acc[:, src].astype(np.int8)  # low 8 bits, no saturation

    def _indices(self, insn: GemmInsn | AluInsn, base: np.ndarray, factor_out: int, factor_in: int) -> np.ndarray:
        """Per micro-op, the buffer indices over the (iter_out, iter_in) loop: [uops, iterations]."""
        i = np.arange(insn.iter_out)[:, None] * factor_out
        j = np.arange(insn.iter_in)[None, :] * factor_in
        return base[:, None] + (i + j).ravel()[None, :]

    def gemm(self, insn: GemmInsn) -> None:
        dst0, src0, wgt0 = decode_uops(self.uop[insn.uop_bgn:insn.uop_end], self.config)
        dst = self._indices(insn, dst0, insn.dst_factor_out, insn.dst_factor_in)
        if insn.reset:
            self.acc[:, dst.ravel()] = 0
            return
        src = self._indices(insn, src0, insn.src_factor_out, insn.src_factor_in)
        wgt = self._indices(insn, wgt0, insn.wgt_factor_out, insn.wgt_factor_in)
        for d, s, w in zip(dst, src, wgt):
            x = self.inp[:, s].astype(np.float32)
            if (w == w[0]).all():
                product = x @ self.wgt[w[0]].astype(np.float32).T
            else:
                product = np.einsum("bni,noi->bno", x, self.wgt[w].astype(np.float32))
            product = product.astype(np.int32)
            if np.unique(d).size == d.size:
                self.acc[:, d] += product
            else:
                np.add.at(self.acc, (slice(None), d), product)

    def alu(self, insn: AluInsn) -> None:
        dst0, src0, _ = decode_uops(self.uop[insn.uop_bgn:insn.uop_end], self.config)
        dst = self._indices(insn, dst0, insn.dst_factor_out, insn.dst_factor_in)
        src = self._indices(insn, src0, insn.src_factor_out, insn.src_factor_in)
        sequential = not insn.use_imm and np.intersect1d(dst, src).size
        if sequential or np.unique(dst).size != dst.size:
            for d, s in zip(dst.ravel(), src.ravel()):  # read-after-write inside the loop: go one by one
                self._alu_apply(insn, np.array([d]), np.array([s]))
        else:
            self._alu_apply(insn, dst.ravel(), src.ravel())

    def _alu_apply(self, insn: AluInsn, dst: np.ndarray, src: np.ndarray) -> None:
        a = self.acc[:, dst]
        b = np.int32(insn.imm) if insn.use_imm else self.acc[:, src]
        op = insn.alu_opcode
        if op == AluOp.ADD:
            result = a + b
        elif op == AluOp.MIN:
            result = np.minimum(a, b)
        elif op == AluOp.MAX:
            result = np.maximum(a, b)
        elif op == AluOp.SHR:
            b = np.broadcast_to(b, a.shape).astype(np.int32)
            result = np.where(b >= 0, a >> np.maximum(b, 0), a << np.maximum(-b, 0))
        else:
            result = a * b
        self.acc[:, dst] = result.astype(np.int32)


def run_isa(program: Program, x: np.ndarray) -> np.ndarray:
    """Interpret the encoded program on int8 input ``[B, C, H, W]``; int8 output ``[B, OC, OH, OW]``."""
    g = program.geometry
    machine = _Machine(program, pack_activations(x, program.config.BLOCK_IN))
    for insn in decode_program(program.binary(), program.config):
        if isinstance(insn, MemInsn):
            machine.load(insn) if insn.opcode == Opcode.LOAD else machine.store(insn)
        elif isinstance(insn, GemmInsn):
            machine.gemm(insn)
        elif isinstance(insn, AluInsn):
            machine.alu(insn)
    packed = machine.out.reshape(x.shape[0], g.oc_tiles, g.out_height, g.out_width, program.config.BLOCK_OUT)
    return unpack_activations(packed, g.out_channels)


def accumulate_fast(program: Program, x: np.ndarray) -> np.ndarray:
    """int32 accumulators ``[B, OC, OH, OW]`` of the kept tiles, computed tile by tile on the host."""
    conv, g, c = program.conv, program.geometry, program.config
    batch = x.shape[0]
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    top, left, bottom, right = conv.pads
    padded = np.zeros((batch, g.ic_tiles * c.BLOCK_IN, g.height + top + bottom, g.width + left + right), np.float32)
    padded[:, :g.in_channels, top:top + g.height, left:left + g.width] = x
    pixels = batch * g.out_height * g.out_width
    # columns[n, p * IT + it, i]: input channel it*BLOCK_IN+i at kernel position p for output pixel n
    columns = np.empty((pixels, g.positions, g.ic_tiles, c.BLOCK_IN), np.float32)
    for p in range(g.positions):
        r, q = (p // g.kw) * dh, (p % g.kw) * dw
        window = padded[:, :, r:r + (g.out_height - 1) * sh + 1:sh, q:q + (g.out_width - 1) * sw + 1:sw]
        columns[:, p] = window.transpose(0, 2, 3, 1).reshape(pixels, g.ic_tiles, c.BLOCK_IN)
    columns = columns.reshape(pixels, g.positions * g.ic_tiles, c.BLOCK_IN)
    out = np.zeros((pixels, g.oc_tiles * c.BLOCK_OUT), np.int64)
    chunk = EXACT_F32_TERMS // c.BLOCK_IN
    for ot in range(g.oc_tiles):
        its, positions = np.nonzero(program.kept[ot])
        if not its.size:
            continue
        # [kept * BLOCK_IN, BLOCK_OUT]: the kept tiles of this oc tile, stacked along the reduction
        weights = program.tiles_f32[ot, its, positions].transpose(0, 2, 1).reshape(-1, c.BLOCK_OUT)
        for k in range(0, its.size, chunk):
            picked = columns[:, positions[k:k + chunk] * g.ic_tiles + its[k:k + chunk]].reshape(pixels, -1)
            part = picked @ weights[k * c.BLOCK_IN:(k + chunk) * c.BLOCK_IN]
            out[:, ot * c.BLOCK_OUT:(ot + 1) * c.BLOCK_OUT] += part.astype(np.int64)
    acc = out[:, :g.out_channels].astype(np.int32)  # wrap to 32 bits, as the int32 accumulator does
    return acc.reshape(batch, g.out_height, g.out_width, g.out_channels).transpose(0, 3, 1, 2)


def run_fast(program: Program, x: np.ndarray) -> np.ndarray:
    """The fast path: int8 output ``[B, OC, OH, OW]``, bit-identical to :func:`run_isa`."""
    return requantize(accumulate_fast(program, x), program.bias_with_rounding, program.shifts,
                      program.conv.relu, channel_axis=1)
