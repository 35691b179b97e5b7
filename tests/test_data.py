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


def test_image_folder_skips_broken_files_lazily_with_one_warning_each(tmp_path, monkeypatch):
    import PIL.Image

    make_image_folder(tmp_path)
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *args, **kwargs: opened.append(args[0]) or real_open(*args, **kwargs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_dataset(f"imagefolder:{tmp_path}", "train", image_size=16)
    # building lists the files and decodes none of them (on ImageNet: 1.28M decodes per rank saved)
    assert opened == [] and caught == []
    assert len(dataset) == 7 and dataset.classes == ["cat", "dog"]
    assert dataset_info(f"imagefolder:{tmp_path}") == {"num_classes": 2, "channels": 3}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a second epoch warns no more
            items = [dataset[index] for index in range(len(dataset))]
    messages = sorted(str(warning.message) for warning in caught)
    assert len(messages) == 2, messages
    assert "corrupt.png" in messages[0] and "truncated.jpg" in messages[1]
    for item in items:
        check_item(item, 3, 16, 2)
    paths = [path for path, _ in dataset.samples]
    corrupt, truncated = paths.index(str(tmp_path / "cat" / "corrupt.png")), paths.index(str(tmp_path / "dog" / "truncated.jpg"))
    # an unreadable item reads the next readable file, label included (the last one wraps around)
    assert torch.equal(items[corrupt][0], items[corrupt + 1][0]) and items[corrupt][1] == items[corrupt + 1][1] == 1
    assert torch.equal(items[truncated][0], items[0][0]) and items[truncated][1] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(dataset, batch_size=2, shuffle=True))
    assert sum(images.shape[0] for images, _ in batches) == 7


def test_image_folder_falls_back_when_a_file_breaks_later(tmp_path):
    make_image_folder(tmp_path)
    dataset = build_dataset(f"imagefolder:{tmp_path}", "test", image_size=16, channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in range(len(dataset)):  # meets the two files broken from the start
            dataset[index]
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


def test_image_folder_splits_share_the_train_class_index(tmp_path):
    for split, classes in (("train", ("ant", "bee", "cow")), ("test", ("ant", "cow"))):
        for shade, name in enumerate(classes):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (12, 12), (60 * shade, 0, 0)).save(tmp_path / split / name / "0.png")
    train = build_dataset(f"imagefolder:{tmp_path}", "train", image_size=8)
    test = build_dataset(f"imagefolder:{tmp_path}", "test", image_size=8)
    assert train.classes == test.classes == ["ant", "bee", "cow"]
    # "cow" keeps label 2 although the test split has no "bee" (it used to become label 1)
    labels = {path.split(os.sep)[-2]: label for path, label in test.samples}
    assert labels == {"ant": 0, "cow": 2} and [test[i][1] for i in range(len(test))] == [0, 2]
    # a test class the training split never saw is refused by name
    (tmp_path / "test" / "dog").mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "test" / "dog" / "0.png")
    with pytest.raises(ValueError, match=r"test has class folder\(s\) \['dog'\].*ant, bee, cow"):
        build_dataset(f"imagefolder:{tmp_path}", "test", image_size=8)


def test_image_folder_scales_16_bit_images(tmp_path):
    (tmp_path / "gray").mkdir()
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "gray" / "deep.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "gray" / "shallow.png")
    full = (tmp_path / "gray" / "deep.png").read_bytes()
    (tmp_path / "gray" / "cut.png").write_bytes(full[: len(full) // 2])  # a truncated 16-bit file
    with Image.open(tmp_path / "gray" / "deep.png") as opened:
        assert opened.mode in ("I;16", "I")  # what Pillow makes of a 16-bit grayscale PNG
    dataset = build_dataset(f"imagefolder:{tmp_path}", "train", image_size=16)
    paths = [os.path.basename(path) for path, _ in dataset.samples]
    deep, shallow = dataset[paths.index("deep.png")][0], dataset[paths.index("shallow.png")][0]
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535.0 * 2 - 1)
    assert deep.shape == (3, 16, 16)
    torch.testing.assert_close(deep, expected.expand(3, -1, -1), atol=1e-5, rtol=0)
    # the same picture at 8 bits reads the same up to its quantisation (it used to be 99.6 % white at 16 bits)
    assert (deep - shallow).abs().max() <= 2 / 255
    assert (deep == 1).float().mean() < 0.01
    resized = build_dataset(f"imagefolder:{tmp_path}", "train", image_size=8, channels=1)[paths.index("deep.png")][0]
    assert resized.shape == (1, 8, 8) and -1 <= resized.min() < resized.max() <= 1
    with pytest.warns(UserWarning, match="cut.png"):
        image, _ = dataset[paths.index("cut.png")]
    assert torch.equal(image, deep)  # the next readable file


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


def test_datamodule_predicts_a_split_in_row_order():
    module = ImageDataModule(dataset="digits", image_size=16, channels=1, batch_size=64, predict_split="test")
    loader = module.predict_dataloader()
    images = torch.cat([batch[0] for batch in loader])
    test = build_dataset("digits", "test", image_size=16, channels=1)
    assert len(images) == len(test) == 297
    assert torch.equal(images, torch.stack([test[i][0] for i in range(len(test))])), "every row once, in order"
    assert module.predict_description() == {"dataset": "digits", "split": "test", "num_classes": 10}
    with pytest.raises(ValueError, match=r"predict_split must be one of \['train', 'test'\], got 'val'"):
        ImageDataModule(dataset="digits", predict_split="val")
