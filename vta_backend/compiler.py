"""Compile one quantized conv2d (one conv group) into a VTA program.

The schedule (as TVM's VTA conv2d schedule does it) tiles the output into blocks of
``oc_block`` output-channel tiles x ``rows`` x ``cols`` pixels (:mod:`vta_backend.tiling`
ranks the tilings; the CANDIDATES best are built and the fastest in the cycle model is kept).
For every block and every input-channel tile that has at least one issued weight tile in the
block (a *step*), in the order that keeps the GEMMs busiest (pruning leaves the steps
different numbers of weight tiles: :func:`~vta_backend.tiling.flow_order`):

* load module: LOAD INP of the input window (spatial padding through the pad fields),
  LOAD WGT of the block's issued weight tiles for that input-channel tile;
* compute module: one GEMM over the issued tiles (output-channel tile, kernel position) and
  the block's pixels, its micro-ops ordered so that no accumulator row is written twice within
  three consecutive executions (the HLS design's pipelined GEMM does not forward them).

Per block the compute module also resets the accumulators, adds the bias (a GEMM of a
constant input vector, or an ALU ADD of bias vectors loaded once per program or per block),
adds a fused residual (a GEMM of the int8 residual from the input buffer, before or after
the shift: :mod:`vta_backend.residual`), and runs the requantization ALU ops (SHR, MIN,
MAX); the store module writes the int8 block out - the program's last block in chunks, each
stored while the next is clipped (:func:`~vta_backend.tiling.clip_chunks`). Input, weight and
accumulator buffers are split in two halves (double buffering) when they fit, so loads, GEMMs
and stores overlap, synchronised by dependency tokens. Every program passes
:mod:`vta_backend.program_check`.

A tile is *issued* when the annotation keeps it and it holds a nonzero weight: pruned
tiles - and tiles that are all zero after quantization - are neither stored in the
weight image, loaded, nor issued as micro-ops. The weight image in DRAM holds the issued
OIHW16o16i tiles (and the bias and residual steps' tiles) in the order the program first uses
them - a step's by oc tile, then kernel position - so each step's weights are one contiguous LOAD.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from gpp_onnx.annotation import check_pruned_tiles_are_zero
from vta_backend.bias import bias_input, bias_weights
from vta_backend.config import VTAConfig
from vta_backend.cost import gemm_cycles
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
from vta_backend.program_check import ProgramCheckError, check_program
from vta_backend.quant import QuantConv
from vta_backend.residual import ResidualAlignment, requantization_shifts
from vta_backend.tiling import (
    HAZARD_DISTANCE,
    AccLayout,
    ClipChunk,
    CompileError,
    Geometry,
    Tiling,
    choose_tilings,
    clip_chunks,
    flow_order,
    geometry,
    input_half,
    shift_vectors,
    shr_passes,
    step_load_cycles,
    sub_block,
    tiles_per_store,
    window,
)
from vta_backend.timing import simulate_timing

PAD_LIMIT = 15  # 4-bit LOAD pad fields
CANDIDATES = 8  # tilings the estimate ranks best; the compiler builds each and keeps the fastest in the cycle model


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
    acc_image: np.ndarray  # int32 [vectors, BLOCK_OUT]: per vector kind of the layout, one per oc tile
    constants: np.ndarray  # int8 [vectors, BLOCK_IN]: input vectors the program needs (the bias GEMM's)
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

    @property
    def residual_path(self) -> str | None:
        """How the fused residual joins: a GEMM of the int8 residual from the input buffer (diagonal tiles),
        after or before the requantization shift, with the SHR its alignment needs (None: no residual)."""
        alignment = ResidualAlignment.of(self.conv)
        if alignment is None:
            return None
        path = "gemm-after-shift" if alignment.after_requantization else "gemm-before-shift"
        if alignment.shift is None:
            return path + "+per-channel-shr"
        return path + ("+shr" if alignment.shift else "")

    def check(self) -> None:
        """Every field fits, no GEMM hazard, the board's design runs it (CompileError naming the layer otherwise)."""
        check_program(self.name, self.binary(), self.uops, self.config)

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
                f"layer {conv.name}: needs {len(rows)} micro-ops (on {config.BOARD}), more than the "
                f"{config.uop_depth} of the micro-op buffer; use a VTA config with a larger LOG_UOP_BUFF_SIZE"
            )
        try:
            return encode_uops(rows[:, 0], rows[:, 1], rows[:, 2], config)
        except FieldOverflow as exc:
            raise CompileError(f"layer {conv.name}: {exc}") from None


def hazard_free_order(
    uops: list[tuple[int, int, int]], scratch: list[int]
) -> tuple[list[tuple[int, int, int]], int] | None:
    """Reorder a micro-op list so no accumulator row is written twice within HAZARD_DISTANCE
    consecutive micro-ops: always the row with the most micro-ops left among those not written
    recently, else a micro-op into a ``scratch`` row. Returns the list and the scratch micro-ops
    added; None when it needs a scratch row and ``scratch`` is empty."""
    pending: dict[int, deque[tuple[int, int, int]]] = {}
    for uop in uops:
        pending.setdefault(uop[0], deque()).append(uop)
    order: list[tuple[int, int, int]] = []
    padding = 0
    while pending:
        recent = {uop[0] for uop in order[1 - HAZARD_DISTANCE :]}
        ready = [row for row in pending if row not in recent]
        if ready:
            row = max(ready, key=lambda r: len(pending[r]))
            order.append(pending[row].popleft())
            if not pending[row]:
                del pending[row]
        elif scratch:
            order.append((next(r for r in scratch if r not in recent), uops[0][1], uops[0][2]))
            padding += 1
        else:
            return None
    return order, padding


def _starts(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, size) of consecutive pieces."""
    return [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]


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
    if conv.residual_shift is not None and config.BLOCK_IN != config.BLOCK_OUT:
        raise CompileError(
            f"layer {conv.name}: a fused Add needs square tiles (the residual goes through the input buffer), "
            f"the config has {config.BLOCK_OUT}x{config.BLOCK_IN}; leave the Add unfused"
        )
    if max(conv.pads) > PAD_LIMIT:
        raise CompileError(f"layer {conv.name}: padding {max(conv.pads)} exceeds the LOAD pad field limit {PAD_LIMIT}")
    density = float(issued_tiles(conv, config)[group].mean()) if conv.weight.size else 1.0
    built, errors = [], []
    for tiling in choose_tilings(conv, g, config, density, CANDIDATES):
        try:
            built.append(_build(conv, g, config, tiling, group))
        except CompileError as exc:  # more micro-ops than the buffer holds: another may fit
            errors.append(exc)
    for program in sorted(built, key=lambda p: simulate_timing(p.insns, config).cycles):
        try:
            program.check()  # only the fastest that passes: the check costs more than the build
            return program
        except ProgramCheckError:
            raise  # a rule the hardware needs is broken: a compiler fault, not a tiling that does not fit
        except CompileError as exc:  # a field too narrow for this tiling: another may fit
            errors.append(exc)
    raise errors[0]


def _build(conv: QuantConv, g: Geometry, config: VTAConfig, tiling: Tiling, group: int) -> Program:
    builder = _ProgramBuilder(conv, g, config, tiling, group)
    for b, extent in enumerate(builder.blocks):
        builder.emit_block(b, extent)
    return builder.program()


def _acc_image(conv: QuantConv, g: Geometry, config: VTAConfig, layout: AccLayout, channels: slice) -> np.ndarray:
    """int32 [vectors, BLOCK_OUT]: per vector kind of the layout, one vector per output-channel tile."""
    per_kind = {"bias": conv.bias_with_rounding(), **shift_vectors(conv)}
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
        self.layout = AccLayout.of(conv, g, tiling)
        self.alignment = ResidualAlignment.of(conv)
        self.channels = slice(group * g.out_channels, (group + 1) * g.out_channels)
        packed = pack_weights(conv.weight[self.channels], config.BLOCK_OUT, config.BLOCK_IN)
        self.issued = issued_tiles(conv, config)[group]
        self.tiles = packed.reshape(g.oc_tiles, g.ic_tiles, g.positions, config.BLOCK_OUT, config.BLOCK_IN)
        self.inp_half = input_half(conv, tiling.oc_block, tiling.rows, tiling.cols)
        self.wgt_half = tiling.oc_block * g.positions
        oc_parts, row_parts, col_parts = (_starts(sizes) for sizes in tiling.parts(g))
        self.blocks = [
            (o0, y0, x0, obb, rb, cb) for o0, obb in oc_parts for y0, rb in row_parts for x0, cb in col_parts
        ]
        self.steps_total = sum(
            1 for o0, _, _, obb, _, _ in self.blocks for it in range(g.ic_tiles) if self.issued[o0 : o0 + obb, it].any()
        ) + len(self.blocks) * ((self.alignment is not None) + tiling.bias_by_gemm)  # residual and bias steps
        self.uops = _UopTable()
        self.weight_tiles: list[np.ndarray] = []
        self.weight_offsets: dict[tuple[str, int, int], int] = {}  # (kind, oc block, ic tile) -> first tile
        self.insns: list[Insn] = []  # in program order; each module reads its own instructions in this order
        self.step = 0
        kinds = ("gemm_uops", "gemm_uops_dense", "gemm_uops_residual", "gemm_uops_bias", "gemm_uops_padding")
        self.counts = dict.fromkeys(kinds, 0)

    def emit_block(self, b: int, extent: tuple[int, int, int, int, int, int]) -> None:
        """Accumulator set-up, the fused residual, the bias, every step (input-channel tile) with an issued
        tile in :meth:`_step_order`, requantization, stores; ``extent`` is the block's origin and size
        (o0, y0, x0, obb, rb, cb)."""
        block = _Block(b, *extent, (b % self.halves) * self.layout.size)
        first = len(self.insns)
        self._emit_accumulator_setup(block)
        if b >= self.halves:
            self.insns[first].deps.pop_next = True  # wait for the store of block b - halves
        if self.alignment is not None and not self.alignment.after_requantization:
            self._emit_residual(block, self.alignment)  # first: its SHR must see the residual alone
        if self.tiling.bias_by_gemm:
            self._emit_bias(block)  # first: its loads are small, its GEMM runs while the first step loads
        for it in self._step_order(block):
            self._emit_step(block, it)
        self._emit_epilogue(block)

    def _step_order(self, block: _Block) -> list[int]:
        """The block's input-channel tiles in the order that keeps the compute module busiest: pruning leaves
        them different numbers of weight tiles, so their loads and GEMMs differ (Johnson's rule,
        :func:`~vta_backend.tiling.flow_order`)."""
        win_rows, win_cols = window(self.conv, block.rb, block.cb)
        costs = []
        for it in range(self.g.ic_tiles):
            tiles = int(self.issued[block.o0 : block.o0 + block.obb, it].sum())
            costs.append((step_load_cycles(win_rows * win_cols, tiles, self.config), gemm_cycles(tiles * block.pixels)))
        return flow_order(costs)

    def _emit_accumulator_setup(self, block: _Block) -> None:
        """LOAD ACC of the bias (+ rounding), per-channel shift and alignment vectors, then reset."""
        if not self.layout.resident_tiles:
            for row, kind in enumerate(self.layout.vectors):
                base = self.layout.vector_base(block.acc_base, kind, block.o0)
                source = row * self.g.oc_tiles + block.o0
                self.insns.append(MemInsn(Opcode.LOAD, MemType.ACC, base, source, 1, block.obb, block.obb))
        begin, end = self.uops.add([(block.acc_base, 0, 0)])
        self.insns.append(GemmInsn(True, begin, end, block.obb * block.rb, block.cb, block.cb, 1, 0, 0))

    def _emit_step(self, block: _Block, it: int) -> None:
        """LOAD INP of the window and LOAD WGT of the block's issued tiles of ``it``, then their GEMM."""
        g = self.g
        block_issued = self.issued[block.o0 : block.o0 + block.obb, it]
        self.counts["gemm_uops_dense"] += block.obb * g.positions * block.pixels
        if not block_issued.any():
            return
        (sh, sw), (dh, dw) = self.conv.stride, self.conv.dilation
        top, left, _, _ = self.conv.pads
        win_rows, win_cols = window(self.conv, block.rb, block.cb)
        inp_base, wgt_base = self._halves()
        load = _input_load(self.conv, g, it, block.y0 * sh - top, block.x0 * sw - left, win_rows, win_cols, inp_base)
        tiles = [(o, p) for o in range(block.obb) for p in range(g.positions) if block_issued[o, p]]
        offset = self._weight_offset(("conv", block.o0, it), [self.tiles[block.o0 + o, it, p] for o, p in tiles])
        taps = [
            (o, inp_base + (p // g.kw) * dh * win_cols + (p % g.kw) * dw, wgt_base + slot)
            for slot, (o, p) in enumerate(tiles)
        ]
        self._emit_loads_and_gemm(block, [load], offset, len(tiles), taps, (sh * win_cols, sw), "gemm_uops")

    def _emit_residual(self, block: _Block, alignment: ResidualAlignment) -> None:
        """The fused Add, as a step: LOAD INP of the int8 residual block (it follows the input in the
        input buffer), LOAD WGT of diagonal tiles ``2**exponent``, their GEMM into the outputs; then
        the ALU SHR the alignment needs (see :class:`~vta_backend.residual.ResidualAlignment`)."""
        inp_base, wgt_base = self._halves()
        loads = [
            MemInsn(
                Opcode.LOAD,
                MemType.INP,
                inp_base + store.sram_base - block.acc_base,
                self.g.input_vectors + store.dram_base,
                store.y_size,
                store.x_size,
                store.x_stride,
            )
            for store in self._stores(block)  # the residual is laid out as the output
        ]
        offset = self._weight_offset(("residual", block.o0, 0), self._diagonal_tiles(block, alignment))
        taps = [(o, inp_base + o * block.pixels, wgt_base + o) for o in range(block.obb)]
        self._emit_loads_and_gemm(block, loads, offset, block.obb, taps, (block.cb, 1), "gemm_uops_residual")
        self._shr(block, "residual_shift", alignment.shift)

    def _emit_bias(self, block: _Block) -> None:
        """The bias (with rounding), as a step: LOAD INP of the constant input vector (after the input and
        residual in the input buffer), LOAD WGT of the block's bias tiles, their GEMM into the outputs."""
        inp_base, wgt_base = self._halves()
        g = self.g
        constant = g.input_vectors + (g.output_vectors if self.alignment is not None else 0)
        load = MemInsn(Opcode.LOAD, MemType.INP, inp_base, constant, 1, 1, 1)
        offset = self._weight_offset(("bias", block.o0, 0), list(self.bias_tiles[block.o0 : block.o0 + block.obb]))
        taps = [(o, inp_base, wgt_base + o) for o in range(block.obb)]
        self._emit_loads_and_gemm(block, [load], offset, block.obb, taps, (0, 0), "gemm_uops_bias")

    @cached_property
    def bias_tiles(self) -> np.ndarray:
        """int8 ``[OT, BLOCK_OUT, BLOCK_IN]``: per output-channel tile, the weights that turn the constant
        input vector into the bias with rounding (zero for padding lanes)."""
        c, g = self.config, self.g
        lanes = np.zeros(g.oc_tiles * c.BLOCK_OUT, np.int64)
        lanes[: g.out_channels] = self.conv.bias_with_rounding()[self.channels]
        weights = bias_weights(lanes, c.BLOCK_IN)
        assert weights is not None  # choose_tilings sets bias_by_gemm only where every bias is representable
        return weights.reshape(g.oc_tiles, c.BLOCK_OUT, c.BLOCK_IN)

    def _diagonal_tiles(self, block: _Block, alignment: ResidualAlignment) -> list[np.ndarray]:
        """Per output-channel tile of the block, the diagonal weight tile ``2**exponent`` per channel."""
        lanes = np.zeros(self.g.oc_tiles * self.config.BLOCK_OUT, np.int64)  # padding lanes: weight 0
        lanes[: self.g.out_channels] = 1 << alignment.exponents[self.channels]
        lanes = lanes.reshape(self.g.oc_tiles, self.config.BLOCK_OUT)
        return [np.diag(lanes[block.o0 + o]).astype(np.int8) for o in range(block.obb)]

    def _halves(self) -> tuple[int, int]:
        """Input and weight buffer bases of the current step's half."""
        half = self.step % self.halves
        return half * self.inp_half, half * self.wgt_half

    def _emit_loads_and_gemm(
        self,
        block: _Block,
        loads: list[MemInsn],
        weight_offset: int,
        tiles: int,
        taps: list[tuple[int, int, int]],
        src_strides: tuple[int, int],
        counter: str,
    ) -> None:
        """One step: its input loads and weight load on the load module, then its GEMM, with the tokens
        that keep the two buffer halves apart; its executions (scratch ones apart) count to ``counter``."""
        _, wgt_base = self._halves()
        loads[0].deps.pop_next = self.step >= self.halves  # wait for the compute module to free the half
        weight_load = MemInsn(
            Opcode.LOAD, MemType.WGT, wgt_base, weight_offset, 1, tiles, tiles, deps=Deps(push_next=True)
        )
        deps = Deps(pop_prev=True, push_prev=self.step + self.halves < self.steps_total)
        gemm, padding = self._gemm(block, taps, src_strides, deps)
        self.insns += [*loads, weight_load, gemm]
        self.step += 1
        self.counts[counter] += gemm.count - padding
        self.counts["gemm_uops_padding"] += padding

    def _gemm(
        self, block: _Block, taps: list[tuple[int, int, int]], src_strides: tuple[int, int], deps: Deps
    ) -> tuple[GemmInsn, int]:
        """A GEMM over the block's pixels in which no accumulator row is written twice within
        HAZARD_DISTANCE consecutive executions. Its micro-op list holds the taps (output-channel tile,
        input base, weight slot) of one pixel, interleaving output-channel tiles, where that suffices
        (every loop iteration then moves to another pixel); else it covers a sub-block of pixels per
        tap, and blocks too small for that separate repeats by micro-ops writing scratch rows. Returns
        the GEMM and the scratch micro-ops it executes."""
        src_row, src_col = src_strides
        interleaved = hazard_free_order([(block.acc_base + o * block.pixels, src, wgt) for o, src, wgt in taps], [])
        if interleaved is not None and block.pixels > 1:
            begin, end = self.uops.add(interleaved[0])
            return GemmInsn(False, begin, end, block.rb, block.cb, block.cb, 1, src_row, src_col, deps=deps), 0
        kr, kc = sub_block(block.rb, block.cb)
        uops = [
            (block.acc_base + o * block.pixels + r * block.cb + c, src + r * src_row + c * src_col, wgt)
            for o, src, wgt in taps
            for r in range(kr)
            for c in range(kc)
        ]
        padding = 0
        if kr * kc < HAZARD_DISTANCE:
            scratch = block.acc_base + self.layout.scratch_offset
            ordered = hazard_free_order(uops, list(range(scratch, scratch + self.layout.scratch)))
            assert ordered is not None  # with scratch rows every list can be ordered
            uops, padding = ordered
        begin, end = self.uops.add(uops)
        loops = (block.rb // kr, block.cb // kc, kr * block.cb, kc, kr * src_row, kc * src_col)
        return GemmInsn(False, begin, end, *loops, deps=deps), padding

    def _weight_offset(self, key: tuple[str, int, int], tiles: list[np.ndarray]) -> int:
        """First tile of ``key`` (kind, oc block, ic tile) in the weight image, appending ``tiles`` the first time."""
        if key not in self.weight_offsets:
            self.weight_offsets[key] = len(self.weight_tiles)
            self.weight_tiles.extend(tiles)
        return self.weight_offsets[key]

    def _per_tile(self, block: _Block, kind: str) -> tuple[int, int]:
        """Micro-ops pairing each output-channel tile of the block with its ``kind`` vector."""
        src = self.layout.vector_base(block.acc_base, kind, block.o0)
        return self.uops.add([(block.acc_base + o * block.pixels, src + o, 0) for o in range(block.obb)])

    def _shr(self, block: _Block, kind: str, amount: int | None) -> None:
        """SHR of the block's outputs: by the per-channel ``kind`` vectors (one pass per ``kind:i``) where
        the layout has them, else by the immediate ``amount``, in passes within the design's SHR range."""
        rb, cb = block.rb, block.cb
        tensors = [k for k in self.layout.vectors if k.startswith(kind + ":")]
        for vectors in tensors:
            self.insns.append(AluInsn(AluOp.SHR, False, 0, *self._per_tile(block, vectors), rb, cb, cb, 1, 0, 0))
        if tensors or not amount:
            return
        whole = self.uops.add([(block.acc_base, 0, 0)])
        for step in shr_passes(amount):
            self.insns.append(AluInsn(AluOp.SHR, True, int(step[0]), *whole, block.obb * rb, cb, cb, 1))

    def _emit_epilogue(self, block: _Block) -> None:
        """The requantization (ADD bias+rounding, SHR), a residual that joins after it, the clip
        (MIN 127, MAX -127 / 0), then the stores of the block; the program's last block clips and stores in
        chunks (:func:`~vta_backend.tiling.clip_chunks`) so that its stores overlap its clipping."""
        obb, rb, cb = block.obb, block.rb, block.cb
        if "bias" in self.layout.vectors:
            self.insns.append(AluInsn(AluOp.ADD, False, 0, *self._per_tile(block, "bias"), rb, cb, cb, 1, 0, 0))
        self._shr(block, "shift", int(requantization_shifts(self.conv)[0]))
        if self.alignment is not None and self.alignment.after_requantization:
            self._emit_residual(block, self.alignment)
        last = block.index == len(self.blocks) - 1
        chunks = clip_chunks(self.g, obb, rb, cb, self.config) if last else [ClipChunk(0, obb, 0, rb)]
        for i, chunk in enumerate(chunks):
            self._emit_clip_and_stores(block, chunk, frees_half=i == len(chunks) - 1)

    def _emit_clip_and_stores(self, block: _Block, chunk: ClipChunk, frees_half: bool) -> None:
        """The clip (MIN 127, MAX -127 / 0) of a chunk of the block, then its stores; ``frees_half``: the
        block's last stores, which hand the accumulator half back (or end the program)."""
        first = block.acc_base + chunk.o0 * block.pixels + chunk.r0 * block.cb
        rows, cb = chunk.tiles * chunk.rows, block.cb
        uops = self.uops.add([(first, 0, 0)])
        self.insns.append(AluInsn(AluOp.MIN, True, 127, *uops, rows, cb, cb, 1))
        low = 0 if self.conv.relu else -127
        self.insns.append(AluInsn(AluOp.MAX, True, low, *uops, rows, cb, cb, 1, deps=Deps(push_next=True)))
        stores = self._stores(block, chunk)
        stores[0].deps.pop_prev = True
        blocks = len(self.blocks)
        stores[-1].deps.push_prev = frees_half and (block.index + self.halves < blocks or block.index == blocks - 1)
        self.insns += stores

    def _stores(self, block: _Block, chunk: ClipChunk | None = None) -> list[MemInsn]:
        """STORE a chunk of the block (default: all of it): one per output-channel tile, or one for all when the
        chunk is whole output maps (:func:`~vta_backend.tiling.tiles_per_store`)."""
        g, cb = self.g, block.cb
        chunk = chunk or ClipChunk(0, block.obb, 0, block.rb)
        per_store = tiles_per_store(g, chunk, cb)
        return [
            MemInsn(
                Opcode.STORE,
                MemType.OUT,
                block.acc_base + o * block.pixels + chunk.r0 * cb,
                ((block.o0 + o) * g.out_height + block.y0 + chunk.r0) * g.out_width + block.x0,
                per_store * chunk.rows,
                cb,
                g.out_width,
            )
            for o in range(chunk.o0, chunk.o0 + chunk.tiles, per_store)
        ]

    def program(self) -> Program:
        """Close the stream (FINISH) and prepend the micro-op load (unchecked: see :meth:`Program.check`)."""
        conv, g, config = self.conv, self.g, self.config
        words = self.uops.encoded(conv, config)
        insns: list[Insn] = [MemInsn(Opcode.LOAD, MemType.UOP, 0, 0, 1, len(words), len(words))]
        if self.layout.resident_tiles and self.layout.vectors:  # every tile's bias / shift vectors, once
            vectors = len(self.layout.vectors) * g.oc_tiles
            base = self.layout.vector_base(0, self.layout.vectors[0], 0)
            insns.append(MemInsn(Opcode.LOAD, MemType.ACC, base, 0, 1, vectors, vectors))
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
            constants=(bias_input(config.BLOCK_IN) if self.tiling.bias_by_gemm else np.zeros(0, np.int8)).reshape(
                -1, config.BLOCK_IN
            ),
            issued=self.issued,
            tiles=self.tiles,
            group=self.group,
            stats=self.counts
            | {
                "tiles_total": int(self.issued.size),
                "tiles_kept": int(self.issued.sum()),
                "blocks": len(self.blocks),
                "steps": self.steps_total,
            },
        )
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
