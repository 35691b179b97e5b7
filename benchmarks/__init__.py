"""Benchmark definitions, run through ``scripts/benchmark.py NAME``.

Each benchmark is a module ``benchmarks/<name>.py`` with ``run(quick: bool, device: str) -> dict`` returning

- ``config``: the sizes and settings it used (and anything it skipped, with the reason);
- ``summary``: the headline numbers, every speed-up a ratio against its baseline from the same run;
- ``rows``: one flat dict per measured case, printed as a table.

``quick`` means tiny sizes for smoke tests. A new benchmark is its module plus one line in :data:`BENCHMARKS`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

BENCHMARKS = {
    "attention": "benchmarks.attention",
    "kv_cache": "benchmarks.kv_cache",
    "nar": "benchmarks.nar",
    "npp": "benchmarks.npp",
    "generate": "benchmarks.generate",
    "tokens_vs_quality": "benchmarks.tokens_vs_quality",
    "speculative": "benchmarks.speculative",
    "scalingar": "benchmarks.scalingar",
    "token_shuffle": "benchmarks.token_shuffle",
    "entropy": "benchmarks.entropy",
    "mvar": "benchmarks.mvar",
}


def load(name: str) -> ModuleType:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    return importlib.import_module(BENCHMARKS[name])
