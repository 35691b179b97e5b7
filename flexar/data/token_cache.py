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

Writing runs on every device: ``flexar-tokenize`` (and ``flexar-train predict`` with a :class:`TokenCacheWriter`)
is ``trainer.predict`` over the dataset, each rank encoding its slice of every global batch and rank zero merging
them in row order, so the files are those :func:`write_token_cache` writes in one process::

    flexar-tokenize --tokenizer runs/demo/tokenizer --dataset digits --split train --output runs/demo/tokens/train
    flexar-tokenize --tokenizer runs/big/tokenizer --dataset imagefolder:/data/imagenet --device cuda --devices 8 ...
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from flexar.data.datamodule import GlobalBatchDataModule, GlobalBatchSampler, _positive_int

META_NAME = "meta.json"
COLUMNS = ("ids", "lengths", "labels")
FINGERPRINT_KEY = "tokenizer_fingerprint"  # in each shard's safetensors header metadata
# safetensors dtype names of the integer types a shard may hold (little-endian, as the format stores them)
INTEGER_DTYPES = {"I8": "<i1", "U8": "<u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8"}
RESERVED = ("tokenizer", "vocab_size", "max_tokens", "grid", "num_items", "shards")


def encode_rows(tokenizer, images: torch.Tensor, num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-cache rows of `images` (B, C, H, W): ids (B, max_tokens) int32, zero past lengths (B,) int32."""
    with torch.no_grad():
        encoded = tokenizer.encode(images, num_tokens)
    ids = torch.zeros(images.shape[0], tokenizer.max_tokens, dtype=torch.int32, device=encoded.ids.device)
    ids[:, : encoded.ids.shape[1]] = encoded.ids.int()
    return ids, encoded.lengths.int()


def tokenizer_meta(tokenizer, tokenizer_id: str | None, folder: Path | None) -> dict:
    """The meta.json fields a tokenizer fills: ``tokenizer`` (class, kwargs, fingerprint, folder path or null),
    ``vocab_size``, ``max_tokens``, ``grid``."""
    return {
        "tokenizer": {"class": type(tokenizer).__name__, "kwargs": tokenizer.config, "fingerprint": tokenizer_id,
                      "path": None if folder is None else str(folder)},
        "vocab_size": tokenizer.codebook_size,
        "max_tokens": tokenizer.max_tokens,
        "grid": tokenizer.grid,
    }


def _check_output(output: Path) -> None:
    if output.exists() and not (output.is_dir() and ((output / META_NAME).is_file() or not any(output.iterdir()))):
        raise FileExistsError(f"{output} exists and is not a token cache (no {META_NAME}); refusing to replace it")


def _check_description(description: dict | None) -> None:
    clashes = sorted(set(description or {}) & set(RESERVED))
    if clashes:
        raise ValueError(f"description may not set {clashes}: the token cache writer fills them")


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
    """Encode every image of `dataset` in this process and write shards of ids + lengths + labels as the cache
    folder `output` (``flexar-tokenize`` and ``flexar-train predict`` do the same on every device, through
    ``trainer.predict`` and :class:`TokenCacheWriter`, and write the same cache).

    `tokenizer_folder`: the folder `tokenizer` was loaded from; meta.json records its path and its fingerprint.
    Without it the fingerprint is that of the folder ``save_pretrained`` would write for `tokenizer`, and the path
    is null. `description` adds keys to meta.json (dataset, split, num_classes). An existing cache at `output` is
    replaced only once the new one is complete; an existing folder that is not a token cache is refused.
    """
    from flexar.hub import fingerprint, model_fingerprint

    _positive_int("shard_size", shard_size)
    _positive_int("batch_size", batch_size)
    _check_description(description)
    output = Path(output)
    _check_output(output)
    folder = None if tokenizer_folder is None else Path(tokenizer_folder).resolve()
    tokenizer_id = fingerprint(folder) if folder is not None else model_fingerprint(tokenizer)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        tokenizer = tokenizer.eval().to(device)
        shards = ShardWriter(staging, shard_size, tokenizer_id)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for images, labels in tqdm(loader, desc=f"tokenize -> {output}", disable=not progress):
            ids, lengths = encode_rows(tokenizer, images.to(device), num_tokens)
            shards.add(ids, lengths, torch.as_tensor(labels))
        meta = {**(description or {}), **tokenizer_meta(tokenizer, tokenizer_id, folder)}
        _finish(staging, output, shards, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


class ShardWriter:
    """Rows in, shards of `shard_size` rows out (``shard_00000.safetensors``, ...) in `folder`, each naming the
    tokenizer fingerprint `tokenizer_id` in its header; :meth:`close` writes the last, partial shard."""

    def __init__(self, folder: Path, shard_size: int, tokenizer_id: str | None):
        self.folder, self.shard_size, self.tokenizer_id = Path(folder), _positive_int("shard_size", shard_size), tokenizer_id
        self.pending: dict[str, list[torch.Tensor]] = {name: [] for name in COLUMNS}
        self.shards: list[dict] = []
        self.total = 0

    def add(self, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> None:
        """Append rows: ids (B, L), lengths (B,), labels (B,) (stored as int32, int32, int64)."""
        self.pending["ids"].append(ids.detach().cpu().int())
        self.pending["lengths"].append(lengths.detach().cpu().int())
        self.pending["labels"].append(labels.detach().cpu().long())
        self.total += ids.shape[0]
        while self._pending_rows() >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> list[dict]:
        """Write what is pending; the shards ``[{"file", "count"}, ...]``."""
        if self._pending_rows():
            self._flush(self._pending_rows())
        return self.shards

    def _pending_rows(self) -> int:
        return sum(t.shape[0] for t in self.pending["ids"])

    def _flush(self, count: int) -> None:
        """Write the first `count` pending rows as one shard."""
        from safetensors.torch import save_file

        merged = {k: torch.cat(v) for k, v in self.pending.items()}
        name = f"shard_{len(self.shards):05d}.safetensors"
        metadata = {FINGERPRINT_KEY: self.tokenizer_id} if self.tokenizer_id is not None else None
        save_file({k: v[:count].contiguous() for k, v in merged.items()}, str(self.folder / name), metadata=metadata)
        self.shards.append({"file": name, "count": count})
        for key, value in merged.items():
            self.pending[key] = [value[count:]]


def _finish(staging: Path, output: Path, shards: ShardWriter, meta: dict) -> None:
    """Close the shards, write meta.json and rename the staging folder into place."""
    files = shards.close()
    if not files:
        raise ValueError(f"the dataset for {output} is empty: nothing to tokenize")
    meta = {**meta, "num_items": shards.total, "shards": files}
    (staging / META_NAME).write_text(json.dumps(meta, indent=2))
    _move_into_place(staging, output)


class TokenCacheEncoder(lightning.LightningModule):
    """``trainer.predict`` with a trained tokenizer (what ``flexar-tokenize`` runs): each batch of (images, labels)
    gives ``{"ids" (B, max_tokens) int32, zero past "lengths" (B,) int32, "labels" (B,) long}`` with `num_tokens`
    kept tokens (None: the tokenizer's default), for :class:`TokenCacheWriter`. A training run's
    ``TokenizerModule`` predicts the same rows from a checkpoint.

    `tokenizer_folder`: the folder `tokenizer` was loaded from, whose fingerprint and path meta.json records; None
    records the fingerprint of the folder ``save_pretrained`` would write, and no path.
    """

    def __init__(self, tokenizer, num_tokens: int | None = None, tokenizer_folder: str | os.PathLike | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.num_tokens = num_tokens
        self.tokenizer_folder = tokenizer_folder

    def predict_step(self, batch, batch_idx, dataloader_idx=0) -> dict:
        images, labels = batch[0], batch[1]
        ids, lengths = encode_rows(self.tokenizer, images, self.num_tokens)
        return {"ids": ids, "lengths": lengths, "labels": torch.as_tensor(labels).long()}

    def token_cache_meta(self, tokenizer_folder: str | os.PathLike | None = None) -> dict:
        from flexar.hub import fingerprint, model_fingerprint

        folder = tokenizer_folder if tokenizer_folder is not None else self.tokenizer_folder
        if folder is None:
            return tokenizer_meta(self.tokenizer, model_fingerprint(self.tokenizer), None)
        return tokenizer_meta(self.tokenizer, fingerprint(folder), Path(folder).resolve())


class TokenCacheWriter(BasePredictionWriter):
    """Writes what ``trainer.predict`` returns, on every device, as one token cache at `output`.

    The LightningModule's ``predict_step`` gives ``{"ids", "lengths", "labels"}`` per batch (a
    :class:`TokenCacheEncoder` or a ``flexar.train.TokenizerModule`` tokenizes its data, a
    ``flexar.train.GeneratorModule`` samples) and its ``token_cache_meta(tokenizer_folder)`` the tokenizer's fields
    of meta.json. Each rank writes its batches into the staging
    folder beside `output`, which every rank must see (one filesystem); when the epoch ends rank zero merges them in
    row order and renames the finished cache into place, as :func:`write_token_cache` does. With several ranks the
    predict loader must be one of flexar's data modules' (a :class:`~flexar.data.GlobalBatchSampler` in row
    order): rank r holds the r-th slice of every global batch, so step by step, rank by rank is the dataset's order,
    and the cache equals the one a single process writes.

    Args:
        output: the cache folder; an existing cache there is replaced once the new one is complete, another folder
            is refused.
        shard_size: rows per shard file.
        tokenizer_folder: the folder the module's tokenizer was loaded from (meta.json records its path and
            fingerprint); None records the fingerprint of the folder the module would export, and no path.
        description: extra meta.json keys; the data module's ``predict_description()`` (dataset, split, classes)
            fills what it leaves out.
    """

    def __init__(self, output: str, shard_size: int = 65536, tokenizer_folder: str | None = None,
                 description: dict | None = None):
        super().__init__(write_interval="batch")
        _check_description(description)
        self.output = Path(output)
        self.shard_size = _positive_int("shard_size", shard_size)
        self.tokenizer_folder = tokenizer_folder
        self.description = dict(description or {})
        self._staging: Path | None = None
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._steps: list[int] = []
        self._parts = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        staging, problem = None, None
        if trainer.is_global_zero:
            try:
                _check_output(self.output)
                self.output.parent.mkdir(parents=True, exist_ok=True)
                staging = tempfile.mkdtemp(prefix=f".{self.output.name}.partial-", dir=self.output.parent)
                (Path(staging) / "parts").mkdir()
            except Exception as error:  # told to every rank, so that none waits for the others
                problem = f"{type(error).__name__}: {error}"
        staging, problem = trainer.strategy.broadcast((staging, problem))
        if problem is not None:
            raise RuntimeError(f"TokenCacheWriter: {problem}")
        self._staging = Path(staging)
        self._pending = {name: [] for name in COLUMNS}
        self._steps, self._parts = [], 0

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            return
        for loader in trainer.predict_dataloaders if isinstance(trainer.predict_dataloaders, list) else [trainer.predict_dataloaders]:
            sampler = getattr(loader, "sampler", None)
            if not isinstance(sampler, GlobalBatchSampler) or sampler.shuffle:
                raise ValueError(
                    "TokenCacheWriter with several ranks needs a predict loader of flexar's data modules (a "
                    f"GlobalBatchSampler in row order), got a {type(sampler).__name__}: the rows of the ranks could "
                    "not be put back in the dataset's order"
                )

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        missing = [name for name in COLUMNS if name not in (prediction or {})]
        if missing:
            raise ValueError(f"TokenCacheWriter: {type(pl_module).__name__}.predict_step must return a dict with "
                             f"{list(COLUMNS)}; it lacks {missing}")
        for name in COLUMNS:
            self._pending[name].append(prediction[name].detach().cpu())
        self._steps.append(int(prediction["ids"].shape[0]))
        if sum(self._steps) >= self.shard_size:
            self._write_part(trainer)

    def _write_part(self, trainer) -> None:
        """This rank's pending rows as one part file, with the row count of each of its steps."""
        from safetensors.torch import save_file

        if not self._steps:
            return
        part = {name: torch.cat(values).contiguous() for name, values in self._pending.items()}
        part["steps"] = torch.tensor(self._steps, dtype=torch.int64)
        save_file(part, str(self._staging / "parts" / f"rank{trainer.global_rank:05d}_{self._parts:05d}.safetensors"))
        self._pending = {name: [] for name in COLUMNS}
        self._steps, self._parts = [], self._parts + 1

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._write_part(trainer)
        meta = pl_module.token_cache_meta(self.tokenizer_folder)  # every rank: the fingerprint may be a collective
        trainer.strategy.barrier("token_cache_parts")
        problem = None
        if trainer.is_global_zero:
            try:
                self._merge(trainer.world_size, meta, trainer)
            except Exception as error:
                problem = f"{type(error).__name__}: {error}"
                shutil.rmtree(self._staging, ignore_errors=True)
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise RuntimeError(f"TokenCacheWriter could not write {self.output}: {problem}")

    def _merge(self, world_size: int, meta: dict, trainer) -> None:
        parts = self._staging / "parts"
        streams = [_steps_of(sorted(parts.glob(f"rank{rank:05d}_*.safetensors"))) for rank in range(world_size)]
        shards = ShardWriter(self._staging, self.shard_size, (meta.get("tokenizer") or {}).get("fingerprint"))
        for step, rows in enumerate(itertools.zip_longest(*streams)):
            if any(row is None for row in rows):
                counts = [rank for rank, row in enumerate(rows) if row is None]
                raise ValueError(f"ranks {counts} wrote no rows for step {step} while others did (is {self._staging} "
                                 "on a filesystem every rank sees?)")
            for row in rows:
                shards.add(row["ids"], row["lengths"], row["labels"])
        shutil.rmtree(parts)
        describe = getattr(trainer.datamodule, "predict_description", None)
        description = {**(describe() if callable(describe) else {}), **self.description}
        _finish(self._staging, self.output, shards, {**description, **meta})
        print(f"wrote {shards.total} token sequences to {self.output}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.is_global_zero and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def _steps_of(files: list[Path]):
    """The rows of each step, in order, from one rank's part files."""
    from safetensors.torch import load_file

    for file in files:
        part = load_file(str(file))
        start = 0
        for count in part["steps"].tolist():
            yield {name: part[name][start:start + count] for name in COLUMNS}
            start += count


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
    tokenizer as `train`. ``trainer.test`` reads the `val` cache (the test split's tokens, as the image data module
    validates and tests on the test split); ``trainer.predict`` reads the rows of the `val` cache, else of `train`,
    in order (a generator samples one image per row's label).
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

    def test_dataloader(self):
        self.setup("test")
        if self.val_set is None:
            raise ValueError("TokenDataModule: testing reads the val cache, and none is given (--data.init_args.val)")
        return self.step_loader(self.val_set, self.batch_size, self.num_workers, self.seed, train=False)

    def predict_dataloader(self):
        self.setup("predict")
        rows = self.val_set if self.val_set is not None else self.train_set
        return self.step_loader(rows, self.batch_size, self.num_workers, self.seed, train=False)

    def predict_description(self) -> dict:
        """meta.json keys of a cache written from predictions over this module's rows."""
        return {"num_classes": self.num_classes, "labels_from": str(self.val_path or self.train_path)}


def _positive_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _accelerator(device: str) -> tuple[str, int | list[int]]:
    """``--device`` (cpu, cuda, cuda:1, mps) -> Lightning's (accelerator, devices) for one device."""
    where = torch.device(device)
    accelerator = {"cuda": "gpu"}.get(where.type, where.type)
    return accelerator, [where.index] if where.index is not None else 1


def main(argv: list[str] | None = None) -> None:
    import lightning as L

    from flexar.data import ImageDataModule, dataset_info
    from flexar.hub import load_model
    from flexar.tokenizers import Tokenizer

    parser = argparse.ArgumentParser(
        prog="flexar-tokenize",
        description="Run a trained tokenizer over a dataset once and cache its ids (trainer.predict on every device).")
    parser.add_argument("--tokenizer", required=True, help="folder written by save_pretrained / flexar-train")
    parser.add_argument("--dataset", default="digits", help="digits, photos, mnist, cifar10 or imagefolder:PATH")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--output", required=True, help="cache folder; an existing cache there is replaced when the new one is complete")
    parser.add_argument("--num-tokens", type=int, default=None, help="keep the first k tokens (flexible tokenizers)")
    parser.add_argument("--batch-size", type=_positive_argument, default=256, help="images per batch and device")
    parser.add_argument("--shard-size", type=_positive_argument, default=65536, help="rows per shard file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N: the kind of device (and one device)")
    parser.add_argument("--devices", type=_positive_argument, default=None,
                        help="how many devices of that kind (one process each, strategy ddp)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per device")
    args = parser.parse_args(argv)
    # the predict loader yields whole batches; the writer needs no batch indices
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    accelerator, devices = _accelerator(args.device)
    if args.devices is not None:
        if isinstance(devices, list):
            parser.error(f"--devices {args.devices} with --device {args.device}: name a kind of device (cuda), not one")
        devices = args.devices
    tokenizer = load_model(args.tokenizer, kind=Tokenizer)
    data = ImageDataModule(args.dataset, image_size=tokenizer.image_size, channels=tokenizer.channels,
                           batch_size=args.batch_size, num_workers=args.num_workers, root=args.root,
                           predict_split=args.split)
    writer = TokenCacheWriter(args.output, shard_size=args.shard_size, tokenizer_folder=args.tokenizer,
                              description={"dataset": args.dataset, "split": args.split,
                                           "num_classes": dataset_info(args.dataset)["num_classes"]})
    strategy = "ddp" if isinstance(devices, int) and devices > 1 else "auto"
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[writer])
    trainer.predict(TokenCacheEncoder(tokenizer, args.num_tokens), datamodule=data, return_predictions=False)


if __name__ == "__main__":
    main()
