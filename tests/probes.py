"""What a training run did, recorded from inside it: the rows each rank trained on, the loss of every step.

The multi-process and kill-and-resume tests run ``flexar-train`` in child processes (Lightning's DDP launcher
re-executes the command line for every rank), so the record goes to files: one JSON line per event, flushed at
once, so that a process killed with SIGKILL keeps everything it recorded before the kill.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file


def row_keys(rows: torch.Tensor) -> list[str]:
    """One key per row of a (B, ...) tensor: a hash of its bytes, so rows are recognised without an index."""
    rows = rows.detach().cpu().contiguous()
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:20] for row in rows]


class RunProbe(L.Callback):
    """Appends to ``folder/rank{R}.jsonl``: per training epoch the keys of the rows trained on and the step count;
    per step the loss. ``kill_at_step``: the process kills itself with SIGKILL when that optimiser step begins
    (after the checkpoints of the steps before it are on disk)."""

    def __init__(self, folder: str, kill_at_step: int | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.kill_at_step = kill_at_step
        self._rows: list[str] = []
        self._steps = 0

    def _write(self, trainer, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._rows, self._steps = [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        self._rows.extend(row_keys(batch[0]))
        self._steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write(trainer, {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx,
                              "loss": float(loss), "rows": len(batch[0])})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, {"epoch_end": trainer.current_epoch, "steps": self._steps, "keys": self._rows})


def read_records(folder: str | os.PathLike, rank: int = 0) -> list[dict]:
    path = Path(folder) / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def index_ids(count: int, vocab_size: int, length: int) -> torch.Tensor:
    """(count, length) ids whose first two positions spell the row index in base ``vocab_size``: every row differs."""
    index = torch.arange(count)
    ids = torch.stack([(index * (3 + 2 * j) + j) % vocab_size for j in range(length)], dim=1)
    ids[:, 0], ids[:, 1] = index // vocab_size, index % vocab_size
    return ids


def write_index_cache(folder: str | os.PathLike, counts: list[int], vocab_size: int, length: int,
                      num_classes: int) -> torch.Tensor:
    """A token cache of ``sum(counts)`` distinct rows in shards of ``counts`` rows; returns all ids (N, length)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    total = sum(counts)
    ids = index_ids(total, vocab_size, length)
    labels = torch.arange(total) % num_classes
    shards, start = [], 0
    for number, count in enumerate(counts):
        name = f"shard_{number:05d}.safetensors"
        rows = slice(start, start + count)
        save_file({"ids": ids[rows].int().contiguous(), "lengths": torch.full((count,), length, dtype=torch.int32),
                   "labels": labels[rows].contiguous()}, str(folder / name))
        shards.append({"file": name, "count": count})
        start += count
    meta = {"vocab_size": vocab_size, "max_tokens": length, "grid": None, "num_items": total,
            "num_classes": num_classes, "shards": shards}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return ids
