"""Olive data components of the example workflow: CIFAR-10 through gpp-onnx's loaders (no download).

``cifar10_dataset`` reads any layout ``gpp-onnx run --data`` reads, from ``data_dir`` or else
``$GPP_DATA_DIR/cifar10-jpeg``; ``cifar10_post_process`` turns logits into classes for the accuracy metric.
"""

from __future__ import annotations

import numpy as np
import torch
from olive.data.registry import Registry
from torch.utils.data import Dataset

from gpp_app import data


class Cifar10(Dataset):
    """``({input_name: normalised float32 CHW (or HWC) image}, int64 label)`` items, as Olive's calibration and
    accuracy evaluation read them."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, input_name: str) -> None:
        """Hold the normalised images and their labels."""
        self.images, self.labels, self.input_name = torch.from_numpy(images), torch.from_numpy(labels), input_name

    def __len__(self) -> int:
        """The number of images."""
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One image as the model's input feed, and its label."""
        return {self.input_name: self.images[index]}, self.labels[index]


@Registry.register_dataset()
def cifar10_dataset(
    data_dir: str | None = None,
    split: str = "test",
    limit: int | None = None,
    input_name: str = "input",
    mean: tuple[float, ...] = data.IMAGENET_MEAN,
    std: tuple[float, ...] = data.IMAGENET_STD,
    channels_last: bool = False,
) -> Cifar10:
    """The first ``limit`` images of a CIFAR-10 split, normalised with ``mean`` / ``std``, fed as ``input_name``
    (HWC images where ``channels_last``, as TensorFlow / Keras exports take them)."""
    dataset = data.locate(data_dir or data.default_data_dir())
    batches = list(data.iter_uint8(dataset, split, 256, limit))
    images = data.normalize(np.concatenate([b[0] for b in batches]), tuple(mean), tuple(std), channels_last)
    return Cifar10(images, np.concatenate([b[1] for b in batches]), input_name)


@Registry.register_post_process()
def cifar10_post_process(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class of each row of logits."""
    return logits.argmax(dim=-1)
