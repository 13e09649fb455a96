"""Train the small CIFAR-10 CNN that ``gpp-onnx demo`` ships, and cut the demo's embedded image sample.

    pip install -e '.[train]'
    python tools/train_demo_model.py [--data DIR] [--epochs 6]

Writes ``gpp_app/demo_assets/cifar10-cnn.onnx`` (batch-norm folded, dynamic batch, normalisation
in metadata) and ``gpp_app/demo_assets/cifar10-sample.zip`` (the first 100 test images and the first
50 train images of each class, as JPEG files in the image-folder layout, copied byte for byte).
The network: five 3x3 convs (32, 32, 64, 64, 128 channels; max-pooling after the first and
third), global average pooling, one linear layer - channel counts in multiples of VTA's 16 so
every conv but the 3-channel first one runs on VTA. Trained from scratch on all 50,000 train
images (random crop with 4-pixel padding, horizontal flip; SGD with Nesterov momentum, one-cycle
learning rate, label smoothing 0.1); the test split is only scored, never used for choices.
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import gpp_onnx
from gpp_app import data
from gpp_app.torch_model import export_image_classifier

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "gpp_app" / "demo_assets"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's own statistics
WIDTHS = (32, 32, 64, 64, 128)
POOL_AFTER = {0, 2}  # max-pool after these convs (0-based)


class DemoCNN(nn.Module):
    """Five conv-BN-ReLU layers, two max-pools, global average pooling, a linear classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        channels = (3, *WIDTHS)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, 1, 1, bias=False) for i, o in zip(channels, channels[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(o) for o in WIDTHS)
        self.linear = nn.Linear(WIDTHS[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if index in POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def fold_batch_norm(self) -> None:
        """Fold every batch-norm into its conv (eval statistics), as deployed models have it."""
        self.convs = nn.ModuleList(fuse_conv_bn_eval(c, n) for c, n in zip(self.convs, self.norms))
        self.norms = nn.ModuleList(nn.Identity() for _ in self.norms)


def load_split(dataset: data.Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split, normalised, with their labels."""
    images, labels = zip(*data.iter_uint8(dataset, split, 1000))
    return torch.from_numpy(data.normalize(np.concatenate(images), MEAN, STD)), torch.from_numpy(np.concatenate(labels))


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the 4-pixel zero-padded images, half of them mirrored."""
    padded = F.pad(batch, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
    out = padded[:, :, dy : dy + 32, dx : dx + 32]
    flip = torch.rand(len(batch), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train(model: DemoCNN, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch: int = 128) -> None:
    """SGD (Nesterov, weight decay 5e-4) with a one-cycle schedule peaking at 0.1."""
    generator = torch.Generator().manual_seed(0)
    steps = epochs * ((len(labels) + batch - 1) // batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        start, order = time.time(), torch.randperm(len(labels), generator=generator)
        for first in range(0, len(labels), batch):
            index = order[first : first + batch]
            loss = F.cross_entropy(model(augment(images[index], generator)), labels[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.time() - start:.0f} s", flush=True)
    model.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    with torch.no_grad():
        predictions = torch.cat([model(images[i : i + 1000]).argmax(1) for i in range(0, len(labels), 1000)])
    return float((predictions == labels).float().mean())


def export(model: DemoCNN, output: Path) -> None:
    """Batch-norm folded, dynamic batch, opset 17, CIFAR-10 normalisation in the metadata."""
    model.fold_batch_norm()
    onnx_model = export_image_classifier(model, (MEAN, STD))
    onnx_model.doc_string = "gpp-onnx demo CNN: trained from scratch on CIFAR-10 by tools/train_demo_model.py"
    gpp_onnx.save_model(onnx_model, output, external_data=False)


def write_sample(root: Path, output: Path, test_per_class: int = 100, train_per_class: int = 50) -> None:
    """The first images of each class of both splits, JPEG bytes unchanged, in one zip."""
    with zipfile.ZipFile(output, "w", zipfile.ZIP_STORED) as archive:
        for split, per_class in (("test", test_per_class), ("train", train_per_class)):
            for name in data.CLASSES:
                for file in sorted((root / split / name).glob("*.jpg"))[:per_class]:
                    archive.write(file, f"{split}/{name}/{file.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset = data.locate(args.data)
    model = DemoCNN()
    train(model, *load_split(dataset, "train"), args.epochs)
    test_images, test_labels = load_split(dataset, "test")
    ASSETS.mkdir(exist_ok=True)
    export(model, ASSETS / "cifar10-cnn.onnx")
    write_sample(dataset.root, ASSETS / "cifar10-sample.zip")
    print(json.dumps({"test_accuracy_torch": accuracy(model, test_images, test_labels), "epochs": args.epochs}))


if __name__ == "__main__":
    main()
