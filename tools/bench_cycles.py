"""Simulated VTA cycles of a model's compiled programs at several sparsities, against its dense program.

    python tools/bench_cycles.py MODEL.onnx [--sparsities 0.5,0.7,0.9] [--pattern group]
        [--scope layer] [--layer-floor 0] [--board pynq] [--exclude '^/conv1/'] [--json]

For the dense model and each sparsity (pruned here, one shot): the simulated cycles of the VTA
convs (cycle model unchanged: TVM's fitted costs), the speedup over the dense program compiled
in the same run, the GEMM micro-ops that multiply weights against ``(1 - s)`` of dense for the
sparsity ``s`` pruning achieved (tile granularity: a 16-channel 3x3 conv has 9 tiles),
and the sum of the per-layer lower bounds (GEMM micro-ops executed plus one-cycle SHR, MIN and
MAX per output vector) with the gap to it - per-channel (the default) and per-tensor weights.
Figures are simulated, not measured on a board; the activation scales are compile's default.
"""

from __future__ import annotations

import argparse
import json

import onnx

import gpp_onnx
from vta_backend import VTAConfig
from vta_backend.model import compile_model
from vta_backend.quantization import QuantizationOptions


def measure(model: onnx.ModelProto, config: VTAConfig, per_channel: bool) -> dict[str, float]:
    report = compile_model(model, config, quantization=QuantizationOptions(per_channel=per_channel)).report()
    bound = sum(layer.lower_bound for layer in report.layers)
    return {
        "cycles": report.cycles,
        "gemm_uops_weights": report.gemm_uops_weights,
        "lower_bound": bound,
        "gap_to_lower_bound": report.cycles / bound,
        "residual_paths": sorted({str(layer.residual_path) for layer in report.layers}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--pattern", default="group")
    parser.add_argument("--scope", default="layer", help="layer: every conv at the sparsity, so GEMM work is (1 - s)")
    parser.add_argument("--layer-floor", type=float, default=0.0)
    parser.add_argument("--board", default="pynq")
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dense = onnx.load(args.model)
    config = VTAConfig(BOARD=args.board)
    rows = []
    for per_channel in (True, False):
        reference = measure(dense, config, per_channel)
        rows.append({"weights": "per-channel" if per_channel else "per-tensor", "sparsity": 0.0, **reference})
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            pruned, pruning = gpp_onnx.prune(
                dense,
                sparsity,
                pattern=args.pattern,
                scope=args.scope,
                exclude=args.exclude,
                layer_floor=args.layer_floor,
            )
            figures = measure(pruned, config, per_channel)
            rows.append(
                {
                    "weights": rows[-1]["weights"],
                    "sparsity": sparsity,
                    **figures,
                    "speedup": reference["cycles"] / figures["cycles"],
                    "sparsity_achieved": pruning.sparsity,
                    "gemm_uops_vs_1_minus_s": figures["gemm_uops_weights"]
                    / (reference["gemm_uops_weights"] * (1 - pruning.sparsity)),
                }
            )
    if args.json:
        print(json.dumps({"simulated": True, "board": args.board, "pattern": args.pattern, "rows": rows}, indent=2))
        return
    print(
        f"simulated VTA cycles ({args.board}, cycle model unchanged), {args.pattern} pruning ({args.scope}), one shot"
    )
    print(
        f"{'weights':12} {'sparsity':>8} {'achieved':>8} {'cycles':>9} {'speedup':>8} {'uops/(1-s)':>10} {'x bound':>8}"
    )
    for row in rows:
        print(
            f"{row['weights']:12} {row['sparsity']:8.0%} {row.get('sparsity_achieved', 0.0):8.2%} "
            f"{row['cycles']:9,} {row.get('speedup', 1.0):7.2f}x "
            f"{row.get('gemm_uops_vs_1_minus_s', 1.0):10.3f} {row['gap_to_lower_bound']:8.2f}"
        )
    print("uops/(1-s): GEMM micro-ops multiplying weights over dense x (1 - achieved weight sparsity)")


if __name__ == "__main__":
    main()
