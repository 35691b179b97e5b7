"""Timing, progress, bar verdicts and machine description shared by every benchmark.

Speed claims are ratios measured in one run: :func:`compare` times several callables in interleaved rounds (the order
rotates every round) so that load from other processes hits every variant alike, and :meth:`Comparison.speedup` takes
the median over rounds of the per-round ratio. Times are ``time.perf_counter`` seconds per call, with
``torch.cuda.synchronize`` around each sample on CUDA.

Every loop of a full run that lasts more than a few seconds (training steps, timing rounds, sampling batches) draws a
:func:`progress` bar on stderr, so that stdout keeps only the report (a single JSON line with ``--json``).

A summary's bar verdicts are its keys that start with ``meets_`` or ``beats_``; :func:`without_verdicts` removes them
from a ``--quick`` run, whose tiny sizes say nothing about any bar.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
VERDICT_PREFIXES = ("meets_", "beats_")


def progress(iterable: Iterable | None = None, description: str = "", total: int | None = None, unit: str = "it"):
    """A tqdm bar on stderr over `iterable`, or (`iterable` None) a bar of `total` steps advanced by ``update(n)``.

    On a terminal the bar redraws at most twice a second; written to a file or a pipe (the log of a long run) it is
    redrawn at most every 30 seconds, so that a log of an hour-long run stays short. Use it as a context manager (or
    call ``close()``) when it is advanced by hand.
    """
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=description, total=total, unit=unit, file=sys.stderr, dynamic_ncols=interactive,
                mininterval=0.5 if interactive else 30.0)


def lightning_progress(description: str):
    """A Lightning callback that draws a :func:`progress` bar over the optimiser steps of ``trainer.fit``.

    Lightning's own bar writes to stdout, which must keep only the benchmark's report; this one goes to stderr. The
    same callback is ``benchmarks.common.StepProgress`` for a LightningCLI run (``--trainer.callbacks+=`` followed by
    ``{"class_path": "benchmarks.common.StepProgress", "init_args": {"description": NAME}}``, as JSON so that a colon
    in NAME stays text).
    """
    return _step_progress_class()(description)


@functools.cache
def _step_progress_class() -> type:
    import lightning as L

    class StepProgress(L.Callback):
        def __init__(self, description: str = "training"):
            self.description = description
            self.bar = None

        def on_train_start(self, trainer, module):
            self.bar = progress(description=self.description, total=trainer.estimated_stepping_batches, unit="step")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
            # global_step counts optimiser steps, the unit of the total, whatever the gradient accumulation
            self.bar.update(trainer.global_step - self.bar.n)

        def on_train_end(self, trainer, module):
            self.bar.close()

    StepProgress.__module__, StepProgress.__qualname__ = __name__, "StepProgress"
    return StepProgress


def __getattr__(name: str):
    # StepProgress subclasses lightning.Callback: it is built on first use, so that the benchmarks that never train
    # through Lightning do not pay for importing it
    if name == "StepProgress":
        return _step_progress_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_verdict(key: object) -> bool:
    """Whether a summary key is a bar verdict (``meets_target``, ``beats_truncated_titok_...``)."""
    return isinstance(key, str) and key.startswith(VERDICT_PREFIXES)


def without_verdicts(value):
    """`value` (nested dicts and lists, as a benchmark returns them) without any bar-verdict key at any depth."""
    if isinstance(value, dict):
        return {key: without_verdicts(item) for key, item in value.items() if not is_verdict(key)}
    if isinstance(value, list):
        return [without_verdicts(item) for item in value]
    return value


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(function: Callable[[], object], device: str | torch.device = "cpu", number: int = 1) -> float:
    """Seconds per call of `function`, averaged over `number` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / number


@dataclass
class Timing:
    """Seconds per call of one callable: one sample per round, each the mean of `number` calls."""

    samples: list[float]
    number: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)


@dataclass
class Comparison:
    """Interleaved timings of named callables; sample i of every callable comes from the same round."""

    timings: dict[str, Timing]

    def seconds(self, name: str) -> float:
        """Median seconds per call of `name`."""
        return self.timings[name].median

    def speedup(self, name: str, baseline: str) -> float:
        """How many times faster `name` is than `baseline`: the median over rounds of baseline / name."""
        pairs = zip(self.timings[baseline].samples, self.timings[name].samples)
        return statistics.median(base / value for base, value in pairs)


def compare(
    functions: dict[str, Callable[[], object]],
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    min_sample_seconds: float = 0.0,
    description: str | None = None,
) -> Comparison:
    """Time every callable `repeats` times in interleaved rounds, after `warmup` untimed calls of each.

    A sample repeats a call until it lasts about `min_sample_seconds` (so that fast calls rise above timer and
    scheduler noise); the call count per sample is fixed from the last warmup call, which needs warmup >= 1.
    With a `description`, a :func:`progress` bar counts the warmup calls and samples, naming the callable that runs
    (it is drawn between samples, never inside one).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if min_sample_seconds > 0 and warmup < 1:
        raise ValueError("min_sample_seconds needs at least one warmup call to size the samples")
    names = list(functions)
    bar = None
    if description is not None:
        bar = progress(description=description, total=len(names) * (warmup + repeats), unit="sample")

    def step(name: str, number: int) -> float:
        if bar is not None:
            bar.set_postfix_str(name)
        seconds = time_calls(functions[name], device, number)
        if bar is not None:
            bar.update()
        return seconds

    numbers = {}
    try:
        for name in names:
            elapsed = 0.0
            for _ in range(warmup):
                elapsed = step(name, 1)
            numbers[name] = max(1, math.ceil(min_sample_seconds / elapsed)) if min_sample_seconds > 0 else 1
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(step(name, numbers[name]))
    finally:
        if bar is not None:
            bar.close()
    return Comparison({name: Timing(samples[name], numbers[name]) for name in names})


def measure(
    function: Callable[[], object],
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    min_sample_seconds: float = 0.0,
    description: str | None = None,
) -> Timing:
    """Timing of a single callable (see :func:`compare`)."""
    return compare({"function": function}, device, warmup, repeats, min_sample_seconds, description).timings["function"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def machine_info(device: str | torch.device) -> dict:
    """Where the numbers came from: software versions, device, cores, threads and load, date, git commit."""
    device = torch.device(device)
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        # other processes on the machine: ratios stay comparable, absolute times do not
        info["load_average_1min"] = os.getloadavg()[0]
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


CHECKPOINT_SECONDS = 300.0  # how often fit writes its resumable state


def fit(model, images: torch.Tensor, steps: int, batch_size: int, lr: float, warmup: int, device: str,
        description: str, labels: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
        checkpoint: Path | None = None, checkpoint_seconds: float = CHECKPOINT_SECONDS):
    """AdamW with warmup and cosine decay on random batches of `images` (a tokenizer) or of token ids with `labels`
    (and `lengths`, a generator); returns the model in eval mode and the last loss.

    With `checkpoint` (a file; :meth:`Models.checkpoint` names it), the whole training state (weights and buffers,
    optimizer, schedule, the batch stream, torch's random state, the step, the seconds trained) is written there every
    `checkpoint_seconds` and read back when the file exists, so a killed run resumes at its last checkpoint and ends,
    on the CPU, with the same weights as a run that was never stopped. A checkpoint of another recipe (steps, batch
    size, learning rate, warmup, data size) is refused by name."""
    from flexar.train import warmup_cosine

    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.05 if labels is not None else 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, steps, 0.1))
    shuffle = torch.Generator().manual_seed(0)
    recipe = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "examples": len(images)}
    start, seconds = 0, 0.0
    if checkpoint is not None and Path(checkpoint).is_file():
        start, seconds = _resume(Path(checkpoint), recipe, model, optimizer, schedule, shuffle, device)
    loss = torch.zeros(())
    began = last_save = time.perf_counter()
    for step in progress(range(start, steps), description + (f" (resumed at step {start})" if start else ""),
                         unit="step"):
        index = torch.randint(0, len(images), (batch_size,), generator=shuffle)
        if labels is None:
            loss, _ = model.training_loss(images[index].to(device))
        else:
            extra = {} if lengths is None else {"lengths": lengths[index].to(device)}
            loss, _ = model.training_loss(images[index].to(device), labels[index].to(device), **extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        now = time.perf_counter()
        if checkpoint is not None and step + 1 < steps and now - last_save >= checkpoint_seconds:
            _save_checkpoint(Path(checkpoint), recipe, step + 1, seconds + now - began, model, optimizer, schedule,
                             shuffle, device)
            last_save = now
    return model.eval(), float(loss.detach())


def _save_checkpoint(path: Path, recipe: dict, step: int, seconds: float, model, optimizer, schedule, shuffle,
                     device: str) -> None:
    """Write the training state to `path` through a temporary file, so a kill mid-write keeps the previous one."""
    state = {"recipe": recipe, "step": step, "seconds": seconds, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "shuffle": shuffle.get_state(),
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if str(device).startswith("cuda") else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def _resume(path: Path, recipe: dict, model, optimizer, schedule, shuffle, device: str) -> tuple[int, float]:
    """Load the training state saved at `path` into the given objects; returns (step, seconds trained)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("recipe") != recipe:
        raise ValueError(f"{path} was saved by another training recipe: {state.get('recipe')} (this run: {recipe}); "
                         f"delete it to train from scratch")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    shuffle.set_state(state["shuffle"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return int(state["step"]), float(state["seconds"])


def checkpoint_seconds(path: Path | None) -> float:
    """The seconds of training a checkpoint written by :func:`fit` holds (0 when there is none)."""
    if path is None or not Path(path).is_file():
        return 0.0
    return float(torch.load(path, map_location="cpu", weights_only=True)["seconds"])


TRAINING_RECORD = "training.json"  # beside a benchmark's saved model: how long it trained


class Models:
    """Where a benchmark's trained models live: loaded from ``folder/NAME`` when there (the folder a benchmark's
    ``FLEXAR_*_MODELS`` variable names), else trained and saved there (in the scratch folder when none is named), so
    that a second run, or a run after an interrupted one, only evaluates; a model whose training was interrupted
    resumes from its checkpoint (``NAME.partial.pt``, when the training passes :meth:`checkpoint` to :func:`fit`). ``trained_seconds`` records the training
    time of each model trained here; ``loaded`` names the ones read from the folder."""

    def __init__(self, folder: str | None, scratch: Path):
        self.folder = Path(folder) if folder else None
        self.scratch = scratch
        self.trained_seconds: dict[str, float] = {}
        self.loaded: list[str] = []

    def path(self, name: str) -> Path:
        return (self.folder or self.scratch / "models") / name

    def get(self, name: str, train):
        """The model NAME: loaded when saved, else ``train()`` (returning it in eval mode), saved and returned. The
        training time is kept beside the weights (``training.json``), so a later run that loads the model reports it
        (:meth:`seconds`)."""
        from flexar.hub import load_model

        path = self.path(name)
        if self.folder is not None and (path / "config.json").is_file():
            self.loaded.append(name)
            return load_model(path)
        checkpoint = self.checkpoint(name)
        earlier = checkpoint_seconds(checkpoint)  # an interrupted run's training, resumed by train()
        started = time.perf_counter()
        model = train()
        self.trained_seconds[name] = earlier + time.perf_counter() - started
        model.save_pretrained(path)
        (path / TRAINING_RECORD).write_text(json.dumps({"seconds": self.trained_seconds[name]}))
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
        return model

    def checkpoint(self, name: str) -> Path | None:
        """Where :func:`fit` keeps the resumable state of model NAME while it trains (None without a folder: a
        scratch folder does not outlive the run)."""
        return None if self.folder is None else self.folder / f"{name}.partial.pt"

    def seconds(self, name: str) -> float | None:
        """The training seconds of model NAME: measured here, or recorded beside a loaded one (None if neither)."""
        if name in self.trained_seconds:
            return self.trained_seconds[name]
        record = self.path(name) / TRAINING_RECORD
        return json.loads(record.read_text()).get("seconds") if record.is_file() else None
