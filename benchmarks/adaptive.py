"""Adaptive-length tokenizers, KARL (single pass) and ALIT (recurrent search), and generation over adaptive lengths.

Both families distil a frozen :class:`flexar.tokenizers.VQGAN2D` of the same dataset (trained first, here), on
``photos`` crops (RGB, flat sky to dense texture) and on MNIST. For each tokenizer and dataset, on the first
``eval_images`` test images:

- ``complexity_spearman``: Spearman correlation between the tokens an image gets and its PNG-compressed size (PIL,
  in memory, 8-bit, the image's native channels), the proxy of its Kolmogorov complexity that the KARL paper uses
  for its "tokens follow complexity" claim, at the tokenizer's own default error (KARL's ``desired_error``, ALIT's
  ``error_threshold``); ``complexity_spearman_by_error`` holds it at every requested error (None where every image
  got the same count);
- ``calibration``: at each of ``requested_errors`` (KARL's ``desired_error``, ALIT's ``error_threshold``), the
  fraction of images whose achieved L1 error (mean absolute error on the [0, 1] scale, of the decode from the chosen
  tokens) lies within 10 % of the requested one; ``calibration_mean`` is their mean;
- ``encode_speedup_vs_alit`` (KARL's entry): KARL's ``encode`` (one encoder pass) against ALIT's ``encode`` (the
  search over up to ``max_iterations`` = 8 rollouts, each decoded to test the threshold), images/s of the same
  batch in interleaved rounds of one run (:func:`benchmarks.common.compare`); ALIT's entry is 1 by definition.

``adaptive_generation`` (MNIST, KARL): the training images are encoded at KARL's default desired error into a
variable-length cache (ids and lengths, in memory); a class-conditional :class:`flexar.generators.RasterAR` with
``eos_token=True`` trains on it and chooses where each sample stops. The baseline is a fixed-length RasterAR of the
same width and depth (the same parameters but the end-of-sequence row of the head) trained for the same steps on the
tokens of a TiTok whose length is the cache's mean length rounded, with the same VQ codebook size and training steps
as KARL. Both sample ``gfid_samples`` class-balanced images, scored against the test images (gFID) with the features of
a digit classifier trained for this run (``configs/eval/classifier.yaml`` through ``flexar-train fit``, as
``tokens_vs_quality`` does). ``length_tv`` is the total-variation distance between the histograms of generated and
cache lengths. ALIT's cache and the photos are left out of generation: one more TiTok and cache encode per case would
not fit the CPU budget, and the FID classifier knows digits only.

Verdicts (full runs only): ``meets_complexity_spearman`` (>= 0.6 on MNIST, >= 0.4 on photos), ``meets_encode_speedup``
(>= 3) and ``meets_length_tv`` (<= 0.1). The plot ``adaptive.png`` beside the JSON record draws, per tokenizer and
dataset, tokens against PNG size, with example images at low, middle and high counts.

Trained tokenizers: with ``FLEXAR_ADAPTIVE_MODELS=FOLDER`` each model (bases, KARL, ALIT, TiTok, classifier) is loaded
from ``FOLDER/NAME`` (NAME: the model, dataset and image side, ``karl_mnist32``) when present, else trained and saved there, so that a second run only evaluates; without it
everything trains in a temporary folder.

Full: 32x32 images, bases of an 8x8 grid of 256 codes (the vq2d-digits preset), the karl-cpu and alit-cpu presets
(32 tokens at most; ALIT 4 tokens x 8 iterations), sized for two CPU cores, far below the papers' budgets. Quick:
16x16 ``photos`` and the embedded ``digits`` (no MNIST needed), the tiny presets, a few steps (a smoke test of the
pipeline; its numbers mean nothing); its plot goes to a temporary folder.

Duration: training the models (300 base, 400 KARL and TiTok, 100 ALIT steps, the classifier) took ~55 min on one core
beside another job; the recorded run (benchmarks/results/adaptive.json) loaded them from FLEXAR_ADAPTIVE_MODELS and
took 815 s, the two 1000-step generators and every evaluation included.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import REPO_ROOT, Models, compare, fit, progress

# KARL / ALIT steps: their decoders learn to read the latents only after a plateau at the base codes' marginal
# entropy (400 KARL steps left MNIST's mean absolute error at 0.14 with 2 tokens and 0.125 with 32, the mean image's
# 0.129); 2000 / 300 steps take about 35 / 13 minutes per dataset on one core
SIZES = {
    "full": dict(datasets={"photos": 3, "mnist": 1}, generation_dataset="mnist", image_size=32, train_images=20000,
                 base=dict(downsample=4, width=32, channel_multipliers=[1, 2, 2], num_res_blocks=1, codebook_size=256,
                           code_dim=8, dead_code_threshold=50),
                 base_steps=300, base_batch=64, karl_preset="karl-cpu", karl_steps=2000, alit_preset="alit-cpu",
                 alit_steps=300, tokenizer_batch=32, lr=1e-3, warmup_steps=50, eval_images=256,
                 requested_errors=[0.02, 0.04, 0.06, 0.08], speed_images=128, speed_repeats=3,
                 titok=dict(patch_size=4, width=96, depth=2, num_heads=4), classifier_epochs=1,
                 generator_dim=96, generator_depth=3, generator_heads=4, generator_steps=1000, generator_batch=64,
                 cache_images=10000, gfid_samples=1000),
    "quick": dict(datasets={"photos": 3, "digits": 1}, generation_dataset="digits", image_size=16, train_images=256,
                  base=dict(downsample=4, width=8, channel_multipliers=[1, 1, 1], num_res_blocks=0, codebook_size=32,
                            code_dim=8),
                  base_steps=8, base_batch=32, karl_preset="karl-tiny", karl_steps=4, alit_preset="alit-tiny",
                  alit_steps=3, tokenizer_batch=16, lr=3e-3, warmup_steps=2, eval_images=32,
                  requested_errors=[0.05, 0.1, 0.2], speed_images=16, speed_repeats=1,
                  titok=dict(patch_size=4, width=32, depth=1, num_heads=2), classifier_epochs=1,
                  generator_dim=32, generator_depth=1, generator_heads=2, generator_steps=6, generator_batch=16,
                  cache_images=128, gfid_samples=40),
}  # fmt: skip
GFID_SAMPLER = dict(temperature=1.0, cfg_scale=2.0)
# the Evidence bars: tokens follow PNG size (lower on photos, whose crops of 16 photos vary less), the single pass
# against the search, and the generated length distribution against the data's
SPEARMAN_BARS = {"photos": 0.4}
SPEARMAN_BAR = 0.6
SPEEDUP_BAR = 3.0
LENGTH_TV_BAR = 0.1
CALIBRATION_TOLERANCE = 0.1
PLOT_NAME = "adaptive.png"
MODELS_VARIABLE = "FLEXAR_ADAPTIVE_MODELS"


# -- measurements ----------------------------------------------------------------------------------------------------
def png_bytes(images: torch.Tensor) -> list[int]:
    """(B, C, H, W) in [-1, 1] -> the size in bytes of each image as an 8-bit PNG (grey for C = 1), written in memory."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
        sizes.append(buffer.tell())
    return sizes


def spearman(x, y) -> float | None:
    """Spearman's rank correlation; None when either side is constant (the correlation is undefined)."""
    from scipy.stats import spearmanr

    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return None
    return float(spearmanr(x.numpy(), y.numpy()).statistic)


def total_variation(a: torch.Tensor, b: torch.Tensor, maximum: int) -> float:
    """Half the L1 distance between the histograms of two (N,) integer samples over 0..maximum."""
    p = torch.bincount(a.long().cpu(), minlength=maximum + 1).double()
    q = torch.bincount(b.long().cpu(), minlength=maximum + 1).double()
    return float(0.5 * (p / p.sum() - q / q.sum()).abs().sum())


def adaptive_encode(tokenizer, images: torch.Tensor, error: float | None, device: str, batch_size: int = 256):
    """ids (B, max_tokens) zero-padded and lengths (B,) of `images` at `error` (KARL's desired error, ALIT's
    threshold; None: the tokenizer's default), on the CPU."""
    ids, lengths = [], []
    key = "desired_error" if type(tokenizer).__name__ == "KARL" else "error_threshold"
    with torch.no_grad():
        for chunk in images.split(batch_size):
            encoded = tokenizer.encode(chunk.to(device), **({} if error is None else {key: error}))
            padded = torch.zeros(len(chunk), tokenizer.max_tokens, dtype=torch.long)
            padded[:, : encoded.ids.shape[1]] = encoded.ids.cpu()
            ids.append(padded)
            lengths.append(encoded.lengths.cpu())
    return torch.cat(ids), torch.cat(lengths)


def achieved_errors(tokenizer, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, device: str,
                    batch_size: int = 256) -> torch.Tensor:
    """(B,) mean absolute error on the [0, 1] scale of the decodes of (ids, lengths)."""
    errors = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            part = slice(start, start + batch_size)
            decoded = tokenizer.decode(ids[part].to(device), lengths[part].to(device)).float().cpu()
            errors.append(tokenizer.reconstruction_error(images[part], decoded))
    return torch.cat(errors)


def default_error(tokenizer) -> float:
    return float(tokenizer.desired_error if type(tokenizer).__name__ == "KARL" else tokenizer.error_threshold)


# -- training ----------------------------------------------------------------------------------------------------------
def train_classifier(size: dict, device: str, models: Models, quick: bool) -> Path:
    """The FID feature extractor of the generation dataset: configs/eval/classifier.yaml through flexar-train fit."""
    from flexar.train.cli import run

    export = models.path(f"classifier_{size['generation_dataset']}{size['image_size']}")
    if models.folder is not None and (export / "config.json").is_file():
        models.loaded.append(export.name)
        return export
    started = time.perf_counter()
    root = models.scratch / "classifier_run"
    bar = {"class_path": "benchmarks.common.StepProgress", "init_args": {"description": "adaptive: FID classifier"}}
    run([
        "fit", "--config", str(REPO_ROOT / "configs" / "eval" / "classifier.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=" + json.dumps(bar), "--trainer.max_epochs", str(size["classifier_epochs"]),
        "--trainer.accelerator", "gpu" if device.startswith("cuda") else "cpu",
        "--model.init_args.image_size", str(size["image_size"]), "--model.init_args.export_dir", str(export),
        "--data.init_args.dataset", size["generation_dataset"], "--data.init_args.image_size", str(size["image_size"]),
    ] + (["--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1"] if quick else []))  # fmt: skip
    models.trained_seconds[export.name] = time.perf_counter() - started
    return export


def load_split(name: str, split: str, size: dict, channels: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    from flexar.data import build_dataset

    dataset = build_dataset(name, split, image_size=size["image_size"], channels=channels)
    dataset = torch.utils.data.Subset(dataset, range(min(count, len(dataset))))
    images, labels = (torch.cat(parts) for parts in zip(*torch.utils.data.DataLoader(dataset, batch_size=1000)))
    return images, labels.long()


def tokenizers_for(dataset: str, channels: int, train_images: torch.Tensor, size: dict, device: str, models: Models):
    """The frozen base, KARL and ALIT of one dataset (trained or loaded)."""
    from flexar.tokenizers import ALIT, KARL, TiTok, VQGAN2D  # noqa: F401 (TiTok: registered for load_model)

    tag = f"{dataset}{size['image_size']}"  # the image side in the name: quick and full models can share a folder

    def base():
        torch.manual_seed(0)
        model = VQGAN2D(image_size=size["image_size"], channels=channels, **size["base"])
        return fit(model, train_images, size["base_steps"], size["base_batch"], size["lr"], size["warmup_steps"],
                   device, f"adaptive: train base {dataset}", checkpoint=models.checkpoint(f"vq2d_{tag}"))[0]

    base_model = models.get(f"vq2d_{tag}", base)
    base_folder = models.path(f"vq2d_{tag}")
    built = {}
    for family, kind, preset in (("karl", KARL, size["karl_preset"]), ("alit", ALIT, size["alit_preset"])):

        def train(kind=kind, preset=preset, family=family):
            torch.manual_seed(0)
            model = kind.from_preset(preset, base=str(base_folder))
            return fit(model, train_images, size[f"{family}_steps"], size["tokenizer_batch"], size["lr"],
                       size["warmup_steps"], device, f"adaptive: train {family} {dataset}",
                       checkpoint=models.checkpoint(f"{family}_{tag}"))[0]

        built[family] = models.get(f"{family}_{tag}", train).to(device).eval()
    return base_model, built


# -- generation ------------------------------------------------------------------------------------------------------
def generator(vocab_size: int, max_tokens: int, size: dict, eos_token: bool):
    from flexar.generators import RasterAR

    torch.manual_seed(0)
    return RasterAR(vocab_size=vocab_size, max_tokens=max_tokens, num_classes=10, dim=size["generator_dim"],
                    depth=size["generator_depth"], num_heads=size["generator_heads"], eos_token=eos_token)


@torch.no_grad()
def sample(model, tokenizer, count: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` class-balanced images in [-1, 1] and their token counts (B,), the model choosing where to stop."""
    from flexar.sampling import Sampler

    sampler = Sampler(**GFID_SAMPLER)
    stream = torch.Generator(device).manual_seed(0)
    images, lengths = [], []
    for chunk in (torch.arange(count) % 10).split(250):
        output = model.generate(chunk.to(device), sampler, stream)
        ids = output.ids
        length = output.lengths if output.lengths is not None else torch.full((len(ids),), ids.shape[1], device=ids.device)
        padded = torch.zeros(len(ids), tokenizer.max_tokens, dtype=torch.long, device=ids.device)
        padded[:, : ids.shape[1]] = ids
        images.append(tokenizer.decode(padded, length).clamp(-1, 1).float().cpu())
        lengths.append(length.cpu())
    return torch.cat(images), torch.cat(lengths)


def adaptive_generation(karl, dataset: str, size: dict, device: str, models: Models, quick: bool,
                        reference: torch.Tensor) -> tuple[dict, list[dict]]:
    """gFID of an end-of-sequence RasterAR on KARL's adaptive cache against a fixed-length RasterAR on TiTok tokens
    at the cache's mean length, and the length histograms' TV distance."""
    from flexar.eval import compute_metrics
    from flexar.tokenizers import TiTok

    classifier = train_classifier(size, device, models, quick)
    images, labels = load_split(dataset, "train", size, 1, size["cache_images"])
    ids, lengths = adaptive_encode(karl, images, None, device)
    mean_length = float(lengths.float().mean())
    fixed = max(1, round(mean_length))

    titok_name = f"titok_{dataset}{size['image_size']}_{fixed}"

    def titok():
        torch.manual_seed(0)
        model = TiTok(image_size=size["image_size"], channels=1, num_latent_tokens=fixed, quantizer="vq",
                      codebook_size=karl.codebook_size, code_dim=8, **size["titok"])
        train, _ = load_split(dataset, "train", size, 1, size["train_images"])
        return fit(model, train, size["karl_steps"], size["tokenizer_batch"], size["lr"], size["warmup_steps"], device,
                   f"adaptive: train titok {dataset} N={fixed}", checkpoint=models.checkpoint(titok_name))[0]

    titok_model = models.get(titok_name, titok).to(device).eval()
    with torch.no_grad():
        titok_ids = torch.cat([titok_model.encode(chunk.to(device)).ids.cpu() for chunk in images.split(256)])

    common = dict(steps=size["generator_steps"], batch_size=size["generator_batch"], lr=1e-3,
                  warmup=max(1, size["generator_steps"] // 20), device=device, labels=labels)
    adaptive_model, adaptive_loss = fit(generator(karl.codebook_size, karl.max_tokens, size, True), ids,
                                        description="adaptive: generator on karl (eos)", lengths=lengths, **common)
    fixed_model, fixed_loss = fit(generator(titok_model.codebook_size, fixed, size, False), titok_ids,
                                  description=f"adaptive: generator on titok N={fixed}", **common)
    scores = {}
    for name, model, tokenizer in progress([("karl", adaptive_model, karl), ("titok", fixed_model, titok_model)],
                                           "adaptive: gFID"):
        samples, generated = sample(model, tokenizer, size["gfid_samples"], device)
        fid = compute_metrics(samples, reference, extractor=f"classifier:{classifier}", kid=False, device=device)["fid"]
        scores[name] = (fid, generated)
    generated = scores["karl"][1]
    result = {
        "gfid_adaptive": scores["karl"][0],
        "gfid_fixed_titok": scores["titok"][0],
        "length_tv": total_variation(generated, lengths, karl.max_tokens),
        "data_mean_tokens": mean_length,
        "generated_mean_tokens": float(generated.float().mean()),
        "titok_tokens": fixed,
        "adaptive_generator_parameters": sum(p.numel() for p in adaptive_model.parameters()),
        "fixed_generator_parameters": sum(p.numel() for p in fixed_model.parameters()),
        "adaptive_final_loss": adaptive_loss,
        "fixed_final_loss": fixed_loss,
    }
    rows = [
        {"tokenizer": "raster AR (eos) on karl", "dataset": dataset, "gfid": result["gfid_adaptive"],
         "mean_tokens": result["generated_mean_tokens"], "length_tv": result["length_tv"]},
        {"tokenizer": "raster AR on titok", "dataset": dataset, "gfid": result["gfid_fixed_titok"],
         "mean_tokens": float(fixed)},
    ]  # fmt: skip
    return result, rows


# -- plot --------------------------------------------------------------------------------------------------------------
def plot(cases: dict, path: Path, title: str) -> Path:
    """cases: (tokenizer, dataset) -> dict(lengths (B,), png (B,), images (B, C, H, W)); one column per case: tokens
    against PNG size above, the images at the 10th, 50th and 90th percentile of tokens below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases), 6.4), squeeze=False,
                                gridspec_kw=dict(height_ratios=[3, 1.3]))
    for column, ((name, dataset), case) in enumerate(cases.items()):
        lengths, sizes, images = case["lengths"], case["png"], case["images"]
        axis = axes[0, column]
        axis.scatter(sizes, lengths.tolist(), s=8, alpha=0.5)
        rho = spearman(lengths, sizes)
        axis.set_title(f"{name} on {dataset}: Spearman {'n/a' if rho is None else f'{rho:.2f}'}", fontsize=10)
        axis.set_xlabel("PNG size (bytes)")
        axis.set_ylabel("tokens chosen")
        axis.grid(alpha=0.3)
        order = torch.argsort(lengths.float() + torch.tensor(sizes, dtype=torch.float) * 1e-9)
        picks = [int(order[int(q * (len(order) - 1))]) for q in (0.1, 0.5, 0.9)]
        strip = torch.cat([images[i] for i in picks], dim=2)  # side by side along the width
        strip = ((strip.clamp(-1, 1) + 1) / 2).permute(1, 2, 0)
        axes[1, column].imshow(strip.squeeze(-1).numpy(), cmap="gray" if strip.shape[-1] == 1 else None, vmin=0, vmax=1)
        axes[1, column].set_title("low / mid / high: " + ", ".join(str(int(lengths[i])) for i in picks) + " tokens",
                                  fontsize=9)
        axes[1, column].axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -- run -------------------------------------------------------------------------------------------------------------
def evaluate(name: str, tokenizer, images: torch.Tensor, size: dict, device: str) -> tuple[dict, dict]:
    """complexity and calibration numbers of one tokenizer, and its case for the plot."""
    sizes = png_bytes(images)
    by_error, calibration, mean_tokens = {}, {}, {}
    for error in progress(size["requested_errors"], f"adaptive: evaluate {name}"):
        ids, lengths = adaptive_encode(tokenizer, images, error, device)
        achieved = achieved_errors(tokenizer, images, ids, lengths, device)
        by_error[str(error)] = spearman(lengths, sizes)
        calibration[str(error)] = float(((achieved - error).abs() <= CALIBRATION_TOLERANCE * error).float().mean())
        mean_tokens[str(error)] = float(lengths.float().mean())
    ids, lengths = adaptive_encode(tokenizer, images, None, device)
    result = {
        "complexity_spearman": spearman(lengths, sizes),
        "default_error": default_error(tokenizer),
        "complexity_spearman_by_error": by_error,
        "calibration": calibration,
        "calibration_mean": sum(calibration.values()) / len(calibration),
        "mean_tokens": float(lengths.float().mean()),
        "mean_tokens_by_error": mean_tokens,
        "max_tokens": tokenizer.max_tokens,
    }
    return result, {"lengths": lengths, "png": sizes, "images": images}


def run(quick: bool, device: str, output_dir: Path | None = None) -> dict:
    size = SIZES["quick" if quick else "full"]
    results: dict = {"karl": {}, "alit": {}}
    rows, cases, generation = [], {}, {}
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        scratch = Path(scratch)
        models = Models(os.environ.get(MODELS_VARIABLE), scratch)
        for dataset, channels in size["datasets"].items():
            train_images, _ = load_split(dataset, "train", size, channels, size["train_images"])
            test_images, _ = load_split(dataset, "test", size, channels, max(size["eval_images"], size["gfid_samples"]))
            _, tokenizers = tokenizers_for(dataset, channels, train_images, size, device, models)
            originals = test_images[: size["eval_images"]]
            for name, tokenizer in tokenizers.items():
                results[name][dataset], cases[(name, dataset)] = evaluate(f"{name} {dataset}", tokenizer, originals,
                                                                          size, device)
            batch = originals[: size["speed_images"]].to(device)
            timing = compare({family: (lambda t=t: t.encode(batch)) for family, t in tokenizers.items()}, device,
                             warmup=1, repeats=size["speed_repeats"], description=f"adaptive: encode speed {dataset}")
            speedup = timing.speedup("karl", "alit")
            for name in tokenizers:
                entry = results[name][dataset]
                entry["encode_images_per_second"] = len(batch) / timing.seconds(name)
                entry["encode_speedup_vs_alit"] = speedup if name == "karl" else 1.0
                entry["meets_complexity_spearman"] = (entry["complexity_spearman"] or 0.0) >= SPEARMAN_BARS.get(dataset, SPEARMAN_BAR)
                rows.append({"tokenizer": name, "dataset": dataset, "complexity_spearman": entry["complexity_spearman"],
                             "calibration_mean": entry["calibration_mean"], "mean_tokens": entry["mean_tokens"],
                             "encode_images_per_second": entry["encode_images_per_second"],
                             "encode_speedup_vs_alit": entry["encode_speedup_vs_alit"]})  # fmt: skip
            results["karl"][dataset]["meets_encode_speedup"] = speedup >= SPEEDUP_BAR
            if dataset == size["generation_dataset"]:
                generation, generation_rows = adaptive_generation(tokenizers["karl"], dataset, size, device, models,
                                                                  quick, test_images[: size["gfid_samples"]])
                generation["meets_length_tv"] = generation["length_tv"] <= LENGTH_TV_BAR
                rows += generation_rows
        plot_folder = scratch if quick or output_dir is None else Path(output_dir)
        plot_path = plot(cases, plot_folder / PLOT_NAME,
                         f"tokens chosen against PNG size ({size['image_size']}x{size['image_size']}; KARL at its "
                         f"desired error, ALIT at its threshold)")
        if plot_folder is scratch:
            plot_path = None  # lives in the scratch folder only

    summary = {**results, "adaptive_generation": {"karl": {size["generation_dataset"]: generation}},
               "bars": {"complexity_spearman": {**{d: SPEARMAN_BAR for d in size["datasets"]}, **SPEARMAN_BARS},
                        "encode_speedup_vs_alit": SPEEDUP_BAR, "length_tv": LENGTH_TV_BAR},
               "trained_seconds": models.trained_seconds, "loaded_models": models.loaded}  # fmt: skip
    config = dict(size, calibration_tolerance=CALIBRATION_TOLERANCE, gfid_sampler=GFID_SAMPLER,
                  gfid_extractor="classifier trained with configs/eval/classifier.yaml on the generation dataset",
                  models_folder=os.environ.get(MODELS_VARIABLE), plot=str(plot_path) if plot_path else None,
                  skipped={"adaptive_generation": "ALIT's cache and photos: one more TiTok and cache per case exceeds "
                                                  "the CPU budget; the FID classifier knows digits only"})  # fmt: skip
    return {"config": config, "summary": summary, "rows": rows}
