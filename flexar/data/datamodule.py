"""Lightning DataModule over :func:`flexar.data.build_dataset` for tokenizer training (images, labels).

Its ``__init__`` takes flat typed arguments only, so LightningCLI exposes them as ``--data.dataset mnist``,
``--data.image_size 64`` ... and the saved hyperparameters rebuild it.
"""
from __future__ import annotations

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from flexar.data.datasets import build_dataset, dataset_info


class ImageDataModule(lightning.LightningDataModule):
    """Train on a dataset's ``train`` split, validate (and test) on its ``test`` split.

    Batches are ``(images (B, C, image_size, image_size) float32 in [-1, 1], labels (B,) long)``.

    Args:
        dataset: a name understood by :func:`flexar.data.build_dataset` (``digits``, ``photos``, ``mnist``,
            ``cifar10``, ``imagefolder:PATH``).
        image_size: image side in pixels.
        channels: 1 or 3, None for the dataset's own count.
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        root: folder holding torchvision datasets; defaults to ``$FLEXAR_DATA``.
        seed: seed of the training shuffle.
    """

    def __init__(
        self,
        dataset: str = "digits",
        image_size: int = 32,
        channels: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        root: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        info = dataset_info(dataset)
        self.dataset = dataset
        self.image_size = image_size
        self.channels = info["channels"] if channels is None else channels
        self.num_classes = info["num_classes"]
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.root = root
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = build_dataset(self.dataset, "train", self.image_size, self.channels, self.root)
        if self.val_dataset is None:
            self.val_dataset = build_dataset(self.dataset, "test", self.image_size, self.channels, self.root)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # Full batches keep shapes static for torch.compile; a set smaller than one batch still yields one.
            drop_last=shuffle and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
