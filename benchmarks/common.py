"""Timing and machine description shared by every benchmark.

Speed claims are ratios measured in one run: :func:`compare` times several callables in interleaved rounds (the order
rotates every round) so that load from other processes hits every variant alike, and :meth:`Comparison.speedup` takes
the median over rounds of the per-round ratio. Times are ``time.perf_counter`` seconds per call, with
``torch.cuda.synchronize`` around each sample on CUDA.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


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
) -> Comparison:
    """Time every callable `repeats` times in interleaved rounds, after `warmup` untimed calls of each.

    A sample repeats a call until it lasts about `min_sample_seconds` (so that fast calls rise above timer and
    scheduler noise); the call count per sample is fixed from the last warmup call, which needs warmup >= 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if min_sample_seconds > 0 and warmup < 1:
        raise ValueError("min_sample_seconds needs at least one warmup call to size the samples")
    names = list(functions)
    numbers = {}
    for name in names:
        elapsed = 0.0
        for _ in range(warmup):
            elapsed = time_calls(functions[name], device)
        numbers[name] = max(1, math.ceil(min_sample_seconds / elapsed)) if min_sample_seconds > 0 else 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_calls(functions[name], device, numbers[name]))
    return Comparison({name: Timing(samples[name], numbers[name]) for name in names})


def measure(
    function: Callable[[], object],
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    min_sample_seconds: float = 0.0,
) -> Timing:
    """Timing of a single callable (see :func:`compare`)."""
    return compare({"function": function}, device, warmup, repeats, min_sample_seconds).timings["function"]


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
