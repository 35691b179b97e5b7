"""LANTERN where its premise holds: many interchangeable codes, flat next-token distributions, long sequences.

The digits models of :mod:`benchmarks.speculative` have 128 peaked codes and 16 tokens, where relaxed acceptance has
little to relax. Here, on MNIST at 32 x 32:

- a 2D VQ (:class:`flexar.tokenizers.VQGAN2D`, downsample 4: 8 x 8 = 64 tokens of ``codebook_size`` = 1024 codes);
- a class-conditional raster target (:class:`flexar.generators.RasterAR`) on its ids, and an EAGLE draft head
  (:class:`flexar.generators.EagleDraftHead`) trained on the target's features;
- decoding with temperature 1 and CFG ``cfg_scale`` by plain sampling, exact speculative decoding with the head
  (``draft_length`` drafts), and LANTERN (exact rejection) over the tokenizer's ``k`` nearest codes for each
  ``(k, delta)`` of ``grid``.

Per method: ``tokens_per_target_pass`` over the ``fid_samples`` class-balanced images generated at batch
``batch_size`` (each row commits its own accepted tokens), the target passes per image, wall-clock seconds per image
at batch 1 over ``timing_images`` images (interleaved rounds), and FID against the first ``fid_samples`` MNIST test
images with the features of a digit classifier (``configs/eval/classifier.yaml``).

Summary: ``lantern_tokens_per_pass_ratio`` = tokens per target pass of the best LANTERN setting whose FID is within
``fid_tolerance`` of exact speculative decoding's, over exact speculative decoding's (paper: 1.75x on LlamaGen;
bar ``meets_lantern_tokens_per_pass_ratio``: >= 1.3), its wall-clock speed-up, and every FID.

Trained models: ``FLEXAR_SPECULATIVE_MODELS=FOLDER`` loads each from ``FOLDER/NAME`` when present, else trains and
saves it there. Full: MNIST under ``FLEXAR_DATA``. Quick: the embedded digits at 16 x 16, tiny models, a few steps.
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
from .common import Models, compare, fit, progress

SIZES = {
    "full": dict(generation_dataset="mnist", image_size=32, train_images=20000, classifier_epochs=1,
                 vq=dict(downsample=4, width=32, channel_multipliers=[1, 2, 2], num_res_blocks=1, codebook_size=1024,
                         code_dim=8, dead_code_threshold=50),
                 vq_steps=800, vq_batch=64, vq_lr=1e-3, warmup_steps=50,
                 target=dict(dim=128, depth=4, num_heads=4), target_steps=3000, batch=64, target_lr=1e-3,
                 head_steps=1500, head_lr=1e-3, draft_length=4, cfg_scale=2.0,
                 grid=((32, 0.1), (64, 0.2), (64, 0.4), (128, 0.4)),
                 fid_samples=1000, batch_size=50, timing_images=10, repeats=3, fid_tolerance=0.1),
    "quick": dict(generation_dataset="digits", image_size=16, train_images=128, classifier_epochs=1,
                  vq=dict(downsample=4, width=8, channel_multipliers=[1, 1, 1], num_res_blocks=0, codebook_size=32,
                          code_dim=8),
                  vq_steps=4, vq_batch=16, vq_lr=3e-3, warmup_steps=2,
                  target=dict(dim=32, depth=1, num_heads=2), target_steps=4, batch=16, target_lr=3e-3,
                  head_steps=4, head_lr=3e-3, draft_length=2, cfg_scale=2.0, grid=((4, 0.2),),
                  fid_samples=40, batch_size=20, timing_images=2, repeats=2, fid_tolerance=0.1),
}
BAR_TOKENS_PER_PASS_RATIO = 1.3


def run(quick: bool, device: str) -> dict:
    from flexar.eval import compute_metrics
    from flexar.generators import EagleDraftHead, RasterAR
    from flexar.sampling import LanternDecoder, Sampler, SpeculativeDecoder, neighbour_table
    from flexar.tokenizers import VQGAN2D

    size = SIZES["quick" if quick else "full"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        models = Models(os.environ.get("FLEXAR_SPECULATIVE_MODELS"), Path(scratch))
        dataset, tag = size["generation_dataset"], f"{size['generation_dataset']}{size['image_size']}"
        classifier = train_classifier(size, device, models, quick)
        train_images, train_labels = load_split(dataset, "train", size, 1, size["train_images"])
        reference, _ = load_split(dataset, "test", size, 1, size["fid_samples"])

        def fid(images: torch.Tensor) -> float:
            return compute_metrics(images, reference, extractor=f"classifier:{classifier}", kid=False,
                                   device=device)["fid"]

        codes = size["vq"]["codebook_size"]
        vq_name = f"vq2d_{codes}_{tag}"

        def train_vq():
            torch.manual_seed(0)
            model = VQGAN2D(image_size=size["image_size"], channels=1, **size["vq"])
            return fit(model, train_images, size["vq_steps"], size["vq_batch"], size["vq_lr"], size["warmup_steps"],
                       device, "speculative_large: train vq2d", checkpoint=models.checkpoint(vq_name))[0]

        vq = models.get(vq_name, train_vq).to(device).eval()
        with torch.no_grad():
            ids = torch.cat([vq.encode(chunk.to(device)).ids.cpu() for chunk in train_images.split(500)])
        train = dict(batch_size=size["batch"], warmup=max(1, size["target_steps"] // 20), device=device,
                     labels=train_labels)

        target_name = f"raster_vq2d_{codes}_{tag}"

        def train_target():
            torch.manual_seed(0)
            model = RasterAR(vocab_size=vq.codebook_size, max_tokens=vq.max_tokens, grid=vq.grid, num_classes=10,
                             **size["target"])
            return fit(model, ids, size["target_steps"], lr=size["target_lr"],
                       description="speculative_large: train target", checkpoint=models.checkpoint(target_name),
                       **train)[0]

        target = models.get(target_name, train_target).to(device).eval()

        def train_head():
            torch.manual_seed(0)
            head = EagleDraftHead(target=str(models.path(target_name)), num_heads=size["target"]["num_heads"])
            return fit(head, ids, size["head_steps"], lr=size["head_lr"], description="speculative_large: train head",
                       checkpoint=models.checkpoint(f"eagle_{target_name}"), **train)[0]

        head = models.get(f"eagle_{target_name}", train_head).to(device).eval()
        sampler = Sampler(temperature=1.0, cfg_scale=size["cfg_scale"])
        table = neighbour_table(vq.code_vectors(), max(k for k, _ in size["grid"])).to(device)
        methods = {"plain": (sampler, {}),
                   "speculative": (SpeculativeDecoder(head, sampler, size["draft_length"]), {})}
        for k, delta in size["grid"]:
            methods[f"lantern_k{k}_d{delta}"] = (
                LanternDecoder(head, sampler, size["draft_length"], neighbours=table[:, :k], k=k, delta=delta),
                {"k": k, "delta": delta})

        def generate(strategy, labels, seed):
            if strategy is sampler:
                return target.generate(labels, sampler, seed)
            return target.generate_with(labels, strategy, seed)

        rows = []
        fid_labels = torch.arange(size["fid_samples"]) % 10
        for name, (strategy, settings) in progress(methods.items(), "speculative_large: FID and passes", len(methods),
                                                   "method"):
            stream = torch.Generator(device).manual_seed(1)
            images, passes = [], 0
            with torch.no_grad():
                for chunk in fid_labels.split(size["batch_size"]):
                    output = generate(strategy, chunk.to(device), stream)
                    passes += output.stats["forward_passes"]
                    images.append(vq.decode(output.ids).clamp(-1, 1).float().cpu())
            batches = -(-len(fid_labels) // size["batch_size"])
            rows.append({"method": name, **settings, "fid": fid(torch.cat(images)),
                         "target_passes_per_batch": passes / batches,
                         "tokens_per_target_pass": vq.max_tokens * batches / passes})

        timing_labels = torch.arange(size["timing_images"]) % 10

        def timed(strategy):
            def call():
                with torch.no_grad():
                    for index, label in enumerate(timing_labels):
                        generate(strategy, label[None].to(device), torch.Generator(device).manual_seed(index))
            return call

        timing = compare({name: timed(strategy) for name, (strategy, _) in methods.items()}, device, warmup=1,
                         repeats=size["repeats"], description="speculative_large: latency at batch 1")
        for row in rows:
            row["seconds_per_image_batch1"] = timing.seconds(row["method"]) / len(timing_labels)
            row["speedup_vs_speculative"] = timing.speedup(row["method"], "speculative")
            row["speedup_vs_plain"] = timing.speedup(row["method"], "plain")

    by = {row["method"]: row for row in rows}
    exact = by["speculative"]
    within = [row for row in rows if row["method"].startswith("lantern")
              and row["fid"] <= (1 + size["fid_tolerance"]) * exact["fid"]]
    best = max(within, key=lambda row: row["tokens_per_target_pass"]) if within else None
    ratio = best["tokens_per_target_pass"] / exact["tokens_per_target_pass"] if best else None
    summary = {
        "fid": {row["method"]: row["fid"] for row in rows},
        "tokens_per_target_pass": {row["method"]: row["tokens_per_target_pass"] for row in rows},
        "best_lantern": best["method"] if best else None,
        "lantern_tokens_per_pass_ratio": ratio,
        "best_lantern_speedup_vs_speculative": best["speedup_vs_speculative"] if best else None,
        "best_lantern_fid": best["fid"] if best else None,
        "speculative_fid": exact["fid"],
        "meets_lantern_tokens_per_pass_ratio": bool(ratio is not None and ratio >= BAR_TOKENS_PER_PASS_RATIO),
        "wall_seconds": time.perf_counter() - started,
    }
    config = dict(size, grid=[list(pair) for pair in size["grid"]], sampler=sampler.to_dict(),
                  tokens_per_image=vq.max_tokens, codebook_size=vq.codebook_size, models_loaded=models.loaded,
                  target_parameters=sum(p.numel() for p in target.parameters()),
                  head_parameters=sum(p.numel() for n, p in head.named_parameters() if not n.startswith("target.")),
                  train_seconds={name: models.seconds(name) for name in
                                 (f"vq2d_{codes}_{tag}", target_name, f"eagle_{target_name}")},
                  fid_extractor="classifier trained with configs/eval/classifier.yaml on the same dataset")
    return {"config": config, "summary": summary, "rows": rows}
