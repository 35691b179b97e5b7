"""flexar's main job on the embedded digits, end to end on a CPU:

1. train a TiTok tokenizer (flexar-train, configs/tokenizers/titok_digits.yaml) and measure its reconstructions;
2. cache its tokens for the train and test splits (flexar-tokenize);
3. train a raster generator on the cached tokens (configs/generators/raster_digits.yaml);
4. train the digit classifier whose features score FID (configs/eval/classifier_digits.yaml);
5. sample an 8x8 grid and score FID of generated digits against the held-out split.

    python scripts/demo.py --output runs/demo

Each stage writes its result under --output and is skipped on a re-run when its result already exists
(delete the stage's folder to redo it).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_CONFIG = ROOT / "configs" / "tokenizers" / "titok_digits.yaml"
GENERATOR_CONFIG = ROOT / "configs" / "generators" / "raster_digits.yaml"
CLASSIFIER_CONFIG = ROOT / "configs" / "eval" / "classifier_digits.yaml"


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def train(config: Path, run_dir: Path, export_dir: Path, extra: list[str] | None = None) -> float:
    """Run `flexar-train fit` unless export_dir already holds a model; returns seconds spent."""
    from flexar.train.cli import run

    if (export_dir / "config.json").is_file():
        log(f"reusing {export_dir}")
        return 0.0
    start = time.perf_counter()
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir),
            "--model.init_args.export_dir", str(export_dir), *(extra or [])]
    log("flexar-train " + " ".join(args))
    run(args)
    return time.perf_counter() - start


def tokenizer_stage(output: Path, extra: list[str]) -> dict:
    from flexar.data import build_dataset
    from flexar.eval.reconstruction import reconstruction_metrics
    from flexar.tokenizers import TiTok
    from flexar.train import save_grid

    seconds = train(TOKENIZER_CONFIG, output / "runs" / "tokenizer", output / "tokenizer", extra)
    tokenizer = TiTok.from_pretrained(output / "tokenizer").eval()
    test = build_dataset("digits", "test", image_size=tokenizer.image_size, channels=tokenizer.channels)
    metrics = reconstruction_metrics(tokenizer, test)
    metrics["train_seconds"] = round(seconds, 1)
    images = torch.stack([test[i][0] for i in range(16)])
    with torch.no_grad():
        recon = tokenizer.reconstruct(images)
    grid = save_grid(torch.cat([images, recon]), output / "reconstructions.png", nrow=16)
    (output / "reconstruction.json").write_text(json.dumps(metrics, indent=2))
    log(f"reconstruction grid (top: held-out digits, bottom: reconstructions): {grid}")
    log(f"reconstruction metrics: {output / 'reconstruction.json'}")
    return metrics


def tokens_stage(output: Path) -> None:
    from flexar.data import build_dataset, dataset_info, write_token_cache
    from flexar.tokenizers import TiTok

    tokenizer = TiTok.from_pretrained(output / "tokenizer").eval()
    for split in ("train", "test"):
        folder = output / "tokens" / split
        if (folder / "meta.json").is_file():
            log(f"reusing {folder}")
            continue
        dataset = build_dataset("digits", split, image_size=tokenizer.image_size, channels=tokenizer.channels)
        description = {"dataset": "digits", "split": split, "num_classes": dataset_info("digits")["num_classes"]}
        write_token_cache(tokenizer, dataset, folder, description=description, progress=False)
        log(f"cached {len(dataset)} {split} token sequences in {folder}")


def generator_stage(output: Path, extra: list[str]) -> float:
    overrides = [
        "--data.init_args.train", str(output / "tokens" / "train"),
        "--data.init_args.val", str(output / "tokens" / "test"),
        "--trainer.callbacks+=flexar.train.SampleGrid",
        "--trainer.callbacks.tokenizer", str(output / "tokenizer"),
        "--trainer.callbacks.every_n_epochs", "10",
    ]
    return train(GENERATOR_CONFIG, output / "runs" / "generator", output / "generator", ["--trainer.callbacks=[]", *overrides, *extra])


def classifier_stage(output: Path, extra: list[str]) -> float:
    return train(CLASSIFIER_CONFIG, output / "runs" / "classifier", output / "classifier", extra)


def sample_stage(output: Path, num_samples: int, cfg_scale: float) -> dict:
    from flexar import Pipeline
    from flexar.data import build_dataset
    from flexar.eval.fid import compute_metrics
    from flexar.generators import RasterAR
    from flexar.sampling import Sampler
    from flexar.tokenizers import TiTok
    from torchvision.utils import save_image

    pipe = Pipeline(TiTok.from_pretrained(output / "tokenizer"), RasterAR.from_pretrained(output / "generator"))
    pipe.save_pretrained(output / "pipeline")
    sampler = Sampler(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=cfg_scale)
    grid_labels = torch.arange(8).repeat_interleave(8)
    grid = pipe.generate(grid_labels, sampler=sampler, seed=0)
    grid_path = output / "samples.png"
    save_image(grid.float() / 255, grid_path, nrow=8, padding=2, pad_value=1.0)
    labels = torch.arange(num_samples) % pipe.num_classes
    samples, stats = pipe.generate(labels, sampler=sampler, seed=1, return_stats=True)
    test = build_dataset("digits", "test", image_size=pipe.tokenizer.image_size, channels=1)
    reference = torch.stack([test[i][0] for i in range(len(test))])
    reference = ((reference.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1)
    metrics = compute_metrics(samples, reference, extractor=f"classifier:{output / 'classifier'}")
    metrics.update(sampler=sampler.to_dict(), images_per_second=len(labels) / max(stats["seconds"] + stats["decode_seconds"], 1e-9))
    (output / "fid.json").write_text(json.dumps(metrics, indent=2))
    log(f"sample grid (rows: digits 0-7): {grid_path}")
    log(f"FID against held-out digits (classifier features): {output / 'fid.json'}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--tokenizer-args", default="", help="extra flexar-train overrides, e.g. '--trainer.max_epochs=5'")
    parser.add_argument("--generator-args", default="", help="extra flexar-train overrides for the generator")
    parser.add_argument("--classifier-args", default="", help="extra flexar-train overrides for the FID classifier")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated images scored by FID")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    recon = tokenizer_stage(args.output, shlex.split(args.tokenizer_args))
    tokens_stage(args.output)
    generator_stage(args.output, shlex.split(args.generator_args))
    classifier_stage(args.output, shlex.split(args.classifier_args))
    fid = sample_stage(args.output, args.num_samples, args.cfg_scale)
    rows = [
        ("tokens per image", recon["num_tokens"]),
        ("recon test MSE", f"{recon['mse']:.4f}"),
        ("recon test PSNR (dB)", f"{recon['psnr']:.2f}"),
        ("codebook usage", f"{recon['codebook_usage']:.3f}"),
        (f"FID ({fid['num_samples']} samples)", f"{fid['fid']:.2f}"),
        ("KID", f"{fid['kid_mean']:.4f}"),
        ("images/s (CPU)", f"{fid['images_per_second']:.1f}"),
        ("total seconds", f"{time.perf_counter() - start:.0f}"),
    ]
    log("summary")
    for name, value in rows:
        print(f"  {name:<24}{value}")
    (args.output / "summary.json").write_text(json.dumps(dict(rows), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
