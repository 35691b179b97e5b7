"""Token and latent caches: a trained tokenizer is run once over a dataset and what it encodes is stored as shards
(as LlamaGen does with its extracted codes, and MAR / xAR with their cached VAE latents), so generator training never
touches pixels.

Layout of a cache folder::

    meta.json                 # kind, tokenizer (class, kwargs, fingerprint, folder), the shape of a row, classes,
                              # num_items and the shards with the row count of each
    shard_00000.safetensors   # the rows of the kind (below); its header names the fingerprint of the tokenizer
                              # that wrote it

Two kinds, one machinery (:class:`CacheKind`): the same writer, checks and memory-mapped reader, parameterised by
the columns of the kind and their dtypes.

- ``"kind": "tokens"`` (a meta.json without ``kind`` is one too): a discrete tokenizer's ids. meta.json holds
  ``vocab_size``, ``max_tokens`` and ``grid``; a shard holds ids (N, max_tokens) int32, zero past lengths (N,)
  int32, and labels (N,) int64.
- ``"kind": "latents"``: a continuous tokenizer's latents (:class:`flexar.tokenizers.VAE`, whose
  ``encode_latents`` gives normalised latents, the input of a flow generator such as xAR). meta.json holds
  ``latent_shape`` [C, h, w], ``max_tokens`` h * w and ``grid`` [h, w], and no ``vocab_size``; a shard holds latents
  (N, C, h, w) float32 and labels (N,) int64. Every row has all h * w positions.

The tokenizer fingerprint is :func:`flexar.hub.fingerprint` of its saved folder (sha256 of config.json and
model.safetensors), so a generator trained on the cache can name the one tokenizer its rows belong to.

A cache is written into a hidden folder beside ``output``, checked as a reader would check it, and renamed into
place once complete: a run that is killed or fails leaves an existing cache as it was (a killed run may leave its
hidden ``.NAME.partial-*`` folder behind, never a half-written cache). Reading checks meta.json and every shard's
header against it (counts, labels against rows, row shape, dtypes, fingerprint) without reading the data, and
refuses a mismatch naming the file and field. Shards are memory-mapped: a batch reads only its own rows, so a cache
larger than memory trains.

Writing runs on every device: ``flexar-tokenize`` (and ``flexar-train predict`` with a :class:`TokenCacheWriter`)
is ``trainer.predict`` over the dataset, each rank encoding its slice of every global batch and rank zero merging
them in row order, so the files are those :func:`write_token_cache` writes in one process. The tokenizer decides the
kind: a folder holding a VAE writes a latent cache::

    flexar-tokenize --tokenizer runs/demo/tokenizer --dataset digits --split train --output runs/demo/tokens/train
    flexar-tokenize --tokenizer runs/vae --dataset digits --output runs/latents/train
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
from dataclasses import dataclass
from pathlib import Path

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from flexar.data.datamodule import GlobalBatchDataModule, GlobalBatchSampler, _positive_int

META_NAME = "meta.json"
FINGERPRINT_KEY = "tokenizer_fingerprint"  # in each shard's safetensors header metadata
# safetensors dtype names a shard may hold (little-endian, as the format stores them): integers for ids, lengths and
# labels, floats for latents (bfloat16 has no numpy type to memory-map)
INTEGER_DTYPES = {"I8": "<i1", "U8": "<u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8"}
FLOAT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
RESERVED = ("kind", "tokenizer", "vocab_size", "latent_shape", "max_tokens", "grid", "num_items", "shards")


@dataclass(frozen=True)
class CacheKind:
    """What one kind of cache stores: its columns (name, stored dtype), the row data first, and the meta.json field
    that fixes the shape of one row of that data (``max_tokens``: ids (N, max_tokens); ``latent_shape``: latents
    (N, C, h, w)). A float column holds a float dtype in every shard, an integer column an integer one."""

    name: str
    columns: tuple[tuple[str, torch.dtype], ...]
    shape_field: str
    what: str  # how messages name it

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def data(self) -> str:
        """The column of the rows themselves (``ids`` or ``latents``); the others hold one value per row."""
        return self.columns[0][0]

    def row_shape(self, meta: dict) -> tuple[int, ...]:
        """The shape of one row of :attr:`data`, from meta.json."""
        value = meta[self.shape_field]
        return tuple(value) if isinstance(value, list) else (value,)


TOKENS = CacheKind("tokens", (("ids", torch.int32), ("lengths", torch.int32), ("labels", torch.int64)), "max_tokens",
                   "token cache")
LATENTS = CacheKind("latents", (("latents", torch.float32), ("labels", torch.int64)), "latent_shape", "latent cache")
KINDS = {kind.name: kind for kind in (TOKENS, LATENTS)}


def cache_kind(meta: dict) -> CacheKind:
    """The kind of a cache from its meta.json (``kind``; absent: tokens, as every cache was before latents)."""
    name = meta.get("kind", TOKENS.name)
    if not isinstance(name, str) or name not in KINDS:
        raise ValueError(f"unknown cache kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def is_continuous(tokenizer) -> bool:
    """A continuous tokenizer (:class:`flexar.tokenizers.VAE`): it encodes to latents (``encode_latents``) and has
    no codebook. Discrete tokenizers may have ``encode_latents`` too (their pre-quantiser features), never without
    ``codebook_size``."""
    return callable(getattr(tokenizer, "encode_latents", None)) and getattr(tokenizer, "codebook_size", None) is None


def tokenizer_kind(tokenizer) -> CacheKind:
    """The kind of cache `tokenizer` writes: latents for a continuous tokenizer, tokens otherwise."""
    return LATENTS if is_continuous(tokenizer) else TOKENS


def check_num_tokens(tokenizer, num_tokens: int | None) -> None:
    """Refuse `num_tokens` for a continuous tokenizer, which keeps no prefix of tokens: every image is its whole
    latent grid."""
    if num_tokens is not None and is_continuous(tokenizer):
        side = tokenizer.latent_size
        raise ValueError(
            f"num_tokens={num_tokens}: {type(tokenizer).__name__} is a continuous tokenizer (encode_latents), each "
            f"image is its whole {tokenizer.latent_channels} x {side} x {side} latent grid with no tokens to keep; "
            "num_tokens (--num-tokens) applies to tokenizers of ids only, leave it out"
        )


def encode_rows(tokenizer, images: torch.Tensor, num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-cache rows of `images` (B, C, H, W): ids (B, max_tokens) int32, zero past lengths (B,) int32."""
    with torch.no_grad():
        encoded = tokenizer.encode(images, num_tokens)
    ids = torch.zeros(images.shape[0], tokenizer.max_tokens, dtype=torch.int32, device=encoded.ids.device)
    ids[:, : encoded.ids.shape[1]] = encoded.ids.int()
    return ids, encoded.lengths.int()


def cache_rows(tokenizer, images: torch.Tensor, labels, num_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """The cache rows of `images` (B, C, H, W) with their `labels` (B,), by the kind `tokenizer` writes:
    ``{"ids" (B, max_tokens) int32, "lengths" (B,) int32, "labels" (B,) long}`` (see :func:`encode_rows`) or, from a
    continuous tokenizer, ``{"latents" (B, C', h, w) float32 = encode_latents(images), "labels" (B,) long}``."""
    labels = torch.as_tensor(labels).long()
    if is_continuous(tokenizer):
        check_num_tokens(tokenizer, num_tokens)
        with torch.no_grad():
            latents = tokenizer.encode_latents(images)
        return {"latents": latents.float(), "labels": labels}
    ids, lengths = encode_rows(tokenizer, images, num_tokens)
    return {"ids": ids, "lengths": lengths, "labels": labels}


def tokenizer_meta(tokenizer, tokenizer_id: str | None, folder: Path | None) -> dict:
    """The meta.json fields a tokenizer fills: ``kind``, ``tokenizer`` (class, kwargs, fingerprint, folder path or
    null) and the shape of a row: ``vocab_size``, ``max_tokens``, ``grid`` for tokens; ``latent_shape`` [C, h, w],
    ``max_tokens`` h * w, ``grid`` [h, w] for latents."""
    described = {"class": type(tokenizer).__name__, "kwargs": tokenizer.config, "fingerprint": tokenizer_id,
                 "path": None if folder is None else str(folder)}
    if is_continuous(tokenizer):
        side = tokenizer.latent_size  # square latents of square images
        return {"kind": LATENTS.name, "tokenizer": described, "latent_shape": [tokenizer.latent_channels, side, side],
                "max_tokens": side * side, "grid": [side, side]}
    return {
        "kind": TOKENS.name,
        "tokenizer": described,
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
    """Encode every image of `dataset` in this process and write the cache folder `output` (``flexar-tokenize`` and
    ``flexar-train predict`` do the same on every device, through ``trainer.predict`` and :class:`TokenCacheWriter`,
    and write the same cache).

    A discrete tokenizer writes a token cache (ids + lengths + labels, `num_tokens` kept tokens); a continuous one
    (:class:`flexar.tokenizers.VAE`) a latent cache of ``tokenizer.encode_latents(images)`` + labels, where
    `num_tokens` is refused. `tokenizer_folder`: the folder `tokenizer` was loaded from; meta.json records its path
    and its fingerprint. Without it the fingerprint is that of the folder ``save_pretrained`` would write for
    `tokenizer`, and the path is null. `description` adds keys to meta.json (dataset, split, num_classes). An
    existing cache at `output` is replaced only once the new one is complete; an existing folder that is not a
    cache is refused.
    """
    from flexar.hub import fingerprint, model_fingerprint

    _positive_int("shard_size", shard_size)
    _positive_int("batch_size", batch_size)
    _check_description(description)
    check_num_tokens(tokenizer, num_tokens)
    output = Path(output)
    _check_output(output)
    folder = None if tokenizer_folder is None else Path(tokenizer_folder).resolve()
    tokenizer_id = fingerprint(folder) if folder is not None else model_fingerprint(tokenizer)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        tokenizer = tokenizer.eval().to(device)
        shards = ShardWriter(staging, shard_size, tokenizer_id, tokenizer_kind(tokenizer))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for images, labels in tqdm(loader, desc=f"tokenize -> {output}", disable=not progress):
            shards.add(cache_rows(tokenizer, images.to(device), labels, num_tokens))
        meta = {**(description or {}), **tokenizer_meta(tokenizer, tokenizer_id, folder)}
        _finish(staging, output, shards, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


class ShardWriter:
    """Rows in, shards of `shard_size` rows out (``shard_00000.safetensors``, ...) in `folder`, each naming the
    tokenizer fingerprint `tokenizer_id` in its header; :meth:`close` writes the last, partial shard. `kind` fixes
    the columns and the dtypes they are stored in."""

    def __init__(self, folder: Path, shard_size: int, tokenizer_id: str | None, kind: CacheKind = TOKENS):
        self.folder, self.shard_size, self.tokenizer_id = Path(folder), _positive_int("shard_size", shard_size), tokenizer_id
        self.kind = kind
        self.pending: dict[str, list[torch.Tensor]] = {name: [] for name in kind.names}
        self.shards: list[dict] = []
        self.total = 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Append a batch of B rows, one tensor per column of the kind: ids (B, L), lengths (B,), labels (B,) for
        tokens; latents (B, C, h, w), labels (B,) for latents. Integer columns must hold integers and float columns
        finite floats; they are stored in the kind's dtypes (int32 / int64, float32)."""
        missing = [name for name in self.kind.names if name not in rows]
        if missing:
            raise ValueError(f"rows of a {self.kind.what} hold {list(self.kind.names)}; these lack {missing}")
        data = torch.as_tensor(rows[self.kind.data])
        if data.dim() < 2:
            raise ValueError(f"column '{self.kind.data}' of a {self.kind.what} has shape {tuple(data.shape)}; it holds "
                             "(rows, ...) with one row per image")
        count = data.shape[0]
        for name, dtype in self.kind.columns:
            value = torch.as_tensor(rows[name]).detach().cpu()
            if value.shape[0] != count or (name != self.kind.data and value.dim() != 1):
                raise ValueError(f"column '{name}' of a {self.kind.what} has shape {tuple(value.shape)} for "
                                 f"{count} rows of '{self.kind.data}'")
            if dtype.is_floating_point:
                if not value.is_floating_point():
                    raise ValueError(f"column '{name}' of a {self.kind.what} must be float, got {value.dtype}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"column '{name}' holds NaN or infinite values; a cache stores finite {name}")
            elif value.is_floating_point() or value.is_complex():
                raise ValueError(f"column '{name}' of a {self.kind.what} must hold integers, got {value.dtype}")
            self.pending[name].append(value.to(dtype))
        self.total += count
        while self._pending_rows() >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> list[dict]:
        """Write what is pending; the shards ``[{"file", "count"}, ...]``."""
        if self._pending_rows():
            self._flush(self._pending_rows())
        return self.shards

    def _pending_rows(self) -> int:
        return sum(t.shape[0] for t in self.pending[self.kind.data])

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
    """Close the shards, write meta.json, check the folder as a reader would and rename it into place."""
    files = shards.close()
    if not files:
        raise ValueError(f"the dataset for {output} is empty: nothing to tokenize")
    meta = {**meta, "num_items": shards.total, "shards": files}
    (staging / META_NAME).write_text(json.dumps(meta, indent=2))
    # the rows must have the shape meta.json gives (a tokenizer or generator whose output disagrees with its own
    # description is caught here, before an existing cache is replaced, not when training reads it)
    try:
        written = read_meta(staging)
        if cache_kind(written) is not shards.kind:
            raise ValueError(f"field 'kind' is {written.get('kind', TOKENS.name)!r}, but the rows are "
                             f"{shards.kind.name}")
        for number in range(len(written["shards"])):
            _shard_layout(staging, written, number)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"the cache written for {output} does not check, so nothing was replaced: {error}") from None
    _move_into_place(staging, output)


class TokenCacheEncoder(lightning.LightningModule):
    """``trainer.predict`` with a trained tokenizer (what ``flexar-tokenize`` runs): each batch of (images, labels)
    gives the rows of :func:`cache_rows` for :class:`TokenCacheWriter`: ``{"ids" (B, max_tokens) int32, zero past
    "lengths" (B,) int32, "labels" (B,) long}`` with `num_tokens` kept tokens (None: the tokenizer's default), or,
    from a continuous tokenizer (VAE; `num_tokens` refused), ``{"latents" (B, C, h, w) float32, "labels" (B,)
    long}``. A training run's ``TokenizerModule`` predicts the same token rows from a checkpoint.

    `tokenizer_folder`: the folder `tokenizer` was loaded from, whose fingerprint and path meta.json records; None
    records the fingerprint of the folder ``save_pretrained`` would write, and no path.
    """

    def __init__(self, tokenizer, num_tokens: int | None = None, tokenizer_folder: str | os.PathLike | None = None):
        super().__init__()
        check_num_tokens(tokenizer, num_tokens)
        self.tokenizer = tokenizer
        self.num_tokens = num_tokens
        self.tokenizer_folder = tokenizer_folder

    def predict_step(self, batch, batch_idx, dataloader_idx=0) -> dict:
        return cache_rows(self.tokenizer, batch[0], batch[1], self.num_tokens)

    def token_cache_meta(self, tokenizer_folder: str | os.PathLike | None = None) -> dict:
        from flexar.hub import fingerprint, model_fingerprint

        folder = tokenizer_folder if tokenizer_folder is not None else self.tokenizer_folder
        if folder is None:
            return tokenizer_meta(self.tokenizer, model_fingerprint(self.tokenizer), None)
        return tokenizer_meta(self.tokenizer, fingerprint(folder), Path(folder).resolve())


class TokenCacheWriter(BasePredictionWriter):
    """Writes what ``trainer.predict`` returns, on every device, as one token or latent cache at `output`.

    The LightningModule's ``predict_step`` gives ``{"ids", "lengths", "labels"}`` per batch for a token cache, or
    ``{"latents", "labels"}`` for a latent cache (a :class:`TokenCacheEncoder` or a ``flexar.train.TokenizerModule``
    tokenizes its data, a ``flexar.train.GeneratorModule`` samples), and its ``token_cache_meta(tokenizer_folder)``
    the ``kind`` and the tokenizer's fields of meta.json, which must name the kind of the rows. Each rank writes its
    batches into the staging folder beside `output`, which every rank must see (one filesystem); when the epoch
    ends rank zero merges them in row order and renames the finished cache into place, as :func:`write_token_cache`
    does. With several ranks the predict loader must be one of flexar's data modules' (a
    :class:`~flexar.data.GlobalBatchSampler` in row order): rank r holds the r-th slice of every global batch, so
    step by step, rank by rank is the dataset's order, and the cache equals the one a single process writes.

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
        self._kind: CacheKind | None = None  # of the rows this rank predicts, known from its first batch
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
        self._kind, self._pending = None, {}
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
        prediction = prediction or {}
        kind = LATENTS if LATENTS.data in prediction else TOKENS
        missing = [name for name in kind.names if name not in prediction]
        if missing:
            raise ValueError(f"TokenCacheWriter: {type(pl_module).__name__}.predict_step must return a dict with "
                             f"{list(TOKENS.names)} (a token cache) or {list(LATENTS.names)} (a latent cache); it "
                             f"lacks {missing}")
        if self._kind is None:
            self._kind, self._pending = kind, {name: [] for name in kind.names}
        elif kind is not self._kind:
            raise ValueError(f"TokenCacheWriter: {type(pl_module).__name__}.predict_step returned the rows of a "
                             f"{kind.what} after those of a {self._kind.what}; one cache holds one kind")
        for name in kind.names:
            self._pending[name].append(prediction[name].detach().cpu())
        self._steps.append(int(prediction[kind.data].shape[0]))
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
        self._pending = {name: [] for name in self._kind.names}
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
        kind = cache_kind(meta)
        if self._kind is not None and self._kind is not kind:
            raise ValueError(f"predict_step returned the rows of a {self._kind.what}, but token_cache_meta "
                             f"describes a {kind.what} (field 'kind' {meta.get('kind', TOKENS.name)!r})")
        streams = [_steps_of(sorted(parts.glob(f"rank{rank:05d}_*.safetensors")), kind) for rank in range(world_size)]
        shards = ShardWriter(self._staging, self.shard_size, (meta.get("tokenizer") or {}).get("fingerprint"), kind)
        for step, rows in enumerate(itertools.zip_longest(*streams)):
            if any(row is None for row in rows):
                counts = [rank for rank, row in enumerate(rows) if row is None]
                raise ValueError(f"ranks {counts} wrote no rows for step {step} while others did (is {self._staging} "
                                 "on a filesystem every rank sees?)")
            for row in rows:
                shards.add(row)
        shutil.rmtree(parts)
        describe = getattr(trainer.datamodule, "predict_description", None)
        description = {**(describe() if callable(describe) else {}), **self.description}
        _finish(self._staging, self.output, shards, {**description, **meta})
        what = "latent grids" if kind is LATENTS else "token sequences"
        print(f"wrote {shards.total} {what} to {self.output}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.is_global_zero and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def _steps_of(files: list[Path], kind: CacheKind):
    """The rows of each step, in order, from one rank's part files (the columns of `kind`)."""
    from safetensors.torch import load_file

    for file in files:
        part = load_file(str(file))
        missing = [name for name in kind.names if name not in part]
        if missing:
            raise ValueError(f"{file} holds no {missing}: its rank predicted the rows of another kind of cache than "
                             f"{kind.name}")
        start = 0
        for count in part["steps"].tolist():
            yield {name: part[name][start:start + count] for name in kind.names}
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
    if not isinstance(meta.get("kind", TOKENS.name), str) or meta.get("kind", TOKENS.name) not in KINDS:
        raise _refuse(path, "kind", f"one of {sorted(KINDS)} (absent: {TOKENS.name!r})", meta["kind"])
    if cache_kind(meta) is LATENTS:
        _check_latent_shape(meta, path)
    else:
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


def _check_latent_shape(meta: dict, path: Path) -> None:
    """A latent cache's row fields: ``latent_shape`` [C, h, w], ``max_tokens`` = h * w, ``grid`` = [h, w], and no
    ``vocab_size``."""
    for field in ("latent_shape", "max_tokens", "grid"):
        if field not in meta:
            raise ValueError(f"{path}: field '{field}' is missing (a latent cache, field 'kind' 'latents')")
    shape = meta["latent_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(n) and n > 0 for n in shape)):
        raise _refuse(path, "latent_shape", "a list [channels, height, width] of positive ints", shape)
    _, height, width = shape
    if meta["max_tokens"] != height * width:
        raise ValueError(f"{path}: field 'max_tokens' is {meta['max_tokens']!r}, but field 'latent_shape' {shape} "
                         f"has {height * width} latent positions")
    if meta["grid"] != [height, width]:
        raise ValueError(f"{path}: field 'grid' is {meta['grid']!r}, but field 'latent_shape' {shape} has the grid "
                         f"{[height, width]}")
    if meta.get("vocab_size") is not None:
        raise ValueError(f"{path}: field 'vocab_size' is {meta['vocab_size']!r}, but a latent cache (field 'kind' "
                         "'latents') has no vocabulary")


def read_meta(folder: str | os.PathLike) -> dict:
    """The checked meta.json of a token or latent cache (see :func:`check_meta`)."""
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
    kind = cache_kind(meta)
    layout = {}
    for column, stored in kind.columns:
        if column not in header:
            raise ValueError(f"{path} holds no '{column}' tensor (it holds {sorted(header)}); a {kind.what} "
                             f"shard holds {list(kind.names)}")
        entry = header[column] if isinstance(header[column], dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape) and isinstance(offsets, list)
                and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
            raise ValueError(f"{path}: tensor '{column}' has an invalid safetensors header entry {header[column]!r}")
        begin, end = offsets
        allowed, what = (FLOAT_DTYPES, "a float") if stored.is_floating_point else (INTEGER_DTYPES, "an integer")
        if dtype not in allowed:
            raise ValueError(f"{path}: tensor '{column}' has dtype {dtype}; in a {kind.what} it must have "
                             f"{what} dtype ({', '.join(allowed)})")
        numpy_dtype = np.dtype(allowed[dtype])
        if end - begin != int(np.prod(shape)) * numpy_dtype.itemsize or 8 + header_size + end > size:
            raise ValueError(f"{path}: tensor '{column}' does not fit in the file (truncated shard?)")
        layout[column] = (8 + header_size + begin, numpy_dtype, tuple(shape))
    rows = layout[kind.data][2]
    if len(rows) < 1 or rows[1:] != kind.row_shape(meta):
        raise ValueError(f"{path}: tensor '{kind.data}' has shape {list(rows)}, but {meta_path} field "
                         f"'{kind.shape_field}' is {meta[kind.shape_field]} ({kind.data} are (rows, "
                         f"{'max_tokens' if kind is TOKENS else '*latent_shape'}))")
    for column in kind.names[1:]:
        if layout[column][2] != (rows[0],):
            raise ValueError(f"{path}: tensor '{column}' has shape {list(layout[column][2])} for {rows[0]} rows of "
                             f"{kind.data}; it must be ({rows[0]},)")
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
    """Rows of a token or latent cache, read from memory-mapped shards.

    ``dataset[i]`` is one row ``(data, labels () long, lengths () long)``, where data is ids (L,) long in a token
    cache and latents (C, h, w) float32 in a latent cache (whose length is every row's h * w positions);
    ``dataset[indices]`` (a list or 1-D array of row indices) is the batch ``(ids (B, L) | latents (B, C, h, w),
    labels (B,), lengths (B,))``, gathered with one read per shard it touches, the only part of the cache brought
    into memory. Opening checks meta.json and every shard's header against it (see the module docstring).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_meta(folder)
        self.kind = cache_kind(self.meta)
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

    def _dtype(self, column: str) -> type:
        """What a column reads as: float32 for latents, int64 for every integer column."""
        return np.float32 if dict(self.kind.columns)[column].is_floating_point else np.int64

    def __getitem__(self, index):
        if _is_int(index) or isinstance(index, np.integer):
            data, labels, lengths = self.gather([int(index) + (len(self) if index < 0 else 0)])
            return data[0], labels[0], lengths[0]
        return self.gather(index)

    def gather(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, L) long | latents (B, C, h, w) float32, labels (B,) long, lengths (B,) long) for row `indices`
        (B,), in that order."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)}) for the {self.kind.what} {self.folder}")
        shape = (rows.size, *self.kind.row_shape(self.meta))
        out = {self.kind.data: np.empty(shape, dtype=self._dtype(self.kind.data))}
        out.update({name: np.empty(rows.size, dtype=np.int64) for name in self.kind.names[1:]})
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        columns = self._columns()
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            local = rows[where] - self.starts[shard]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            for name, values in out.items():
                values[where[order]] = columns[shard][name][local[order]]
        if "lengths" not in out:  # latents: every row holds all h * w positions
            out["lengths"] = np.full(rows.size, self.meta["max_tokens"], dtype=np.int64)
        return tuple(torch.from_numpy(out[name]) for name in (self.kind.data, "labels", "lengths"))

    def column(self, name: str) -> torch.Tensor:
        """A whole column as a tensor (reads every shard): ``ids`` (N, L), ``labels`` or ``lengths`` (N,) long;
        ``latents`` (N, C, h, w) float32 (a latent cache's lengths are h * w for every row)."""
        if name == "lengths" and name not in self.kind.names:
            return torch.full((len(self),), self.meta["max_tokens"], dtype=torch.long)
        if name not in self.kind.names:
            raise KeyError(f"{self.folder} is a {self.kind.what}: its columns are {list(self.kind.names)}, "
                           f"not {name!r}")
        values = np.concatenate([columns[name] for columns in self._columns()])
        return torch.from_numpy(values.astype(self._dtype(name)))

    @property
    def ids(self) -> torch.Tensor:
        return self.column("ids")

    @property
    def latents(self) -> torch.Tensor:
        return self.column("latents")

    @property
    def labels(self) -> torch.Tensor:
        return self.column("labels")

    @property
    def lengths(self) -> torch.Tensor:
        return self.column("lengths")


class TokenDataModule(GlobalBatchDataModule):
    """Batches (ids (B, L), labels (B,), lengths (B,)) from token caches, or (latents (B, C, h, w) float32, labels
    (B,), lengths (B,) = h * w) from latent caches, for generator training.

    Every training epoch covers every row of the `train` cache once, split across data-parallel ranks as
    :mod:`flexar.data.datamodule` describes; `batch_size` is per process. A `val` cache must be of the same kind as
    `train` and come from the same tokenizer. ``trainer.test`` reads the `val` cache (the test split's tokens, as
    the image data module validates and tests on the test split); ``trainer.predict`` reads the rows of the `val`
    cache, else of `train`, in order (a generator samples one image per row's label).
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
        kind, val_kind = cache_kind(self.meta), cache_kind(val_meta)
        if kind is not val_kind:
            different = [f"kind {kind.name} vs {val_kind.name}"]
        else:
            keys = ("vocab_size", "max_tokens") if kind is TOKENS else ("latent_shape",)
            different = [f"{key} {self.meta[key]} vs {val_meta[key]}" for key in keys
                         if self.meta[key] != val_meta[key]]
        if train_print and val_print and train_print != val_print:
            different.append(f"tokenizer.fingerprint {train_print[:12]} vs {val_print[:12]}")
        if different:
            raise ValueError(f"{kind.what}s {self.train_path} (train) and {self.val_path} (val) come from "
                             f"different tokenizers: {'; '.join(different)}")

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
        description="Run a trained tokenizer over a dataset once and cache its ids, or a continuous tokenizer's (VAE) "
                    "latents (trainer.predict on every device).")
    parser.add_argument("--tokenizer", required=True,
                        help="folder written by save_pretrained / flexar-train: a tokenizer (a token cache) or a VAE "
                             "(a latent cache)")
    parser.add_argument("--dataset", default="digits", help="digits, photos, mnist, cifar10 or imagefolder:PATH")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--output", required=True, help="cache folder; an existing cache there is replaced when the new one is complete")
    parser.add_argument("--num-tokens", type=int, default=None,
                        help="keep the first k tokens (flexible tokenizers; not for a VAE's latents)")
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
    tokenizer = load_model(args.tokenizer)
    if not (isinstance(tokenizer, Tokenizer) or is_continuous(tokenizer)):
        parser.error(f"--tokenizer {args.tokenizer} holds a {type(tokenizer).__name__}, which is not a tokenizer (a "
                     "flexar Tokenizer, or a continuous tokenizer with encode_latents such as VAE)")
    if args.num_tokens is not None and is_continuous(tokenizer):
        side = tokenizer.latent_size
        parser.error(f"--num-tokens {args.num_tokens} with --tokenizer {args.tokenizer}, a {type(tokenizer).__name__}: "
                     f"a continuous tokenizer writes a latent cache of whole {tokenizer.latent_channels} x {side} x "
                     f"{side} latent grids, with no tokens to keep; leave --num-tokens out")
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
