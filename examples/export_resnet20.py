"""Export the pretrained CIFAR-10 ResNet-20 to ONNX (batch-norm folded, dynamic batch, normalisation in metadata).

    pip install -e '.[train]'          # torch is the optional extra
    python examples/export_resnet20.py -o resnet20.onnx [--weights PATH] [--data DIR] [--limit N]

ResNet-20 is the CIFAR variant of He et al. 2016 (3 stages of 16/32/64 channels, 3 basic
blocks each, option-A shortcuts: stride-2 subsampling and zero-padded channels), as in
akamaster/pytorch_resnet_cifar10. The weights default to
``$GPP_MODELS_DIR/resnet20-cifar10-akamaster.th`` (``../shared/models``). With a data folder
(default ``$GPP_DATA_DIR/cifar10-jpeg``) the script also reports the torch model's top-1
accuracy on the test split, to compare with ``gpp-onnx run --backend ort``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import gpp_onnx
from gpp_app import data
from gpp_app.torch_model import export_image_classifier

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("GPP_MODELS_DIR", REPO.parent / "shared" / "models"))
DATA_DIR = Path(os.environ.get("GPP_DATA_DIR", REPO.parent / "shared" / "data"))
MEAN, STD = data.IMAGENET_MEAN, data.IMAGENET_STD  # the normalisation the weights were trained with


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))  # option A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def fold_batch_norm(self) -> None:
        self.conv1, self.bn1 = fuse_conv_bn_eval(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fuse_conv_bn_eval(self.conv2, self.bn2), nn.Identity()


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [
                BasicBlock(in_planes, planes, stride),
                BasicBlock(planes, planes, 1),
                BasicBlock(planes, planes, 1),
            ]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def fold_batch_norm(self) -> None:
        self.conv1, self.bn1 = fuse_conv_bn_eval(self.conv1, self.bn1), nn.Identity()
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                block.fold_batch_norm()


def load_pretrained(path: Path) -> ResNet20:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    model = ResNet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def torch_accuracy(model: nn.Module, data_dir: Path, limit: int | None, batch: int = 500) -> tuple[float, int]:
    dataset = data.locate(data_dir)
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.iter_uint8(dataset, "test", batch, limit):
            logits = model(torch.from_numpy(data.normalize(images, MEAN, STD)))
            correct += int((logits.argmax(1).numpy() == labels).sum())
            total += len(labels)
    return correct / total, total


def export(model: ResNet20, output: Path) -> None:
    model.fold_batch_norm()
    gpp_onnx.save_model(export_image_classifier(model, (MEAN, STD)), output, external_data=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("resnet20.onnx"))
    parser.add_argument("--weights", type=Path, default=MODELS_DIR / "resnet20-cifar10-akamaster.th")
    parser.add_argument("--data", type=Path, default=DATA_DIR / "cifar10-jpeg")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--no-eval", action="store_true", help="skip the torch accuracy")
    args = parser.parse_args()

    model = load_pretrained(args.weights)
    result: dict[str, object] = {"output": str(args.output), "weights": str(args.weights)}
    if not args.no_eval:
        accuracy, images = torch_accuracy(model, args.data, args.limit)
        result.update(torch_accuracy=accuracy, images=images, data=str(args.data))
    folded = load_pretrained(args.weights)
    export(folded, args.output)
    if not args.no_eval:
        folded_accuracy, _ = torch_accuracy(folded, args.data, args.limit)
        result["torch_folded_accuracy"] = folded_accuracy
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
