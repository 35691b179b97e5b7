"""Reconstruction quality against the number of kept tokens k, for a fixed-length and flexible-length 1D tokenizers.

Four tokenizers with the same ViT sizes, quantiser (FSQ), data, optimiser and number of training steps, each trained
through :class:`flexar.train.TokenizerModule` on the dataset's train split:

- ``titok``: fixed-length TiTok decoded from its first k tokens: the "TiTok, truncated" baseline, in three rows per k
  (``fill``, see :class:`flexar.tokenizers.TiTok`): ``pad``, the dropped positions take its pad embedding, which gets
  no gradient in TiTok's training (so the decoder sees a random vector there); and two fair decodes, ``cut``, the
  decoder attends to the k kept tokens alone, and ``mean``, the dropped positions take the per-position mean code
  of ``mean_fill_images`` training images;
- ``onedpiece``: One-D-Piece, TiTok + Tail Token Drop;
- ``flextok``: FlexTok (registers with nested dropout, rectified-flow decoder), when ``flexar.tokenizers.FlexTok``
  exists; its decoder samples, so its reconstructions use a fixed seed;
- ``retok``: ReTok with redundant token padding (M = 7N/8, ReTok's 224/256) and no semantic teacher (no DINOv2 here).

At k = 1, 2, 4, ..., N on the first ``eval_images`` test images: MSE and PSNR (images in [-1, 1], peak-to-peak 2),
and rFID, the FID of the reconstructions against the originals with the features of a digit classifier trained for
this run (``configs/eval/classifier.yaml`` through ``flexar-train fit``, on the same dataset). A sampling
decoder (FlexTok) pays for its sample variance in MSE: a perfect one has twice the error of the posterior mean. So on
the first ``posterior_images`` test images each row also has ``mse_mean_decode``, the MSE of the mean of
``posterior_samples`` seeded decodes (of the single decode for a deterministic decoder), which estimates how much the
k tokens say about the image. The summary says, for each flexible tokenizer, whether it beats truncated TiTok at every
k <= N/4 (the claim of One-D-Piece, FlexTok and ReTok) in MSE, in mean-decode MSE and in rFID, where at each k and
for each metric truncated TiTok counts with the better of its two fair decodes (``cut``, ``mean``); the same bar
against the ``pad`` decode is kept beside it (``beats_titok_pad_decode_...``) to show what the unfair baseline
changed. The plot ``tokens_vs_quality.png``, written beside the JSON record (``runs/benchmarks/``, or
``benchmarks/results/`` with ``--record``), draws the curves, TiTok's three decodes among them.

The tokenizers train one after the other from the same global random stream, so a change to one tokenizer's recipe
changes the batches and draws of the ones trained after it.

Trained models: with ``FLEXAR_TVQ_MODELS=FOLDER`` the classifier, each tokenizer and the generator are loaded from
``FOLDER/NAME`` when present, else trained and saved there (with their training seconds, reported by later runs),
so that an interrupted run resumes at the first model it had not finished and a second run only evaluates; the
record lists the loaded ones (``models_loaded``). Without it everything trains in a temporary folder. A tokenizer
trained after loaded ones starts from another point of the random stream than in a run that trained them all.

Generation on flexible tokens: the flexible tokenizer with the lowest mean rFID over k encodes the training split at
k = N, a class-conditional :class:`flexar.generators.RasterAR` trains on those tokens, and at every k it samples
``gfid_samples`` images by stopping after k tokens (coarse to fine), decoded from their k tokens and scored against
the test images with the same classifier features (gFID), in the plot's fourth panel.

Full: MNIST (``FLEXAR_DATA``), 32x32, N = 32 tokens, ViTs 64 wide and 4 deep on each side, 1500 steps of 64 images
each: sized for two CPU cores, far below the papers' budgets. FlexTok keeps the same steps, batch and sizes with its
own recipe: learning rate 3e-3 (1e-3 for the three others), no QK-norm and no null-register dropout (with the shared
recipe its decoder ignored the registers within this budget: MSE flat at 0.33 for every k), and the noise level drawn
logit-normal with mean 1.0 (the library default is 0.0), which puts more of this short budget on noisy inputs, where
the decoder cannot rely on x_t alone and has to read the registers. Quick: embedded digits at 16x16, N = 8, a few
steps (a smoke test of the pipeline; its numbers mean nothing); its plot goes to a temporary folder.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import REPO_ROOT, Models, lightning_progress, progress

SIZES = {
    "full": dict(dataset="mnist", image_size=32, patch_size=4, num_tokens=32, width=64, depth=4, num_heads=4,
                 fsq_levels=[8, 5, 5, 5], steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, eval_images=2000,
                 classifier_epochs=2, flextok_sigma_mean=1.0, flextok_lr=3e-3, flextok_qk_norm=False,
                 flextok_null_condition_prob=0.0, posterior_samples=8, posterior_images=500, generator_dim=128, generator_depth=4,
                 generator_heads=4, generator_steps=1500, generator_batch=128, generator_train_images=30000,
                 gfid_samples=1000, mean_fill_images=30000),
    "quick": dict(dataset="digits", image_size=16, patch_size=4, num_tokens=8, width=32, depth=1, num_heads=2,
                  fsq_levels=[8, 8, 8], steps=6, batch_size=16, lr=3e-3, warmup_steps=2, eval_images=48,
                  classifier_epochs=1, flextok_sigma_mean=1.0, flextok_lr=3e-3, flextok_qk_norm=False,
                  flextok_null_condition_prob=0.0, posterior_samples=2, posterior_images=16, generator_dim=32, generator_depth=1,
                  generator_heads=2, generator_steps=6, generator_batch=16, generator_train_images=128,
                  gfid_samples=40, mean_fill_images=128),
}  # fmt: skip
GFID_SAMPLER = dict(temperature=1.0, cfg_scale=2.0)
# TiTok's decodes of truncated sequences: the pad embedding, and the two fair ones the bar compares with
TITOK_FILLS = ("pad", "cut", "mean")
FAIR_FILLS = ("cut", "mean")
PLOT_NAME = "tokens_vs_quality.png"
MODELS_VARIABLE = "FLEXAR_TVQ_MODELS"


def token_counts(maximum: int) -> list[int]:
    counts = [2**i for i in range(int(math.log2(maximum)) + 1)]
    return counts if counts[-1] == maximum else counts + [maximum]


def build_tokenizers(size: dict) -> tuple[dict, dict]:
    """name -> untrained tokenizer, and name -> reason for the ones skipped."""
    from flexar import tokenizers

    shared = dict(image_size=size["image_size"], channels=1, patch_size=size["patch_size"], width=size["width"],
                  depth=size["depth"], num_heads=size["num_heads"])  # fmt: skip
    titok_family = dict(shared, num_latent_tokens=size["num_tokens"], quantizer="fsq", fsq_levels=size["fsq_levels"])
    built, skipped = {}, {}
    torch.manual_seed(0)
    built["titok"] = tokenizers.TiTok(**titok_family)
    torch.manual_seed(0)
    built["onedpiece"] = tokenizers.OneDPiece(**titok_family)
    flextok = getattr(tokenizers, "FlexTok", None)
    if flextok is None:
        skipped["flextok"] = "flexar.tokenizers.FlexTok does not exist"
    else:
        accepted = inspect.signature(flextok.__init__).parameters
        kwargs = dict(shared, num_registers=size["num_tokens"], fsq_levels=size["fsq_levels"],
                      sigma_mean=size["flextok_sigma_mean"], qk_norm=size["flextok_qk_norm"],
                      null_condition_prob=size["flextok_null_condition_prob"])
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        try:
            torch.manual_seed(0)
            built["flextok"] = flextok(**kwargs)
        except Exception as error:  # a family under construction must not sink the other three
            skipped["flextok"] = f"could not build FlexTok({kwargs}): {error}"
    torch.manual_seed(0)
    built["retok"] = tokenizers.ReTok(**titok_family, redundant_tokens=size["num_tokens"] * 7 // 8)
    return built, skipped


def train_tokenizer(tokenizer, size: dict, device: str, folder: Path, lr: float, description: str = "tokenizer"):
    import lightning as L

    from flexar.data import ImageDataModule
    from flexar.train import TokenizerModule

    data = ImageDataModule(size["dataset"], image_size=size["image_size"], channels=1, batch_size=size["batch_size"])
    module = TokenizerModule(tokenizer, lr=lr, warmup_steps=size["warmup_steps"], export_dir=str(folder))
    trainer = L.Trainer(
        max_steps=size["steps"], accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(folder),
        callbacks=[lightning_progress(description)],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, data)
    return module.averaged_network().eval(), time.perf_counter() - started


def train_classifier(size: dict, device: str, models: Models) -> Path:
    """The FID feature extractor: configs/eval/classifier.yaml through flexar-train fit, exported to (or, when saved
    there, read from) ``models.path("classifier")``."""
    from flexar.train.cli import run

    export = models.path("classifier")
    if models.folder is not None and (export / "config.json").is_file():
        models.loaded.append("classifier")
        return export
    folder = models.scratch / "classifier_run"
    started = time.perf_counter()
    run([
        "fit", "--config", str(REPO_ROOT / "configs" / "eval" / "classifier.yaml"),
        "--trainer.default_root_dir", str(folder), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=" + json.dumps({"class_path": "benchmarks.common.StepProgress",
                                              "init_args": {"description": "tokens_vs_quality: FID classifier"}}),
        "--trainer.max_epochs", str(size["classifier_epochs"]), "--trainer.accelerator", "gpu" if device.startswith("cuda") else "cpu",
        "--model.init_args.image_size", str(size["image_size"]), "--model.init_args.export_dir", str(export),
        "--data.init_args.dataset", size["dataset"], "--data.init_args.image_size", str(size["image_size"]),
    ] + (["--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1"] if size is SIZES["quick"] else []))  # fmt: skip
    models.trained_seconds["classifier"] = time.perf_counter() - started
    (export / "training.json").write_text(json.dumps({"seconds": models.trained_seconds["classifier"]}))
    return export


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, k: int, device: str, batch_size: int = 500, seed: int = 0,
                fill: str | None = None) -> torch.Tensor:
    """Decodes of `images` from their first k tokens; `fill` is TiTok's decode of the dropped positions."""
    tokenizer = tokenizer.to(device)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        encoded = tokenizer.encode(batch, k)
        extra = {} if fill is None else {"fill": fill}
        if decodes_by_sampling(tokenizer):  # a different stream per (seed, batch)
            extra["generator"] = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
        outputs.append(tokenizer.decode(encoded.ids, encoded.lengths, **extra).clamp(-1, 1).float().cpu())
    return torch.cat(outputs)


def decodes_by_sampling(tokenizer) -> bool:
    """Whether the tokenizer's decoder draws noise (a seeded sampler rather than a function of the ids)."""
    return "generator" in inspect.signature(tokenizer.decode).parameters


def train_generator(tokenizer, images: torch.Tensor, labels: torch.Tensor, size: dict, device: str):
    """A class-conditional raster generator on the tokenizer's full-length ids of `images`; returns it in eval mode."""
    from flexar.generators import RasterAR
    from flexar.train import warmup_cosine

    with torch.no_grad():
        ids = torch.cat([tokenizer.encode(chunk.to(device)).ids.cpu() for chunk in images.split(500)])
    torch.manual_seed(0)
    model = RasterAR(vocab_size=tokenizer.codebook_size, max_tokens=tokenizer.max_tokens, num_classes=10,
                     dim=size["generator_dim"], depth=size["generator_depth"], num_heads=size["generator_heads"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    steps = size["generator_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps // 20, steps, 0.1))
    shuffle = torch.Generator().manual_seed(0)
    model.train()
    started = time.perf_counter()
    for _ in progress(range(steps), "tokens_vs_quality: generator", unit="step"):
        index = torch.randint(0, ids.shape[0], (size["generator_batch"],), generator=shuffle)
        loss, _ = model.training_loss(ids[index].to(device), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), time.perf_counter() - started, float(loss.detach())


@torch.no_grad()
def sample_at(model, tokenizer, k: int, count: int, device: str) -> torch.Tensor:
    """`count` class-balanced images generated with k tokens each, in [-1, 1]."""
    from flexar.sampling import Sampler

    sampler = Sampler(**GFID_SAMPLER)
    generator = torch.Generator(device).manual_seed(k)
    images = []
    for chunk in (torch.arange(count) % 10).split(250):
        ids = model.generate(chunk.to(device), sampler, generator, num_tokens=k).ids
        padded = torch.zeros(ids.shape[0], tokenizer.max_tokens, dtype=torch.long, device=ids.device)
        padded[:, :k] = ids
        lengths = torch.full((ids.shape[0],), k, dtype=torch.long, device=ids.device)
        extra = {"generator": torch.Generator(device=device).manual_seed(len(images))} if "generator" in inspect.signature(tokenizer.decode).parameters else {}
        images.append(tokenizer.decode(padded, lengths, **extra).clamp(-1, 1).float().cpu())
    return torch.cat(images)


def plot(rows: list[dict], generation: list[dict], path: Path, title: str, sampling: dict[str, int]) -> Path:
    """`sampling`: name -> number of decodes averaged in ``mse_mean_decode``, for the sampling decoders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    # TiTok's decodes share its colour and differ in line and marker
    styles = {None: dict(marker="o"), "pad": dict(linestyle=":", marker="v"), "cut": dict(linestyle="-", marker="s"),
              "mean": dict(linestyle="-.", marker="D")}  # fmt: skip
    colours = {name: f"C{index}" for index, name in enumerate(dict.fromkeys(row["tokenizer"] for row in rows))}
    for name, fill in dict.fromkeys((row["tokenizer"], row.get("fill")) for row in rows):
        mine = [row for row in rows if row["tokenizer"] == name and row.get("fill") == fill]
        style = dict(styles[fill], color=colours[name])
        label = name if fill is None else f"{name}, {fill} decode"
        for axis, metric in zip(axes, ("mse", "psnr", "rfid")):
            line = axis.plot([r["num_tokens"] for r in mine], [r[metric] for r in mine], label=label, **style)[0]
        if name in sampling:
            axes[0].plot([r["num_tokens"] for r in mine], [r["mse_mean_decode"] for r in mine], marker="x",
                         linestyle="--", color=line.get_color(), label=f"{name}, mean of {sampling[name]} decodes")
    if generation:
        axes[3].plot([r["num_tokens"] for r in generation], [r["gfid"] for r in generation], marker="o",
                     color="black", label=f"raster on {generation[0]['tokenizer']}")
        axes[3].plot([r["num_tokens"] for r in generation], [r["rfid"] for r in generation], marker="x",
                     linestyle="--", color="gray", label="its tokenizer's rFID")
        axes[3].legend(fontsize=8)
    titles = ("MSE (lower is better)", "PSNR dB (higher is better)", "rFID, classifier features (lower is better)",
              "gFID of raster AR stopped at k tokens")
    for axis, label in zip(axes, titles):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("kept tokens k")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run(quick: bool, device: str, output_dir: Path | None = None) -> dict:
    from flexar.data import build_dataset
    from flexar.eval import compute_metrics

    size = SIZES["quick" if quick else "full"]
    counts = token_counts(size["num_tokens"])
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        scratch = Path(scratch)
        models = Models(os.environ.get(MODELS_VARIABLE), scratch)
        classifier = train_classifier(size, device, models)
        test = build_dataset(size["dataset"], "test", image_size=size["image_size"], channels=1)
        count = min(size["eval_images"], len(test))
        originals = torch.stack([test[i][0] for i in range(count)])
        train = build_dataset(size["dataset"], "train", image_size=size["image_size"], channels=1)
        needed = max(size["generator_train_images"], size["mean_fill_images"])
        train = torch.utils.data.Subset(train, range(min(needed, len(train))))
        train_images, train_labels = (torch.cat(parts) for parts in zip(*torch.utils.data.DataLoader(train, batch_size=1000)))
        tokenizers, skipped = build_tokenizers(size)
        rows, train_seconds = [], {}
        for name, untrained in tokenizers.items():
            lr = size["flextok_lr"] if name == "flextok" else size["lr"]

            def train(untrained=untrained, name=name, lr=lr):
                return train_tokenizer(untrained, size, device, scratch / name, lr, f"tokens_vs_quality: train {name}")[0]

            tokenizer = models.get(name, train).to(device).eval()
            train_seconds[name] = models.seconds(name)
            tokenizers[name] = tokenizer
            fills = [None]
            if name == "titok":
                with torch.no_grad():
                    fill_ids = [tokenizer.encode(chunk.to(device)).ids for chunk in train_images[: size["mean_fill_images"]].split(500)]
                tokenizer.fit_mean_fill(torch.cat(fill_ids))
                fills = list(TITOK_FILLS)
            for k in progress(counts, f"tokens_vs_quality: evaluate {name}"):
                for fill in fills:
                    recon = reconstruct(tokenizer, originals, k, device, fill=fill)
                    mse = torch.mean((recon - originals) ** 2).item()
                    fid = compute_metrics(recon, originals, extractor=f"classifier:{classifier}", kid=False, device=device)["fid"]
                    row = {"tokenizer": name, "fill": fill, "num_tokens": k, "mse": mse,
                           "psnr": 10 * math.log10(4.0 / max(mse, 1e-10)), "rfid": fid}  # fmt: skip
                    # the error of the mean decode on a subset: for a sampling decoder, the mean of several seeded
                    # decodes estimates the posterior mean, the decode that MSE rewards
                    subset = originals[: size["posterior_images"]]
                    draws = [recon[: len(subset)]]
                    if decodes_by_sampling(tokenizer):
                        draws += [reconstruct(tokenizer, subset, k, device, seed=seed) for seed in range(1, size["posterior_samples"])]
                    row["mse_mean_decode"] = torch.mean((torch.stack(draws).mean(0) - subset) ** 2).item()
                    rows.append(row)

        # generation on the best flexible tokenizer's tokens, stopped at k
        flexible = [name for name in tokenizers if name != "titok"]
        chosen = min(flexible, key=lambda name: sum(r["rfid"] for r in rows if r["tokenizer"] == name))
        train_images, train_labels = train_images[: size["generator_train_images"]], train_labels[: size["generator_train_images"]]
        losses = {}

        def fit_generator():
            model, _, losses["final"] = train_generator(tokenizers[chosen], train_images, train_labels.long(), size, device)
            return model

        generator = models.get(f"raster_{chosen}", fit_generator).to(device).eval()
        generator_seconds, generator_loss = models.seconds(f"raster_{chosen}"), losses.get("final")
        generation = []
        for k in progress(counts, "tokens_vs_quality: gFID"):
            samples = sample_at(generator, tokenizers[chosen], k, size["gfid_samples"], device)
            gfid = compute_metrics(samples, originals, extractor=f"classifier:{classifier}", kid=False, device=device)["fid"]
            rfid = next(r["rfid"] for r in rows if r["tokenizer"] == chosen and r["num_tokens"] == k)
            generation.append({"tokenizer": chosen, "num_tokens": k, "gfid": gfid, "rfid": rfid})
        plot_folder = scratch if quick or output_dir is None else Path(output_dir)
        plot_path = plot(rows, generation, plot_folder / PLOT_NAME,
                         f"{size['dataset']}, {size['steps']} steps of {size['batch_size']} images each, N = {size['num_tokens']}",
                         {name: size["posterior_samples"] for name, t in tokenizers.items() if decodes_by_sampling(t)})
        if plot_folder is scratch:
            plot_path = None  # lives in the scratch folder only

    small = [k for k in counts if k <= size["num_tokens"] // 4]
    by = {(r["tokenizer"], r["fill"], r["num_tokens"]): r for r in rows}
    flexible = [name for name in tokenizers if name != "titok"]
    metrics = {"": "mse", "_by_rfid": "rfid", "_by_mean_decode_mse": "mse_mean_decode"}

    def titok_fair(metric: str, k: int) -> float:
        # the better of TiTok's two fair decodes, chosen per k and per metric
        return min(by[("titok", fill, k)][metric] for fill in FAIR_FILLS)

    # each row's key in the per-decode summaries: the tokenizer, or "titok:FILL" for TiTok's three decodes
    decodes = [(name, None) for name in flexible] + [("titok", fill) for fill in TITOK_FILLS]
    label = {decode: decode[0] if decode[1] is None else f"{decode[0]}:{decode[1]}" for decode in decodes}
    summary = {
        **{f"beats_truncated_titok_at_k_le_n_over_4{bar}": {
            name: all(by[(name, None, k)][metric] < titok_fair(metric, k) for k in small) for name in flexible
        } for bar, metric in metrics.items()},
        **{f"beats_titok_pad_decode_at_k_le_n_over_4{bar}": {
            name: all(by[(name, None, k)][metric] < by[("titok", "pad", k)][metric] for k in small) for name in flexible
        } for bar, metric in metrics.items()},
        "titok_best_fair_fill": {
            metric: {k: min(FAIR_FILLS, key=lambda fill: by[("titok", fill, k)][metric]) for k in counts}
            for metric in metrics.values()
        },
        "titok_pad_over_best_fair_mse": {k: by[("titok", "pad", k)]["mse"] / titok_fair("mse", k) for k in counts},
        "mse_at_k1": {label[d]: by[(*d, 1)]["mse"] for d in decodes},
        "mean_decode_mse_at_k1": {label[d]: by[(*d, 1)]["mse_mean_decode"] for d in decodes},
        "mse_at_n": {label[d]: by[(*d, size["num_tokens"])]["mse"] for d in decodes},
        "rfid_at_k1": {label[d]: by[(*d, 1)]["rfid"] for d in decodes},
        "rfid_at_n": {label[d]: by[(*d, size["num_tokens"])]["rfid"] for d in decodes},
        "train_seconds": train_seconds,
        "generator_tokenizer": chosen,
        "generator_train_seconds": generator_seconds,
        "generator_final_loss": generator_loss,
        "gfid_by_k": {r["num_tokens"]: r["gfid"] for r in generation},
    }
    config = dict(size, num_tokens_evaluated=counts, tokenizers=list(tokenizers), skipped=skipped, eval_images=count,
                  titok_fills=list(TITOK_FILLS), titok_fair_fills=list(FAIR_FILLS),
                  rfid_extractor="classifier trained with configs/eval/classifier.yaml on the same dataset",
                  plot=str(plot_path) if plot_path else None, models_loaded=models.loaded)  # fmt: skip
    config["gfid_sampler"] = GFID_SAMPLER
    return {"config": config, "summary": summary, "rows": rows + [dict(r, tokenizer=f"raster AR on {r['tokenizer']}") for r in generation]}
