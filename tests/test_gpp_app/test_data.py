"""CIFAR-10 loaders: the python-pickle, binary and image-folder layouts, written here in small files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import IMAGES, LABELS, write_binary, write_folders, write_pickle
from PIL import Image

from gpp_app import data
from gpp_onnx import UserError


def collect(path: Path, batch: int = 7, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    batches = list(data.iter_uint8(data.locate(path), "test", batch, limit))
    assert all(len(labels) <= batch for _, labels in batches)
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


@pytest.mark.parametrize("str_keys", [False, True])
def test_pickle_release_with_bytes_or_str_keys(tmp_path, str_keys):
    folder = write_pickle(tmp_path, str_keys)
    assert data.locate(tmp_path).layout == "pickle"  # found one level down
    images, labels = collect(folder)
    np.testing.assert_array_equal(images, IMAGES)
    np.testing.assert_array_equal(labels, LABELS)
    assert data.count(data.locate(folder), "train") == 25


def test_binary_release(tmp_path):
    images, labels = collect(write_binary(tmp_path))
    np.testing.assert_array_equal(images, IMAGES)
    np.testing.assert_array_equal(labels, LABELS)


def test_image_folders_are_balanced_and_lossless_for_png(tmp_path):
    images, labels = collect(write_folders(tmp_path))
    assert sorted(labels.tolist()) == sorted(LABELS.tolist())
    assert list(labels[:10]) == list(range(10))  # interleaved over classes: any prefix covers them
    for image, label in zip(images, labels):
        assert any(np.array_equal(image, IMAGES[i]) for i in np.flatnonzero(LABELS == label))


def test_limit_streams_only_what_is_asked(tmp_path):
    images, labels = collect(write_pickle(tmp_path, False), batch=4, limit=9)
    assert len(labels) == 9 and data.count(data.locate(tmp_path), "test", 9) == 9


def test_normalize_is_nchw_float32():
    x = data.normalize(IMAGES[:2], data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert x.dtype == np.float32 and x.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(x[0, 1, 0, 0], (IMAGES[0, 1, 0, 0] / 255 - 0.456) / 0.224, rtol=1e-5)


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no CIFAR-10 data found"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a folder"),
    ],
)
def test_bad_data_paths_say_which_layouts_are_accepted(tmp_path, setup, message):
    with pytest.raises(UserError, match=message) as info:
        data.locate(setup(tmp_path))
    assert "cifar-10-batches-py" in str(info.value)


def test_truncated_binary_is_an_error(tmp_path):
    folder = write_binary(tmp_path)
    (folder / "test_batch.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="not a CIFAR-10 binary batch"):
        collect(folder)


def _pickle_batch(root: Path, content) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(content, f)
    return folder


@pytest.mark.parametrize(
    "content,message",
    [
        ([1, 2, 3], "holds a list, not a CIFAR-10 batch dictionary"),
        ({b"data": IMAGES.reshape(25, -1), b"labels": LABELS[:20].tolist()}, "holds 25 images but 20 labels"),
    ],
)
def test_a_pickle_that_does_not_fit_is_a_user_error(tmp_path, content, message):
    with pytest.raises(UserError, match=message):
        collect(_pickle_batch(tmp_path, content))


def test_images_of_different_sizes_are_a_user_error(tmp_path):
    root = write_folders(tmp_path)
    odd = root / "test" / "airplane" / "odd.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(odd)
    with pytest.raises(UserError, match="odd.png is 16x16 but .* is 32x32; all images must have one size"):
        collect(root, batch=100)


def test_data_folder_defaults_to_the_shared_folder_beside_the_working_folder(tmp_path, monkeypatch):
    from gpp_app.data import default_data_dir

    monkeypatch.delenv("GPP_DATA_DIR", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(UserError, match="pass --data DIR"):
        default_data_dir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert default_data_dir().resolve() == tmp_path / "shared" / "data" / "cifar10-jpeg"
    monkeypatch.setenv("GPP_DATA_DIR", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere" / "cifar10-jpeg"
