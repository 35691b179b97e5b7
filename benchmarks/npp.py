"""NPP (next-patch training) and NAR against raster training: training time per epoch and FID after the same epochs.

Pipeline, all in one run and on one device:

1. a 2D VQ tokenizer (:class:`flexar.tokenizers.VQGAN2D`, f4: 32x32 images -> 8x8 grids) is trained on the training
   split and encodes both splits once (the token cache generators train on);
2. the digit classifier whose penultimate features score FID (``flexar.eval``'s ``classifier:PATH`` extractor) is
   trained on the same training split;
3. a :class:`flexar.generators.RasterAR`, an :class:`flexar.generators.NPP` and a :class:`flexar.generators.NAR`
   with the same width, depth and initial weights (NAR adds its vertical-head block) train for the same number of
   epochs on the same batches (same shuffle per epoch, AdamW + warmup/cosine as flexar's GeneratorModule). Their
   epochs interleave (raster, NPP and NAR epoch e, the order rotating every epoch) so that load from other processes
   hits all alike; NPP enters its stage through ``on_epoch_start`` (``patch_sizes`` [2, 1]: 2x2-token patches for
   the first half of the epochs, then tokens, as in the paper's two-level schedule);
4. each model samples ``num_samples`` images (raster decoding for raster and NPP, whose inference is raster decoding;
   h + w - 1 diagonal passes for NAR) with the same sampler and seed, decoded by the tokenizer and scored with FID/KID
   against the test split. The rows are the MNIST FID table of the three families at one budget.

Full mode reads MNIST from ``FLEXAR_DATA`` (torchvision's raw files); quick mode runs tiny models on the embedded
digits for smoke tests. ``FLEXAR_NPP_EPOCHS=E`` trains for E epochs instead, and ``FLEXAR_NPP_WITH_NAR=0`` leaves NAR
out (raster and NPP only). Bars: NPP's total training time <= 0.7x raster's, and its FID no worse than raster's by more
than 10%.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flexar.data import build_dataset
from flexar.eval import DigitClassifier, compute_metrics
from flexar.generators import NAR, NPP, RasterAR
from flexar.sampling import Sampler
from flexar.tokenizers import VQGAN2D
from flexar.train import warmup_cosine

from .common import progress, synchronize

# full: sized to finish in about half an hour on two shared CPU cores (the first 15000 MNIST training images, the
# whole test split as FID reference); quick: seconds, on the embedded digits
SIZES = {
    "full": dict(dataset="mnist", image_size=32, tokenizer_preset="vq2d-digits", tokenizer_width=16,
                 tokenizer_epochs=2, classifier_epochs=2, dim=128, depth=4, num_heads=4, epochs=6, batch_size=128,
                 lr=1e-3, warmup_steps=50, train_limit=15000, num_samples=1000, reference_limit=None),
    "quick": dict(dataset="digits", image_size=16, tokenizer_preset="vq2d-tiny", tokenizer_width=8,
                  tokenizer_epochs=1, classifier_epochs=1, dim=32, depth=1, num_heads=2, epochs=2, batch_size=32,
                  lr=1e-3, warmup_steps=5, train_limit=256, num_samples=40, reference_limit=60),
}
PATCH_SIZES = [2, 1]
SAMPLER = dict(temperature=1.0, top_k=0, cfg_scale=2.0)
TARGET_TIME_RATIO = 0.7
TARGET_FID_RATIO = 1.1


def load_split(dataset: str, split: str, image_size: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as float images (N, 1, S, S) in [-1, 1] and labels (N,)."""
    data = build_dataset(dataset, split, image_size=image_size, channels=1)
    if limit is not None:
        data = torch.utils.data.Subset(data, range(min(limit, len(data))))
    loader = torch.utils.data.DataLoader(data, batch_size=1024)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels).long()


def batches(count: int, batch_size: int, seed: int):
    """Shuffled index batches of one epoch (the last partial batch is dropped, as flexar's DataModules do)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return [order[i : i + batch_size] for i in range(0, count - batch_size + 1, batch_size)] or [order]


def fit(model, loss_of, data: tuple[torch.Tensor, ...], epochs: int, batch_size: int, lr: float, device: str,
        description: str = "training"):
    """A plain AdamW loop: `loss_of(model, *batch)` -> loss, over `epochs` epochs of `data` (tensors on CPU)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    steps_per_epoch = len(batches(data[0].shape[0], batch_size, 0))
    with progress(description=description, total=epochs * steps_per_epoch, unit="step") as bar:
        for epoch in range(epochs):
            for index in batches(data[0].shape[0], batch_size, epoch):
                loss = loss_of(model, *(tensor[index].to(device) for tensor in data))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
    return model.eval()


@torch.no_grad()
def encode(tokenizer: VQGAN2D, images: torch.Tensor, device: str) -> torch.Tensor:
    return torch.cat([tokenizer.encode(chunk.to(device)).ids.cpu() for chunk in images.split(512)])


class GeneratorRun:
    """One generator's optimiser and schedule, trained an epoch at a time and timed per epoch."""

    def __init__(self, model, sizes: dict, steps_per_epoch: int):
        self.model = model
        self.sizes = sizes
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        # GeneratorModule's defaults: AdamW (0.9, 0.95), weight decay 0.05 on matrices, warmup + cosine to 0.1
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=sizes["lr"], betas=(0.9, 0.95))
        total = steps_per_epoch * sizes["epochs"]
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, sizes["warmup_steps"], total, 0.1))
        self.epoch_seconds: list[float] = []
        self.losses: list[float] = []
        self.patch_sizes: list[int] = []

    def train_epoch(self, epoch: int, ids: torch.Tensor, labels: torch.Tensor, device: str, bar=None) -> None:
        """One epoch, timed; `bar` (a :func:`benchmarks.common.progress` bar), when given, advances by one per step."""
        model = self.model.train()
        hook = getattr(model, "on_epoch_start", None)
        if callable(hook):
            hook(epoch, self.sizes["epochs"])
        self.patch_sizes.append(getattr(model, "patch_size", 1))
        synchronize(device)
        start = time.perf_counter()
        total, count = 0.0, 0
        for index in batches(ids.shape[0], self.sizes["batch_size"], 1000 + epoch):
            loss, _ = model.training_loss(ids[index].to(device), labels[index].to(device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            total, count = total + loss.detach(), count + 1
            if bar is not None:  # inside the timed epoch: a counter increment and, now and then, a redraw
                bar.update()
        synchronize(device)
        self.epoch_seconds.append(time.perf_counter() - start)
        self.losses.append(float(total) / count)


def run(quick: bool, device: str) -> dict:
    sizes = dict(SIZES["quick" if quick else "full"])
    if os.environ.get("FLEXAR_NPP_EPOCHS"):  # a longer budget than the recorded default
        sizes["epochs"] = int(os.environ["FLEXAR_NPP_EPOCHS"])
    with_nar = os.environ.get("FLEXAR_NPP_WITH_NAR", "1") != "0"
    torch.manual_seed(0)
    train_images, train_labels = load_split(sizes["dataset"], "train", sizes["image_size"], sizes["train_limit"])
    test_images, test_labels = load_split(sizes["dataset"], "test", sizes["image_size"], sizes["reference_limit"])
    work = Path(tempfile.mkdtemp(prefix="flexar-npp-"))

    # 1. tokenizer and token cache
    start = time.perf_counter()
    tokenizer = VQGAN2D.from_preset(sizes["tokenizer_preset"], image_size=sizes["image_size"], channels=1,
                                    width=sizes["tokenizer_width"], dead_code_threshold=50).to(device)
    fit(tokenizer, lambda m, x, y: m.training_loss(x)[0], (train_images, train_labels), sizes["tokenizer_epochs"],
        sizes["batch_size"], 1e-3, device, "npp: tokenizer")
    train_ids, test_ids = encode(tokenizer, train_images, device), encode(tokenizer, test_images, device)
    with torch.no_grad():
        recon = torch.cat([tokenizer.decode(ids.to(device)).cpu() for ids in test_ids.split(512)])
    recon_mse = F.mse_loss(recon, test_images).item()
    tokenizer_seconds = time.perf_counter() - start

    # 2. FID feature extractor
    classifier = DigitClassifier(in_channels=1, num_classes=10, image_size=sizes["image_size"]).to(device)
    fit(classifier, lambda m, x, y: F.cross_entropy(m(x), y), (train_images, train_labels), sizes["classifier_epochs"],
        sizes["batch_size"], 3e-3, device, "npp: FID classifier")
    with torch.no_grad():
        predictions = torch.cat([classifier(x.to(device)).argmax(-1).cpu() for x in test_images.split(512)])
    classifier.cpu().save_pretrained(work / "classifier")

    # 3. raster and NPP from the same initial weights, epochs interleaved
    side = sizes["image_size"] // tokenizer.downsample
    kwargs = dict(vocab_size=tokenizer.codebook_size, max_tokens=side * side, grid=[side, side], num_classes=10,
                  dim=sizes["dim"], depth=sizes["depth"], num_heads=sizes["num_heads"])
    torch.manual_seed(1)
    raster = RasterAR(**kwargs)
    npp = NPP(**kwargs, patch_sizes=PATCH_SIZES)
    npp.load_state_dict(raster.state_dict())
    nar = NAR(**kwargs)
    nar.load_state_dict(raster.state_dict(), strict=False)
    steps_per_epoch = len(batches(train_ids.shape[0], sizes["batch_size"], 0))
    runs = {"raster": GeneratorRun(raster.to(device), sizes, steps_per_epoch),
            "npp": GeneratorRun(npp.to(device), sizes, steps_per_epoch),
            "nar": GeneratorRun(nar.to(device), sizes, steps_per_epoch)}
    if not with_nar:
        del runs["nar"]
    order = list(runs)
    with progress(description="npp: generators", total=sizes["epochs"] * len(runs) * steps_per_epoch,
                  unit="step") as bar:
        for epoch in range(sizes["epochs"]):
            for name in order[epoch % len(order) :] + order[: epoch % len(order)]:
                bar.set_postfix_str(f"{name} epoch {epoch + 1}/{sizes['epochs']}")
                runs[name].train_epoch(epoch, train_ids, train_labels, device, bar)

    # 4. samples and FID against the test split
    sampler = Sampler(**SAMPLER)
    reference = ((test_images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    labels = torch.arange(sizes["num_samples"]) % 10
    rows, fids = [], {}
    chunks = labels.split(250)
    bar = progress(description="npp: sampling", total=len(runs) * len(chunks), unit="batch")
    for name, record in runs.items():
        model = record.model.eval()
        generator = torch.Generator(device).manual_seed(0)
        images, passes = [], 0
        bar.set_postfix_str(name)
        with torch.no_grad():
            for chunk in chunks:
                out = model.generate(chunk.to(device), sampler, generator)
                passes = out.stats["forward_passes"]
                images.append(tokenizer.decode(out.ids).cpu())
                bar.update()
        samples = ((torch.cat(images).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        metrics = compute_metrics(samples, reference, extractor=f"classifier:{work / 'classifier'}", device=device)
        fids[name] = metrics["fid"]
        rows.append({
            "family": name,
            "epochs": sizes["epochs"],
            "patch_size_per_epoch": "/".join(map(str, record.patch_sizes)),
            "train_seconds": sum(record.epoch_seconds),
            "seconds_per_epoch": sum(record.epoch_seconds) / len(record.epoch_seconds),
            "final_train_loss": record.losses[-1],
            "fid": metrics["fid"],
            "kid": metrics["kid_mean"],
            "forward_passes_per_image_batch": passes,
        })
    bar.close()
    by = {row["family"]: row for row in rows}
    time_ratio = by["npp"]["train_seconds"] / by["raster"]["train_seconds"]
    per_epoch_ratios = [n / r for n, r in zip(runs["npp"].epoch_seconds, runs["raster"].epoch_seconds)]
    fid_ratio = fids["npp"] / fids["raster"] if fids["raster"] > 0 else math.inf
    return {
        "config": {
            **sizes,
            "patch_sizes": PATCH_SIZES,
            "stage_boundaries": npp.stage_boundaries(sizes["epochs"]),
            "grid": [side, side],
            "codebook_size": tokenizer.codebook_size,
            "generator_parameters": sum(p.numel() for p in raster.parameters()),
            "sampler": sampler.to_dict(),
            "num_reference": int(reference.shape[0]),
            "extractor": "flexar DigitClassifier trained in this run",
        },
        "summary": {
            "tokenizer_test_mse": recon_mse,
            "tokenizer_seconds": tokenizer_seconds,
            "classifier_test_accuracy": (predictions == test_labels).float().mean().item(),
            "raster_seconds_per_epoch": by["raster"]["seconds_per_epoch"],
            "npp_seconds_per_epoch": by["npp"]["seconds_per_epoch"],
            "nar_seconds_per_epoch": by["nar"]["seconds_per_epoch"] if with_nar else None,
            "time_ratio_npp_vs_raster": time_ratio,
            "time_ratio_per_epoch": per_epoch_ratios,
            "raster_fid": fids["raster"],
            "npp_fid": fids["npp"],
            "nar_fid": fids["nar"] if with_nar else None,
            "time_ratio_nar_vs_raster": by["nar"]["train_seconds"] / by["raster"]["train_seconds"] if with_nar else None,
            "fid_ratio_npp_vs_raster": fid_ratio,
            "target_time_ratio": TARGET_TIME_RATIO,
            "target_fid_ratio": TARGET_FID_RATIO,
            "meets_time_target": time_ratio <= TARGET_TIME_RATIO,
            "meets_fid_target": fid_ratio <= TARGET_FID_RATIO,
        },
        "rows": rows,
    }
