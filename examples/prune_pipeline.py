"""Prune a model inside an export pipeline and gate on the achieved sparsity.

    python examples/prune_pipeline.py model.onnx pruned.onnx --sparsity 0.7

Uses only the library API: load (keeping track of external data), prune, check the
annotation, save atomically.
"""

from __future__ import annotations

import argparse

import gpp_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--pattern", default="group")
    args = parser.parse_args()

    loaded = gpp_onnx.load_model(args.model)
    pruned, report = gpp_onnx.prune(loaded, args.sparsity, pattern=args.pattern, exclude=[r"^/?conv1\b"])
    gpp_onnx.validate_annotation(pruned, gpp_onnx.read_annotation(pruned))
    for row in report.layers:
        tiles = f"{row.tiles_kept}/{row.tiles_total}"
        print(f"{row.name:40s} {row.status:8s} {tiles:>11s} {row.sparsity:6.1%} {row.reason or ''}")
    print(f"overall sparsity {report.sparsity:.2%} (target {args.sparsity:.0%})")
    if abs(report.sparsity - args.sparsity) > 0.01:
        raise SystemExit("achieved sparsity is more than 1 point from the target; the layers are too coarse")
    gpp_onnx.save_model(pruned, args.output, external_data=loaded.had_external_data)


if __name__ == "__main__":
    main()
