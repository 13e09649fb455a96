"""Speed of the VTA simulator on ResNet-20's conv shapes, against ONNX Runtime fp32 in the same run.

    python tools/bench_vta.py [--batch 64] [--sparsities 0,0.5,0.7,0.9] [--interpreter-batch 64] [--json]

For each group sparsity: prunes synthetic ResNet-20 conv weights (the 18 convs of the
residual stages; the 3-channel first conv stays on the CPU, as TVM keeps it), compiles
them for VTA, and times

* the fast tile-level path (int8 channels-last activations in and out, as the VTA session
  keeps them between convs; pruned tiles skipped on the host),
* the ISA interpreter (on a smaller batch),
* ONNX Runtime running the same convs in fp32 (dense kernels),

and prints images/s, the ratios, and the simulated VTA cycles and speedup.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from timing import best_of

import gpp_onnx
from vta_backend import VTAConfig
from vta_backend.layer import VtaConv
from vta_backend.quant import QuantConv, quantize, shift_for

# (in channels, out channels, input size, stride) of ResNet-20's residual-stage convs
RESNET20_CONVS = (
    [(16, 16, 32, 1)] * 6 + [(16, 32, 32, 2)] + [(32, 32, 16, 1)] * 5 + [(32, 64, 16, 2)] + [(64, 64, 8, 1)] * 5
)


def conv_graph(weights: list[np.ndarray], batch: int) -> onnx.ModelProto:
    """Every conv as an independent node with its own input, so ORT runs exactly these convs."""
    nodes, inputs, outputs, inits = [], [], [], []
    for i, ((cin, _, size, stride), w) in enumerate(zip(RESNET20_CONVS, weights)):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"y{i}"], pads=[1, 1, 1, 1], strides=[stride] * 2))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [batch, cin, size, size]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "resnet20_convs", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def pruned_weights(rng: np.random.Generator, sparsity: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    weights = [
        (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        for cin, cout, _, _ in RESNET20_CONVS
    ]
    pruned, _ = gpp_onnx.prune(conv_graph(weights, 1), sparsity, pattern="group")
    annotation = gpp_onnx.read_annotation(pruned)
    arrays = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    return [arrays[f"w{i}"] for i in range(len(weights))], [
        annotation.for_weight(f"w{i}").kept for i in range(len(weights))
    ]


def measure(sparsity: float, batch: int, interpreter_batch: int, repeat: int, config: VTAConfig) -> dict:
    rng = np.random.default_rng(0)
    weights, kept = pruned_weights(rng, sparsity)
    layers, inputs_q, inputs_f = [], [], {}
    for i, ((cin, _, size, stride), w, k) in enumerate(zip(RESNET20_CONVS, weights, kept)):
        q = quantize(w, int(shift_for(np.abs(w).max())))
        conv = QuantConv(f"conv{i}", q, stride=(stride, stride), pads=(1, 1, 1, 1), shift=8, relu=True, kept=k)
        layers.append(VtaConv.compile(conv, (cin, size, size), config))
        x = rng.integers(-127, 128, (batch, cin, size, size)).astype(np.int8)
        inputs_q.append(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))  # channels last, as VTA's NCHW1n16c
        inputs_f[f"x{i}"] = x.astype(np.float32) / 16
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    session = ort.InferenceSession(
        conv_graph(weights, batch).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    session.run(None, inputs_f)  # warm-up
    t_ort = best_of(repeat, lambda: session.run(None, inputs_f))
    t_fast = best_of(repeat, lambda: [layer.run_nhwc(x) for layer, x in zip(layers, inputs_q)])
    small = [x[:interpreter_batch] for x in inputs_q]
    t_isa = best_of(1, lambda: [layer.run(x.transpose(0, 3, 1, 2), "isa") for layer, x in zip(layers, small)])
    stats = [layer.stats() for layer in layers]
    cycles = sum(s.timing.cycles for s in stats)
    dense = sum(s.dense_cycles for s in stats)
    floor = sum(s.floor_cycles for s in stats)
    return {
        "sparsity": sparsity,
        "tile_sparsity": 1 - sum(k.sum() for k in kept) / sum(k.size for k in kept),
        "ort_fp32_images_per_s": batch / t_ort,
        "fast_images_per_s": batch / t_fast,
        "interpreter_images_per_s": interpreter_batch / t_isa,
        "fast_vs_ort": t_ort / t_fast,
        "interpreter_slowdown_vs_fast": (t_isa / interpreter_batch) / (t_fast / batch),
        "simulated_cycles_per_image": cycles,
        "simulated_speedup": dense / cycles,
        "amdahl_bound": dense / floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--interpreter-batch", type=int, default=64)
    parser.add_argument("--sparsities", default="0,0.5,0.7,0.9")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = VTAConfig()
    rows = [
        measure(float(s), args.batch, args.interpreter_batch, args.repeat, config) for s in args.sparsities.split(",")
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"ResNet-20 residual-stage convs (18), batch {args.batch}; images/s on this machine, "
        f"VTA cycles simulated ({config.BOARD}, {config.clock_mhz:g} MHz)"
    )
    print(
        f"{'sparsity':>8} {'ORT fp32':>10} {'fast':>10} {'fast/ORT':>9} {'interp':>9} {'interp slower':>13} "
        f"{'sim cycles':>12} {'sim speedup':>11} {'Amdahl':>7}"
    )
    for r in rows:
        print(
            f"{r['sparsity']:>8.2f} {r['ort_fp32_images_per_s']:>10.0f} {r['fast_images_per_s']:>10.0f} "
            f"{r['fast_vs_ort']:>8.2f}x {r['interpreter_images_per_s']:>9.1f} "
            f"{r['interpreter_slowdown_vs_fast']:>12.1f}x "
            f"{r['simulated_cycles_per_image']:>12,} {r['simulated_speedup']:>10.2f}x {r['amdahl_bound']:>6.2f}x"
        )


if __name__ == "__main__":
    main()
