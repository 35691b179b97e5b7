"""Token caches: a trained tokenizer is run once over a dataset and its ids are stored as shards (as LlamaGen does
with its extracted codes), so generator training never touches pixels.

Layout of a cache folder::

    meta.json                 # tokenizer class and config, vocabulary, token count, grid, classes, shard list
    shard_00000.safetensors   # ids (N, L) int32, lengths (N,) int32, labels (N,) int64

`flexar-tokenize --tokenizer runs/demo/tokenizer --dataset digits --split train --output runs/demo/tokens/train`
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

META_NAME = "meta.json"


@torch.no_grad()
def write_token_cache(
    tokenizer,
    dataset: Dataset,
    output: str | os.PathLike,
    num_tokens: int | None = None,
    batch_size: int = 256,
    shard_size: int = 65536,
    device: str | torch.device = "cpu",
    progress: bool = True,
    description: dict | None = None,
) -> Path:
    """Encode every image of `dataset` and write shards of ids + lengths + labels under `output`."""
    from safetensors.torch import save_file

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    pending = {"ids": [], "lengths": [], "labels": []}
    shards, total = [], 0

    def flush(count: int) -> None:
        """Write the first `count` pending rows as one shard."""
        merged = {k: torch.cat(v) for k, v in pending.items()}
        name = f"shard_{len(shards):05d}.safetensors"
        save_file({k: v[:count].contiguous() for k, v in merged.items()}, str(output / name))
        shards.append({"file": name, "count": count})
        for key, value in merged.items():
            pending[key] = [value[count:]]

    for images, labels in tqdm(loader, desc=f"tokenize -> {output}", disable=not progress):
        encoded = tokenizer.encode(images.to(device), num_tokens)
        ids = torch.zeros(images.shape[0], tokenizer.max_tokens, dtype=torch.int32)
        ids[:, : encoded.ids.shape[1]] = encoded.ids.cpu().int()
        pending["ids"].append(ids)
        pending["lengths"].append(encoded.lengths.cpu().int())
        pending["labels"].append(torch.as_tensor(labels).long())
        total += images.shape[0]
        while sum(t.shape[0] for t in pending["ids"]) >= shard_size:
            flush(shard_size)
    remaining = sum(t.shape[0] for t in pending["ids"])
    if remaining:
        flush(remaining)
    meta = {
        "tokenizer": {"class": type(tokenizer).__name__, "kwargs": tokenizer.config},
        "vocab_size": tokenizer.codebook_size,
        "max_tokens": tokenizer.max_tokens,
        "grid": tokenizer.grid,
        "num_items": total,
        "shards": shards,
        **(description or {}),
    }
    (output / META_NAME).write_text(json.dumps(meta, indent=2))
    return output


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a token cache (no {META_NAME}); create one with flexar-tokenize")
    return json.loads(path.read_text())


class TokenDataset(Dataset):
    """Items (ids (L,) long, labels () long, lengths () long) from a token cache.

    With `world_size` > 1 each rank reads only its own shards (round robin), so no rank loads the whole cache.
    """

    def __init__(self, folder: str | os.PathLike, rank: int = 0, world_size: int = 1):
        from flexar.hub import load_weights

        self.folder = Path(folder)
        self.meta = read_meta(folder)
        shards = self.meta["shards"][rank::world_size] if world_size > 1 else self.meta["shards"]
        if not shards:
            raise ValueError(f"token cache {folder} has {len(self.meta['shards'])} shards; rank {rank} of {world_size} gets none")
        parts = [load_weights(self.folder / shard["file"]) for shard in shards]
        self.ids = torch.cat([p["ids"] for p in parts]).long()
        self.lengths = torch.cat([p["lengths"] for p in parts]).long()
        self.labels = torch.cat([p["labels"] for p in parts]).long()

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index):
        return self.ids[index], self.labels[index], self.lengths[index]


class TokenDataModule(L.LightningDataModule):
    """Batches (ids (B, L), labels (B,), lengths (B,)) from token caches for generator training."""

    def __init__(self, train: str, val: str | None = None, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.train_path, self.val_path = train, val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.meta = read_meta(train)

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")

    def setup(self, stage: str | None = None) -> None:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        world = world if len(self.meta["shards"]) >= world else 1  # too few shards to split: every rank reads all
        self.train_set = TokenDataset(self.train_path, rank if world > 1 else 0, world)
        self.val_set = TokenDataset(self.val_path) if self.val_path else None

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=self.num_workers, drop_last=len(self.train_set) >= self.batch_size)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


def main(argv: list[str] | None = None) -> None:
    from flexar.data import build_dataset, dataset_info
    from flexar.hub import load_model
    from flexar.tokenizers import Tokenizer

    parser = argparse.ArgumentParser(prog="flexar-tokenize", description="Run a trained tokenizer over a dataset once and cache its ids.")
    parser.add_argument("--tokenizer", required=True, help="folder written by save_pretrained / flexar-train")
    parser.add_argument("--dataset", default="digits", help="digits, photos, mnist, cifar10 or imagefolder:PATH")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-tokens", type=int, default=None, help="keep the first k tokens (flexible tokenizers)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=65536)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    tokenizer = load_model(args.tokenizer, kind=Tokenizer)
    dataset = build_dataset(args.dataset, args.split, image_size=tokenizer.image_size, channels=tokenizer.channels, root=args.root)
    info = dataset_info(args.dataset)
    path = write_token_cache(
        tokenizer, dataset, args.output, num_tokens=args.num_tokens, batch_size=args.batch_size,
        shard_size=args.shard_size, device=args.device,
        description={"dataset": args.dataset, "split": args.split, "num_classes": info["num_classes"]},
    )
    print(f"wrote {read_meta(path)['num_items']} token sequences to {path}")


if __name__ == "__main__":
    main()
