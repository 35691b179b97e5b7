"""xAR's entities against each other and against raster AR on discrete tokens: FID and forward passes per image.

On MNIST at 32 x 32: a KL autoencoder (:class:`flexar.tokenizers.VAE`, the ``vae-digits`` preset: 8 x 8 x 4
latents) trained first; its normalised latents of ``train_images`` training images (in memory, as a latent cache
holds them) train one :class:`flexar.generators.XAR` per entity, every one with the same width, depth, heads
(so the same parameter count: the entity changes the order and the mask, not the weights), steps, batch and learning
rate:

- ``token`` (64 entities), ``cell2`` (2 x 2 cells, 16), ``cell4`` (4 x 4 cells, 4: the paper's 2 x 2 grid of cells),
  ``subsample`` (stride 2, 4), ``scale`` (nested lattices 1, 3, 12, 48), ``image`` (1): the paper's Table 4 ablation
  of the entity, on an 8 x 8 latent instead of 16 x 16;
- ``cell4_clean_context``: ``cell4`` trained on clean context (``noisy_context=False``), the paper's noisy-context
  ablation.

Each samples ``gfid_samples`` class-balanced images with a :class:`flexar.sampling.FlowSampler` (``flow_steps``
Euler-Maruyama calls per entity, CFG ``cfg_scale`` ramped over entities), scored against the first ``gfid_samples``
test images (FID with the features of a digit classifier trained for this run, ``configs/eval/classifier.yaml``);
``forward_passes`` is the network calls per image (entities x steps).

Baseline: a class-conditional :class:`flexar.generators.RasterAR` on the ids of a 2D VQ of the same resolution
(:class:`flexar.tokenizers.VQGAN2D`, 8 x 8 tokens of 256 codes, trained for as many steps as the VAE), its width
chosen so its parameter count is closest to xAR's, trained for the same steps and batch, sampled with temperature 1
and the same CFG scale (64 passes per image). ``rfid`` of each tokenizer (its reconstructions of the reference
images) bounds what its generator can reach.

Summary: ``fid`` and ``forward_passes`` per model; the verdicts (full runs only) ``beats_next_token_with_next_cell``
(``cell4`` against ``token``, the paper's claim), ``beats_clean_context_with_noisy_context`` (``cell4`` against
``cell4_clean_context``, the paper's ablation) and ``beats_raster_with_best_xar``.

Trained models: with ``FLEXAR_XAR_MODELS=FOLDER`` each model is loaded from ``FOLDER/NAME`` when present, else
trained and saved there (a second run only samples); without it everything trains in a temporary folder.

Full: MNIST under ``FLEXAR_DATA``, sized for one CPU core, far below the paper's budgets (xAR-B trains 800 epochs of
ImageNet): measured single-thread steps of ~2.6 s (VAE, 64 images), ~2.0 s (2D VQ, 64 images) and ~0.3 s (xAR at
width 64, 2 + 2 blocks, 64 latents; twice that without noisy context, whose sequence is doubled) put a first run at
~2 h, most of it the tokenizers' 500 steps and the eight 2000-step generators. Quick: the embedded digits at 16 x 16 (4 x 4 latents), tiny models, a few steps (a smoke test of the
pipeline; its numbers mean nothing).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .adaptive import load_split, train_classifier
from .common import Models, fit, progress

SIZES = {
    "full": dict(generation_dataset="mnist", image_size=32, train_images=20000, classifier_epochs=1,
                 vae="vae-digits", vae_steps=500, tokenizer_batch=64, lr=1e-3, warmup_steps=50,
                 vq=dict(downsample=4, width=32, channel_multipliers=[1, 2, 2], num_res_blocks=1, codebook_size=256,
                         code_dim=8, dead_code_threshold=50),
                 dim=64, depth=2, decoder_depth=2, num_heads=4, generator_steps=2000, generator_batch=64,
                 generator_lr=1e-3, flow_steps=20, cfg_scale=2.0, gfid_samples=1000, cells=(2, 4)),
    "quick": dict(generation_dataset="digits", image_size=16, train_images=128, classifier_epochs=1,
                  vae=None, vae_steps=4, tokenizer_batch=16, lr=3e-3, warmup_steps=2,
                  vq=dict(downsample=4, width=8, channel_multipliers=[1, 1, 1], num_res_blocks=0, codebook_size=32,
                          code_dim=8),
                  dim=32, depth=1, decoder_depth=1, num_heads=2, generator_steps=4, generator_batch=16,
                  generator_lr=3e-3, flow_steps=2, cfg_scale=2.0, gfid_samples=40, cells=(2, 4)),
}
# the quick VAE: 16 px -> 4 x 4 x 2 latents
QUICK_VAE = dict(image_size=16, channels=1, latent_channels=2, block_out_channels=[8, 8, 8], layers_per_block=1,
                 norm_num_groups=4, mid_block_attention=False)


def variants(size: dict) -> dict[str, dict]:
    """name -> the XAR arguments that differ between the compared models."""
    small, large = size["cells"]
    return {"token": dict(entity="token"), f"cell{small}": dict(entity="cell", cell_size=small),
            f"cell{large}": dict(entity="cell", cell_size=large), "subsample": dict(entity="subsample", stride=2),
            "scale": dict(entity="scale"), "image": dict(entity="image"),
            f"cell{large}_clean_context": dict(entity="cell", cell_size=large, noisy_context=False)}


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def raster_width(target: int, vocab_size: int, max_tokens: int, grid, depth: int, num_heads: int) -> int:
    """The RasterAR width (a multiple of 4 * num_heads) whose parameter count is closest to `target`."""
    from flexar.generators import RasterAR

    best, gap = None, None
    for width in range(4 * num_heads, 1025, 4 * num_heads):
        with torch.device("meta"):
            count = parameter_count(RasterAR(vocab_size=vocab_size, max_tokens=max_tokens, grid=grid, num_classes=10,
                                             dim=width, depth=depth, num_heads=num_heads))
        if gap is None or abs(count - target) < gap:
            best, gap = width, abs(count - target)
    return best


@torch.no_grad()
def sample(model, sampler, decode, count: int, device: str) -> tuple[torch.Tensor, int]:
    """`count` class-balanced images in [-1, 1], decoded from each output by `decode`, and the network calls per
    image (those of one batch: every call serves the whole batch)."""
    stream = torch.Generator(device).manual_seed(0)
    images, passes = [], 0
    for chunk in (torch.arange(count) % 10).split(250):
        output = model.generate(chunk.to(device), sampler, stream)
        passes = output.stats["forward_passes"]
        images.append(decode(output).clamp(-1, 1).float().cpu())
    return torch.cat(images), passes


def run(quick: bool, device: str) -> dict:
    from flexar.eval import compute_metrics
    from flexar.generators import XAR, RasterAR
    from flexar.sampling import FlowSampler, Sampler
    from flexar.tokenizers import VAE, VQGAN2D

    size = SIZES["quick" if quick else "full"]
    flow_sampler = FlowSampler(steps=size["flow_steps"], cfg_scale=size["cfg_scale"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        models = Models(os.environ.get("FLEXAR_XAR_MODELS"), Path(scratch))
        dataset, tag = size["generation_dataset"], f"{size['generation_dataset']}{size['image_size']}"
        classifier = train_classifier(size, device, models, quick)
        extractor = f"classifier:{classifier}"
        train_images, train_labels = load_split(dataset, "train", size, 1, size["train_images"])
        reference, _ = load_split(dataset, "test", size, 1, size["gfid_samples"])

        def fid(images: torch.Tensor) -> float:
            return compute_metrics(images, reference, extractor=extractor, kid=False, device=device)["fid"]

        def train_vae():
            torch.manual_seed(0)
            model = VAE(**QUICK_VAE) if size["vae"] is None else VAE.from_preset(size["vae"])
            return fit(model, train_images, size["vae_steps"], size["tokenizer_batch"], size["lr"],
                       size["warmup_steps"], device, "xar: train vae", checkpoint=models.checkpoint(f"vae_{tag}"))[0]

        def train_vq():
            torch.manual_seed(0)
            model = VQGAN2D(image_size=size["image_size"], channels=1, **size["vq"])
            return fit(model, train_images, size["vae_steps"], size["tokenizer_batch"], size["lr"],
                       size["warmup_steps"], device, "xar: train vq2d", checkpoint=models.checkpoint(f"vq2d_{tag}"))[0]

        vae = models.get(f"vae_{tag}", train_vae).to(device).eval()
        vq = models.get(f"vq2d_{tag}", train_vq).to(device).eval()
        with torch.no_grad():
            latents = torch.cat([vae.encode_latents(chunk.to(device)).cpu() for chunk in train_images.split(500)])
            ids = torch.cat([vq.encode(chunk.to(device)).ids.cpu() for chunk in train_images.split(500)])
            rfid = {"vae": fid(torch.cat([vae.reconstruct(c.to(device)).clamp(-1, 1).cpu() for c in reference.split(500)])),
                    "vq2d": fid(torch.cat([vq.reconstruct(c.to(device)).clamp(-1, 1).cpu() for c in reference.split(500)]))}
        shared = dict(latent_channels=vae.latent_channels, latent_size=vae.latent_size, num_classes=10,
                      dim=size["dim"], depth=size["depth"], decoder_depth=size["decoder_depth"],
                      num_heads=size["num_heads"])
        train = dict(steps=size["generator_steps"], batch_size=size["generator_batch"], lr=size["generator_lr"],
                     warmup=max(1, size["generator_steps"] // 20), device=device, labels=train_labels)
        rows = []
        for name, arguments in progress(list(variants(size).items()), "xar: models"):

            def train_xar(arguments=arguments, name=name):
                torch.manual_seed(0)
                return fit(XAR(**shared, **arguments), latents, description=f"xar: train {name}",
                           checkpoint=models.checkpoint(f"xar_{name}_{tag}"), **train)[0]

            model = models.get(f"xar_{name}_{tag}", train_xar).to(device).eval()
            began = time.perf_counter()
            images, passes = sample(model, flow_sampler, lambda out: vae.decode_latents(out.latents), size["gfid_samples"],
                                    device)
            rows.append({"model": name, "family": "xar", "entity": model.entity, "entities": model.num_entities,
                         "noisy_context": model.noisy_context, "parameters": parameter_count(model),
                         "forward_passes": passes, "fid": fid(images), "rfid": rfid["vae"],
                         "sample_seconds": time.perf_counter() - began,
                         "train_seconds": models.seconds(f"xar_{name}_{tag}")})
        xar_parameters = rows[0]["parameters"]
        width = raster_width(xar_parameters, vq.codebook_size, vq.max_tokens, vq.grid, size["depth"] + size["decoder_depth"],
                             size["num_heads"])

        def train_raster():
            torch.manual_seed(0)
            model = RasterAR(vocab_size=vq.codebook_size, max_tokens=vq.max_tokens, grid=vq.grid, num_classes=10,
                             dim=width, depth=size["depth"] + size["decoder_depth"], num_heads=size["num_heads"])
            return fit(model, ids, description="xar: train raster on vq2d",
                       checkpoint=models.checkpoint(f"raster_vq2d_{tag}_{width}"), **train)[0]

        raster = models.get(f"raster_vq2d_{tag}_{width}", train_raster).to(device).eval()
        began = time.perf_counter()
        images, passes = sample(raster, Sampler(temperature=1.0, cfg_scale=size["cfg_scale"]), lambda out: vq.decode(out.ids),
                                size["gfid_samples"], device)
        rows.append({"model": "raster_vq2d", "family": "raster", "entity": "token", "entities": vq.max_tokens,
                     "noisy_context": None, "parameters": parameter_count(raster), "forward_passes": passes,
                     "fid": fid(images), "rfid": rfid["vq2d"], "sample_seconds": time.perf_counter() - began,
                     "train_seconds": models.seconds(f"raster_vq2d_{tag}_{width}")})

    by = {row["model"]: row for row in rows}
    small, large = size["cells"]
    xar_rows = [row for row in rows if row["family"] == "xar"]
    best = min(xar_rows, key=lambda row: row["fid"])
    summary = {
        "fid": {row["model"]: row["fid"] for row in rows},
        "forward_passes": {row["model"]: row["forward_passes"] for row in rows},
        "rfid": rfid,
        "parameters": {"xar": xar_parameters, "raster": by["raster_vq2d"]["parameters"]},
        "best_xar": best["model"],
        "beats_next_token_with_next_cell": by[f"cell{large}"]["fid"] < by["token"]["fid"],
        "beats_clean_context_with_noisy_context": by[f"cell{large}"]["fid"] < by[f"cell{large}_clean_context"]["fid"],
        "beats_raster_with_best_xar": best["fid"] < by["raster_vq2d"]["fid"],
        "wall_seconds": time.perf_counter() - started,
    }
    config = dict(size, cells=list(size["cells"]), variants=variants(size), raster_width=width,
                  latent_shape=[vae.latent_channels, vae.latent_size, vae.latent_size],
                  models_loaded=models.loaded, vae_preset=size["vae"] or QUICK_VAE,
                  fid_extractor="classifier trained with configs/eval/classifier.yaml on the same dataset")
    return {"config": config, "summary": summary, "rows": rows}
