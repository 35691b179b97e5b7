"""Attention backends against the ``math`` reference, through :func:`flexar.nn.attention`.

For every sequence length and mask (none, causal, block-causal with 16 equal blocks) each backend runs on the same
q, k, v of shape (B, H, L, D); its output is compared with ``math`` (max abs difference) and its time per call is
measured in rounds interleaved with ``math``, so every speed-up is a ratio from one run. Backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``;
- ``flex_eager``: FlexAttention unfused (the default of ``backend="flex"``);
- ``flex_compiled``: FlexAttention after ``set_flex_compile(True)``; the first call per shape and mask compiles, and
  its time is recorded as ``first_call_seconds``, outside the timed rounds (shorter when inductor's on-disk cache
  already holds the kernel; ``--quick`` skips this backend);
- ``xformers``: ``memory_efficient_attention``, on CUDA where its kernels load (on CPU it would only fall back to
  ``sdpa``, so it is skipped there).
"""
from __future__ import annotations

import functools
import time
import warnings

import torch

from flexar.nn import attention, block_causal_mask, causal_mask, set_flex_compile, xformers_available

from .common import compare, progress, synchronize

SIZES = {
    "cpu": dict(batch=4, heads=8, head_dim=64, lengths=(256, 1024), dtype=torch.float32),
    "cuda": dict(batch=8, heads=16, head_dim=64, lengths=(1024, 4096), dtype=torch.bfloat16),
    "quick": dict(batch=1, heads=2, head_dim=16, lengths=(32, 64), dtype=torch.float32),
}
NUM_BLOCKS = 16
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def masks(length: int, device: str) -> dict:
    block_ids = torch.arange(length, device=device) * NUM_BLOCKS // length
    return {"none": None, "causal": causal_mask(), "block_causal": block_causal_mask(block_ids)}


def _backend(name: str):
    def call(q, k, v, mask):
        return attention(q, k, v, mask, backend=name)

    return call


def _flex(compiled: bool):
    def call(q, k, v, mask):
        set_flex_compile(compiled)
        return attention(q, k, v, mask, backend="flex")

    return call


def backends(device: str, quick: bool) -> tuple[dict, dict[str, str]]:
    """The backends to time (name -> call(q, k, v, mask)) and the skipped ones with the reason."""
    variants = {"math": _backend("math"), "sdpa": _backend("sdpa"), "flex_eager": _flex(False)}
    skipped = {}
    if quick:
        skipped["flex_compiled"] = "--quick skips compilation"
    else:
        variants["flex_compiled"] = _flex(True)
    if torch.device(device).type != "cuda":
        skipped["xformers"] = "xformers kernels are CUDA-only"
    elif not xformers_available():
        skipped["xformers"] = "xformers kernels do not load here"
    else:
        variants["xformers"] = _backend("xformers")
    return variants, skipped


def run(quick: bool, device: str) -> dict:
    sizes = SIZES["quick" if quick else torch.device(device).type]
    batch, heads, head_dim, dtype = sizes["batch"], sizes["heads"], sizes["head_dim"], sizes["dtype"]
    repeats, min_sample_seconds = (2, 0.0) if quick else (5, 0.05)
    tolerance = TOLERANCE[dtype]
    variants, skipped = backends(device, quick)
    generator = torch.Generator().manual_seed(0)
    rows = []
    # one step per (length, mask) case: its first calls (compilation included) and its timed rounds
    cases = len(sizes["lengths"]) * len(masks(sizes["lengths"][0], device))
    bar = progress(description="attention", total=cases, unit="case")
    try:
        for length in sizes["lengths"]:
            q, k, v = (
                torch.randn(batch, heads, length, head_dim, generator=generator).to(device, dtype) for _ in range(3)
            )
            for mask_name, mask in masks(length, device).items():
                bar.set_postfix_str(f"L={length} {mask_name}")
                reference = attention(q, k, v, mask, backend="math").float()
                first_call, difference = {}, {}
                for name, call in variants.items():
                    synchronize(device)
                    start = time.perf_counter()
                    out = call(q, k, v, mask)
                    synchronize(device)
                    first_call[name] = time.perf_counter() - start
                    difference[name] = (out.float() - reference).abs().max().item()
                    if difference[name] > tolerance:
                        warnings.warn(f"{name} differs from math by {difference[name]:.3g} (L={length}, {mask_name})")
                comparison = compare(
                    {name: functools.partial(call, q, k, v, mask) for name, call in variants.items()},
                    device,
                    warmup=1,
                    repeats=repeats,
                    min_sample_seconds=min_sample_seconds,
                )
                for name in variants:
                    rows.append(
                        {
                            "length": length,
                            "mask": mask_name,
                            "backend": name,
                            "seconds": comparison.seconds(name),
                            "speedup_vs_math": comparison.speedup(name, "math"),
                            "max_abs_diff": difference[name],
                            "matches_math": difference[name] <= tolerance,
                            "calls_per_sample": comparison.timings[name].number,
                            "first_call_seconds": first_call[name],
                        }
                    )
                bar.update()
    finally:
        bar.close()
        set_flex_compile(False)
    speedups: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["backend"] != "math":
            speedups.setdefault(row["backend"], {})[f"{row['length']}/{row['mask']}"] = row["speedup_vs_math"]
    return {
        "config": {
            "batch": batch,
            "heads": heads,
            "head_dim": head_dim,
            "lengths": list(sizes["lengths"]),
            "dtype": str(dtype).removeprefix("torch."),
            "masks": ["none", "causal", f"block_causal ({NUM_BLOCKS} blocks)"],
            "backends": list(variants),
            "skipped": skipped,
            "repeats": repeats,
            "min_sample_seconds": min_sample_seconds,
            "tolerance": tolerance,
        },
        "summary": {
            "all_match_math": all(row["matches_math"] for row in rows),
            "speedup_vs_math": speedups,
        },
        "rows": rows,
    }
