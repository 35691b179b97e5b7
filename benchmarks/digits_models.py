"""Small digit models shared by the sampling benchmarks (speculative, scalingar, entropy).

A TiTok tokenizer, a raster target generator, a small raster draft, an EAGLE draft head and the digit classifier that
scores FID, all trained here on scikit-learn's digits (16x16) with plain AdamW loops, or reused:

- ``FLEXAR_BENCH_DIGITS=FOLDER``: load (or train once and save) every model under FOLDER; the default is
  ``runs/bench_digits`` for full runs and a fresh temporary folder for quick runs;
- ``FLEXAR_BENCH_PIPELINE=FOLDER`` (with ``FLEXAR_BENCH_CLASSIFIER=FOLDER``): use a saved :class:`flexar.Pipeline`
  (tokenizer + raster generator, e.g. ``runs/demo/pipeline`` from scripts/demo.py) as tokenizer and target instead;
  its token cache is rebuilt here from the digits training split, and only the drafts are trained.

Quick mode trains each model for a handful of steps: the numbers exercise the code, not the methods.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import REPO_ROOT, progress

SIZES = {
    "quick": dict(image_size=16, tokens=8, codebook=32, tokenizer_steps=20, generator_steps=20, draft_steps=10,
                  classifier_steps=20, target=dict(dim=32, depth=1, num_heads=2), draft=dict(dim=16, depth=1, num_heads=2),
                  batch=64),
    "full": dict(image_size=16, tokens=16, codebook=128, tokenizer_steps=3000, generator_steps=4000, draft_steps=2000,
                 classifier_steps=1500, target=dict(dim=192, depth=6, num_heads=6), draft=dict(dim=64, depth=1, num_heads=4),
                 batch=128),
}


@dataclass
class DigitModels:
    tokenizer: object
    target: object
    draft: object
    eagle: object
    classifier: Path
    folder: Path
    train_seconds: float

    @property
    def pipeline(self):
        from flexar import Pipeline

        return Pipeline(self.tokenizer, self.target)


def _loop(model, loss_fn, steps: int, lr: float, batches, description: str = "training") -> None:
    """`steps` AdamW steps of `loss_fn(*next(batches))` with warmup + cosine and clipping at 1.0, with a progress bar."""
    from flexar.train.modules import warmup_cosine

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, steps, 0.1))
    model.train()
    for step in progress(range(steps), description, unit="step"):
        loss = loss_fn(*next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    model.eval()


def _batches(tensors: tuple[torch.Tensor, ...], batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    count = tensors[0].shape[0]
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch + 1, batch):
            index = order[start : start + batch]
            yield tuple(tensor[index] for tensor in tensors)


def digits(split: str, image_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    from flexar.data import build_dataset

    dataset = build_dataset("digits", split, image_size=image_size, channels=1)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return images.to(device), labels.to(device)


def reference(image_size: int) -> torch.Tensor:
    from flexar.eval.fid import reference_images

    return reference_images("digits", "test", image_size=image_size)


@torch.no_grad()
def encode_all(tokenizer, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([tokenizer.encode(images[i : i + batch]).ids for i in range(0, len(images), batch)])


def load_or_train(quick: bool, device: str) -> DigitModels:
    """Every model the sampling benchmarks need, trained once per folder (see the module docstring)."""
    from flexar.eval.classifier import DigitClassifier
    from flexar.generators import EagleDraftHead, RasterAR
    from flexar.hub import load_model
    from flexar.tokenizers import TiTok

    sizes = SIZES["quick" if quick else "full"]
    folder_name = os.environ.get("FLEXAR_BENCH_DIGITS")
    if folder_name:
        folder = Path(folder_name)
    elif quick:
        folder = Path(tempfile.mkdtemp(prefix="flexar_bench_"))
    else:
        folder = REPO_ROOT / "runs" / "bench_digits"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    images, labels = digits("train", sizes["image_size"], device)

    pipeline_folder = os.environ.get("FLEXAR_BENCH_PIPELINE")
    if pipeline_folder:
        from flexar import Pipeline

        pipe = Pipeline.from_pretrained(pipeline_folder, device=device)
        tokenizer, target = pipe.tokenizer, pipe.generator
        images, labels = digits("train", tokenizer.image_size, device)
        target_folder = Path(pipeline_folder) / "generator"
    else:
        if not (folder / "tokenizer" / "config.json").is_file():
            torch.manual_seed(0)
            tokenizer = TiTok(image_size=sizes["image_size"], channels=1, patch_size=4, num_latent_tokens=sizes["tokens"],
                              width=64 if quick else 128, depth=1 if quick else 4, num_heads=4,
                              codebook_size=sizes["codebook"], code_dim=8, dead_code_threshold=0 if quick else 20).to(device)
            _loop(tokenizer, lambda x: tokenizer.training_loss(x)[0], sizes["tokenizer_steps"], 2e-3,
                  _batches((images,), sizes["batch"], 0), "digits models: tokenizer")
            tokenizer.save_pretrained(folder / "tokenizer")
        tokenizer = load_model(folder / "tokenizer").to(device).eval()
        target_folder = folder / "generator"
    ids = encode_all(tokenizer, images)

    def train_generator(name: str, size: dict, steps: int):
        if not (folder / name / "config.json").is_file():
            torch.manual_seed(1)
            model = RasterAR(vocab_size=tokenizer.codebook_size, max_tokens=tokenizer.max_tokens, num_classes=10,
                             class_dropout=0.1, **size).to(device)
            _loop(model, lambda x, y: model.training_loss(x, y)[0], steps, 1e-3,
                  _batches((ids, labels), sizes["batch"], 1), f"digits models: {name}")
            model.save_pretrained(folder / name)
        return load_model(folder / name).to(device).eval()

    if not pipeline_folder:
        target = train_generator("generator", sizes["target"], sizes["generator_steps"])
    draft = train_generator("draft", sizes["draft"], sizes["draft_steps"])
    if not (folder / "eagle" / "config.json").is_file():
        torch.manual_seed(2)
        eagle = EagleDraftHead(target=str(target_folder), num_heads=4).to(device)
        _loop(eagle, lambda x, y: eagle.training_loss(x, y)[0], sizes["draft_steps"], 1e-3,
              _batches((ids, labels), sizes["batch"], 2), "digits models: eagle")
        eagle.save_pretrained(folder / "eagle")
    eagle = load_model(folder / "eagle").to(device).eval()

    classifier = Path(os.environ.get("FLEXAR_BENCH_CLASSIFIER", folder / "classifier"))
    if not (classifier / "config.json").is_file():
        torch.manual_seed(3)
        model = DigitClassifier(in_channels=1, image_size=tokenizer.image_size, width=16 if quick else 32).to(device)
        _loop(model, lambda x, y: torch.nn.functional.cross_entropy(model(x), y), sizes["classifier_steps"], 2e-3,
              _batches((images, labels), sizes["batch"], 3), "digits models: FID classifier")
        model.save_pretrained(classifier)
    return DigitModels(tokenizer, target, draft, eagle, classifier, folder, time.perf_counter() - start)


def fid(samples: torch.Tensor, models: DigitModels, device: str) -> float:
    """FID of uint8 samples against the digits test split, in the classifier's features."""
    from flexar.eval.fid import compute_metrics

    metrics = compute_metrics(samples, reference(models.tokenizer.image_size), extractor=f"classifier:{models.classifier}",
                              kid=False, device=device)
    return float(metrics["fid"])
