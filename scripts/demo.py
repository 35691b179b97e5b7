"""flexar's main job, end to end on a CPU (embedded digits by default; MNIST with --dataset mnist):

1. train a tokenizer (flexar-train, --tokenizer-config) and measure its reconstructions on the test split;
2. cache its tokens for the train and test splits (flexar-tokenize);
3. train a generator on the cached tokens (--generator-config);
4. train the classifier whose features score FID (--classifier-config);
5. sample an 8x8 grid and score FID of generated images against the test split.

    python scripts/demo.py --output runs/demo
    FLEXAR_DATA=../shared/data python scripts/demo.py --dataset mnist --output runs/mnist \
        --tokenizer-config configs/tokenizers/titok_mnist.yaml --generator-config configs/generators/raster_mnist.yaml \
        --classifier-config configs/eval/classifier_mnist.yaml

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


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def train(config: Path, run_dir: Path, export_dir: Path, extra: list[str]) -> float:
    """Run `flexar-train fit` unless export_dir already holds a model; returns seconds spent."""
    from flexar.train.cli import run

    if (export_dir / "config.json").is_file():
        log(f"reusing {export_dir}")
        return 0.0
    start = time.perf_counter()
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir),
            "--model.init_args.export_dir", str(export_dir), *extra]
    log("flexar-train " + " ".join(args))
    run(args)
    return time.perf_counter() - start


def data_overrides(dataset: str, root: str | None) -> list[str]:
    return ["--data.init_args.dataset", dataset] + (["--data.init_args.root", root] if root else [])


def tokenizer_stage(args) -> dict:
    from flexar.data import build_dataset
    from flexar.eval import reconstruction_metrics
    from flexar.hub import load_model
    from flexar.train import save_grid

    output = args.output
    extra = data_overrides(args.dataset, args.root) + shlex.split(args.tokenizer_args)
    seconds = train(args.tokenizer_config, output / "runs" / "tokenizer", output / "tokenizer", extra)
    tokenizer = load_model(output / "tokenizer").eval()
    test = build_dataset(args.dataset, "test", image_size=tokenizer.image_size, channels=tokenizer.channels, root=args.root)
    metrics = reconstruction_metrics(tokenizer, test)
    metrics["train_seconds"] = round(seconds, 1)
    images = torch.stack([test[i][0] for i in range(16)])
    with torch.no_grad():
        recon = tokenizer.reconstruct(images)
    grid = save_grid(torch.cat([images, recon]), output / "reconstructions.png", nrow=16)
    (output / "reconstruction.json").write_text(json.dumps(metrics, indent=2))
    log(f"reconstruction grid (top: held-out images, bottom: reconstructions): {grid}")
    return metrics


def tokens_stage(args) -> None:
    from flexar.data import build_dataset, dataset_info, write_token_cache
    from flexar.hub import load_model

    tokenizer = load_model(args.output / "tokenizer").eval()
    for split in ("train", "test"):
        folder = args.output / "tokens" / split
        if (folder / "meta.json").is_file():
            log(f"reusing {folder}")
            continue
        dataset = build_dataset(args.dataset, split, image_size=tokenizer.image_size, channels=tokenizer.channels,
                                root=args.root)
        description = {"dataset": args.dataset, "split": split, "num_classes": dataset_info(args.dataset)["num_classes"]}
        write_token_cache(tokenizer, dataset, folder, description=description, progress=False)
        log(f"cached {len(dataset)} {split} token sequences in {folder}")


def generator_stage(args) -> float:
    output = args.output
    overrides = [
        "--data.init_args.train", str(output / "tokens" / "train"),
        "--data.init_args.val", str(output / "tokens" / "test"),
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=flexar.train.SampleGrid",
        "--trainer.callbacks.tokenizer", str(output / "tokenizer"),
        "--trainer.callbacks.every_n_epochs", "5",
    ]
    return train(args.generator_config, output / "runs" / "generator", output / "generator",
                 overrides + shlex.split(args.generator_args))


def classifier_stage(args) -> float:
    extra = data_overrides(args.dataset, args.root) + shlex.split(args.classifier_args)
    return train(args.classifier_config, args.output / "runs" / "classifier", args.output / "classifier", extra)


def sample_stage(args) -> dict:
    from torchvision.utils import save_image

    from flexar import Pipeline
    from flexar.eval.fid import compute_metrics, reference_images
    from flexar.hub import load_model
    from flexar.sampling import Sampler

    output = args.output
    pipe = Pipeline(load_model(output / "tokenizer"), load_model(output / "generator"))
    pipe.save_pretrained(output / "pipeline")
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, cfg_scale=args.cfg_scale)
    grid = pipe.generate(torch.arange(8).repeat_interleave(8) % pipe.num_classes, sampler=sampler, seed=0)
    grid_path = output / "samples.png"
    save_image(grid.float() / 255, grid_path, nrow=8, padding=2, pad_value=1.0)
    labels = torch.arange(args.num_samples) % pipe.num_classes
    start = time.perf_counter()
    samples, stats = pipe.generate(labels, sampler=sampler, seed=1, batch_size=250, return_stats=True)
    sample_seconds = time.perf_counter() - start
    reference = reference_images(args.dataset, "test", pipe.tokenizer.image_size, args.root, args.reference_limit)
    metrics = compute_metrics(samples, reference, extractor=f"classifier:{output / 'classifier'}")
    metrics.update(
        dataset=args.dataset,
        sampler=sampler.to_dict(),
        forward_passes=stats["forward_passes"],
        images_per_second=len(labels) / sample_seconds,
    )
    (output / "fid.json").write_text(json.dumps(metrics, indent=2))
    log(f"sample grid (row r: class r): {grid_path}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--tokenizer-config", type=Path, default=ROOT / "configs" / "tokenizers" / "titok_digits.yaml")
    parser.add_argument("--generator-config", type=Path, default=ROOT / "configs" / "generators" / "raster_digits.yaml")
    parser.add_argument("--classifier-config", type=Path, default=ROOT / "configs" / "eval" / "classifier_digits.yaml")
    parser.add_argument("--tokenizer-args", default="", help="extra flexar-train overrides, e.g. '--trainer.max_epochs=5'")
    parser.add_argument("--generator-args", default="", help="extra flexar-train overrides for the generator")
    parser.add_argument("--classifier-args", default="", help="extra flexar-train overrides for the FID classifier")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated images scored by FID")
    parser.add_argument("--reference-limit", type=int, default=None, help="test images in the FID reference (default all)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    recon = tokenizer_stage(args)
    tokens_stage(args)
    generator_stage(args)
    classifier_stage(args)
    fid = sample_stage(args)
    rows = {
        "dataset": args.dataset,
        "tokens per image": recon["num_tokens"],
        "recon test MSE": round(recon["mse"], 4),
        "recon test PSNR (dB)": round(recon["psnr"], 2),
        "codebook usage": round(recon["codebook_usage"], 3),
        f"FID ({fid['num_samples']} vs {fid['num_reference']})": round(fid["fid"], 2),
        "KID": round(fid["kid_mean"], 4),
        "images/s": round(fid["images_per_second"], 1),
        "seconds": round(time.perf_counter() - start),
    }
    (args.output / "summary.json").write_text(json.dumps(rows, indent=2))
    log("summary")
    for name, value in rows.items():
        print(f"  {name:<26}{value}")
    log(f"files: {args.output}/{{reconstructions.png, samples.png, reconstruction.json, fid.json, summary.json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
