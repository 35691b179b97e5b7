"""Image datasets: every item is ``(image, label)`` with ``image`` float32 (C, H, W) in [-1, 1] and ``label`` an int.

Names understood by :func:`build_dataset`:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, 1 channel), upsampled.
  A fixed permutation (seed 0) puts 1500 images in ``train`` and the other 297 in ``test``.
- ``photos``: square crops of 16 photographs bundled with scikit-image (3 channels, label = photo index). Crop
  side is log-uniform between 1/8 and all of the photo's short side, so items range from flat patches of sky to
  dense texture: the natural test for adaptive-length tokenizers. Each crop is a pure function of (split, index);
  ``train`` has 4096 items, ``test`` 512 drawn with another seed, so test crops are new crops of the same photos
  (held-out views, not held-out scenes). ``cat`` is left out because it is the same photo as ``chelsea``.
- ``mnist``, ``cifar10``: torchvision's files, never downloaded. The root is the ``root`` argument, else the
  ``FLEXAR_DATA`` environment variable, else ``./data``; MNIST is read from ``ROOT/MNIST/raw`` (the idx files) and
  CIFAR-10 from ``ROOT/cifar-10-batches-py``.
- ``imagefolder:PATH``: one sub-folder of images per class, as torchvision's ``ImageFolder``. If ``PATH/train``
  exists it holds the train split and ``PATH/test`` (or ``PATH/val``) the test split; otherwise both splits read all
  of ``PATH``. The class index comes from the train split's sub-folders and is shared by every split, so a test split
  that lacks a class keeps the train labels; a test class folder the train split does not have is refused by name.
  Images are resized (shorter side, bicubic) and centre-cropped, with no augmentation; 16-bit grayscale files
  (Pillow modes ``I;16`` and ``I``) are scaled from 0..65535. Building the dataset only lists the files (decoding
  each one up front costs a full pass over ImageNet on every rank): a file that cannot be read is found when it is
  loaded, named in one warning (once per process: each DataLoader worker and rank warns for itself), and from then
  on replaced by the next readable file, so an epoch never ends early.

``image_size`` is the output side; ``channels=None`` keeps the native count, 1 -> 3 repeats the channel and 3 -> 1
takes the ITU-R BT.601 luminance.
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

KNOWN_DATASETS = ("digits", "photos", "mnist", "cifar10", "imagefolder:PATH")

PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field", "coins",
    "moon", "page", "text", "horse", "brick", "grass", "gravel", "colorwheel",
)  # fmt: skip

SPLITS = ("train", "test")
LUMINANCE = (0.299, 0.587, 0.114)


def _match_channels(image: Tensor, channels: int | None) -> Tensor:
    """(C, H, W) -> (channels, H, W); the luminance weights sum to 1, so [-1, 1] stays [-1, 1]."""
    if channels is None or channels == image.shape[0]:
        return image
    if image.shape[0] == 1 and channels == 3:
        return image.expand(3, -1, -1).contiguous()
    if image.shape[0] == 3 and channels == 1:
        weights = torch.tensor(LUMINANCE, dtype=image.dtype).view(3, 1, 1)
        return (image * weights).sum(dim=0, keepdim=True)
    raise ValueError(f"cannot convert {image.shape[0]} channels to {channels}")


def _resize(image: Tensor, image_size: int) -> Tensor:
    """(C, h, w) float -> (C, image_size, image_size), bilinear with antialiasing when shrinking."""
    if image.shape[-2:] == (image_size, image_size):
        return image
    resized = F.interpolate(image[None], size=(image_size, image_size), mode="bilinear", antialias=True)
    return resized[0].clamp(-1.0, 1.0)


def _uint8_to_unit(image: Tensor) -> Tensor:
    return image.float() / 127.5 - 1.0


class TensorImages(Dataset):
    """Images held in memory, resized per item (the originals stay small: 8x8 digits, 28x28 MNIST).

    Args:
        images: (N, C, h, w), uint8 in [0, 255] or float in [-1, 1].
        labels: (N,) integer class labels.
        image_size: output side.
        channels: output channels, None for C.
    """

    def __init__(self, images: Tensor, labels: Tensor, image_size: int, channels: int | None = None):
        self.images = images
        self.labels = labels.long()
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        image = _uint8_to_unit(image) if image.dtype == torch.uint8 else image.float()
        image = _match_channels(_resize(image, self.image_size), self.channels)
        return image, int(self.labels[index])


@functools.lru_cache(maxsize=1)
def _load_photos() -> tuple[Tensor, ...]:
    """The bundled photographs as (3, H, W) uint8 tensors, loaded once per process."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        array = torch.as_tensor(getattr(skimage.data, name)())
        if array.dtype == torch.bool:  # `horse` is a binary silhouette
            array = array.to(torch.uint8) * 255
        if array.dim() == 2:
            array = array.unsqueeze(-1).expand(-1, -1, 3)
        photos.append(array[..., :3].permute(2, 0, 1).contiguous())
    return tuple(photos)


class PhotoCrops(Dataset):
    """Deterministic square crops of scikit-image's photographs, label = photo index.

    Item ``index`` crops photo ``index % 16`` with a generator seeded from (seed, index), so an item never changes
    and labels are balanced.

    Args:
        image_size: output side.
        channels: output channels, None for 3.
        length: number of items.
        seed: crop seed; train and test use different seeds.
        min_fraction: smallest crop side as a fraction of the photo's short side.
    """

    def __init__(
        self,
        image_size: int,
        channels: int | None = None,
        length: int = 4096,
        seed: int = 0,
        min_fraction: float = 0.125,
    ):
        self.photos = _load_photos()
        self.image_size = image_size
        self.channels = channels
        self.length = length
        self.seed = seed
        self.min_fraction = min_fraction

    def __len__(self) -> int:
        return self.length

    def crop_box(self, index: int) -> tuple[int, int, int, int]:
        """(photo, top, left, side) of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} crops")
        photo = index % len(self.photos)
        height, width = self.photos[photo].shape[-2:]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        uniform = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        # Log-uniform side: as many crops per octave of scale, so small flat patches are as common as whole scenes.
        fraction = math.exp(math.log(self.min_fraction) * uniform[0])
        side = max(8, round(fraction * min(height, width)))
        top = int(uniform[1] * (height - side + 1))
        left = int(uniform[2] * (width - side + 1))
        return photo, top, left, side

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        photo, top, left, side = self.crop_box(index)
        crop = _uint8_to_unit(self.photos[photo][:, top : top + side, left : left + side])
        return _match_channels(_resize(crop, self.image_size), self.channels), photo


# Pillow's modes for 16-bit grayscale files (PNG, TIFF): its RGB conversion clips their values at 255, which turns
# almost every pixel white, so they are scaled from 0..65535 instead.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageFolderImages(Dataset):
    """Images in one sub-folder per class, resized and centre-cropped to ``image_size``; see the module docstring.

    Files are listed, not decoded, when the dataset is built. An item whose file cannot be read is replaced by the next
    readable file (its label comes with it), with one warning per file and process.

    Args:
        folder: root with one sub-folder per class.
        image_size: output side.
        channels: output channels, None for 3.
        classes: the class index (sorted class names, label = position); None takes the folder's own sub-folders.
            ``build_dataset`` passes the train split's classes to every split, so labels mean the same everywhere.
    """

    def __init__(self, folder: str, image_size: int, channels: int | None = None, classes: list[str] | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        own, _ = find_classes(folder)
        classes = list(own) if classes is None else list(classes)
        unknown = [name for name in own if name not in classes]
        if unknown:
            raise ValueError(
                f"{folder} has class folder(s) {unknown} that the class index lacks (the train split's classes: "
                f"{_format_paths(classes)}); every split must use the train split's classes"
            )
        index = {name: label for label, name in enumerate(classes)}
        self.folder = folder
        self.classes = classes
        self.image_size = image_size
        self.channels = channels
        self.samples = make_dataset(folder, {name: index[name] for name in own}, IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise ValueError(f"no images in {folder} (expected one sub-folder of images per class)")
        self.failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Tensor:
        """One file -> (3, image_size, image_size) float in [-1, 1]: shorter side resized, centre crop."""
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(path) as opened:
            if opened.mode in SIXTEEN_BIT_MODES:
                image = Image.fromarray(np.asarray(opened, dtype=np.float32) / 65535.0)  # mode "F", values 0..1
            else:
                image = opened.convert("RGB")
        scale = self.image_size / min(image.size)
        width = max(self.image_size, round(image.width * scale))
        height = max(self.image_size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - self.image_size) // 2, (height - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        if image.mode == "F":
            # mode "F" keeps bicubic overshoot that 8-bit modes clip: clip it the same way
            unit = torch.from_numpy(np.array(image, dtype=np.float32)).clamp(0.0, 1.0)
            return (unit * 2.0 - 1.0).expand(3, -1, -1).contiguous()
        return _uint8_to_unit(pil_to_tensor(image))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            if path in self.failed:
                continue
            try:
                image = self.load(path)
            except Exception as error:  # any decoder error (OSError, SyntaxError, DecompressionBomb...): never end an epoch
                self.failed.add(path)
                warnings.warn(f"skipping unreadable image file in {self.folder}: {path} ({error}); its items read the "
                              f"next readable file instead")
                continue
            return _match_channels(image, self.channels), label
        raise RuntimeError(f"no image in {self.folder} could be read")


def _format_paths(paths: list[str], limit: int = 20) -> str:
    shown = ", ".join(paths[:limit])
    return shown if len(paths) <= limit else f"{shown}, ... and {len(paths) - limit} more"


def _data_root(root: str | None) -> str:
    return root if root is not None else os.environ.get("FLEXAR_DATA", "data")


def _missing(dataset: str, folder: str, expected: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{dataset} not found: expected {expected} in {os.path.abspath(folder)}. flexar never downloads it; pass "
        f"root=... (--data.root on the command line) or set FLEXAR_DATA to the folder that holds it."
    )


def _torchvision_images(kind: str, split: str, root: str | None) -> tuple[Tensor, Tensor]:
    """(N, C, h, w) uint8 images and (N,) labels from torchvision's MNIST / CIFAR-10 files."""
    import torchvision

    root = _data_root(root)
    train = split == "train"
    if kind == "mnist":
        raw = os.path.join(root, "MNIST", "raw")
        contents = ("images-idx3", "labels-idx1")
        files = [f"{prefix}-{content}-ubyte" for prefix in ("train", "t10k") for content in contents]
        if not all(os.path.isfile(os.path.join(raw, file)) for file in files):
            raise _missing("MNIST", raw, "the raw idx files " + ", ".join(files))
        dataset = torchvision.datasets.MNIST(root, train=train, download=False)
        return dataset.data.unsqueeze(1), torch.as_tensor(dataset.targets)
    folder = os.path.join(root, "cifar-10-batches-py")
    try:
        dataset = torchvision.datasets.CIFAR10(root, train=train, download=False)
    except RuntimeError as error:  # torchvision checks every batch file's md5 and raises a bare RuntimeError
        raise _missing("CIFAR-10", folder, "the python-version batches (data_batch_1..5, test_batch)") from error
    return torch.as_tensor(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(dataset.targets)


def _parse_name(name: str) -> tuple[str, str | None]:
    """'imagefolder:PATH' -> ('imagefolder', PATH); other known names -> (name, None)."""
    if isinstance(name, str) and name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return "imagefolder", os.path.expanduser(name[len("imagefolder:") :])
    if name in KNOWN_DATASETS[:-1]:
        return name, None
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")


def _image_folder_split(path: str, split: str) -> str:
    candidates = ("train",) if split == "train" else ("test", "val")
    for candidate in candidates:
        if os.path.isdir(os.path.join(path, candidate)):
            return os.path.join(path, candidate)
    return path


def dataset_info(name: str) -> dict:
    """``{"num_classes": int, "channels": int}`` (native channels) without loading any images."""
    kind, path = _parse_name(name)
    if kind == "imagefolder":
        from torchvision.datasets.folder import find_classes

        classes, _ = find_classes(_image_folder_split(path, "train"))
        return {"num_classes": len(classes), "channels": 3}
    return {
        "digits": {"num_classes": 10, "channels": 1},
        "photos": {"num_classes": len(PHOTOS), "channels": 3},
        "mnist": {"num_classes": 10, "channels": 1},
        "cifar10": {"num_classes": 10, "channels": 3},
    }[kind]


def build_dataset(
    name: str,
    split: str = "train",
    image_size: int = 32,
    channels: int | None = None,
    root: str | None = None,
) -> Dataset:
    """A dataset of ``(image (C, image_size, image_size) float32 in [-1, 1], label int)``.

    Args:
        name: one of ``digits``, ``photos``, ``mnist``, ``cifar10``, ``imagefolder:PATH``.
        split: ``train`` or ``test``.
        image_size: output side, an int >= 8.
        channels: 1 or 3, None for the dataset's own count.
        root: folder holding torchvision datasets; defaults to ``$FLEXAR_DATA``, then ``./data``.
    """
    kind, path = _parse_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (native), got {channels!r}")
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # values 0..16
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
        indices = order[:1500] if split == "train" else order[1500:]
        return TensorImages(images[indices], torch.as_tensor(digits.target)[indices], image_size, channels)
    if kind == "photos":
        return PhotoCrops(image_size, channels, length=4096 if split == "train" else 512, seed=SPLITS.index(split))
    if kind in ("mnist", "cifar10"):
        images, labels = _torchvision_images(kind, split, root)
        return TensorImages(images, labels, image_size, channels)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {os.path.abspath(path)} does not exist")
    from torchvision.datasets.folder import find_classes

    classes, _ = find_classes(_image_folder_split(path, "train"))  # one class index for every split
    return ImageFolderImages(_image_folder_split(path, split), image_size, channels, classes=classes)
