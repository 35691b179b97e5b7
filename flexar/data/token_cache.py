"""Token caches: a trained tokenizer is run once over a dataset and its ids are stored as shards (as LlamaGen does
with its extracted codes), so generator training never touches pixels.

Layout of a cache folder::

    meta.json                 # tokenizer (class, kwargs, fingerprint, folder), vocabulary, token count, grid,
                              # classes, num_items and the shards with the row count of each
    shard_00000.safetensors   # ids (N, L) int32, lengths (N,) int32, labels (N,) int64; its header names the
                              # fingerprint of the tokenizer that wrote it

The tokenizer fingerprint is :func:`flexar.hub.fingerprint` of its saved folder (sha256 of config.json and
model.safetensors), so a generator trained on the cache can name the one tokenizer its ids belong to.

A cache is written into a hidden folder beside ``output`` and renamed into place once complete: a run that is
killed or fails leaves an existing cache as it was (a killed run may leave its hidden ``.NAME.partial-*`` folder
behind, never a half-written cache). Reading checks meta.json and every shard's header against it (counts, labels
against ids, token count, fingerprint) without reading the data, and refuses a mismatch naming the file and field.
Shards are memory-mapped: a batch reads only its own rows, so a cache larger than memory trains.

`flexar-tokenize --tokenizer runs/demo/tokenizer --dataset digits --split train --output runs/demo/tokens/train`
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from flexar.data.datamodule import GlobalBatchDataModule, _positive_int

META_NAME = "meta.json"
COLUMNS = ("ids", "lengths", "labels")
FINGERPRINT_KEY = "tokenizer_fingerprint"  # in each shard's safetensors header metadata
# safetensors dtype names of the integer types a shard may hold (little-endian, as the format stores them)
INTEGER_DTYPES = {"I8": "<i1", "U8": "<u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8"}
RESERVED = ("tokenizer", "vocab_size", "max_tokens", "grid", "num_items", "shards")


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
    tokenizer_folder: str | os.PathLike | None = None,
) -> Path:
    """Encode every image of `dataset` and write shards of ids + lengths + labels as the cache folder `output`.

    `tokenizer_folder`: the folder `tokenizer` was loaded from; meta.json records its path and its fingerprint.
    Without it the fingerprint is that of the folder ``save_pretrained`` would write for `tokenizer`, and the path
    is null. `description` adds keys to meta.json (dataset, split, num_classes). An existing cache at `output` is
    replaced only once the new one is complete; an existing folder that is not a token cache is refused.
    """
    from flexar.hub import fingerprint, model_fingerprint

    _positive_int("shard_size", shard_size)
    _positive_int("batch_size", batch_size)
    clashes = sorted(set(description or {}) & set(RESERVED))
    if clashes:
        raise ValueError(f"description may not set {clashes}: write_token_cache fills them")
    output = Path(output)
    if output.exists() and not (output.is_dir() and ((output / META_NAME).is_file() or not any(output.iterdir()))):
        raise FileExistsError(f"{output} exists and is not a token cache (no {META_NAME}); refusing to replace it")
    folder = None if tokenizer_folder is None else Path(tokenizer_folder).resolve()
    tokenizer_id = fingerprint(folder) if folder is not None else model_fingerprint(tokenizer)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        shards, total = _write_shards(tokenizer.eval().to(device), dataset, staging, num_tokens, batch_size,
                                      shard_size, device, progress, tokenizer_id, output)
        meta = {
            **(description or {}),
            "tokenizer": {"class": type(tokenizer).__name__, "kwargs": tokenizer.config, "fingerprint": tokenizer_id,
                          "path": None if folder is None else str(folder)},
            "vocab_size": tokenizer.codebook_size,
            "max_tokens": tokenizer.max_tokens,
            "grid": tokenizer.grid,
            "num_items": total,
            "shards": shards,
        }
        (staging / META_NAME).write_text(json.dumps(meta, indent=2))
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _write_shards(tokenizer, dataset, folder: Path, num_tokens, batch_size, shard_size, device, progress,
                  tokenizer_id: str, output: Path) -> tuple[list[dict], int]:
    from safetensors.torch import save_file

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    pending = {name: [] for name in COLUMNS}
    shards, total = [], 0

    def flush(count: int) -> None:
        """Write the first `count` pending rows as one shard."""
        merged = {k: torch.cat(v) for k, v in pending.items()}
        name = f"shard_{len(shards):05d}.safetensors"
        save_file({k: v[:count].contiguous() for k, v in merged.items()}, str(folder / name),
                  metadata={FINGERPRINT_KEY: tokenizer_id})
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
    if not shards:
        raise ValueError(f"the dataset for {output} is empty: nothing to tokenize")
    return shards, total


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename the finished `staging` folder to `output`, retiring an existing cache only once the new one is whole."""
    if not output.exists():
        os.rename(staging, output)
        return
    retired = output.parent / f".{output.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(output, retired)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(retired, output)
        raise
    shutil.rmtree(retired, ignore_errors=True)


# -- reading and checking -------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(path: Path, field: str, expected: str, value) -> ValueError:
    return ValueError(f"{path}: field '{field}' must be {expected}, got {value!r}")


def check_meta(meta, path: Path) -> dict:
    """Refuse a meta.json that lacks a field or holds a wrong one, naming the file and the field."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    for field in ("vocab_size", "max_tokens"):
        if field not in meta:
            raise ValueError(f"{path}: field '{field}' is missing")
        if not _is_int(meta[field]) or meta[field] <= 0:
            raise _refuse(path, field, "a positive int", meta[field])
    if meta.get("num_classes") is not None and (not _is_int(meta["num_classes"]) or meta["num_classes"] <= 0):
        raise _refuse(path, "num_classes", "a positive int or null", meta["num_classes"])
    shards = meta.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _refuse(path, "shards", "a non-empty list of {\"file\": ..., \"count\": ...}", shards)
    for number, shard in enumerate(shards):
        field = f"shards[{number}]"
        if not isinstance(shard, dict):
            raise _refuse(path, field, "an object with 'file' and 'count'", shard)
        name = shard.get("file")
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise _refuse(path, f"{field}.file", "the name of a file in the cache folder", name)
        if not _is_int(shard.get("count")) or shard["count"] <= 0:
            raise _refuse(path, f"{field}.count", "a positive int (the shard's row count)", shard.get("count"))
    total = sum(shard["count"] for shard in shards)
    if meta.get("num_items") != total:
        raise ValueError(f"{path}: field 'num_items' is {meta.get('num_items')!r}, but the shards' counts add up to {total}")
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict):
            raise _refuse(path, "tokenizer", "an object (class, kwargs, fingerprint, path)", tokenizer)
        for key in ("fingerprint", "path"):
            if tokenizer.get(key) is not None and not isinstance(tokenizer[key], str):
                raise _refuse(path, f"tokenizer.{key}", "a string or null", tokenizer[key])
    return meta


def read_meta(folder: str | os.PathLike) -> dict:
    """The checked meta.json of a token cache (see :func:`check_meta`)."""
    folder = Path(folder)
    path = folder / META_NAME
    if not path.is_file():
        retired = sorted(folder.parent.glob(f".{folder.name}.replaced-*"))
        hint = f"; {retired[0]} holds the cache an interrupted flexar-tokenize was replacing" if retired else ""
        raise FileNotFoundError(f"{folder} is not a token cache (no {META_NAME}); create one with flexar-tokenize{hint}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (truncated?): {error}; re-run flexar-tokenize") from None
    return check_meta(meta, path)


def _shard_layout(folder: Path, meta: dict, number: int) -> dict[str, tuple[int, np.dtype, tuple[int, ...]]]:
    """Check shard `number`'s safetensors header against meta.json; return (byte offset, dtype, shape) per column."""
    meta_path = folder / META_NAME
    field = f"shards[{number}]"
    shard = meta["shards"][number]
    path = folder / shard["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{meta_path}: field '{field}.file' names {shard['file']}, which does not exist")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_size <= 0 or header_size > size - 8:
            raise ValueError(f"{path} is not a safetensors file (truncated or of another format)")
        try:
            header = json.loads(handle.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} has an unreadable safetensors header: {error}") from None
    metadata = header.pop("__metadata__", None) or {}
    layout = {}
    for column in COLUMNS:
        if column not in header:
            raise ValueError(f"{path} holds no '{column}' tensor (it holds {sorted(header)}); a token-cache shard "
                             f"holds {list(COLUMNS)}")
        entry = header[column] if isinstance(header[column], dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape) and isinstance(offsets, list)
                and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
            raise ValueError(f"{path}: tensor '{column}' has an invalid safetensors header entry {header[column]!r}")
        begin, end = offsets
        if dtype not in INTEGER_DTYPES:
            raise ValueError(f"{path}: tensor '{column}' has dtype {dtype}; token caches hold integer tensors")
        numpy_dtype = np.dtype(INTEGER_DTYPES[dtype])
        if end - begin != int(np.prod(shape)) * numpy_dtype.itemsize or 8 + header_size + end > size:
            raise ValueError(f"{path}: tensor '{column}' does not fit in the file (truncated shard?)")
        layout[column] = (8 + header_size + begin, numpy_dtype, tuple(shape))
    rows = layout["ids"][2]
    if len(rows) != 2 or rows[1] != meta["max_tokens"]:
        raise ValueError(f"{path}: tensor 'ids' has shape {list(rows)}, but {meta_path} field 'max_tokens' is "
                         f"{meta['max_tokens']} (ids are (rows, max_tokens))")
    for column in ("labels", "lengths"):
        if layout[column][2] != (rows[0],):
            raise ValueError(f"{path}: tensor '{column}' has shape {list(layout[column][2])} for {rows[0]} rows of "
                             f"ids; it must be ({rows[0]},)")
    if rows[0] != shard["count"]:
        raise ValueError(f"{path} holds {rows[0]} rows, but {meta_path} field '{field}.count' is {shard['count']}")
    expected = (meta.get("tokenizer") or {}).get("fingerprint")
    if expected is not None and metadata.get(FINGERPRINT_KEY) != expected:
        found = metadata.get(FINGERPRINT_KEY)
        raise ValueError(
            f"{path} was written by tokenizer {found[:12] if found else '(not recorded)'}, but {meta_path} field "
            f"'tokenizer.fingerprint' is {expected[:12]}: the folder mixes shards of different caches; re-run "
            "flexar-tokenize"
        )
    return layout


class TokenDataset(Dataset):
    """Rows of a token cache, read from memory-mapped shards.

    ``dataset[i]`` is one row ``(ids (L,) long, labels () long, lengths () long)``; ``dataset[indices]`` (a list
    or 1-D array of row indices) is the batch ``(ids (B, L), labels (B,), lengths (B,))``, gathered with one read
    per shard it touches, the only part of the cache brought into memory. Opening checks meta.json and every
    shard's header against it (see the module docstring).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_meta(folder)
        self.layouts = [_shard_layout(self.folder, self.meta, n) for n in range(len(self.meta["shards"]))]
        self.starts = np.cumsum([0] + [shard["count"] for shard in self.meta["shards"]])
        self._maps: list[dict[str, np.memmap]] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        # worker processes open their own maps (a pickled memmap would copy its whole shard)
        return {**self.__dict__, "_maps": None}

    def _columns(self) -> list[dict[str, np.memmap]]:
        if self._maps is None:
            self._maps = [
                {column: np.memmap(self.folder / shard["file"], dtype=dtype, mode="r", offset=offset, shape=shape)
                 for column, (offset, dtype, shape) in layout.items()}
                for shard, layout in zip(self.meta["shards"], self.layouts)
            ]
        return self._maps

    def __getitem__(self, index):
        if _is_int(index) or isinstance(index, np.integer):
            ids, labels, lengths = self.gather([int(index) + (len(self) if index < 0 else 0)])
            return ids[0], labels[0], lengths[0]
        return self.gather(index)

    def gather(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, L), labels (B,), lengths (B,)) long for row `indices` (B,), in that order."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)}) for the token cache {self.folder}")
        out = {"ids": np.empty((rows.size, self.meta["max_tokens"]), dtype=np.int64),
               "labels": np.empty(rows.size, dtype=np.int64), "lengths": np.empty(rows.size, dtype=np.int64)}
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        columns = self._columns()
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            local = rows[where] - self.starts[shard]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            for name, values in out.items():
                values[where[order]] = columns[shard][name][local[order]]
        return tuple(torch.from_numpy(out[name]) for name in ("ids", "labels", "lengths"))

    def column(self, name: str) -> torch.Tensor:
        """A whole column (``ids`` (N, L), ``labels`` or ``lengths`` (N,)) as a long tensor: reads every shard."""
        return torch.from_numpy(np.concatenate([columns[name] for columns in self._columns()]).astype(np.int64))

    @property
    def ids(self) -> torch.Tensor:
        return self.column("ids")

    @property
    def labels(self) -> torch.Tensor:
        return self.column("labels")

    @property
    def lengths(self) -> torch.Tensor:
        return self.column("lengths")


class TokenDataModule(GlobalBatchDataModule):
    """Batches (ids (B, L), labels (B,), lengths (B,)) from token caches for generator training.

    Every training epoch covers every row of the `train` cache once, split across data-parallel ranks as
    :mod:`flexar.data.datamodule` describes; `batch_size` is per process. A `val` cache must come from the same
    tokenizer as `train`.
    """

    def __init__(self, train: str, val: str | None = None, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.train_path, self.val_path = train, val
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_workers, self.seed = num_workers, seed
        self.meta = read_meta(train)
        self.train_set: TokenDataset | None = None
        self.val_set: TokenDataset | None = None

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = TokenDataset(self.train_path)
        if self.val_set is None and self.val_path:
            self.val_set = TokenDataset(self.val_path)
            self._check_same_tokenizer(self.val_set.meta)

    def _check_same_tokenizer(self, val_meta: dict) -> None:
        train_print = (self.meta.get("tokenizer") or {}).get("fingerprint")
        val_print = (val_meta.get("tokenizer") or {}).get("fingerprint")
        different = [
            f"{key} {self.meta[key]} vs {val_meta[key]}" for key in ("vocab_size", "max_tokens") if self.meta[key] != val_meta[key]
        ]
        if train_print and val_print and train_print != val_print:
            different.append(f"tokenizer.fingerprint {train_print[:12]} vs {val_print[:12]}")
        if different:
            raise ValueError(f"token caches {self.train_path} (train) and {self.val_path} (val) come from different "
                             f"tokenizers: {'; '.join(different)}")

    def train_dataloader(self):
        self.setup("fit")
        return self.step_loader(self.train_set, self.batch_size, self.num_workers, self.seed, train=True)

    def val_dataloader(self):
        self.setup("validate")
        if self.val_set is None:
            return []
        return self.step_loader(self.val_set, self.batch_size, self.num_workers, self.seed, train=False)


def _positive_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    from flexar.data import build_dataset, dataset_info
    from flexar.hub import load_model
    from flexar.tokenizers import Tokenizer

    parser = argparse.ArgumentParser(prog="flexar-tokenize", description="Run a trained tokenizer over a dataset once and cache its ids.")
    parser.add_argument("--tokenizer", required=True, help="folder written by save_pretrained / flexar-train")
    parser.add_argument("--dataset", default="digits", help="digits, photos, mnist, cifar10 or imagefolder:PATH")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--output", required=True, help="cache folder; an existing cache there is replaced when the new one is complete")
    parser.add_argument("--num-tokens", type=int, default=None, help="keep the first k tokens (flexible tokenizers)")
    parser.add_argument("--batch-size", type=_positive_argument, default=256)
    parser.add_argument("--shard-size", type=_positive_argument, default=65536, help="rows per shard file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    tokenizer = load_model(args.tokenizer, kind=Tokenizer)
    dataset = build_dataset(args.dataset, args.split, image_size=tokenizer.image_size, channels=tokenizer.channels, root=args.root)
    info = dataset_info(args.dataset)
    path = write_token_cache(
        tokenizer, dataset, args.output, num_tokens=args.num_tokens, batch_size=args.batch_size,
        shard_size=args.shard_size, device=args.device, tokenizer_folder=args.tokenizer,
        description={"dataset": args.dataset, "split": args.split, "num_classes": info["num_classes"]},
    )
    print(f"wrote {read_meta(path)['num_items']} token sequences to {path}")


if __name__ == "__main__":
    main()
