"""Compile one quantized conv2d (one conv group) into a VTA program.

The schedule (as TVM's VTA conv2d schedule does it) tiles the output into blocks of
``oc_block`` output-channel tiles x ``rows`` x ``cols`` pixels (:mod:`vta_backend.tiling`
chooses them). For every block and every input-channel tile that has at least one issued
weight tile in the block (a *step*):

* load module: LOAD INP of the input window (spatial padding through the pad fields),
  LOAD WGT of the block's issued weight tiles for that input-channel tile;
* compute module: one GEMM whose micro-ops are the issued tiles (output-channel tile,
  kernel position); ``iter_out`` / ``iter_in`` walk the block's output rows and columns.

Per block the compute module also resets the accumulators, loads the bias vectors
(bias plus rounding constant, and per-channel shifts), and runs the requantization ALU
ops (ADD, SHR, MIN, MAX); the store module writes the int8 block out. Input, weight and
accumulator buffers are split in two halves (double buffering) when they fit, so loads,
GEMMs and stores overlap, synchronised by dependency tokens.

A tile is *issued* when the annotation keeps it and it holds a nonzero weight: pruned
tiles - and tiles that are all zero after quantization - are neither stored in the
weight image, loaded, nor issued as micro-ops. The weight image in DRAM holds the issued
OIHW16o16i tiles in step order (oc block, ic tile, oc tile, kernel position), so each
step's weights are one contiguous LOAD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from gpp_onnx.annotation import check_pruned_tiles_are_zero
from vta_backend.config import VTAConfig
from vta_backend.isa import (
    AluInsn,
    AluOp,
    Deps,
    FieldOverflow,
    FinishInsn,
    GemmInsn,
    Insn,
    MemInsn,
    MemType,
    Opcode,
    encode_program,
    encode_uops,
)
from vta_backend.layout import ceil_div, pack_weights
from vta_backend.quant import QuantConv
from vta_backend.tiling import AccLayout, CompileError, Geometry, Tiling, choose_tiling, geometry, window

PAD_LIMIT = 15  # 4-bit LOAD pad fields


@dataclass
class Program:
    """A compiled conv group: instructions, micro-ops and the DRAM images it reads."""

    name: str
    config: VTAConfig
    conv: QuantConv
    geometry: Geometry
    tiling: Tiling
    insns: list[Insn]
    uops: np.ndarray  # uint32 DRAM image of the micro-ops
    weights: np.ndarray  # int8 [tiles, BLOCK_OUT, BLOCK_IN]: issued tiles in step order
    acc_image: np.ndarray  # int32 [vectors, BLOCK_OUT]: bias+rounding per oc tile, then shifts
    issued: np.ndarray  # bool [OT, IT, P]: tiles issued
    tiles: np.ndarray  # int8 [OT, IT, P, BLOCK_OUT, BLOCK_IN]: the group's packed weight (OIHW16o16i)
    group: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def channels(self) -> slice:
        """The conv's output channels this program computes."""
        return slice(self.group * self.geometry.out_channels, (self.group + 1) * self.geometry.out_channels)

    @cached_property
    def bias_with_rounding(self) -> np.ndarray:
        """int32 per output-channel tile and lane, padding lanes 0: ``[OT, BLOCK_OUT]``."""
        return self._per_lane(self.conv.bias_with_rounding()[self.channels])

    @cached_property
    def residual_shifts(self) -> np.ndarray:
        """Power of two a fused residual is multiplied by, per output-channel tile and lane: ``[OT, BLOCK_OUT]``."""
        return self._per_lane(self.conv.residual_shifts()[self.channels])

    @cached_property
    def shifts(self) -> np.ndarray:
        """Requantization shift per output-channel tile and lane: ``[OT, BLOCK_OUT]``."""
        return self._per_lane(self.conv.shifts()[self.channels])

    def _per_lane(self, values: np.ndarray) -> np.ndarray:
        lanes = np.zeros((self.geometry.oc_tiles, self.config.BLOCK_OUT), np.int32)
        lanes.reshape(-1)[: self.geometry.out_channels] = values
        return lanes

    @cached_property
    def tile_groups(self) -> list[tuple[list[int], np.ndarray, np.ndarray, np.ndarray]]:
        """Output-channel tiles with identical issued (ic tile, position) sets: ``(ots, its, positions,
        weights)`` with the issued tiles stacked along the reduction, ``[issued * BLOCK_IN, len(ots) * BLOCK_OUT]``."""
        sets: dict[bytes, list[int]] = {}
        for ot in range(self.geometry.oc_tiles):
            sets.setdefault(self.issued[ot].tobytes(), []).append(ot)
        groups = []
        for ots in sets.values():
            its, positions = np.nonzero(self.issued[ots[0]])
            weights = self.tiles[ots][:, its, positions].transpose(1, 3, 0, 2)
            weights = weights.reshape(its.size * self.config.BLOCK_IN, len(ots) * self.config.BLOCK_OUT)
            groups.append((ots, its, positions, np.ascontiguousarray(weights)))
        return groups

    def binary(self) -> bytes:
        """The instruction stream in VTA's 128-bit encoding (CompileError naming the layer when a field overflows)."""
        try:
            return encode_program(self.insns, self.config)
        except FieldOverflow as exc:
            raise CompileError(f"layer {self.name}: {exc}") from None


class _UopTable:
    """Micro-op sequences, deduplicated; each sequence gets a [begin, end) range."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int]] = []
        self.index: dict[tuple, tuple[int, int]] = {}

    def add(self, uops: list[tuple[int, int, int]]) -> tuple[int, int]:
        """The [begin, end) range of this sequence, appended when it is new."""
        key = tuple(uops)
        if key not in self.index:
            self.index[key] = (len(self.rows), len(self.rows) + len(uops))
            self.rows.extend(uops)
        return self.index[key]

    def encoded(self, conv: QuantConv, config: VTAConfig) -> np.ndarray:
        """The uint32 DRAM image; CompileError when it exceeds the micro-op buffer or a field."""
        rows = np.array(self.rows, np.int64).reshape(-1, 3)
        if len(rows) > config.uop_depth:
            raise CompileError(
                f"layer {conv.name}: needs {len(rows)} micro-ops, more than the "
                f"{config.uop_depth} of the micro-op buffer; use a VTA config with a larger LOG_UOP_BUFF_SIZE"
            )
        try:
            return encode_uops(rows[:, 0], rows[:, 1], rows[:, 2], config)
        except FieldOverflow as exc:
            raise CompileError(f"layer {conv.name}: {exc}") from None


def _nonzero_tiles(conv: QuantConv, config: VTAConfig) -> np.ndarray:
    """bool [G, OT, IT, P]: the weight tiles holding a nonzero weight."""
    out_channels, icg, kh, kw = conv.weight.shape
    ocg = out_channels // conv.groups
    ot, it = ceil_div(ocg, config.BLOCK_OUT), ceil_div(icg, config.BLOCK_IN)
    padded = np.zeros((conv.groups, ot * config.BLOCK_OUT, it * config.BLOCK_IN, kh * kw), bool)
    padded[:, :ocg, :icg] = (conv.weight != 0).reshape(conv.groups, ocg, icg, kh * kw)
    return padded.reshape(conv.groups, ot, config.BLOCK_OUT, it, config.BLOCK_IN, kh * kw).any(axis=(2, 4))


def issued_tiles(conv: QuantConv, config: VTAConfig) -> np.ndarray:
    """bool [G, OT, IT, P]: the tiles to issue - kept in the annotation and holding a nonzero weight.

    A kept-tile map of another grid is a CompileError; a tile marked pruned that holds a
    nonzero weight is the core's AnnotationError.
    """
    nonzero = _nonzero_tiles(conv, config)
    if conv.kept is None:
        return nonzero
    if conv.kept.shape != nonzero.shape:
        raise CompileError(
            f"layer {conv.name}: the annotation's tile map {conv.kept.shape} does not match "
            f"the weight's {nonzero.shape}; re-run gpp-onnx prune"
        )
    check_pruned_tiles_are_zero(conv.name, nonzero, conv.kept)
    return nonzero & conv.kept


def compile_conv(conv: QuantConv, in_shape: tuple[int, int, int], config: VTAConfig, group: int = 0) -> Program:
    """Compile conv group ``group`` for an input of ``in_shape`` = (channels of the group, H, W)."""
    g = geometry(conv, in_shape, config)
    if max(conv.pads) > PAD_LIMIT:
        raise CompileError(f"layer {conv.name}: padding {max(conv.pads)} exceeds the LOAD pad field limit {PAD_LIMIT}")
    tiling = choose_tiling(conv, g, config)
    builder = _ProgramBuilder(conv, g, config, tiling, group)
    for b, origin in enumerate(builder.origins):
        builder.emit_block(b, origin)
    return builder.program()


def _acc_image(conv: QuantConv, g: Geometry, config: VTAConfig, layout: AccLayout, channels: slice) -> np.ndarray:
    """int32 [vectors, BLOCK_OUT]: per vector kind of the layout, one vector per output-channel tile."""
    per_kind = {"bias": conv.bias_with_rounding(), "shift": conv.shifts(), "residual_shift": -conv.residual_shifts()}
    image = np.zeros((len(layout.vectors), g.oc_tiles, config.BLOCK_OUT), np.int32)
    for row, kind in enumerate(layout.vectors):  # SHR by a negative amount shifts the residual left
        image[row].reshape(-1)[: g.out_channels] = per_kind[kind][channels]
    return image.reshape(-1, config.BLOCK_OUT)


@dataclass(frozen=True)
class _Block:
    """One block of outputs: its index, origin, size (clipped at the edges) and accumulator half."""

    index: int
    o0: int
    y0: int
    x0: int
    obb: int
    rb: int
    cb: int
    acc_base: int

    @property
    def pixels(self) -> int:
        """Output pixels of the block."""
        return self.rb * self.cb


class _ProgramBuilder:
    """Emits one conv group's instruction stream block by block, collecting micro-ops and weight tiles."""

    def __init__(self, conv: QuantConv, g: Geometry, config: VTAConfig, tiling: Tiling, group: int) -> None:
        self.conv, self.g, self.config, self.tiling, self.group = conv, g, config, tiling, group
        self.halves = 2 if tiling.double_buffered else 1
        self.layout = AccLayout.of(conv, tiling.oc_block, tiling.rows, tiling.cols)
        self.channels = slice(group * g.out_channels, (group + 1) * g.out_channels)
        packed = pack_weights(conv.weight[self.channels], config.BLOCK_OUT, config.BLOCK_IN)
        self.issued = issued_tiles(conv, config)[group]
        self.tiles = packed.reshape(g.oc_tiles, g.ic_tiles, g.positions, config.BLOCK_OUT, config.BLOCK_IN)
        win_rows, win_cols = window(conv, tiling.rows, tiling.cols)
        self.inp_half, self.wgt_half = win_rows * win_cols, tiling.oc_block * g.positions
        self.origins = [
            (o0, y0, x0)
            for o0 in range(0, g.oc_tiles, tiling.oc_block)
            for y0 in range(0, g.out_height, tiling.rows)
            for x0 in range(0, g.out_width, tiling.cols)
        ]
        ob = tiling.oc_block
        self.steps_total = sum(
            1 for o0, _, _ in self.origins for it in range(g.ic_tiles) if self.issued[o0 : o0 + ob, it].any()
        )
        self.uops = _UopTable()
        self.weight_tiles: list[np.ndarray] = []
        self.weight_offsets: dict[tuple[int, int], int] = {}  # (oc block, ic tile) -> first tile in the image
        self.insns: list[Insn] = []  # in program order; each module reads its own instructions in this order
        self.step = self.gemm_uops = self.dense_uops = 0

    def emit_block(self, b: int, origin: tuple[int, int, int]) -> None:
        """Accumulator set-up, every step (input-channel tile) with an issued tile, requantization, stores."""
        o0, y0, x0 = origin
        t, g = self.tiling, self.g
        block = _Block(
            b,
            o0,
            y0,
            x0,
            min(t.oc_block, g.oc_tiles - o0),
            min(t.rows, g.out_height - y0),
            min(t.cols, g.out_width - x0),
            (b % self.halves) * self.layout.size,
        )
        first = len(self.insns)
        self._emit_accumulator_setup(block)
        if b >= self.halves:
            self.insns[first].deps.pop_next = True  # wait for the store of block b - halves
        for it in range(g.ic_tiles):
            self._emit_step(block, it)
        self._emit_epilogue(block)

    def _emit_accumulator_setup(self, block: _Block) -> None:
        """LOAD ACC of the bias (+ rounding), per-channel shift and alignment vectors, the residual, reset."""
        for row, kind in enumerate(self.layout.vectors):
            base = self.layout.vector_base(block.acc_base, kind)
            source = row * self.g.oc_tiles + block.o0
            self.insns.append(MemInsn(Opcode.LOAD, MemType.ACC, base, source, 1, block.obb, block.obb))
        if self.layout.residual:
            self.insns += self._residual_load(block)
        begin, end = self.uops.add([(block.acc_base, 0, 0)])
        self.insns.append(GemmInsn(True, begin, end, block.obb * block.rb, block.cb, block.cb, 1, 0, 0))

    def _emit_step(self, block: _Block, it: int) -> None:
        """LOAD INP of the window and LOAD WGT of the block's issued tiles of ``it``, then their GEMM."""
        g, halves = self.g, self.halves
        block_issued = self.issued[block.o0 : block.o0 + block.obb, it]
        self.dense_uops += block.obb * g.positions * block.pixels
        if not block_issued.any():
            return
        (sh, sw), (dh, dw) = self.conv.stride, self.conv.dilation
        top, left, _, _ = self.conv.pads
        win_rows, win_cols = window(self.conv, block.rb, block.cb)
        inp_base, wgt_base = (self.step % halves) * self.inp_half, (self.step % halves) * self.wgt_half
        load = _input_load(self.conv, g, it, block.y0 * sh - top, block.x0 * sw - left, win_rows, win_cols, inp_base)
        load.deps.pop_next = self.step >= halves
        tiles = [(o, p) for o in range(block.obb) for p in range(g.positions) if block_issued[o, p]]
        offset = self._weight_offset(block.o0, it, tiles)
        weight_load = MemInsn(
            Opcode.LOAD, MemType.WGT, wgt_base, offset, 1, len(tiles), len(tiles), deps=Deps(push_next=True)
        )
        begin, end = self.uops.add(
            [
                (
                    block.acc_base + o * block.pixels,
                    inp_base + (p // g.kw) * dh * win_cols + (p % g.kw) * dw,
                    wgt_base + slot,
                )
                for slot, (o, p) in enumerate(tiles)
            ]
        )
        deps = Deps(pop_prev=True, push_prev=self.step + halves < self.steps_total)
        gemm = GemmInsn(False, begin, end, block.rb, block.cb, block.cb, 1, sh * win_cols, sw, deps=deps)
        self.insns += [load, weight_load, gemm]
        self.gemm_uops += gemm.count
        self.step += 1

    def _weight_offset(self, o0: int, it: int, tiles: list[tuple[int, int]]) -> int:
        """First tile of (oc block, ic tile) in the weight image, appending its tiles the first time."""
        if (o0, it) not in self.weight_offsets:
            self.weight_offsets[(o0, it)] = len(self.weight_tiles)
            self.weight_tiles.extend(self.tiles[o0 + o, it, p] for o, p in tiles)
        return self.weight_offsets[(o0, it)]

    def _emit_epilogue(self, block: _Block) -> None:
        """The fused Add, the requantization ALU ops, then the stores of the block."""
        if self.layout.residual:  # outputs += aligned residual
            residual = self.layout.residual_base(block.acc_base)
            add = self.uops.add(
                [(block.acc_base + o * block.pixels, residual + o * block.pixels, 0) for o in range(block.obb)]
            )
            self.insns.append(AluInsn(AluOp.ADD, False, 0, *add, block.rb, block.cb, block.cb, 1, block.cb, 1))
        self.insns += self._requantize(block)
        self.insns[-1].deps.push_next = True
        stores = self._stores(block)
        stores[0].deps.pop_prev = True
        blocks = len(self.origins)
        stores[-1].deps.push_prev = block.index + self.halves < blocks or block.index == blocks - 1
        self.insns += stores

    def _residual_load(self, block: _Block) -> list[Insn]:
        """LOAD ACC_8BIT of the residual block (int8, sign-extended), then SHR to align its scale."""
        base, residual_shift = self.layout.residual_base(block.acc_base), self.conv.residual_shift
        insns: list[Insn] = [
            MemInsn(
                Opcode.LOAD,
                MemType.ACC_8BIT,
                store.sram_base - block.acc_base + base,
                store.dram_base,
                store.y_size,
                store.x_size,
                store.x_stride,
            )
            for store in self._stores(block)  # the same block shape as the output
        ]
        if np.ndim(residual_shift) == 1:
            vectors = self.layout.vector_base(block.acc_base, "residual_shift")
            align = self.uops.add([(base + o * block.pixels, vectors + o, 0) for o in range(block.obb)])
            insns.append(AluInsn(AluOp.SHR, False, 0, *align, block.rb, block.cb, block.cb, 1, 0, 0))
        elif residual_shift:
            whole = self.uops.add([(base, 0, 0)])
            shift = -int(residual_shift)  # type: ignore[arg-type]
            insns.append(AluInsn(AluOp.SHR, True, shift, *whole, block.obb * block.rb, block.cb, block.cb, 1))
        return insns

    def _requantize(self, block: _Block) -> list[AluInsn]:
        """ADD bias+rounding (tensor), SHR (immediate or per-channel tensor), MIN 127, MAX -127 / 0."""
        acc_base, obb, rb, cb = block.acc_base, block.obb, block.rb, block.cb

        def per_tile(kind: str) -> tuple[int, int]:
            """Micro-ops pairing each output-channel tile with its ``kind`` vector."""
            src = self.layout.vector_base(acc_base, kind)
            return self.uops.add([(acc_base + o * block.pixels, src + o, 0) for o in range(obb)])

        whole = self.uops.add([(acc_base, 0, 0)])
        insns = [AluInsn(AluOp.ADD, False, 0, *per_tile("bias"), rb, cb, cb, 1, 0, 0)]
        if np.ndim(self.conv.shift) == 1:
            insns.append(AluInsn(AluOp.SHR, False, 0, *per_tile("shift"), rb, cb, cb, 1, 0, 0))
        else:
            insns.append(AluInsn(AluOp.SHR, True, int(self.conv.shift), *whole, obb * rb, cb, cb, 1))  # type: ignore[arg-type]
        insns.append(AluInsn(AluOp.MIN, True, 127, *whole, obb * rb, cb, cb, 1))
        insns.append(AluInsn(AluOp.MAX, True, 0 if self.conv.relu else -127, *whole, obb * rb, cb, cb, 1))
        return insns

    def _stores(self, block: _Block) -> list[MemInsn]:
        """STORE the block: one per output-channel tile, or one for all when the block is whole maps."""
        g, rb, cb = self.g, block.rb, block.cb
        if rb == g.out_height and cb == g.out_width:
            return [MemInsn(Opcode.STORE, MemType.OUT, block.acc_base, block.o0 * rb * cb, block.obb * rb, cb, cb)]
        return [
            MemInsn(
                Opcode.STORE,
                MemType.OUT,
                block.acc_base + o * rb * cb,
                ((block.o0 + o) * g.out_height + block.y0) * g.out_width + block.x0,
                rb,
                cb,
                g.out_width,
            )
            for o in range(block.obb)
        ]

    def program(self) -> Program:
        """Close the stream (FINISH), prepend the micro-op load and check that every field fits."""
        conv, g, config = self.conv, self.g, self.config
        words = self.uops.encoded(conv, config)
        insns: list[Insn] = [MemInsn(Opcode.LOAD, MemType.UOP, 0, 0, 1, len(words), len(words))]
        insns += self.insns + [FinishInsn(Deps(pop_next=True))]
        program = Program(
            name=conv.name if conv.groups == 1 else f"{conv.name}[group {self.group}]",
            config=config,
            conv=conv,
            geometry=g,
            tiling=self.tiling,
            insns=insns,
            uops=words,
            weights=np.array(self.weight_tiles, np.int8).reshape(-1, config.BLOCK_OUT, config.BLOCK_IN),
            acc_image=_acc_image(conv, g, config, self.layout, self.channels),
            issued=self.issued,
            tiles=self.tiles,
            group=self.group,
            stats={
                "gemm_uops": self.gemm_uops,
                "gemm_uops_dense": self.dense_uops,
                "tiles_total": int(self.issued.size),
                "tiles_kept": int(self.issued.sum()),
                "blocks": len(self.origins),
                "steps": self.steps_total,
            },
        )
        program.binary()  # every field fits (CompileError naming the layer otherwise)
        return program


def _input_load(
    conv: QuantConv, g: Geometry, it: int, row0: int, col0: int, win_rows: int, win_cols: int, sram_base: int
) -> MemInsn:
    """LOAD INP of an input window starting at (row0, col0), which may reach into the padding."""
    r_start, r_end = max(0, row0), min(g.height, row0 + win_rows)
    c_start, c_end = max(0, col0), min(g.width, col0 + win_cols)
    if r_end <= r_start or c_end <= c_start:
        raise CompileError(
            f"layer {conv.name}: an input window lies entirely in the padding "
            "(padding wider than the kernel's reach); VTA's LOAD cannot express it"
        )
    return MemInsn(
        Opcode.LOAD,
        MemType.INP,
        sram_base,
        (it * g.height + r_start) * g.width + c_start,
        r_end - r_start,
        c_end - c_start,
        g.width,
        y_pad_0=r_start - row0,
        y_pad_1=row0 + win_rows - r_end,
        x_pad_0=c_start - col0,
        x_pad_1=col0 + win_cols - c_end,
    )
