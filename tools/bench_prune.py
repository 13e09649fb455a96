"""Time load + prune + save of a ResNet-50-sized ONNX model against plain onnx.load + onnx.save.

    python tools/bench_prune.py [--pattern group] [--sparsity 0.7] [--repeat 3] [--json]

The model is ResNet-50's graph (bottlenecks 3-4-6-3, about 23.5M conv weights) with
synthetic random weights, built in a temporary folder. Both timings come from the
same run; the ratio is the figure to report (these machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from timing import best_of

import gpp_onnx
from gpp_onnx.patterns import pattern_names
from gpp_onnx.pruner import DEFAULT_PATTERN


class GraphBuilder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.inits, self.count = rng, [], [], 0

    def conv(self, x: str, out_c: int, in_c: int, k: int, stride: int = 1, relu: bool = True) -> str:
        i = self.count = self.count + 1
        w = (self.rng.standard_normal((out_c, in_c, k, k), np.float32) * np.sqrt(2 / (in_c * k * k))).astype(np.float32)
        self.inits += [
            numpy_helper.from_array(w, f"conv{i}.weight"),
            numpy_helper.from_array(np.zeros(out_c, np.float32), f"conv{i}.bias"),
        ]
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"conv{i}.weight", f"conv{i}.bias"],
                [f"conv{i}"],
                name=f"Conv_{i}",
                kernel_shape=[k, k],
                strides=[stride] * 2,
                pads=[k // 2] * 4,
            )
        )
        return self.relu(f"conv{i}") if relu else f"conv{i}"

    def relu(self, x: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [x + ".relu"]))
        return x + ".relu"

    def add(self, a: str, b: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [a + ".add"]))
        return self.relu(a + ".add")


def resnet50(rng: np.random.Generator) -> onnx.ModelProto:
    b = GraphBuilder(rng)
    x = b.conv("input", 64, 3, 7, stride=2)
    b.nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, in_c = "pool", 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for j in range(blocks):
            s = stride if j == 0 else 1
            y = b.conv(x, width, in_c, 1)
            y = b.conv(y, width, width, 3, stride=s)
            y = b.conv(y, width * 4, width, 1, relu=False)
            shortcut = b.conv(x, width * 4, in_c, 1, stride=s, relu=False) if j == 0 else x
            x, in_c = b.add(y, shortcut), width * 4
    b.nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"])]
    fc = rng.standard_normal((1000, 2048), np.float32) * 0.01
    b.inits.append(numpy_helper.from_array(fc.astype(np.float32), "fc.weight"))
    b.nodes.append(helper.make_node("Gemm", ["flat", "fc.weight"], ["logits"], transB=1))
    graph = helper.make_graph(
        b.nodes,
        "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        b.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default=DEFAULT_PATTERN, choices=pattern_names())
    parser.add_argument("--scope", default="layer", choices=["layer", "global"])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src, dst, plain = Path(tmp, "resnet50.onnx"), Path(tmp, "pruned.onnx"), Path(tmp, "copy.onnx")
        onnx.save(resnet50(np.random.default_rng(0)), src)
        conv_params = sum(
            int(np.prod(t.dims))
            for t in onnx.load(src).graph.initializer
            if t.name.endswith(".weight") and len(t.dims) == 4
        )

        def reference() -> None:
            onnx.save(onnx.load(src), plain)

        def gpp() -> None:
            loaded = gpp_onnx.load_model(src)
            pruned, _ = gpp_onnx.prune(loaded, args.sparsity, pattern=args.pattern, scope=args.scope)
            gpp_onnx.save_model(pruned, dst, external_data=loaded.had_external_data)

        t_ref = best_of(args.repeat, reference)
        t_gpp = best_of(args.repeat, gpp)
        sparsity = gpp_onnx.inspect(dst).sparsity
    result = {
        "model": "ResNet-50 graph, synthetic weights",
        "conv_params": conv_params,
        "pattern": args.pattern,
        "scope": args.scope,
        "sparsity_target": args.sparsity,
        "sparsity_achieved": sparsity,
        "load_prune_save_s": t_gpp,
        "onnx_load_save_s": t_ref,
        "ratio": t_gpp / t_ref,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['model']}: {conv_params / 1e6:.1f}M conv weights, {args.pattern}/{args.scope} "
            f"pruning at {args.sparsity:.0%} (achieved {sparsity:.2%}), best of {args.repeat}"
        )
        print(f"  gpp-onnx load + prune + save: {t_gpp:.3f} s")
        print(f"  onnx.load + onnx.save:        {t_ref:.3f} s")
        print(f"  ratio: {t_gpp / t_ref:.2f}x")


if __name__ == "__main__":
    main()
