"""Lightning DataModules and the one mechanism that splits a dataset across data-parallel ranks.

Every training step consumes one *global* batch: step k of epoch e takes rows ``perm[k * G : (k + 1) * G]`` of a
permutation seeded by ``seed + e``, with ``G = batch_size * world_size``, and rank r trains on its slice of them.
So a run on W processes sees, step for step, the rows of a single-process run with batch ``G`` (DDP averages the
ranks' gradients, so the updates agree as well), every row exactly once per epoch, and every rank runs the same
number of steps whatever the row count. :class:`GlobalBatchSampler` subclasses
``torch.utils.data.DistributedSampler``, so Lightning adds no sampler of its own on top.

Loaders built here yield whole batches (the sampler yields index lists, the dataset gathers them in one call), and
they resume exactly: the data module records the epoch and how many of its batches training consumed, Lightning
saves that in every checkpoint, and a run resumed from a mid-epoch checkpoint continues with the next batch of the
interrupted epoch (Lightning 2.6 alone would restart a plain DataLoader's epoch from its first batch, training
those batches twice and never the last ones).

The data modules' ``__init__`` take flat typed arguments only, so LightningCLI exposes them as
``--data.dataset mnist``, ``--data.image_size 64`` ... and the saved hyperparameters rebuild them.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import lightning
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from flexar.data.datasets import SPLITS, build_dataset, dataset_info


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class GlobalBatchSampler(DistributedSampler):
    """This rank's part of each global batch, as a list of row indices per step.

    Args:
        num_rows: rows of the dataset (N).
        batch_size: rows per rank and step (b); the global batch is G = b * num_replicas.
        num_replicas: data-parallel ranks (W).
        rank: this rank, in [0, W).
        shuffle: a fresh permutation each epoch (seeded by ``seed + epoch``, as DistributedSampler), else row order.
        seed: seed of the permutation, the same on every rank.

    An epoch has ceil(N / G) steps. The last, partial global batch is split as evenly as the ranks allow (sizes
    differ by at most one row); when it has fewer rows than ranks, it joins the step before it instead, so no rank
    ever gets an empty batch (then the epoch has floor(N / G) steps). N < W is refused. DDP averages per-rank mean
    losses, so a step whose rows do not split equally weights them slightly unlike one process would (each rank's
    rows count 1 / (W * its row count)); full steps, and partial ones that split equally, match one process exactly.
    Nothing is dropped, so the last step of an epoch may be smaller than the others (one more shape to compile).
    """

    def __init__(self, num_rows: int, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        _positive_int("batch_size", batch_size)
        _positive_int("num_replicas", num_replicas)
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < num_replicas:
            raise ValueError(f"cannot split {num_rows!r} rows across {num_replicas} data-parallel ranks: every rank "
                             "needs at least one row per step")
        super().__init__(range(num_rows), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_rows, self.batch_size = num_rows, batch_size
        self.global_batch = batch_size * num_replicas
        full, tail = divmod(num_rows, self.global_batch)
        self.num_steps = full + (1 if tail >= num_replicas else 0)
        self.consumed = 0  # batches of `epoch` handed to training (counted by the data module)
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.num_steps

    @property
    def geometry(self) -> dict:
        """What fixes the batches of an epoch; a mid-epoch resume needs the same."""
        return {"num_rows": self.num_rows, "batch_size": self.batch_size, "num_replicas": self.num_replicas,
                "shuffle": self.shuffle, "seed": self.seed}

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next iteration over `epoch` starts at its batch `batches` (the ones before were trained on)."""
        self._resume = (int(epoch), int(batches))

    def order(self, epoch: int) -> torch.Tensor:
        """(N,) the epoch's row order, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.num_rows)
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def step_rows(self, order: torch.Tensor, step: int) -> list[int]:
        """This rank's rows of global batch `step`."""
        start = step * self.global_batch
        stop = self.num_rows if step == self.num_steps - 1 else start + self.global_batch
        count = stop - start
        lo = start + self.rank * count // self.num_replicas
        hi = start + (self.rank + 1) * count // self.num_replicas
        return order[lo:hi].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the epoch is read at the first batch, after Lightning has called set_epoch
        epoch, start = self.epoch, 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                start = min(self._resume[1], self.num_steps)
            self._resume = None
        self.consumed = start
        order = self.order(epoch)
        for step in range(start, self.num_steps):
            yield self.step_rows(order, step)


class GatheredBatches(Dataset):
    """A map-style dataset of items seen through lists of indices: ``batches[[i, j, ...]]`` is the collated batch
    of ``dataset[i], dataset[j], ...`` (a loader with ``batch_size=None`` over :class:`GlobalBatchSampler`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Sequence[int]):
        return default_collate([self.dataset[int(i)] for i in indices])


class StepLoader(DataLoader):
    """Loader of whole batches over a :class:`GlobalBatchSampler`; its dataset takes a list of indices.

    ``state_dict`` / ``load_state_dict`` hold the position in the epoch, so Lightning treats it as resumable.
    """

    def __init__(self, dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int = 0, seed: int = 0,
                 **loader_options):
        # a generator of its own: every iterator draws a base seed for its workers, which would otherwise come from
        # the global RNG and shift the stream that class dropout and token drop read after a resume.
        # `loader_options`: Lightning rebuilds a predict loader to track its batches, passing DataLoader keywords
        # (shuffle=False, batch_sampler=None) that agree with this loader's own
        self.seed = seed
        super().__init__(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                         persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                         **loader_options)

    def __iter__(self):
        # Lightning creates a resumed run's first iterator before it sets the sampler's epoch, and worker processes
        # draw indices as soon as their iterator exists: create it when the first batch is asked for
        yield from super().__iter__()

    def state_dict(self) -> dict:
        sampler = self.sampler
        return {"epoch": sampler.epoch, "batches": sampler.consumed, **sampler.geometry}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        sampler = self.sampler
        if 0 < state["batches"] < sampler.num_steps:
            changed = {key: (state.get(key), value) for key, value in sampler.geometry.items() if state.get(key) != value}
            if changed:
                details = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
                raise ValueError(
                    f"cannot resume in the middle of epoch {state['epoch']} (after {state['batches']} of its batches): "
                    f"the checkpoint's data differs ({details}); resume with the same data, batch_size and device "
                    "count, or from an epoch-end checkpoint"
                )
        sampler.resume_at(state["epoch"], state["batches"])


class GlobalBatchDataModule(lightning.LightningDataModule):
    """Shared plumbing: loaders over :class:`GlobalBatchSampler`, and the training position saved in checkpoints.

    ``state_dict`` (saved by Lightning in every checkpoint) records the epoch and how many of its batches reached
    the training step (counted in ``on_before_batch_transfer``, after Lightning's prefetching, so a batch fetched
    ahead but never trained is not counted); ``load_state_dict`` makes the resumed epoch start after them. Lightning
    restores a data module before it builds the loaders, which is why this state lives here and not only in the
    loader (Lightning skips restoring a loader it built early, as it does to estimate the number of steps for a
    learning-rate schedule). A LightningModule trained with these data modules leaves ``on_before_batch_transfer``
    to them (Lightning calls the data module's when both define it).
    """

    def __init__(self):
        super().__init__()
        self._train_loader: StepLoader | None = None
        self._resume_state: dict = {}

    def replicas(self) -> tuple[int, int]:
        """(data-parallel ranks, this rank) of the attached trainer's strategy; (1, 0) without one."""
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs:
            return 1, 0
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    def step_loader(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int, train: bool) -> StepLoader:
        """A loader over `dataset`, whose `dataset[indices]` returns a batch; `batch_size` is per rank. Training
        loaders shuffle and are the ones whose position checkpoints record; evaluation loaders keep row order."""
        num_replicas, rank = self.replicas()
        sampler = GlobalBatchSampler(len(dataset), batch_size, num_replicas, rank, shuffle=train, seed=seed)
        # keywords: Lightning, rebuilding a predict loader, passes its own sampler= (this very sampler) by keyword
        loader = StepLoader(dataset, sampler=sampler, num_workers=num_workers, seed=seed)
        if train:
            loader.load_state_dict(self._resume_state)
            self._train_loader = loader
        return loader

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.sampler.consumed += 1
        return batch

    def state_dict(self) -> dict:
        return self._train_loader.state_dict() if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_state = dict(state_dict)
        if self._train_loader is not None:
            self._train_loader.load_state_dict(self._resume_state)


class ImageDataModule(GlobalBatchDataModule):
    """Train on a dataset's ``train`` split, validate (and test) on its ``test`` split, predict over
    ``predict_split`` in row order (a tokenizer tokenizes it).

    Batches are ``(images (B, C, image_size, image_size) float32 in [-1, 1], labels (B,) long)``; every training
    epoch covers every image once, in a fresh order (see the module docstring for the split across ranks).

    Args:
        dataset: a name understood by :func:`flexar.data.build_dataset` (``digits``, ``photos``, ``mnist``,
            ``cifar10``, ``imagefolder:PATH``).
        image_size: image side in pixels.
        channels: 1 or 3, None for the dataset's own count.
        batch_size: images per batch and process (the global batch is batch_size times the data-parallel ranks).
        num_workers: DataLoader worker processes.
        root: folder holding torchvision datasets; defaults to ``$FLEXAR_DATA``.
        seed: seed of the training order (epoch e uses seed + e).
        predict_split: the split ``trainer.predict`` reads, ``train`` or ``test``.
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
        predict_split: str = "train",
    ):
        super().__init__()
        self.save_hyperparameters()
        if predict_split not in SPLITS:
            raise ValueError(f"predict_split must be one of {list(SPLITS)}, got {predict_split!r}")
        info = dataset_info(dataset)
        self.dataset = dataset
        self.image_size = image_size
        self.channels = info["channels"] if channels is None else channels
        self.num_classes = info["num_classes"]
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_workers = num_workers
        self.root = root
        self.seed = seed
        self.predict_split = predict_split
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = build_dataset(self.dataset, "train", self.image_size, self.channels, self.root)
        if self.val_dataset is None:
            self.val_dataset = build_dataset(self.dataset, "test", self.image_size, self.channels, self.root)

    def train_dataloader(self) -> StepLoader:
        self.setup("fit")
        return self.step_loader(GatheredBatches(self.train_dataset), self.batch_size, self.num_workers, self.seed, train=True)

    def val_dataloader(self) -> StepLoader:
        self.setup("validate")
        return self.step_loader(GatheredBatches(self.val_dataset), self.batch_size, self.num_workers, self.seed, train=False)

    def test_dataloader(self) -> StepLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> StepLoader:
        dataset = build_dataset(self.dataset, self.predict_split, self.image_size, self.channels, self.root)
        return self.step_loader(GatheredBatches(dataset), self.batch_size, self.num_workers, self.seed, train=False)

    def predict_description(self) -> dict:
        """meta.json keys of a token cache written from predictions over this module's ``predict_split``."""
        return {"dataset": self.dataset, "split": self.predict_split, "num_classes": self.num_classes}
