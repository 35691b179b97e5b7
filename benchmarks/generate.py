"""Images per second and forward passes of a pipeline's generator with and without the KV cache.

The pipeline is the demo's (runs/demo/pipeline, made by `make demo`) unless FLEXAR_PIPELINE names another folder;
`quick` builds a tiny random pipeline instead so the benchmark can be smoke-tested anywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import REPO_ROOT, compare


def _pipeline(quick: bool, device: str):
    from flexar import Pipeline
    from flexar.generators import RasterAR
    from flexar.tokenizers import TiTok

    if quick:
        torch.manual_seed(0)
        tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=32, depth=1, num_heads=2,
                          codebook_size=64, code_dim=8)
        generator = RasterAR(vocab_size=64, max_tokens=8, num_classes=10, dim=32, depth=2, num_heads=2)
        return Pipeline(tokenizer, generator).to(device), "tiny random pipeline"
    folder = Path(os.environ.get("FLEXAR_PIPELINE", REPO_ROOT / "runs" / "demo" / "pipeline"))
    if not (folder / "pipeline.json").is_file():
        raise FileNotFoundError(f"no pipeline at {folder}: run `make demo` first or set FLEXAR_PIPELINE")
    return Pipeline.from_pretrained(folder, device=device), str(folder)


def run(quick: bool = False, device: str = "cpu") -> dict:
    from flexar.sampling import Sampler

    pipe, source = _pipeline(quick, device)
    batch = 8 if quick else 64
    labels = torch.arange(batch) % pipe.num_classes
    sampler = Sampler(temperature=1.0, cfg_scale=2.0)
    stats = {}

    def generate(use_cache: bool):
        def call():
            stats[use_cache] = pipe.generate(labels, sampler=sampler, seed=0, batch_size=batch, use_cache=use_cache,
                                             return_stats=True)[1]
        return call

    comparison = compare({"cached": generate(True), "recompute": generate(False)}, device=device,
                         warmup=1, repeats=2 if quick else 5, description="generate: cached vs recompute")
    rows = []
    for name, cached in (("cached", True), ("recompute", False)):
        seconds = comparison.seconds(name)
        rows.append({
            "path": name,
            "seconds_per_batch": seconds,
            "images_per_second": batch / seconds,
            "forward_passes": stats[cached]["forward_passes"],
            "tokens_per_image": stats[cached]["tokens"] // batch,
        })
    return {
        "config": {"pipeline": source, "batch": batch, "sampler": sampler.to_dict(),
                   "generator": type(pipe.generator).__name__, "max_tokens": pipe.generator.max_tokens},
        "summary": {
            "cached_images_per_second": rows[0]["images_per_second"],
            "recompute_images_per_second": rows[1]["images_per_second"],
            "speedup": comparison.speedup("cached", "recompute"),
            "forward_passes_per_batch": rows[0]["forward_passes"],
        },
        "rows": rows,
    }
