"""Token-Shuffle (s = 2) against raster decoding: transformer sequence length and images per second.

Both generators have the same transformer (width, depth, heads) and are trained here for the same number of steps on
the same 2D token grids of the digits: each 16x16 digit image quantised pixel by pixel into 16 grey levels (a fixed
2D grid "tokenizer", so the benchmark needs no trained tokenizer). Raster decoding runs one token per pass over
``h * w`` positions; Token-Shuffle merges every 2x2 window into one position and emits 4 tokens per pass over
``h * w / 4`` positions. Both decode with their KV caches, the same sampler (CFG 2, temperature 1) and batch.

Images/s counts generated token grids per second of the generator's decoding loop (the image decoder is the same
for both and is left out); the two loops alternate in interleaved rounds, and the speed-up is the median over rounds
of raster time / Token-Shuffle time. The training loss of each model after training is recorded as a sanity check
that both learned the grids. The bar: at least 3x images/s.
"""
from __future__ import annotations

import torch

from flexar.generators import RasterAR, TokenShuffleAR
from flexar.sampling import Sampler

from .common import compare
from .digits_models import _batches, _loop, digits

SIZES = {
    "quick": dict(grid=8, levels=16, dim=32, depth=1, num_heads=2, train_steps=5, batch=2, repeats=1),
    "full": dict(grid=16, levels=16, dim=256, depth=6, num_heads=8, train_steps=100, batch=16, repeats=3),
}
TARGET_SPEEDUP = 3.0


def pixel_grids(images: torch.Tensor, levels: int) -> torch.Tensor:
    """(B, 1, h, w) in [-1, 1] -> (B, h * w) ids in [0, levels), raster order."""
    return ((images[:, 0] + 1) / 2 * (levels - 1)).round().long().clamp(0, levels - 1).flatten(1)


def run(quick: bool, device: str) -> dict:
    sizes = SIZES["quick" if quick else "full"]
    side = sizes["grid"]
    images, labels = digits("train", side, device)
    ids = pixel_grids(images, sizes["levels"])
    common = dict(vocab_size=sizes["levels"], max_tokens=side * side, grid=[side, side], num_classes=10,
                  dim=sizes["dim"], depth=sizes["depth"], num_heads=sizes["num_heads"])
    torch.manual_seed(0)
    models = {"raster": RasterAR(**common).to(device), "token_shuffle": TokenShuffleAR(**common, shuffle=2).to(device)}
    losses = {}
    for name, model in models.items():
        _loop(model, lambda x, y, model=model: model.training_loss(x, y)[0], sizes["train_steps"], 1e-3,
              _batches((ids, labels), 32, 0), f"token_shuffle: train {name}")
        with torch.no_grad():
            losses[name] = float(model.training_loss(ids[:256], labels[:256])[0])

    sampler = Sampler(temperature=1.0, cfg_scale=2.0)
    batch_labels = (torch.arange(sizes["batch"]) % 10).to(device)
    stats = {}

    def generate(name):
        def call():
            stats[name] = models[name].generate(batch_labels, sampler, torch.Generator(device).manual_seed(0)).stats
        return call

    comparison = compare({name: generate(name) for name in models}, device, warmup=1, repeats=sizes["repeats"],
                         description="token_shuffle: decoding")
    lengths = {"raster": side * side + 1, "token_shuffle": models["token_shuffle"].num_windows + 1}
    rows = [
        {
            "generator": name,
            "sequence_length": lengths[name],
            "forward_passes": stats[name]["forward_passes"],
            "tokens_per_pass": side * side // stats[name]["forward_passes"],
            "seconds": comparison.seconds(name),
            "images_per_second": sizes["batch"] / comparison.seconds(name),
            "speedup_vs_raster": comparison.speedup(name, "raster"),
            "parameters": sum(parameter.numel() for parameter in models[name].parameters()),
            "train_loss": losses[name],
        }
        for name in models
    ]
    speedup = comparison.speedup("token_shuffle", "raster")
    return {
        "config": {**sizes, "shuffle": 2, "tokens_per_image": side * side, "sampler": sampler.to_dict(),
                   "tokenizer": f"pixel grid, {sizes['levels']} grey levels"},
        "summary": {
            "raster_sequence_length": lengths["raster"],
            "token_shuffle_sequence_length": lengths["token_shuffle"],
            "raster_images_per_second": rows[0]["images_per_second"],
            "token_shuffle_images_per_second": rows[1]["images_per_second"],
            "speedup": speedup,
            "target_speedup": TARGET_SPEEDUP,
            "meets_target": speedup >= TARGET_SPEEDUP,
        },
        "rows": rows,
    }
