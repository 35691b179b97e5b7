"""Datasets and the DataModule: shapes, ranges, determinism, splits, offline torchvision files, broken image files."""
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from flexar.data import ImageDataModule, build_dataset, dataset_info
from flexar.data.datasets import LUMINANCE


def check_item(item, channels, image_size, num_classes):
    image, label = item
    assert image.dtype == torch.float32
    assert image.shape == (channels, image_size, image_size)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert isinstance(label, int) and 0 <= label < num_classes


@pytest.mark.parametrize("name", ["digits", "photos"])
@pytest.mark.parametrize("image_size, channels", [(8, None), (24, 1), (32, 3)])
def test_embedded_items(name, image_size, channels):
    info = dataset_info(name)
    for split in ("train", "test"):
        dataset = build_dataset(name, split, image_size=image_size, channels=channels)
        for index in (0, 7, len(dataset) - 1):
            check_item(dataset[index], channels or info["channels"], image_size, info["num_classes"])


def test_embedded_lengths_and_labels():
    assert (len(build_dataset("digits", "train")), len(build_dataset("digits", "test"))) == (1500, 297)
    assert dataset_info("digits") == {"num_classes": 10, "channels": 1}
    photos = build_dataset("photos", "test", image_size=8)
    assert len(photos) == 512 and len(build_dataset("photos", "train", image_size=8)) == 4096
    assert {photos[index][1] for index in range(32)} == set(range(dataset_info("photos")["num_classes"]))
    digits = build_dataset("digits", "test", image_size=8)
    assert {digits[index][1] for index in range(len(digits))} == set(range(10))
    # Digits use the full range: 0 ink maps to -1 and 16 to +1.
    stacked = torch.stack([digits[index][0] for index in range(len(digits))])
    assert stacked.min() == -1.0 and stacked.max() == 1.0


@pytest.mark.parametrize("name", ["digits", "photos"])
def test_items_are_deterministic(name):
    first = build_dataset(name, "train", image_size=16)
    second = build_dataset(name, "train", image_size=16)
    for index in (0, 3, 99):
        image, label = first[index]
        assert torch.equal(image, first[index][0])
        assert torch.equal(image, second[index][0]) and label == second[index][1]


def test_digits_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    train = build_dataset("digits", "train", image_size=8)
    test = build_dataset("digits", "test", image_size=8)
    split_rows = torch.cat([train.images, test.images]).reshape(-1, 64)
    original = torch.as_tensor(load_digits().images, dtype=torch.float32).reshape(-1, 64) / 8.0 - 1.0
    # Same multiset of images: every digit is in exactly one split.
    assert torch.equal(torch.sort(split_rows, dim=0).values, torch.sort(original, dim=0).values)
    assert torch.equal(split_rows.unique(dim=0), original.unique(dim=0))
    train_labels = torch.tensor([train[index][1] for index in range(len(train))])
    assert torch.equal(train_labels, train.labels)


def test_photo_splits_use_different_crops():
    train = build_dataset("photos", "train", image_size=16)
    test = build_dataset("photos", "test", image_size=16)
    boxes_train = {train.crop_box(index) for index in range(64)}
    boxes_test = {test.crop_box(index) for index in range(64)}
    assert not boxes_train & boxes_test
    sides = [train.crop_box(index)[3] for index in range(512)]
    assert min(sides) < 80 and max(sides) > 250  # small patches and near-whole photos both occur


def test_channel_conversion():
    gray = build_dataset("digits", "train", image_size=16)[4][0]
    rgb = build_dataset("digits", "train", image_size=16, channels=3)[4][0]
    assert torch.equal(rgb, gray.expand(3, -1, -1))
    colour = build_dataset("photos", "train", image_size=16)[4][0]
    luminance = build_dataset("photos", "train", image_size=16, channels=1)[4][0]
    expected = sum(weight * colour[channel] for channel, weight in enumerate(LUMINANCE))
    torch.testing.assert_close(luminance[0], expected)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="digits, photos, mnist, cifar10, imagefolder:PATH"):
        build_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_info("imagefolder:")
    for image_size in (4, 32.0, True):
        with pytest.raises(ValueError, match="image_size"):
            build_dataset("digits", image_size=image_size)
    with pytest.raises(ValueError, match="channels"):
        build_dataset("digits", channels=2)
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", split="validation")


# ---------------------------------------------------------------- torchvision files


def write_idx(path, array, magic):
    with open(path, "wb") as file:
        file.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape))
        file.write(array.astype(np.uint8).tobytes())


def write_fake_mnist(root, train_count=5, test_count=3):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10, 2049)


def test_mnist_from_raw_folder(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path)
    train = build_dataset("mnist", "train", image_size=32, root=str(tmp_path))
    assert len(train) == 5
    check_item(train[3], 1, 32, 10)
    assert train[3][1] == 3
    native = build_dataset("mnist", "test", image_size=28, channels=3, root=str(tmp_path))
    assert len(native) == 3
    check_item(native[0], 3, 28, 10)
    assert native[0][0].min() >= -1 and native[0][0].max() <= 1 and native[0][0].std() > 0.3
    monkeypatch.setenv("FLEXAR_DATA", str(tmp_path))
    assert len(build_dataset("mnist", "test", image_size=16)) == 3


def test_missing_torchvision_files_name_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXAR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as error:
        build_dataset("mnist")
    message = str(error.value)
    assert os.path.join(str(tmp_path / "nowhere"), "MNIST", "raw") in message and "FLEXAR_DATA" in message
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_dataset("cifar10", root=str(tmp_path))


def test_real_mnist_if_available():
    root = os.environ.get("FLEXAR_DATA")
    if not root or not os.path.isdir(os.path.join(root, "MNIST", "raw")):
        pytest.skip("FLEXAR_DATA does not point to a folder with MNIST/raw")
    dataset = build_dataset("mnist", "test", image_size=32)
    assert len(dataset) == 10000
    check_item(dataset[0], 1, 32, 10)


# ---------------------------------------------------------------- image folders


def make_image_folder(root):
    rng = np.random.default_rng(0)
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "cat" / f"{index}.png")
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8)).save(root / "dog" / f"{index}.jpg")
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    full = (root / "dog" / "0.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(full[: len(full) // 2])


def test_image_folder_skips_broken_files_with_one_warning(tmp_path):
    make_image_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_dataset(f"imagefolder:{tmp_path}", "train", image_size=16)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "corrupt.png" in message and "truncated.jpg" in message
    assert len(dataset) == 5 and dataset.classes == ["cat", "dog"]
    assert dataset_info(f"imagefolder:{tmp_path}") == {"num_classes": 2, "channels": 3}
    for index in range(len(dataset)):
        check_item(dataset[index], 3, 16, 2)
    batches = list(DataLoader(dataset, batch_size=2, shuffle=True))
    assert sum(images.shape[0] for images, _ in batches) == 5


def test_image_folder_falls_back_when_a_file_breaks_later(tmp_path):
    make_image_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = build_dataset(f"imagefolder:{tmp_path}", "test", image_size=16, channels=1)
    broken_path, _ = dataset.samples[1]
    with open(broken_path, "wb") as file:
        file.write(b"not an image")
    with pytest.warns(UserWarning, match="unreadable image"):
        image, label = dataset[1]
    assert torch.equal(image, dataset[2][0]) and label == dataset[2][1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file, not once per access
        for images, labels in DataLoader(dataset, batch_size=4):
            assert images.shape[1:] == (1, 16, 16)


def test_image_folder_split_subfolders(tmp_path):
    for split, classes in (("train", ("a", "b", "c")), ("val", ("a", "b", "c"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (20, 20), (len(name) * 40, 0, 0)).save(tmp_path / split / name / f"{split}.png")
    train = build_dataset(f"imagefolder:{tmp_path}", "train", image_size=8)
    test = build_dataset(f"imagefolder:{tmp_path}", "test", image_size=8)
    assert all("train" in path for path, _ in train.samples) and all("val" in path for path, _ in test.samples)
    assert dataset_info(f"imagefolder:{tmp_path}")["num_classes"] == 3


# ---------------------------------------------------------------- DataModule


def test_datamodule_batches():
    module = ImageDataModule(dataset="digits", image_size=16, channels=3, batch_size=8, seed=1)
    assert (module.num_classes, module.channels, module.image_size) == (10, 3, 16)
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (8,) and labels.dtype == torch.long
    val_images, _ = next(iter(module.val_dataloader()))
    assert val_images.shape == (8, 3, 16, 16)
    same_seed = ImageDataModule(dataset="digits", image_size=16, channels=3, batch_size=8, seed=1)
    again, _ = next(iter(same_seed.train_dataloader()))
    assert torch.equal(images, again)
    assert ImageDataModule(dataset="photos").channels == 3


def test_datamodule_from_lightning_cli(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    write_fake_mnist(tmp_path)
    arguments = ["--data.dataset", "mnist", "--data.image_size", "16", "--data.root", str(tmp_path),
                 "--data.batch_size", "2", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
                 "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["flexar-train"])
    cli = LightningCLI(
        BoringModel,
        ImageDataModule,
        run=False,
        args=arguments,
        save_config_callback=None,
        seed_everything_default=False,
    )
    module = cli.datamodule
    assert isinstance(module, ImageDataModule) and module.hparams.dataset == "mnist"
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (2, 1, 16, 16)
