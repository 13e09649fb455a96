"""The cycle model (simulated): a hand calculation, token balance, and what pruning removes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import conv_model, weight

import gpp_onnx
from vta_backend import VTAConfig
from vta_backend.compiler import compile_conv
from vta_backend.isa import Deps, GemmInsn
from vta_backend.layer import VtaConv
from vta_backend.quant import QuantConv, quantize
from vta_backend.timing import simulate_timing

CONFIG = VTAConfig()  # pynq: 64-bit bus


def test_hand_calculation_of_a_1x1_conv():
    conv = QuantConv("tiny", np.ones((16, 16, 1, 1), np.int8), shift=4)
    program = compile_conv(conv, (16, 2, 2), CONFIG)
    timing = simulate_timing(program.insns, CONFIG)
    # compute: LOAD UOP (2 uops: the reset's, equal to the GEMM's one tap, and the bias ADD's = 8 B = 1 beat)
    # 151, LOAD ACC bias (64 B = 8 beats) 158, reset GEMM 80+4
    compute_ready = 151 + 158 + 84  # 393
    # load: LOAD INP (4 vectors x 16 B = 8 beats) 158, LOAD WGT (256 B = 32 beats) 182 -> token at 340
    gemm_end = max(compute_ready, 158 + 182) + 80 + 4  # 477
    # ALU: ADD with the bias tensor 46+2*4, SHR/MIN/MAX with immediates 46+4 each
    alu_end = gemm_end + 54 + 50 * 3  # 681
    store_end = alu_end + 150 + 8  # STORE 4 vectors x 16 B = 8 beats
    assert timing.cycles == store_end == 839
    assert timing.busy == {
        "load_inp": 158,
        "load_wgt": 182,
        "load_acc": 158,
        "load_uop": 151,
        "gemm": 168,
        "alu": 204,
        "store": 158,
    }
    assert timing.gemm_uops == 4 and timing.bytes["wgt"] == 256 and timing.bytes["out"] == 64
    assert timing.bound == "compute"


def test_ultra96_bus_moves_twice_the_bytes_per_beat():
    conv = QuantConv("tiny", np.ones((16, 16, 1, 1), np.int8), shift=4)
    fast_bus = VTAConfig(BOARD="ultra96")
    program = compile_conv(conv, (16, 2, 2), fast_bus)
    assert simulate_timing(program.insns, fast_bus).busy["load_wgt"] == 150 + 16


def test_unbalanced_tokens_are_detected():
    with pytest.raises(ValueError, match="never pushed"):
        simulate_timing([GemmInsn(False, 0, 1, 1, 1, 0, 0, 0, 0, deps=Deps(pop_prev=True))], CONFIG)


def test_double_buffering_overlaps_loads_with_gemm():
    rng = np.random.default_rng(0)
    conv = QuantConv("c", rng.integers(-127, 128, (64, 64, 3, 3)).astype(np.int8), pads=(1, 1, 1, 1), shift=9)
    program = compile_conv(conv, (64, 8, 8), CONFIG)
    timing = simulate_timing(program.insns, CONFIG)
    assert program.tiling.double_buffered
    assert timing.cycles < sum(timing.busy.values())  # modules ran in parallel


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_gemm_uops_drop_with_group_sparsity(rng, sparsity):
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    pruned, report = gpp_onnx.prune(conv_model([w], [1, 64, 8, 8], attrs=[{"pads": [1] * 4}]), sparsity)
    kept = gpp_onnx.read_annotation(pruned).weights[0].kept
    q = quantize(weight(pruned, "W0"), 6)
    layer = VtaConv.compile(QuantConv("c", q, pads=(1, 1, 1, 1), shift=8, kept=kept), (64, 8, 8), CONFIG)
    stats = layer.stats()
    tile_sparsity = 1 - kept.mean()
    assert abs(tile_sparsity - sparsity) <= 1 / kept.size + 1e-9  # tile rounding
    assert stats.gemm_uops_weights == pytest.approx(stats.gemm_uops_dense * (1 - tile_sparsity))
    assert stats.gemm_uops_skipped == stats.gemm_uops_dense - stats.gemm_uops_weights
    bias = sum(p.stats["gemm_uops_bias"] for p in layer.programs)  # a bias GEMM, where it pays, runs besides
    assert stats.timing.gemm_uops == stats.gemm_uops_weights + bias
    assert 1.0 < stats.speedup <= stats.amdahl_bound
