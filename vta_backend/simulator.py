"""Execute compiled convs with VTA's exact integer semantics, over a whole batch at once.

Two paths give bit-identical results:

* :func:`run_isa` - an interpreter of the encoded program: it decodes the 128-bit
  instructions and 32-bit micro-ops and runs LOAD / GEMM / ALU / STORE as VTA's
  functional simulator does (int8 x int8 products summed into int32 with wrap-around,
  LOAD padding, STORE keeping the low 8 bits). Each memory type has its own DRAM array
  addressed in elements of that type.
* :func:`run_fast` - a tile-level path for real workloads: per output-channel tile it
  gathers only the issued (input-channel tile, kernel position) columns and multiplies
  them with ONNX Runtime's integer GEMM (exact int32), then requantizes.

The instruction stream does not depend on the data, so both run every image of the
batch through the same program (VTA runs them one at a time, BATCH = 1).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vta_backend.compiler import Program
from vta_backend.config import VTAConfig
from vta_backend.isa import AluInsn, AluOp, GemmInsn, MemInsn, MemType, Opcode, decode_program, decode_uops
from vta_backend.quant import requantize, shift_right

_POOL = ThreadPoolExecutor(max_workers=2)
IMAGES_PER_TASK = 64
EXACT_INT32_TILES = 1024  # 1024 tiles * 16 products * 255 * 128 < 2**31
TileGroup = tuple[list[int], np.ndarray, np.ndarray, np.ndarray]  # an entry of Program.tile_groups


class _Machine:
    """SRAM buffers and DRAM arrays of one program run over a batch."""

    def __init__(self, config: VTAConfig, dram: dict[MemType, np.ndarray], out_vectors: int) -> None:
        c = self.config = config
        batch = dram[MemType.INP].shape[0]
        self.inp = np.zeros((batch, c.inp_depth, c.BLOCK_IN), np.int8)
        self.wgt = np.zeros((c.wgt_depth, c.BLOCK_OUT, c.BLOCK_IN), np.int8)
        self.acc = np.zeros((batch, c.acc_depth, c.BLOCK_OUT), np.int32)
        self.uop = np.zeros(c.uop_depth, np.uint32)
        self.dram = dram
        self.out = np.zeros((batch, out_vectors, c.BLOCK_OUT), np.int8)

    def load(self, insn: MemInsn) -> None:
        """LOAD: DRAM region into a buffer, zero padding around it."""
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
        """STORE: accumulator vectors to the output, keeping their low 8 bits."""
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
        """GEMM (or accumulator reset) over the micro-ops and the two-level loop."""
        dst0, src0, wgt0 = decode_uops(self.uop[insn.uop_bgn : insn.uop_end], self.config)
        dst = self._indices(insn, dst0, insn.dst_factor_out, insn.dst_factor_in)
        if insn.reset:
            self.acc[:, dst.ravel()] = 0
            return
        src = self._indices(insn, src0, insn.src_factor_out, insn.src_factor_in)
        wgt = self._indices(insn, wgt0, insn.wgt_factor_out, insn.wgt_factor_in)
        # Micro-ops that write the same accumulator rows (the taps of the same outputs) form one
        # integer GEMM: their input vectors side by side times their weight tiles stacked.
        rows, first = np.unique(dst, axis=0, return_index=True)
        for row in rows[np.argsort(first)]:
            same = np.flatnonzero((dst == row).all(axis=1))
            total = self._dot(src[same], wgt[same])  # int32 [B, iterations, BLOCK_OUT]
            if np.unique(row).size == row.size:
                self.acc[:, row] += total  # int32 addition wraps, as VTA's accumulator does
            else:
                np.add.at(self.acc, (slice(None), row), total)

    def _dot(self, src: np.ndarray, wgt: np.ndarray) -> np.ndarray:
        """sum over micro-ops u of inp[src[u, n]] . wgt[wgt[u, n]]^T, exactly, for every iteration n."""
        batch, (uops, iterations) = self.inp.shape[0], src.shape
        block_in = self.config.BLOCK_IN
        if (wgt == wgt[:, :1]).all():  # one weight tile per micro-op: a single integer GEMM
            items = self.inp.view(np.dtype((np.void, block_in)))[..., 0]  # [B, depth] 16-byte vectors
            columns = np.take(items, src.T, axis=1).view(np.uint8).reshape(batch * iterations, -1) ^ np.uint8(128)
            weights = self.wgt[wgt[:, 0]].transpose(0, 2, 1).reshape(uops * block_in, -1)
            product = _int8_matmul().run(None, {"A": columns, "B": np.ascontiguousarray(weights)})[0]
            return product.reshape(batch, iterations, -1)
        x = self.inp[:, src].astype(np.float32)  # [B, uops, iterations, BLOCK_IN]
        products = np.einsum("buni,unoi->buno", x, self.wgt[wgt].astype(np.float32)).astype(np.int32)
        return products.sum(axis=1, dtype=np.int32)  # each product is 16 terms: exact in float32

    def alu(self, insn: AluInsn) -> None:
        """ALU operation over the micro-ops and the two-level loop."""
        dst0, src0, _ = decode_uops(self.uop[insn.uop_bgn : insn.uop_end], self.config)
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
            result = shift_right(a, b)
        else:
            result = a * b
        self.acc[:, dst] = result.astype(np.int32)


def execute(binary: bytes, dram: dict[MemType, np.ndarray], out_vectors: int, config: VTAConfig) -> np.ndarray:
    """Interpret an encoded program over its DRAM images, one per memory type as the program files hold
    them (INP int8 ``[B, vectors, BLOCK_IN]`` per image; UOP, WGT and ACC shared).

    Returns the OUT buffer, int8 ``[B, out_vectors, BLOCK_OUT]``.
    """
    machine = _Machine(config, dram, out_vectors)
    for insn in decode_program(binary, config):
        if isinstance(insn, MemInsn):
            machine.load(insn) if insn.opcode == Opcode.LOAD else machine.store(insn)
        elif isinstance(insn, GemmInsn):
            machine.gemm(insn)
        elif isinstance(insn, AluInsn):
            machine.alu(insn)
    return machine.out


def run_isa(program: Program, packed: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """Interpret the encoded program: int8 ``[B, IT, H, W, BLOCK_IN]`` -> int8 ``[B, OT, OH, OW, BLOCK_OUT]``.

    ``residual`` (int8, laid out as the output) is the second operand of a fused Add; it follows
    the input in the input DRAM buffer, and the program's constant input vectors follow both.
    """
    g, c = program.geometry, program.config
    _check_residual(program, residual)
    batch = packed.shape[0]
    inputs = packed.reshape(batch, -1, c.BLOCK_IN)
    if residual is not None:
        inputs = np.concatenate([inputs, residual.reshape(batch, -1, c.BLOCK_IN)], axis=1)
    constants = np.broadcast_to(program.constants, (batch, *program.constants.shape))
    inputs = np.concatenate([inputs, constants], axis=1)
    dram = {
        MemType.INP: inputs,
        MemType.WGT: program.weights,
        MemType.ACC: program.acc_image,
        MemType.UOP: program.uops,
    }
    out = execute(program.binary(), dram, g.output_vectors, c)
    return out.reshape(batch, g.oc_tiles, g.out_height, g.out_width, c.BLOCK_OUT)


@lru_cache(maxsize=1)
def _int8_matmul() -> ort.InferenceSession:
    """ONNX Runtime's MatMulInteger: uint8 A (zero point 128, i.e. int8 + 128) x int8 B -> exact int32."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B", "a_zero"], ["Y"])],
        "int8_matmul",
        [
            helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", "K"]),
            helper.make_tensor_value_info("B", TensorProto.INT8, ["K", "N"]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", "N"])],
        [numpy_helper.from_array(np.array(128, np.uint8), "a_zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the fast path runs two of these at once
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _padded_items(program: Program, x: np.ndarray) -> np.ndarray:
    """The NHWC int8 input zero-padded (space and channels to whole tiles), offset by 128 to uint8,
    as 16-byte items ``[B, Hp, Wp, IT]``: one item is one input-channel tile at one pixel."""
    conv, g, c = program.conv, program.geometry, program.config
    top, left, bottom, right = conv.pads
    batch, hp, wp = x.shape[0], g.height + top + bottom, g.width + left + right
    padded = np.empty((batch, hp, wp, g.ic_tiles * c.BLOCK_IN), np.uint8)
    for frame in (np.s_[:, :top], np.s_[:, top + g.height :], np.s_[:, :, :left], np.s_[:, :, left + g.width :]):
        padded[frame] = 128  # spatial padding: int8 zero
    inside = padded[:, top : top + g.height, left : left + g.width]
    inside[..., g.in_channels :] = 128  # channels padded to whole tiles: int8 zero
    np.bitwise_xor(x.view(np.uint8), 128, out=inside[..., : g.in_channels])  # int8 + 128
    return padded.view(np.dtype((np.void, c.BLOCK_IN)))


def _accumulate(
    program: Program,
    items: np.ndarray,
    images: slice,
    its: np.ndarray,
    positions: np.ndarray,
    weights: np.ndarray,
    width: int,
) -> np.ndarray:
    """int32 ``[pixels, width]``: the issued tile columns of these images times their weight tiles."""
    conv, g, c = program.conv, program.geometry, program.config
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    count = images.stop - images.start
    pixels = count * g.out_height * g.out_width
    if not its.size:
        return np.zeros((pixels, width), np.int32)
    gathered = np.empty((count, g.out_height, g.out_width, its.size), items.dtype)
    for j, (it, p) in enumerate(zip(its, positions)):  # strided copy of one tile column
        r, q = (p // g.kw) * dh, (p % g.kw) * dw
        gathered[..., j] = items[
            images, r : r + (g.out_height - 1) * sh + 1 : sh, q : q + (g.out_width - 1) * sw + 1 : sw, it
        ]
    columns = gathered.view(np.uint8).reshape(pixels, -1)
    session = _int8_matmul()
    acc = None
    for k in range(0, its.size, EXACT_INT32_TILES):  # int32 sums of at most 1024 tiles cannot overflow
        rows = slice(k * c.BLOCK_IN, (k + EXACT_INT32_TILES) * c.BLOCK_IN)
        part = session.run(None, {"A": columns[:, rows], "B": weights[rows]})[0]
        acc = part if acc is None else np.add(acc, part, out=acc)  # int32 addition wraps, as VTA's does
    return acc


def _check_residual(program: Program, residual: np.ndarray | None) -> None:
    if (residual is not None) != (program.conv.residual_shift is not None):
        raise ValueError(f"layer {program.name}: a fused Add needs exactly one residual input")


def run_fast(program: Program, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """The tile-level fast path on channels-last int8 activations: ``[B, H, W, C]`` -> ``[B, OH, OW, OC]``,
    bit-identical to :func:`run_isa`; ``residual`` (int8, like the output) is the other operand of a fused Add.

    One input-channel tile at one pixel is one 16-byte item of the (padded) input, so the issued
    (ic tile, kernel position) columns of every output pixel are strided copies of 16-byte
    items. Output-channel tiles with the same issued set share those columns; each set
    multiplies them with its issued weight tiles in ONNX Runtime's integer GEMM (exact int32
    accumulation) and is requantized exactly as VTA's ALU does. Pruned tiles are neither
    gathered nor multiplied. The work runs on two threads, in tasks of one set and at most
    ``IMAGES_PER_TASK`` images (so the gathered columns stay in cache).
    """
    g, batch = program.geometry, x.shape[0]
    _check_residual(program, residual)
    items = _padded_items(program, x)
    out = np.empty((batch, g.out_height, g.out_width, g.out_channels), np.int8)
    groups = program.tile_groups
    chunks = max(-(-batch // IMAGES_PER_TASK), 2 if len(groups) == 1 and batch > 1 else 1)
    bounds = np.linspace(0, batch, chunks + 1).astype(int)
    tasks = [(group, slice(a, b)) for group in groups for a, b in zip(bounds[:-1], bounds[1:])]
    list(_POOL.map(lambda task: _run_task(program, items, residual, out, *task), tasks))
    return out


def _run_task(
    program: Program, items: np.ndarray, residual: np.ndarray | None, out: np.ndarray, group: TileGroup, images: slice
) -> None:
    """One set of output-channel tiles for some images: accumulate, add the residual, requantize, write ``out``."""
    g, c = program.geometry, program.config
    ots, its, positions, weights = group
    acc = _accumulate(program, items, images, its, positions, weights, len(ots) * c.BLOCK_OUT)
    count = images.stop - images.start
    if residual is not None:
        _add_residual(
            program, acc.reshape(count, g.out_height, g.out_width, len(ots), c.BLOCK_OUT), residual[images], ots
        )
    result = requantize(
        acc, program.bias_with_rounding[ots].ravel(), program.shifts[ots].ravel(), program.conv.relu, channel_axis=-1
    )
    result = result.reshape(count, g.out_height, g.out_width, len(ots) * c.BLOCK_OUT)
    for j, ot in enumerate(ots):  # dropping the padding lanes
        low, high = ot * c.BLOCK_OUT, min((ot + 1) * c.BLOCK_OUT, g.out_channels)
        out[images, :, :, low:high] = result[..., j * c.BLOCK_OUT : j * c.BLOCK_OUT + high - low]


def _add_residual(program: Program, lanes: np.ndarray, residual: np.ndarray, ots: list[int]) -> None:
    """The fused Add: ``lanes`` (int32 ``[B, OH, OW, len(ots), BLOCK_OUT]``) += residual aligned to the accumulator."""
    block_out, channels = program.config.BLOCK_OUT, program.geometry.out_channels
    for j, ot in enumerate(ots):
        low, high = ot * block_out, min((ot + 1) * block_out, channels)
        aligned = shift_right(residual[..., low:high], -program.residual_shifts[ot, : high - low])  # SHR by -align
        np.add(lanes[..., j, : high - low], aligned, out=lanes[..., j, : high - low])
