"""Latency-target pruning: how close it lands and how long it takes, on CIFAR ResNet-20/32/56.

    python tools/bench_latency.py [--model resnet20.onnx] [--depths 20,32,56] [--speedups 1.3,1.5,1.7,1.9]
        [--pattern group] [--board pynq] [--allocation global] [--json]

For each model (``--model`` files, and synthetic CIFAR ResNets of ``--depths`` from
``tools/resnet_cifar.py``, random weights) and each target: the simulated speedup that
``vta_backend.latency.prune_for_latency`` reaches (first conv kept dense: it stays on the CPU),
its relative error against the target, and the wall time of the whole search (pricing, allocation,
the exact compilations that check it) against one ``compile_model`` of the dense model measured
in the same run (the reference: the search costs a few compilations). Figures are simulated cycles.
``--allocation sensitivity`` times the search on a synthetic sensitivity (random rising curves,
seeded; the search's cost does not depend on the values - measuring a real one needs data and is
timed by ``tools/bench_sensitivity.py``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from resnet_cifar import resnet_cifar

from gpp_onnx.pruner import PruneOptions, rank_layers
from gpp_onnx.sensitivity import LayerSensitivity
from vta_backend import VTAConfig
from vta_backend.latency import (
    ALLOCATIONS,
    DEFAULT_ALLOCATION,
    MEASURED_ALLOCATION,
    LatencyTarget,
    cpu_layers,
    prune_for_latency,
)
from vta_backend.model import compile_model, conv_sites


def synthetic_sensitivity(model: onnx.ModelProto, options: PruneOptions, config: VTAConfig) -> dict:
    """Random rising loss curves (seeded) for the layers a latency target prunes."""
    rng = np.random.default_rng(0)
    skip = cpu_layers(model, conv_sites(model, config))
    rankings = rank_layers(model, replace(options, tile=config), skip)
    return {
        r.layer.weight: LayerSensitivity(
            np.array([0, r.order.size // 2, r.order.size]), np.cumsum([0.0, *rng.uniform(0.01, 1.0, 2)])
        )
        for r in rankings
    }


def measure(name: str, model: onnx.ModelProto, speedups: list[float], pattern: str, setting: tuple) -> list[dict]:
    """One row per target speedup; ``setting``: the VTA config and the allocation."""
    config, allocation = setting
    began = time.perf_counter()
    compile_model(model, config)
    reference = time.perf_counter() - began
    options = PruneOptions(pattern=pattern, layer_floor=0.05)
    sensitivity = synthetic_sensitivity(model, options, config) if allocation == MEASURED_ALLOCATION else None
    rows = []
    for speedup in speedups:
        began = time.perf_counter()
        target = LatencyTarget(speedup=speedup)
        _, report, latency = prune_for_latency(
            model, target, config, options, allocation=allocation, sensitivity=sensitivity
        )
        seconds = time.perf_counter() - began
        rows.append(
            {
                "model": name,
                "target_speedup": speedup,
                "speedup": round(latency.speedup, 4),
                "error": round(latency.speedup / speedup - 1, 4),
                "sparsity": round(report.sparsity, 4),
                "seconds": round(seconds, 2),
                "compile_seconds": round(reference, 2),
                "vs_compile": round(seconds / reference, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], type=Path, help="an ONNX model (repeatable)")
    parser.add_argument("--depths", default="20,32,56", help="synthetic CIFAR ResNets ('' for none)")
    parser.add_argument("--speedups", default="1.3,1.5,1.7,1.9")
    parser.add_argument("--pattern", default="group")
    parser.add_argument("--board", default="pynq")
    parser.add_argument("--allocation", default=DEFAULT_ALLOCATION, choices=ALLOCATIONS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = VTAConfig(BOARD=args.board)
    speedups = [float(s) for s in args.speedups.split(",")]
    models = [(path.name, onnx.load(path)) for path in args.model]
    models += [(f"resnet{d} (synthetic)", resnet_cifar(int(d))) for d in args.depths.split(",") if d]
    setting = (config, args.allocation)
    rows = [row for name, model in models for row in measure(name, model, speedups, args.pattern, setting)]
    if args.json:
        doc = {"simulated": True, "board": args.board, "pattern": args.pattern, "allocation": args.allocation}
        print(json.dumps({**doc, "rows": rows}, indent=2))
        return
    print(
        f"latency-target pruning ({args.pattern}, {args.board}, {args.allocation} allocation; simulated cycles), "
        "time against one dense compile"
    )
    print(f"{'model':24} {'target':>7} {'reached':>8} {'error':>7} {'sparsity':>8} {'time':>7} {'x compile':>9}")
    for r in rows:
        print(
            f"{r['model']:24} {r['target_speedup']:6.2f}x {r['speedup']:7.3f}x {r['error']:+7.2%} "
            f"{r['sparsity']:8.1%} {r['seconds']:6.1f}s {r['vs_compile']:8.2f}x"
        )


if __name__ == "__main__":
    main()
