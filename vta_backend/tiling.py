"""How a conv group is cut into blocks for VTA's buffers, and which cut is cheapest.

A block is ``oc_block`` output-channel tiles x ``rows`` x ``cols`` output pixels; a *step*
is one input-channel tile of a block. :func:`choose_tilings` ranks the feasible tilings by a
cycle estimate priced with :mod:`vta_backend.cost` (the functions the cycle model uses),
double buffering preferred; the compiler builds the best few and keeps the fastest.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from gpp_onnx.errors import UserError
from vta_backend.bias import bias_weights
from vta_backend.config import VTAConfig
from vta_backend.cost import alu_cycles, dma_cycles, element_bytes, gemm_cycles
from vta_backend.isa import LOOP_ITER_WIDTH, MemType
from vta_backend.layout import ceil_div
from vta_backend.quant import QuantConv
from vta_backend.residual import ResidualAlignment, requantization_shifts

ITER_LIMIT = (1 << LOOP_ITER_WIDTH) - 1


class CompileError(UserError):
    """The conv cannot be compiled for this VTA configuration."""


@dataclass(frozen=True)
class Tiling:
    """The block shape of a program and whether its buffers are split in two halves."""

    oc_block: int  # output-channel tiles per block
    rows: int  # output rows per block
    cols: int  # output columns per block
    double_buffered: bool
    resident_vectors: bool = False  # bias / shift vectors loaded once per program, not per block
    bias_by_gemm: bool = False  # the bias added by a GEMM of a constant input (vta_backend.bias), not the ALU
    lead_rows: int = 0  # a first, smaller block row (0: none), so the first GEMM starts sooner
    lead_cols: int = 0  # a first, smaller block column (0: none)
    tail_rows: int = 0  # a last, smaller block row (0: none), so less store follows the last GEMM
    lead_oc: int = 0  # a first, smaller block of output-channel tiles (0: none)
    tail_oc: int = 0  # a last, smaller block of output-channel tiles (0: none)

    def parts(self, g: "Geometry") -> tuple[list[int], list[int], list[int]]:
        """The block sizes along output-channel tiles, rows and columns, in program order."""
        return (
            partition(g.oc_tiles, self.oc_block, self.lead_oc, self.tail_oc),
            partition(g.out_height, self.rows, self.lead_rows, self.tail_rows),
            partition(g.out_width, self.cols, self.lead_cols),
        )


def partition(total: int, size: int, lead: int = 0, tail: int = 0) -> list[int]:
    """The piece sizes ``total`` is cut into: a ``lead`` piece first (when > 0), then pieces of ``size``,
    then the remainder, then a ``tail`` piece (when > 0)."""
    rest = total - lead - tail
    middle = [size] * (rest // size) + ([rest % size] if rest % size else [])
    return ([lead] if lead else []) + middle + ([tail] if tail else [])


@dataclass(frozen=True)
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
        """Kernel positions (KH x KW)."""
        return self.kh * self.kw

    @property
    def input_vectors(self) -> int:
        """Vectors of the packed input (NCHW1n16c); a fused residual follows them in the input DRAM buffer."""
        return self.ic_tiles * self.height * self.width

    @property
    def output_vectors(self) -> int:
        """Vectors of the packed output, and of a fused residual (laid out as the output)."""
        return self.oc_tiles * self.out_height * self.out_width


def geometry(conv: QuantConv, in_shape: tuple[int, int, int], config: VTAConfig) -> Geometry:
    """The sizes of one group of ``conv`` for an input of ``in_shape`` = (channels of the group, H, W)."""
    c, h, w = in_shape
    if c != conv.in_channels // conv.groups:
        raise CompileError(
            f"layer {conv.name}: input has {c} channels, the weight expects {conv.in_channels // conv.groups}"
        )
    oh, ow = conv.out_size(h, w)
    kh, kw = conv.kernel
    oc = conv.weight.shape[0] // conv.groups
    return Geometry(c, h, w, oc, oh, ow, kh, kw, ceil_div(c, config.BLOCK_IN), ceil_div(oc, config.BLOCK_OUT))


HAZARD_DISTANCE = 3  # no accumulator row may be written twice within this many GEMM micro-op executions


SHR_RANGE = (-16, 15)  # the HLS design's SHR reads its amount as a 5-bit signed field (VTA_SHR_ARG_BIT_WIDTH)


def shr_passes(amounts: np.ndarray | int) -> list[np.ndarray]:
    """Arithmetic shifts compose exactly (``floor(floor(x / 2**a) / 2**b) == floor(x / 2**(a + b))``,
    left shifts likewise), so a shift beyond SHR_RANGE is done as several SHR passes within it:
    per pass, the amount of every channel (``amounts`` broadcast), at least one pass."""
    remaining = np.atleast_1d(np.asarray(amounts, np.int64)).copy()
    low, high = SHR_RANGE
    passes = []
    while not passes or remaining.any():
        step = np.clip(remaining, low, high)
        passes.append(step)
        remaining = remaining - step
    return passes


def shift_vectors(conv: QuantConv) -> dict[str, np.ndarray]:
    """Per-channel shift vectors by kind: ``shift:i`` the requantization's pass i where the shifts differ
    per channel, ``residual_shift:i`` (the negated alignment) where a residual is aligned per channel
    (computed once per conv: the tiling search asks for them thousands of times)."""
    if conv not in _SHIFT_VECTORS:
        _SHIFT_VECTORS[conv] = _shift_vectors(conv)
    return _SHIFT_VECTORS[conv]


def _shift_vectors(conv: QuantConv) -> dict[str, np.ndarray]:
    vectors = {}
    shifts = requantization_shifts(conv)
    if np.unique(shifts).size > 1:
        vectors.update({f"shift:{i}": p for i, p in enumerate(shr_passes(shifts))})
    alignment = ResidualAlignment.of(conv)
    if alignment is not None and alignment.shift is None:
        vectors.update({f"residual_shift:{i}": p for i, p in enumerate(shr_passes(-conv.residual_shifts()))})
    return vectors


_SHIFT_VECTORS: "weakref.WeakKeyDictionary[QuantConv, dict[str, np.ndarray]]" = weakref.WeakKeyDictionary()


def vector_kinds(conv: QuantConv, bias_by_gemm: bool) -> tuple[str, ...]:
    """The per-output-channel vectors a block loads into the accumulator: the bias (with the rounding
    constant) unless a GEMM adds it, then the shift vectors (:func:`shift_vectors`)."""
    return (() if bias_by_gemm else ("bias",)) + tuple(shift_vectors(conv))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def sub_block(rows: int, cols: int) -> tuple[int, int]:
    """The pixels (``kr`` rows x ``kc`` columns, dividing the block) one GEMM micro-op list covers: the
    fewest that reach :data:`HAZARD_DISTANCE`, so that consecutive executions write different rows;
    the whole block when it has fewer pixels."""
    options = [(kr * kc, -kc, kr, kc) for kr in _divisors(rows) for kc in _divisors(cols) if kr * kc >= HAZARD_DISTANCE]
    return (rows, cols) if not options else min(options)[2:]


@dataclass(frozen=True)
class AccLayout:
    """The accumulator buffer: per half (two with double buffering) the block's outputs (a fused
    residual is added into them directly), then - unless resident - one vector per output-channel
    tile of each kind in ``vectors`` (bias+rounding, per-channel shifts, per-channel residual
    alignment), then ``scratch`` rows that separate micro-ops writing one row in blocks too small
    to interleave. Resident vectors (every output-channel tile's, loaded once) follow the halves,
    in the order of the DRAM accumulator image."""

    outputs: int  # oc_block * rows * cols
    vectors: tuple[str, ...]
    oc_block: int
    halves: int
    scratch: int = 0
    resident_tiles: int = 0  # output-channel tiles whose vectors stay resident (0: loaded per block)

    @classmethod
    def of(cls, conv: QuantConv, g: Geometry, tiling: Tiling) -> "AccLayout":
        """The layout of ``tiling``'s blocks."""
        t = tiling
        return cls(
            t.oc_block * t.rows * t.cols,
            vector_kinds(conv, t.bias_by_gemm),
            t.oc_block,
            2 if t.double_buffered else 1,
            scratch_rows(g, t),
            g.oc_tiles if t.resident_vectors else 0,
        )

    @property
    def size(self) -> int:
        """Accumulator vectors of one half."""
        return self.scratch_offset + self.scratch

    @property
    def total(self) -> int:
        """Accumulator vectors of the whole layout."""
        return self.halves * self.size + len(self.vectors) * self.resident_tiles

    @property
    def scratch_offset(self) -> int:
        """Offset of the scratch rows within a half."""
        return self.outputs + (0 if self.resident_tiles else self.oc_block * len(self.vectors))

    def vector_base(self, half: int, kind: str, o0: int) -> int:
        """Accumulator index of the ``kind`` vector of output-channel tile ``o0`` (the block's first) for
        the block in the half starting at ``half``; the block's next tiles' vectors follow it."""
        index = self.vectors.index(kind)
        if self.resident_tiles:
            return self.halves * self.size + index * self.resident_tiles + o0
        return half + self.outputs + self.oc_block * index


def scratch_rows(g: Geometry, tiling: Tiling) -> int:
    """Scratch accumulator rows a tiling needs: HAZARD_DISTANCE - 1 when some block (edges included)
    has fewer pixels than HAZARD_DISTANCE, else none."""
    _, rows, cols = tiling.parts(g)
    return HAZARD_DISTANCE - 1 if min(rows) * min(cols) < HAZARD_DISTANCE else 0


def input_half(conv: QuantConv, oc_block: int, rows: int, cols: int) -> int:
    """Input vectors one step needs: the input window, or a fused residual's block when larger."""
    win_rows, win_cols = window(conv, rows, cols)
    residual = oc_block * rows * cols if conv.residual_shift is not None else 0
    return max(win_rows * win_cols, residual)


def window(conv: QuantConv, rows: int, cols: int) -> tuple[int, int]:
    """Input rows and columns that ``rows`` x ``cols`` outputs read."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel, conv.stride, conv.dilation
    return (rows - 1) * sh + (kh - 1) * dh + 1, (cols - 1) * sw + (kw - 1) * dw + 1


def _fits(conv: QuantConv, g: Geometry, config: VTAConfig, tiling: Tiling) -> bool:
    ob, rows, cols = tiling.oc_block, tiling.rows, tiling.cols
    halves = 2 if tiling.double_buffered else 1
    _, win_cols = window(conv, rows, cols)
    return (
        halves * input_half(conv, ob, rows, cols) <= config.inp_depth
        and halves * ob * g.positions <= config.wgt_depth
        and AccLayout.of(conv, g, tiling).total <= config.acc_depth
        and ob * rows <= ITER_LIMIT
        and win_cols * conv.stride[0] < config.inp_depth
    )


def _dma(memory_type: MemType, elements: int, config: VTAConfig) -> int:
    return dma_cycles(elements * element_bytes(memory_type, config)[1], config)


def step_load_cycles(input_vectors: int, weight_tiles: int, config: VTAConfig) -> int:
    """Cycles of a step's loads: its input window and its weight tiles."""
    return _dma(MemType.INP, input_vectors, config) + _dma(MemType.WGT, weight_tiles, config)


def flow_order(steps: list[tuple[int, int]]) -> list[int]:
    """An order of steps ``(load cycles, compute cycles)`` for a load module feeding a compute module through
    two buffer halves (a step's loads wait for the GEMM two steps back): :func:`johnson_order`, or the given
    order where that ends sooner with two halves (:func:`two_buffer_makespan`)."""
    given = list(range(len(steps)))
    return min((johnson_order(steps), given), key=lambda order: two_buffer_makespan([steps[i] for i in order]))


def johnson_order(steps: list[tuple[int, int]]) -> list[int]:
    """Johnson's rule for the two-machine flow shop, the order of steps ``(load cycles, compute cycles)`` that
    ends soonest when loads may run ahead without limit: steps whose load is shorter than their compute
    first, by increasing load, then the others by decreasing compute; ties keep their order."""
    indexed = list(enumerate(steps))
    first = sorted((s for s in indexed if s[1][0] < s[1][1]), key=lambda s: s[1][0])
    last = sorted((s for s in indexed if s[1][0] >= s[1][1]), key=lambda s: -s[1][1])
    return [index for index, _ in first + last]


def two_buffer_makespan(steps: list[tuple[int, int]]) -> int:
    """When the last of these steps ``(load cycles, compute cycles)`` ends, in this order: each step's load
    starts after the previous load and after the compute two steps back (which frees its buffer half), each
    compute after its load and the previous compute."""
    load = compute = 0
    ends: list[int] = []
    for index, (load_cycles, compute_cycles) in enumerate(steps):
        load = max(load, ends[index - 2] if index >= 2 else 0) + load_cycles
        compute = max(compute, load) + compute_cycles
        ends.append(compute)
    return compute


def _requantization(conv: QuantConv, outputs: int, bias_by_gemm: bool) -> int:
    """Cycles of a block's requantization: the bias (GEMM, or ALU ADD with a tensor operand), SHR (tensor
    when per channel), MIN, MAX."""
    tensor = sum(kind.startswith("shift:") for kind in vector_kinds(conv, bias_by_gemm))
    shift = tensor * alu_cycles(outputs, True) if tensor else _immediate_passes(requantization_shifts(conv)[0], outputs)
    bias = gemm_cycles(outputs) if bias_by_gemm else alu_cycles(outputs, tensor_operand=True)
    return bias + shift + 2 * alu_cycles(outputs, tensor_operand=False)


def _immediate_passes(amount: int, outputs: int) -> int:
    """Cycles of the immediate SHR passes that shift by ``amount`` (none for 0)."""
    return _immediate_pass_count(int(amount)) * alu_cycles(outputs, False)


@functools.lru_cache(maxsize=None)
def _immediate_pass_count(amount: int) -> int:
    return sum(bool(p[0]) for p in shr_passes(amount))


def _block_work(
    conv: QuantConv,
    g: Geometry,
    config: VTAConfig,
    block: tuple[int, int, int],
    density: float,
    tiling: Tiling,
    memo: dict | None = None,
) -> tuple[int, int, int, int]:
    """:func:`_work_of_block`, remembered in ``memo`` when given (one tiling search prices the same
    blocks many times)."""
    if memo is None:
        return _work_of_block(conv, g, config, block, density, tiling)
    key = (block, density, tiling.bias_by_gemm, tiling.resident_vectors)
    if key not in memo:
        memo[key] = _work_of_block(conv, g, config, block, density, tiling)
    return memo[key]


def _work_of_block(
    conv: QuantConv, g: Geometry, config: VTAConfig, block: tuple[int, int, int], density: float, tiling: Tiling
) -> tuple[int, int, int, int]:
    """Busy cycles of one block of ``(oc tiles, rows, cols)`` per module (load, compute, store), and the
    cycles its first step's loads keep the compute module waiting (the reset and a bias GEMM, whose loads
    are small, run while the step's input and weights load)."""
    ob, rows, cols = block
    outputs = ob * rows * cols
    win_rows, win_cols = window(conv, rows, cols)
    step_load = step_load_cycles(win_rows * win_cols, max(1, round(ob * g.positions * density)), config)
    load = g.ic_tiles * step_load
    compute = g.ic_tiles * gemm_cycles(round(outputs * g.positions * density))
    kinds = len(vector_kinds(conv, tiling.bias_by_gemm))
    compute += gemm_cycles(outputs) + (0 if tiling.resident_vectors else kinds * _dma(MemType.ACC, ob, config))
    compute += _requantization(conv, outputs, tiling.bias_by_gemm)
    head = gemm_cycles(outputs)  # the reset
    if tiling.bias_by_gemm:  # the constant input vector and the bias tiles
        bias_loads = _dma(MemType.INP, 1, config) + _dma(MemType.WGT, ob, config)
        load += bias_loads
        step_load += bias_loads
        head += gemm_cycles(outputs)
    alignment = ResidualAlignment.of(conv)
    if alignment is not None:
        load += _dma(MemType.INP, outputs, config) + _dma(MemType.WGT, ob, config)
        compute += gemm_cycles(outputs)
        if alignment.shift is None:
            passes = sum(kind.startswith("residual_shift:") for kind in shift_vectors(conv))
            compute += passes * alu_cycles(outputs, tensor_operand=True)
        else:
            compute += _immediate_passes(alignment.shift, outputs)
    return load, compute, _dma(MemType.OUT, outputs, config), max(0, step_load - head)


@dataclass(frozen=True)
class ClipChunk:
    """A piece of a block whose clip (MIN, MAX) and stores are emitted together: output-channel tiles
    ``[o0, o0 + tiles)`` x rows ``[r0, r0 + rows)``, cut along one axis only - all the block's rows of some
    tiles, or some rows of a one-tile block - so that its accumulator rows are one contiguous run. The
    program's last block is cut in several (:func:`clip_chunks`) so the stores of one overlap the clipping
    of the next; every other block is one."""

    o0: int
    tiles: int
    r0: int
    rows: int


MAX_CLIP_CHUNKS = 4


def clip_chunks(g: Geometry, ob: int, rows: int, cols: int, config: VTAConfig) -> list[ClipChunk]:
    """How the program's last block is clipped and stored: the cut (at most MAX_CLIP_CHUNKS near-equal
    pieces) whose last store ends soonest after the block's shift; one piece when cutting does not pay."""
    units = ob if ob > 1 else rows
    options = []
    for k in range(1, min(units, MAX_CLIP_CHUNKS) + 1):
        sizes = [units // k + (i < units % k) for i in range(k)]
        starts = np.cumsum([0] + sizes[:-1])
        if ob > 1:
            chunks = [ClipChunk(int(s), n, 0, rows) for s, n in zip(starts, sizes)]
        else:
            chunks = [ClipChunk(0, 1, int(s), n) for s, n in zip(starts, sizes)]
        options.append((clip_and_store_cycles(g, chunks, cols, config), k, chunks))
    return min(options, key=lambda option: option[:2])[2]


def tiles_per_store(g: Geometry, chunk: ClipChunk, cols: int) -> int:
    """Output-channel tiles one STORE of a chunk covers: all of them where the chunk is whole output maps
    (contiguous in DRAM), else one per STORE."""
    return chunk.tiles if chunk.rows == g.out_height and cols == g.out_width else 1


def clip_and_store_cycles(g: Geometry, chunks: list[ClipChunk], cols: int, config: VTAConfig) -> int:
    """Cycles from the start of the clip to the end of the last store, the stores of each chunk waiting
    for its clip (MIN and MAX) and the previous stores."""
    compute = store = 0
    for chunk in chunks:
        compute += 2 * alu_cycles(chunk.tiles * chunk.rows * cols, tensor_operand=False)
        per_store = tiles_per_store(g, chunk, cols)
        stores = chunk.tiles // per_store * _dma(MemType.OUT, per_store * chunk.rows * cols, config)
        store = max(store, compute) + stores
    return store


def _last_block_tail(g: Geometry, ob: int, rows: int, cols: int, config: VTAConfig) -> int:
    """Cycles the last block's clip and stores add after its compute as :func:`_block_work` counts it (which
    includes one MIN and one MAX over the whole block)."""
    chunks = clip_chunks(g, ob, rows, cols, config)
    return clip_and_store_cycles(g, chunks, cols, config) - 2 * alu_cycles(ob * rows * cols, tensor_operand=False)


def estimate_cycles(
    conv: QuantConv, g: Geometry, config: VTAConfig, tiling: Tiling, density: float = 1.0, memo: dict | None = None
) -> int:
    """Estimated cycles of a program with this tiling whose blocks issue ``density`` of their weight tiles
    (``memo``: a dict shared by the estimates of one conv, geometry and config, or None).

    Double-buffered, the load, compute and store modules overlap: every block costs its busiest
    module's work, plus the first block's first step loads before any GEMM and the last block's
    stores after the compute module is done (overlapping its clip where :func:`clip_chunks` cuts it).
    Single-buffered, the modules take turns.
    """
    parts = tiling.parts(g)
    total = 0
    for block, count in Counter(itertools.product(*parts)).items():
        load, compute, store, _ = _block_work(conv, g, config, block, density, tiling, memo)
        total += count * (max(load, compute, store) if tiling.double_buffered else load + compute + store)
    ob, rows, cols = (p[-1] for p in parts)
    if not tiling.double_buffered:  # the last block's stores overlap its clip all the same
        return total - _dma(MemType.OUT, ob * rows * cols, config) + _last_block_tail(g, ob, rows, cols, config)
    first = _block_work(conv, g, config, tuple(p[0] for p in parts), density, tiling, memo)[3]
    kinds = len(vector_kinds(conv, tiling.bias_by_gemm))
    resident = kinds * _dma(MemType.ACC, g.oc_tiles, config) if tiling.resident_vectors and kinds else 0
    return resident + first + total + _last_block_tail(g, ob, rows, cols, config)


def _lead_variants(tiling: Tiling) -> list[Tiling]:
    """``tiling`` and its variants with a smaller first block row or column."""
    return [tiling] + [
        replace(tiling, **{field: size // k})
        for field, size in (
            ("lead_rows", tiling.rows),
            ("lead_cols", tiling.cols),
            ("tail_rows", tiling.rows),
            ("lead_oc", tiling.oc_block),
            ("tail_oc", tiling.oc_block),
        )
        for k in (2, 4)
        if size // k
    ]


def choose_tilings(
    conv: QuantConv, g: Geometry, config: VTAConfig, density: float = 1.0, count: int = 1
) -> list[Tiling]:
    """The ``count`` feasible tilings with the lowest estimated cycles for blocks that issue ``density``
    of their weight tiles, best first: double buffering preferred, then resident vectors; the bias by
    GEMM where representable, and a smaller first block where the estimate prefers them."""
    col_options = sorted({ceil_div(g.out_width, k) for k in range(1, g.out_width + 1)}, reverse=True)
    bias_options = (False, True) if bias_weights(conv.bias_with_rounding(), config.BLOCK_IN) is not None else (False,)
    for double, resident in ((True, True), (True, False), (False, True), (False, False)):
        feasible = []
        for ob, cols, by_gemm in itertools.product(range(g.oc_tiles, 0, -1), col_options, bias_options):
            fitting = (Tiling(ob, r, cols, double, resident, by_gemm) for r in range(g.out_height, 0, -1))
            tiling = next((t for t in fitting if _fits(conv, g, config, t)), None)
            if tiling is not None:  # fewer rows only costs more for this (ob, cols)
                feasible.append(tiling)
        if feasible:
            memo: dict = {}
            ranked = sorted(feasible, key=lambda t: estimate_cycles(conv, g, config, t, density, memo))[:count]
            variants = [v for t in ranked for v in _lead_variants(t) if _fits(conv, g, config, v)]
            return sorted(variants, key=lambda t: estimate_cycles(conv, g, config, t, density, memo))[:count]
    smallest = AccLayout.of(conv, g, Tiling(1, 1, 1, False)).total
    raise CompileError(
        f"layer {conv.name}: does not fit VTA's buffers ({config.BOARD}) even one output pixel and one channel "
        "tile at a time "
        f"(needs {input_half(conv, 1, 1, 1)} of {config.inp_depth} input vectors, {g.positions} of {config.wgt_depth} "
        f"weight tiles, {smallest} of {config.acc_depth} accumulator vectors); "
        "use a VTA config with larger buffers"
    )
