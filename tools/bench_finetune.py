"""Time one fine-tuning epoch of gpp-onnx against a plain torch loop over the same converted module.

    python tools/bench_finetune.py MODEL.onnx [--data DIR] [--images 50000] [--batch 128] [--json]

Both train the onnx2torch conversion of MODEL with SGD on the same train images, same
batch size, same number of steps. gpp-onnx's loop adds what fine-tuning needs (random
crops and flips, frozen pruned tiles, the learning-rate schedule, progress statistics);
the plain loop trains on pre-normalised tensors already in memory. Decoding the images
is excluded from both. Target: gpp-onnx within 1.3x of the plain loop.

A third run adds distillation from MODEL itself as the teacher (``--teacher``); target: an
epoch with the teacher at most 1.5x the masked epoch without it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import onnx

from gpp_app import data
from gpp_app.finetune import FinetuneOptions, split_in_memory, train
from gpp_app.torch_model import import_training, to_trainable
from gpp_onnx.normalization import normalization_for

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GPP_DATA_DIR", REPO.parent / "shared" / "data")) / "cifar10-jpeg"


def plain_epoch(model: onnx.ModelProto, x, y, batch: int) -> float:
    torch, _ = import_training()
    module = to_trainable(model).module
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    start = time.perf_counter()
    for i in range(0, len(y), batch):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(module(x[i : i + batch]), y[i : i + batch])
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def timed_epoch(model: onnx.ModelProto, dataset, mean, std, options: FinetuneOptions) -> float:
    start = time.perf_counter()
    train(model, dataset, mean, std, options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch, _ = import_training()
    model = onnx.load(args.model)
    dataset = data.locate(args.data)
    mean, std = normalization_for(model)
    images, labels = split_in_memory(str(dataset.root), dataset.layout, "train", args.images)  # decoded once
    x = torch.from_numpy(data.normalize(images, mean, std))
    y = torch.from_numpy(labels)
    t_plain = plain_epoch(model, x, y, args.batch)
    t_ours = timed_epoch(model, dataset, mean, std, FinetuneOptions(epochs=1, batch=args.batch, limit=args.images))
    with_teacher = FinetuneOptions(epochs=1, batch=args.batch, limit=args.images, teacher=str(args.model))
    t_teacher = timed_epoch(model, dataset, mean, std, with_teacher)
    result = {
        "model": str(args.model),
        "images": len(labels),
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "gpp_onnx_epoch_s": t_ours,
        "plain_torch_epoch_s": t_plain,
        "ratio": t_ours / t_plain,
        "with_teacher_epoch_s": t_teacher,
        "teacher_ratio": t_teacher / t_ours,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"one epoch over {len(labels):,} images, batch {args.batch}, {result['threads']} threads")
        print(f"  gpp-onnx fine-tuning: {t_ours:.1f} s")
        print(f"  plain torch loop:     {t_plain:.1f} s")
        print(f"  ratio: {t_ours / t_plain:.2f}x")
        print(f"  with the teacher:     {t_teacher:.1f} s ({t_teacher / t_ours:.2f}x the masked epoch without it)")


if __name__ == "__main__":
    main()
