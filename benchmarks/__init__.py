"""Benchmark definitions, run through ``scripts/benchmark.py NAME``.

Each benchmark is a module ``benchmarks/<name>.py`` with ``run(quick: bool, device: str) -> dict`` returning

- ``config``: the sizes and settings it used (and anything it skipped, with the reason);
- ``summary``: the headline numbers, every speed-up a ratio against its baseline from the same run;
- ``rows``: one flat dict per measured case, printed as a table.

``quick`` means tiny sizes for smoke tests. A new benchmark is its module, one line in :data:`BENCHMARKS` and one
in :data:`ABOUT` (what it measures and how long it runs: ``scripts/benchmark.py --list`` prints it, and
``benchmarks/README.md`` holds the same table, checked by the tests).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

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
    "adaptive": "benchmarks.adaptive",
    "xar": "benchmarks.xar",
    "decode": "benchmarks.decode",
    "gpu": "benchmarks.gpu",
    "speculative_large": "benchmarks.speculative_large",
}


class About(NamedTuple):
    """What a benchmark measures and how long it runs on the reference machine: 2 CPU cores (AMD EPYC) shared with
    other jobs, so every duration is a load-dependent guide, not a promise."""

    measures: str  # one line
    # a full run: the wall_seconds of its record in benchmarks/results/NAME.json; None until it is recorded
    full_seconds: float | None
    # a --quick run: wall time of `OMP_NUM_THREADS=1 python scripts/benchmark.py NAME --quick --json --device cpu`,
    # start-up and imports included
    quick_seconds: float
    needs: str = ""  # what a full run needs first, and any one-time work it does before the recorded duration
    environment: str = ""  # variables the full run's command sets
    files: tuple[str, ...] = ()  # files written beside the JSON record


# the digits models of speculative, scalingar and entropy: every model from scratch, or only the two drafts on the
# demo's tokenizer and generator; estimated from 25 steps of each training loop, one thread, load average 5
_DIGITS_MODELS = ("the digits models, trained by the first run into runs/bench_digits (~4 h 40 min; ~40 min on the "
                  "demo pipeline with FLEXAR_BENCH_PIPELINE) and reused after")

ABOUT = {
    "attention": About(
        "attention backends (SDPA, FlexAttention eager and compiled, xformers on CUDA) against `math`: speed-up and "
        "max difference, no / causal / block-causal mask",
        full_seconds=92, quick_seconds=11),
    "kv_cache": About(
        "KV-cache decoding against recomputing the prefix at every step: tokens/s, identical tokens",
        full_seconds=670, quick_seconds=6),
    "nar": About(
        "NAR (h + w - 1 passes) against raster decoding (h * w passes) on the same network: images/s, forward passes",
        full_seconds=107, quick_seconds=12),
    "npp": About(
        "NPP and NAR against raster training on MNIST: seconds per epoch, and FID after the same epochs",
        full_seconds=2645, quick_seconds=17, needs="MNIST under FLEXAR_DATA", environment="FLEXAR_DATA=DIR"),
    "generate": About(
        "a saved pipeline's generator with and without the KV cache: images/s, forward passes",
        full_seconds=30, quick_seconds=12,
        needs="runs/demo/pipeline (`make demo`, ~5 min) or FLEXAR_PIPELINE=FOLDER"),
    "tokens_vs_quality": About(
        "reconstruction (MSE, PSNR, rFID) against the kept tokens k for truncated TiTok, One-D-Piece, FlexTok and "
        "ReTok; gFID of a raster generator stopped at k tokens",
        full_seconds=7541, quick_seconds=47,
        needs="MNIST under FLEXAR_DATA; the classifier, tokenizers and generator are kept for reuse with "
              "FLEXAR_TVQ_MODELS=FOLDER (the recorded run loaded the classifier and the four tokenizers, which "
              "train in ~100 min more on one core)", environment="FLEXAR_DATA=DIR", files=("tokens_vs_quality.png",)),
    "speculative": About(
        "exact speculative decoding and LANTERN against plain decoding: latency at batch 1, acceptance, FID",
        full_seconds=315, quick_seconds=32, needs=_DIGITS_MODELS),
    "scalingar": About(
        "ScalingAR against best-of-N at equal N: tokens consumed, FID over seeds",
        full_seconds=285, quick_seconds=35, needs=_DIGITS_MODELS),
    "token_shuffle": About(
        "Token-Shuffle (s = 2) against raster decoding with the same transformer: sequence length, images/s",
        full_seconds=1973, quick_seconds=20),
    "entropy": About(
        "entropy-aware temperature and top-k against a fixed temperature at equal settings: FID",
        full_seconds=152, quick_seconds=24, needs=_DIGITS_MODELS),
    "mvar": About(
        "MVAR against VAR with the same width and depth: peak memory of a training step and of generation, "
        "generation speed, each in a fresh process; FID of both trained with one budget on one multi-scale VQ",
        full_seconds=5714, quick_seconds=80,
        needs="a GPU for the full memory sizes, or FLEXAR_MVAR_SIZE=narrow on a CPU; MNIST under FLEXAR_DATA"),
    "decode": About(
        "compiled against eager decoding steps (raster, Token-Shuffle) at batch 1 and 64, NAR against raster at "
        "16 x 16 both compiled, each against its matrix-product floor from the profiler; exact speculative decoding "
        "with the EAGLE head against plain decoding, both compiled, at batch 1 and 8",
        full_seconds=None, quick_seconds=120, needs=_DIGITS_MODELS),
    "speculative_large": About(
        "LANTERN against exact speculative decoding with an EAGLE head on MNIST 2D VQ tokens (1024 codes, 64 tokens "
        "per image): tokens per target pass, latency at batch 1, FID",
        full_seconds=5624, quick_seconds=40,
        needs="MNIST under FLEXAR_DATA; trains a 2D VQ, a raster target, its EAGLE head and a classifier (the "
              "recorded run, training included, on one core), kept for reuse with FLEXAR_SPECULATIVE_MODELS=FOLDER",
        environment="FLEXAR_DATA=DIR"),
    "gpu": About(
        "one GPU's evidence at GPT-B size with random weights: raster eager vs compiled (CUDA graphs) tokens/s at "
        "batch 1 and 64, NAR vs raster images/s at 16 x 16 and 24 x 24, attention kernels against `math`, bf16 "
        "training tokens/s and MFU, exact speculative decoding and LANTERN wall-clock",
        full_seconds=None, quick_seconds=60, needs="a CUDA GPU (sized for one H100 / H200, under 8 minutes)"),
    "adaptive": About(
        "KARL (one pass) and ALIT (search) on photos and MNIST: tokens against PNG size (Spearman), calibration to the "
        "requested error, encode speed; gFID and length TV of an end-of-sequence raster AR on KARL tokens against "
        "fixed-length TiTok",
        full_seconds=7774, quick_seconds=17,
        needs="MNIST under FLEXAR_DATA; trains 2 bases, KARL, ALIT, TiTok, 2 generators and a classifier, kept "
              "with FLEXAR_ADAPTIVE_MODELS=FOLDER; the recorded run loaded the bases and the classifier",
        environment="FLEXAR_DATA=DIR", files=("adaptive.png",)),
    "xar": About(
        "xAR on MNIST VAE latents, one model per entity (token, cell, subsample, scale, image) at one parameter count "
        "and budget, and cell without noisy context: FID and forward passes, against raster AR on 2D VQ tokens",
        full_seconds=6765, quick_seconds=64,
        needs="MNIST under FLEXAR_DATA; trains a VAE, a 2D VQ, a classifier, 7 xAR models and a raster AR (~3 h 20 min "
              "on one core), kept for reuse with FLEXAR_XAR_MODELS=FOLDER; the recorded run loaded all but the "
              "clean-context xAR and the raster AR",
        environment="FLEXAR_DATA=DIR"),
}


def load(name: str) -> ModuleType:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    return importlib.import_module(BENCHMARKS[name])
