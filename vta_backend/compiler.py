"""Compile one quantized conv2d (one conv group) into a VTA program.

The schedule (as TVM's VTA conv2d schedule does it) tiles the output into blocks of
``oc_block`` output-channel tiles x ``rows`` x ``cols`` pixels. For every block and
every input-channel tile that has at least one kept weight tile in the block (a *step*):

* load module: LOAD INP of the input window (spatial padding through the pad fields),
  LOAD WGT of the block's kept weight tiles for that input-channel tile;
* compute module: one GEMM whose micro-ops are the kept tiles (output-channel tile,
  kernel position); ``iter_out`` / ``iter_in`` walk the block's output rows and columns.

Per block the compute module also resets the accumulators, loads the bias vectors
(bias plus rounding constant, and per-channel shifts), and runs the requantization ALU
ops (ADD, SHR, MIN, MAX); the store module writes the int8 block out. Input, weight and
accumulator buffers are split in two halves (double buffering) when they fit, so loads,
GEMMs and stores overlap, synchronised by dependency tokens.

Pruned tiles - and tiles that are all zero after quantization - are neither stored in
the weight image, loaded, nor issued as micro-ops. The weight image in DRAM holds the
kept OIHW16o16i tiles in step order (oc block, ic tile, oc tile, kernel position), so
each step's weights are one contiguous LOAD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from gpp_onnx.errors import UserError
from vta_backend.config import VTAConfig
from vta_backend.isa import (
    LOOP_ITER_WIDTH,
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
    encode,
    encode_uops,
)
from vta_backend.layout import ceil_div, pack_weights
from vta_backend.quant import QuantConv

PAD_LIMIT = 15  # 4-bit LOAD pad fields
SIZE_LIMIT = (1 << 16) - 1
ITER_LIMIT = (1 << LOOP_ITER_WIDTH) - 1


class CompileError(UserError):
    """The conv cannot be compiled for this VTA configuration."""


@dataclass(frozen=True)
class Tiling:
    oc_block: int  # output-channel tiles per block
    rows: int  # output rows per block
    cols: int  # output columns per block
    double_buffered: bool


@dataclass
class Geometry:
    """Sizes of one conv group on VTA."""

    in_channels: int
    height: int
    width: int
    out_channels: int
    out_height: int
    out_width: int
    kh: int
    kw: int
    ic_tiles: int
    oc_tiles: int

    @property
    def positions(self) -> int:
        return self.kh * self.kw


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
    weights: np.ndarray  # int8 [tiles, BLOCK_OUT, BLOCK_IN]: kept tiles in step order
    acc_image: np.ndarray  # int32 [vectors, BLOCK_OUT]: bias+rounding per oc tile, then shifts
    kept: np.ndarray  # bool [OT, IT, P]: tiles issued
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
        """Output-channel tiles with identical kept (ic tile, position) sets: ``(ots, its, positions,
        weights)`` with the kept tiles stacked along the reduction, ``[kept * BLOCK_IN, len(ots) * BLOCK_OUT]``."""
        sets: dict[bytes, list[int]] = {}
        for ot in range(self.geometry.oc_tiles):
            sets.setdefault(self.kept[ot].tobytes(), []).append(ot)
        groups = []
        for ots in sets.values():
            its, positions = np.nonzero(self.kept[ots[0]])
            weights = self.tiles[ots][:, its, positions].transpose(1, 3, 0, 2)
            weights = weights.reshape(its.size * self.config.BLOCK_IN, len(ots) * self.config.BLOCK_OUT)
            groups.append((ots, its, positions, np.ascontiguousarray(weights)))
        return groups

    def binary(self) -> bytes:
        """The instruction stream in VTA's 128-bit encoding."""
        try:
            return b"".join(encode(i, self.config) for i in self.insns)
        except FieldOverflow as exc:
            raise CompileError(f"layer {self.name}: {exc}") from None


@dataclass(frozen=True)
class AccLayout:
    """One half of the accumulator buffer: the block's outputs, the fused residual (if any), then
    one vector per output-channel tile of each kind in ``vectors`` (bias+rounding, per-channel
    shifts, per-channel residual alignment), in the order of the DRAM accumulator image."""

    outputs: int  # oc_block * rows * cols
    residual: bool
    vectors: tuple[str, ...]
    oc_block: int

    @classmethod
    def of(cls, conv: QuantConv, oc_block: int, rows: int, cols: int) -> "AccLayout":
        vectors = ("bias",) + (("shift",) if np.ndim(conv.shift) == 1 else ())
        if conv.residual_shift is not None and np.ndim(conv.residual_shift) == 1:
            vectors += ("residual_shift",)
        return cls(oc_block * rows * cols, conv.residual_shift is not None, vectors, oc_block)

    @property
    def size(self) -> int:
        return self.outputs * (2 if self.residual else 1) + self.oc_block * len(self.vectors)

    def residual_base(self, half: int) -> int:
        return half + self.outputs

    def vector_base(self, half: int, kind: str) -> int:
        return half + self.outputs * (2 if self.residual else 1) + self.oc_block * self.vectors.index(kind)


class _UopTable:
    """Micro-op sequences, deduplicated; each sequence gets a [begin, end) range."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int]] = []
        self.index: dict[tuple, tuple[int, int]] = {}

    def add(self, uops: list[tuple[int, int, int]]) -> tuple[int, int]:
        key = tuple(uops)
        if key not in self.index:
            self.index[key] = (len(self.rows), len(self.rows) + len(uops))
            self.rows.extend(uops)
        return self.index[key]


def geometry(conv: QuantConv, in_shape: tuple[int, int, int], config: VTAConfig) -> Geometry:
    c, h, w = in_shape
    if c != conv.in_channels // conv.groups:
        raise CompileError(
            f"layer {conv.name}: input has {c} channels, the weight expects {conv.in_channels // conv.groups}"
        )
    oh, ow = conv.out_size(h, w)
    kh, kw = conv.kernel
    oc = conv.weight.shape[0] // conv.groups
    return Geometry(c, h, w, oc, oh, ow, kh, kw, ceil_div(c, config.BLOCK_IN), ceil_div(oc, config.BLOCK_OUT))


def _window(conv: QuantConv, rows: int, cols: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel, conv.stride, conv.dilation
    return (rows - 1) * sh + (kh - 1) * dh + 1, (cols - 1) * sw + (kw - 1) * dw + 1


def _fits(conv: QuantConv, g: Geometry, config: VTAConfig, ob: int, rows: int, cols: int, halves: int) -> bool:
    win_rows, win_cols = _window(conv, rows, cols)
    return (
        halves * win_rows * win_cols <= config.inp_depth
        and halves * ob * g.positions <= config.wgt_depth
        and halves * AccLayout.of(conv, ob, rows, cols).size <= config.acc_depth
        and ob * rows <= ITER_LIMIT
        and win_cols * conv.stride[0] < config.inp_depth
    )


def choose_tiling(conv: QuantConv, g: Geometry, config: VTAConfig) -> Tiling:
    """The feasible tiling with the lowest estimated cycle count (double buffering preferred)."""
    inp_beats = max(1, config.inp_vector_bytes * 8 // config.bus_bits)
    wgt_beats = max(1, config.wgt_tile_bytes * 8 // config.bus_bits)
    col_options = sorted({ceil_div(g.out_width, k) for k in range(1, g.out_width + 1)}, reverse=True)
    for halves in (2, 1):
        best: tuple[float, Tiling] | None = None
        for ob in range(g.oc_tiles, 0, -1):
            for cols in col_options:
                for rows in range(g.out_height, 0, -1):
                    if not _fits(conv, g, config, ob, rows, cols, halves):
                        continue
                    win_rows, win_cols = _window(conv, rows, cols)
                    load = 300 + win_rows * win_cols * inp_beats + ob * g.positions * wgt_beats
                    gemm = 80 + rows * cols * ob * g.positions
                    step = max(load, gemm) if halves == 2 else load + gemm
                    blocks = ceil_div(g.oc_tiles, ob) * ceil_div(g.out_height, rows) * ceil_div(g.out_width, cols)
                    residual = 200 + 4 * ob * rows * cols if conv.residual_shift is not None else 0
                    cost = blocks * (g.ic_tiles * step + 4 * (46 + 2 * ob * rows * cols) + 300 + residual)
                    if best is None or cost < best[0]:
                        best = (cost, Tiling(ob, rows, cols, halves == 2))
                    break  # fewer rows only costs more for this (ob, cols)
        if best is not None:
            return best[1]
    win_rows, win_cols = _window(conv, 1, 1)
    raise CompileError(
        f"layer {conv.name}: does not fit VTA's buffers even one output pixel and one channel tile at a time "
        f"(needs {win_rows * win_cols} of {config.inp_depth} input vectors, {g.positions} of {config.wgt_depth} "
        f"weight tiles, {AccLayout.of(conv, 1, 1, 1).size} of {config.acc_depth} accumulator vectors); "
        "use a VTA config with larger buffers"
    )


def kept_tiles(conv: QuantConv, group: int, packed: np.ndarray) -> np.ndarray:
    """bool [OT, IT, P]: tiles to issue - kept in the annotation and not all zero."""
    ot, it = packed.shape[:2]
    nonzero = packed.reshape(ot, it, -1, packed.shape[-2] * packed.shape[-1]).any(axis=3)
    if conv.kept is None:
        return nonzero
    annotated = conv.kept[group]
    if annotated.shape != nonzero.shape:
        raise CompileError(
            f"layer {conv.name}: the annotation's tile map {annotated.shape} does not match "
            f"the weight's {nonzero.shape}; re-run gpp-onnx prune"
        )
    bad = np.argwhere(nonzero & ~annotated)
    if bad.size:
        o, i, p = bad[0]
        raise CompileError(
            f"layer {conv.name}: tile (group {group}, oc_tile {o}, ic_tile {i}, position {p}) is "
            "marked pruned but holds nonzero weights; re-run gpp-onnx prune"
        )
    return nonzero & annotated


def compile_conv(
    conv: QuantConv, in_shape: tuple[int, int, int], config: VTAConfig, group: int = 0, tiling: Tiling | None = None
) -> Program:
    """Compile conv group ``group`` for an input of ``in_shape`` = (channels of the group, H, W)."""
    g = geometry(conv, in_shape, config)
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    top, left, _, _ = conv.pads
    if max(conv.pads) > PAD_LIMIT:
        raise CompileError(f"layer {conv.name}: padding {max(conv.pads)} exceeds the LOAD pad field limit {PAD_LIMIT}")
    tiling = tiling or choose_tiling(conv, g, config)
    ob, rows, cols = tiling.oc_block, tiling.rows, tiling.cols
    halves = 2 if tiling.double_buffered else 1
    layout = AccLayout.of(conv, ob, rows, cols)
    oc_slice = slice(group * g.out_channels, (group + 1) * g.out_channels)
    packed = pack_weights(conv.weight[oc_slice], config.BLOCK_OUT, config.BLOCK_IN)
    kept = kept_tiles(conv, group, packed)
    tiles = packed.reshape(g.oc_tiles, g.ic_tiles, g.positions, config.BLOCK_OUT, config.BLOCK_IN)
    weight_offsets: dict[tuple[int, int], int] = {}  # (oc block, ic tile) -> first tile in the weight image

    win_rows_max, win_cols_max = _window(conv, rows, cols)
    inp_half, wgt_half = win_rows_max * win_cols_max, ob * g.positions
    per_kind = {"bias": conv.bias_with_rounding(), "shift": conv.shifts(), "residual_shift": -conv.residual_shifts()}
    acc_image = np.zeros((len(layout.vectors), g.oc_tiles, config.BLOCK_OUT), np.int32)
    for row, kind in enumerate(layout.vectors):  # SHR by a negative amount shifts the residual left
        acc_image[row].reshape(-1)[: g.out_channels] = per_kind[kind][oc_slice]
    acc_image = acc_image.reshape(-1, config.BLOCK_OUT)

    blocks = [
        (o0, y0, x0)
        for o0 in range(0, g.oc_tiles, ob)
        for y0 in range(0, g.out_height, rows)
        for x0 in range(0, g.out_width, cols)
    ]
    uops = _UopTable()
    weight_tiles: list[np.ndarray] = []
    # (module, insn) in program order; modules: "load", "compute", "store"
    stream: list[tuple[str, Insn]] = []
    step = 0
    steps_total = sum(1 for o0, _, _ in blocks for it in range(g.ic_tiles) if kept[o0 : o0 + ob, it].any())
    gemm_uops = dense_uops = 0
    for b, (o0, y0, x0) in enumerate(blocks):
        obb, rb, cb = min(ob, g.oc_tiles - o0), min(rows, g.out_height - y0), min(cols, g.out_width - x0)
        acc_base = (b % halves) * layout.size
        pixels = rb * cb
        first_compute = len(stream)
        # bias (+ rounding) vectors, per-channel shifts and residual alignments into the accumulator buffer
        for row, kind in enumerate(layout.vectors):
            base = layout.vector_base(acc_base, kind)
            stream.append(("compute", MemInsn(Opcode.LOAD, MemType.ACC, base, row * g.oc_tiles + o0, 1, obb, obb)))
        if layout.residual:
            stream += [
                ("compute", insn) for insn in _residual_load(conv, g, uops, layout, acc_base, o0, obb, y0, x0, rb, cb)
            ]
        begin, end = uops.add([(acc_base, 0, 0)])
        stream.append(("compute", GemmInsn(True, begin, end, obb * rb, cb, cb, 1, 0, 0)))
        if b >= halves:
            stream[first_compute][1].deps.pop_next = True  # wait for the store of block b - halves
        win_rows, win_cols = _window(conv, rb, cb)
        for it in range(g.ic_tiles):
            block_kept = kept[o0 : o0 + obb, it]
            dense_uops += obb * g.positions * pixels
            if not block_kept.any():
                continue
            inp_base = (step % halves) * inp_half
            wgt_base = (step % halves) * wgt_half
            load = _input_load(conv, g, it, y0 * sh - top, x0 * sw - left, win_rows, win_cols, inp_base)
            load.deps.pop_next = step >= halves
            kept_list = [(o, p) for o in range(obb) for p in range(g.positions) if block_kept[o, p]]
            if (o0, it) not in weight_offsets:
                weight_offsets[(o0, it)] = len(weight_tiles)
                weight_tiles.extend(tiles[o0 + o, it, p] for o, p in kept_list)
            weight_load = MemInsn(
                Opcode.LOAD,
                MemType.WGT,
                wgt_base,
                weight_offsets[(o0, it)],
                1,
                len(kept_list),
                len(kept_list),
                deps=Deps(push_next=True),
            )
            stream += [("load", load), ("load", weight_load)]
            gemm_list = [
                (acc_base + o * pixels, inp_base + (p // g.kw) * dh * win_cols + (p % g.kw) * dw, wgt_base + slot)
                for slot, (o, p) in enumerate(kept_list)
            ]
            begin, end = uops.add(gemm_list)
            gemm = GemmInsn(
                False,
                begin,
                end,
                rb,
                cb,
                cb,
                1,
                sh * win_cols,
                sw,
                deps=Deps(pop_prev=True, push_prev=step + halves < steps_total),
            )
            stream.append(("compute", gemm))
            gemm_uops += gemm.count
            step += 1
        if layout.residual:  # the fused Add: outputs += aligned residual
            residual = layout.residual_base(acc_base)
            add = uops.add([(acc_base + o * pixels, residual + o * pixels, 0) for o in range(obb)])
            stream.append(("compute", AluInsn(AluOp.ADD, False, 0, *add, rb, cb, cb, 1, cb, 1)))
        stream += [("compute", insn) for insn in _requantize(conv, uops, layout, acc_base, obb, rb, cb)]
        stream[-1][1].deps.push_next = True
        stores = _stores(g, acc_base, o0, obb, y0, x0, rb, cb)
        stores[0].deps.pop_prev = True
        stores[-1].deps.push_prev = b + halves < len(blocks) or b == len(blocks) - 1
        stream += [("store", s) for s in stores]
    stream.append(("compute", FinishInsn(Deps(pop_next=True))))

    uop_words = np.array(uops.rows, np.int64).reshape(-1, 3)
    if len(uop_words) > config.uop_depth:
        raise CompileError(
            f"layer {conv.name}: needs {len(uop_words)} micro-ops, more than the "
            f"{config.uop_depth} of the micro-op buffer; use a VTA config with a larger LOG_UOP_BUFF_SIZE"
        )
    try:
        words = encode_uops(uop_words[:, 0], uop_words[:, 1], uop_words[:, 2], config)
    except FieldOverflow as exc:
        raise CompileError(f"layer {conv.name}: {exc}") from None
    insns = [MemInsn(Opcode.LOAD, MemType.UOP, 0, 0, 1, len(words), len(words))] + [i for _, i in stream]
    program = Program(
        name=conv.name if conv.groups == 1 else f"{conv.name}[group {group}]",
        config=config,
        conv=conv,
        geometry=g,
        tiling=tiling,
        insns=insns,
        uops=words,
        weights=np.array(weight_tiles, np.int8).reshape(-1, config.BLOCK_OUT, config.BLOCK_IN),
        acc_image=acc_image,
        kept=kept,
        tiles=tiles,
        group=group,
        stats={
            "gemm_uops": gemm_uops,
            "gemm_uops_dense": dense_uops,
            "tiles_total": int(kept.size),
            "tiles_kept": int(kept.sum()),
            "blocks": len(blocks),
            "steps": steps_total,
        },
    )
    _check_fields(program)
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


def _residual_load(
    conv: QuantConv,
    g: Geometry,
    uops: _UopTable,
    layout: AccLayout,
    acc_base: int,
    o0: int,
    obb: int,
    y0: int,
    x0: int,
    rb: int,
    cb: int,
) -> list[Insn]:
    """LOAD ACC_8BIT of the residual block (int8, sign-extended), then SHR to align its scale."""
    base, pixels = layout.residual_base(acc_base), rb * cb
    insns: list[Insn] = [
        MemInsn(
            Opcode.LOAD,
            MemType.ACC_8BIT,
            store.sram_base - acc_base + base,
            store.dram_base,
            store.y_size,
            store.x_size,
            store.x_stride,
        )
        for store in _stores(g, acc_base, o0, obb, y0, x0, rb, cb)  # the same block shape as the output
    ]
    if np.ndim(conv.residual_shift) == 1:
        align = uops.add(
            [(base + o * pixels, layout.vector_base(acc_base, "residual_shift") + o, 0) for o in range(obb)]
        )
        insns.append(AluInsn(AluOp.SHR, False, 0, *align, rb, cb, cb, 1, 0, 0))
    elif conv.residual_shift:
        whole = uops.add([(base, 0, 0)])
        insns.append(AluInsn(AluOp.SHR, True, -int(conv.residual_shift), *whole, obb * rb, cb, cb, 1))
    return insns


def _requantize(
    conv: QuantConv, uops: _UopTable, layout: AccLayout, acc_base: int, obb: int, rb: int, cb: int
) -> list[AluInsn]:
    """ADD bias+rounding (tensor), SHR (immediate or per-channel tensor), MIN 127, MAX -127 / 0."""
    pixels = rb * cb

    def per_tile(kind: str) -> tuple[int, int]:
        src = layout.vector_base(acc_base, kind)
        return uops.add([(acc_base + o * pixels, src + o, 0) for o in range(obb)])

    whole = uops.add([(acc_base, 0, 0)])
    insns = [AluInsn(AluOp.ADD, False, 0, *per_tile("bias"), rb, cb, cb, 1, 0, 0)]
    if np.ndim(conv.shift) == 1:
        insns.append(AluInsn(AluOp.SHR, False, 0, *per_tile("shift"), rb, cb, cb, 1, 0, 0))
    else:
        insns.append(AluInsn(AluOp.SHR, True, int(conv.shift), *whole, obb * rb, cb, cb, 1))
    insns.append(AluInsn(AluOp.MIN, True, 127, *whole, obb * rb, cb, cb, 1))
    insns.append(AluInsn(AluOp.MAX, True, 0 if conv.relu else -127, *whole, obb * rb, cb, cb, 1))
    return insns


def _stores(g: Geometry, acc_base: int, o0: int, obb: int, y0: int, x0: int, rb: int, cb: int) -> list[MemInsn]:
    """STORE the block: one per output-channel tile, or one for all when the block is whole maps."""
    if rb == g.out_height and cb == g.out_width:
        return [MemInsn(Opcode.STORE, MemType.OUT, acc_base, o0 * rb * cb, obb * rb, cb, cb)]
    return [
        MemInsn(
            Opcode.STORE,
            MemType.OUT,
            acc_base + o * rb * cb,
            ((o0 + o) * g.out_height + y0) * g.out_width + x0,
            rb,
            cb,
            g.out_width,
        )
        for o in range(obb)
    ]


def _check_fields(program: Program) -> None:
    """Every field fits its width (raises CompileError naming the layer otherwise)."""
    program.binary()
