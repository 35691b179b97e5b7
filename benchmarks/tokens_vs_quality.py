"""Reconstruction quality against the number of kept tokens k, for a fixed-length and flexible-length 1D tokenizers.

Four tokenizers with the same ViT sizes, quantiser (FSQ), data, optimiser and number of training steps, each trained
through :class:`flexar.train.TokenizerModule` on the dataset's train split:

- ``titok``: fixed-length TiTok, decoded from its first k tokens (the rest take its pad embedding, never seen in
  training): the "TiTok, truncated" baseline;
- ``onedpiece``: One-D-Piece, TiTok + Tail Token Drop;
- ``flextok``: FlexTok (registers with nested dropout, rectified-flow decoder), when ``flexar.tokenizers.FlexTok``
  exists; its decoder samples, so its reconstructions use a fixed seed;
- ``retok``: ReTok with redundant token padding (M = 7N/8, ReTok's 224/256) and no semantic teacher (no DINOv2 here).

At k = 1, 2, 4, ..., N on the first ``eval_images`` test images: MSE and PSNR (images in [-1, 1], peak-to-peak 2),
and rFID, the FID of the reconstructions against the originals with the features of a digit classifier trained for
this run (``configs/eval/classifier_digits.yaml`` through ``flexar-train fit``, on the same dataset). The summary
says, for each flexible tokenizer, whether it beats truncated TiTok in MSE at every k <= N/4 (the claim of
One-D-Piece, FlexTok and ReTok), and the plot ``benchmarks/results/tokens_vs_quality.png`` draws the three curves.

Full: MNIST (``FLEXAR_DATA``), 32x32, N = 32 tokens. Quick: embedded digits at 16x16, N = 8, a few steps (a smoke
test of the pipeline; its numbers mean nothing); its plot goes to a temporary folder.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import REPO_ROOT

SIZES = {
    "full": dict(dataset="mnist", image_size=32, patch_size=4, num_tokens=32, width=128, depth=4, num_heads=4,
                 fsq_levels=[8, 5, 5, 5], steps=4000, batch_size=128, lr=1e-3, warmup_steps=200, eval_images=10000,
                 classifier_epochs=3),
    "quick": dict(dataset="digits", image_size=16, patch_size=4, num_tokens=8, width=32, depth=1, num_heads=2,
                  fsq_levels=[8, 8, 8], steps=6, batch_size=16, lr=3e-3, warmup_steps=2, eval_images=48,
                  classifier_epochs=1),
}  # fmt: skip
PLOT = REPO_ROOT / "benchmarks" / "results" / "tokens_vs_quality.png"


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
        kwargs = {k: v for k, v in dict(shared, num_registers=size["num_tokens"], fsq_levels=size["fsq_levels"]).items() if k in accepted}
        try:
            torch.manual_seed(0)
            built["flextok"] = flextok(**kwargs)
        except Exception as error:  # a family under construction must not sink the other three
            skipped["flextok"] = f"could not build FlexTok({kwargs}): {error}"
    torch.manual_seed(0)
    built["retok"] = tokenizers.ReTok(**titok_family, redundant_tokens=size["num_tokens"] * 7 // 8)
    return built, skipped


def train_tokenizer(tokenizer, size: dict, device: str, folder: Path):
    import lightning as L

    from flexar.data import ImageDataModule
    from flexar.train import TokenizerModule

    data = ImageDataModule(size["dataset"], image_size=size["image_size"], channels=1, batch_size=size["batch_size"])
    module = TokenizerModule(tokenizer, lr=size["lr"], warmup_steps=size["warmup_steps"], export_dir=str(folder))
    trainer = L.Trainer(
        max_steps=size["steps"], accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(folder),
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, data)
    return module.averaged_network().eval(), time.perf_counter() - started


def train_classifier(size: dict, device: str, folder: Path) -> Path:
    from flexar.train.cli import run

    export = folder / "classifier"
    run([
        "fit", "--config", str(REPO_ROOT / "configs" / "eval" / "classifier_digits.yaml"),
        "--trainer.default_root_dir", str(folder), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", str(size["classifier_epochs"]), "--trainer.accelerator", "gpu" if device.startswith("cuda") else "cpu",
        "--model.init_args.image_size", str(size["image_size"]), "--model.init_args.export_dir", str(export),
        "--data.init_args.dataset", size["dataset"], "--data.init_args.image_size", str(size["image_size"]),
    ] + (["--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1"] if size is SIZES["quick"] else []))  # fmt: skip
    return export


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, k: int, device: str, batch_size: int = 500) -> torch.Tensor:
    tokenizer = tokenizer.to(device)
    seeded = "generator" in inspect.signature(tokenizer.decode).parameters
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        encoded = tokenizer.encode(batch, k)
        extra = {"generator": torch.Generator(device=device).manual_seed(start)} if seeded else {}
        outputs.append(tokenizer.decode(encoded.ids, encoded.lengths, **extra).clamp(-1, 1).float().cpu())
    return torch.cat(outputs)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in dict.fromkeys(row["tokenizer"] for row in rows):
        mine = [row for row in rows if row["tokenizer"] == name]
        for axis, metric in zip(axes, ("mse", "psnr", "rfid")):
            axis.plot([r["num_tokens"] for r in mine], [r[metric] for r in mine], marker="o", label=name)
    for axis, label in zip(axes, ("MSE (lower is better)", "PSNR dB (higher is better)", "rFID, classifier features (lower is better)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("kept tokens k")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run(quick: bool, device: str) -> dict:
    from flexar.data import build_dataset
    from flexar.eval import compute_metrics

    size = SIZES["quick" if quick else "full"]
    counts = token_counts(size["num_tokens"])
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        scratch = Path(scratch)
        classifier = train_classifier(size, device, scratch / "classifier")
        test = build_dataset(size["dataset"], "test", image_size=size["image_size"], channels=1)
        count = min(size["eval_images"], len(test))
        originals = torch.stack([test[i][0] for i in range(count)])
        tokenizers, skipped = build_tokenizers(size)
        rows, train_seconds = [], {}
        for name, tokenizer in tokenizers.items():
            tokenizer, train_seconds[name] = train_tokenizer(tokenizer, size, device, scratch / name)
            for k in counts:
                recon = reconstruct(tokenizer, originals, k, device)
                mse = torch.mean((recon - originals) ** 2).item()
                fid = compute_metrics(recon, originals, extractor=f"classifier:{classifier}", kid=False, device=device)["fid"]
                rows.append({"tokenizer": name, "num_tokens": k, "mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-10)), "rfid": fid})
        plot_path = plot(rows, (scratch / "tokens_vs_quality.png") if quick else PLOT,
                         f"{size['dataset']}, {size['steps']} steps each, N = {size['num_tokens']}")
        if quick:
            plot_path = None  # lives in the scratch folder only

    small = [k for k in counts if k <= size["num_tokens"] // 4]
    by = {(r["tokenizer"], r["num_tokens"]): r for r in rows}
    summary = {
        "beats_truncated_titok_at_k_le_n_over_4": {
            name: all(by[(name, k)]["mse"] < by[("titok", k)]["mse"] for k in small) for name in tokenizers if name != "titok"
        },
        "mse_at_k1": {name: by[(name, 1)]["mse"] for name in tokenizers},
        "mse_at_n": {name: by[(name, size["num_tokens"])]["mse"] for name in tokenizers},
        "rfid_at_k1": {name: by[(name, 1)]["rfid"] for name in tokenizers},
        "rfid_at_n": {name: by[(name, size["num_tokens"])]["rfid"] for name in tokenizers},
        "train_seconds": train_seconds,
    }
    config = dict(size, num_tokens_evaluated=counts, tokenizers=list(tokenizers), skipped=skipped, eval_images=count,
                  rfid_extractor="classifier trained with configs/eval/classifier_digits.yaml on the same dataset",
                  plot=str(plot_path) if plot_path else None)  # fmt: skip
    return {"config": config, "summary": summary, "rows": rows}
