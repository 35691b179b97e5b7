"""flexar's main job, end to end on a CPU (embedded digits by default; MNIST with --dataset mnist):

1. train a tokenizer (flexar-train, --tokenizer-config) and measure its reconstructions on the test split;
2. cache its tokens for the train and test splits (flexar-tokenize);
3. train a generator on the cached tokens (--generator-config);
4. train the classifier whose features score FID (--classifier-config);
5. sample an 8x8 grid and score FID of generated images against the test split (the sampling flags of
   flexar-sample: CFG 2 by default, --temperature, --top-k, --entropy-temperature, --decoding scalingar, ...).

    python scripts/demo.py --output runs/demo
    FLEXAR_DATA=../shared/data python scripts/demo.py --dataset mnist --output runs/mnist \
        --tokenizer-args "--config configs/data/mnist.yaml" --generator-config configs/generators/raster.yaml --generator-args "--trainer.max_epochs 1 --data.init_args.batch_size 128" \
        --classifier-args "--config configs/eval/mnist/classifier.yaml"

Each stage writes its result under --output and records in --output/stages.json what it was made from: its
recipe (config file and overrides) and the fingerprints of the results it read. On a re-run a stage is reused
when its result exists and was made from the same inputs; otherwise it is redone, and so is every stage that reads
its result (delete the tokenizer folder, or change --tokenizer-args, and the token caches and the generator are
redone with it; the FID classifier reads only the dataset and is kept).
"""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES_NAME = "stages.json"


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_id(folder: Path) -> str:
    """Fingerprint of a saved model folder (config.json + model.safetensors)."""
    from flexar.hub import fingerprint

    return fingerprint(folder)


def cache_id(folder: Path) -> str:
    """Identity of a token cache: the hash of its meta.json, which names its tokenizer, dataset and shard counts."""
    return sha256_file(folder / "meta.json")


class Stages:
    """OUTPUT/stages.json: for each stage, the inputs it was made from and the identity of what it wrote.

    A stage is current when its result exists, its recorded inputs equal today's and its result is still the one it
    wrote (not replaced by hand). The record is written only once the stage has finished, so a stage killed half
    way is redone.
    """

    def __init__(self, output: Path):
        self.path = output / STAGES_NAME
        self.records = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def stale_reason(self, name: str, inputs: dict, result: Path, identify) -> str | None:
        """None when stage `name` can be reused, else why it must be redone. `result` is the file whose presence
        marks the stage done; `identify()` hashes what the stage wrote."""
        if not result.exists():
            return "no result yet"
        record = self.records.get(name)
        if record is None:
            return "no record of what it was made from"
        changed = sorted(key for key in {*inputs, *record["inputs"]} if inputs.get(key) != record["inputs"].get(key))
        if changed:
            return "its inputs changed: " + ", ".join(changed)
        try:
            if identify() != record["result"]:
                return "its result was replaced since it was made"
        except (FileNotFoundError, OSError):
            return "its result is incomplete"
        return None

    def record(self, name: str, inputs: dict, result: str) -> None:
        self.records[name] = {"inputs": inputs, "result": result}
        self.path.write_text(json.dumps(self.records, indent=2))


def recipe(config: Path, extra: list[str]) -> dict:
    """A training stage's own inputs: the config file's content and the command-line overrides."""
    return {"config": sha256_file(config), "overrides": extra}


def train(stages: Stages, name: str, config: Path, run_dir: Path, export_dir: Path, extra: list[str],
          inputs: dict) -> float:
    """Run `flexar-train fit` unless export_dir holds a model made from the same `inputs`; returns seconds spent.

    A stale export is replaced (``overwrite_export``) only when the new run exports: until then the old model stays.
    """
    from flexar.train.cli import run

    inputs = {**recipe(config, extra), **inputs}
    reason = stages.stale_reason(name, inputs, export_dir / "config.json", lambda: model_id(export_dir))
    if reason is None:
        log(f"reusing {export_dir}")
        return 0.0
    start = time.perf_counter()
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir),
            "--model.init_args.export_dir", str(export_dir), *extra]
    if export_dir.exists() and any(export_dir.iterdir()):
        log(f"redoing {export_dir}: {reason}")
        args += ["--model.init_args.overwrite_export", "true"]
    log("flexar-train " + " ".join(args))
    run(args)
    stages.record(name, inputs, model_id(export_dir))
    return time.perf_counter() - start


def data_overrides(dataset: str, root: str | None) -> list[str]:
    return ["--data.init_args.dataset", dataset] + (["--data.init_args.root", root] if root else [])


def tokenizer_stage(args, stages: Stages) -> dict:
    from flexar.data import build_dataset
    from flexar.eval import reconstruction_metrics
    from flexar.hub import load_model
    from flexar.train import save_grid

    output = args.output
    extra = data_overrides(args.dataset, args.root) + shlex.split(args.tokenizer_args)
    seconds = train(stages, "tokenizer", args.tokenizer_config, output / "runs" / "tokenizer", output / "tokenizer",
                    extra, inputs={})
    tokenizer = load_model(output / "tokenizer")
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


def tokens_stage(args, stages: Stages) -> None:
    from flexar.data import build_dataset, dataset_info, write_token_cache
    from flexar.hub import load_model

    tokenizer = load_model(args.output / "tokenizer")
    for split in ("train", "test"):
        folder = args.output / "tokens" / split
        name = f"tokens/{split}"
        inputs = {"tokenizer": tokenizer.fingerprint, "dataset": args.dataset, "root": args.root}
        reason = stages.stale_reason(name, inputs, folder / "meta.json", lambda: cache_id(folder))
        if reason is None:
            log(f"reusing {folder}")
            continue
        if folder.exists():  # write_token_cache replaces it whole, atomically, when the new cache is complete
            log(f"redoing {folder}: {reason}")
        dataset = build_dataset(args.dataset, split, image_size=tokenizer.image_size, channels=tokenizer.channels,
                                root=args.root)
        description = {"dataset": args.dataset, "split": split, "num_classes": dataset_info(args.dataset)["num_classes"]}
        write_token_cache(tokenizer, dataset, folder, description=description, progress=False,
                          tokenizer_folder=args.output / "tokenizer")
        stages.record(name, inputs, cache_id(folder))
        log(f"cached {len(dataset)} {split} token sequences in {folder}")


def generator_stage(args, stages: Stages) -> float:
    output = args.output
    overrides = [
        "--data.init_args.train", str(output / "tokens" / "train"),
        "--data.init_args.val", str(output / "tokens" / "test"),
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=flexar.train.SampleGrid",
        "--trainer.callbacks.tokenizer", str(output / "tokenizer"),
        "--trainer.callbacks.every_n_epochs", "5",
    ]
    # the generator reads both token caches and previews through the tokenizer
    inputs = {"tokens/train": cache_id(output / "tokens" / "train"), "tokens/test": cache_id(output / "tokens" / "test"),
              "tokenizer": model_id(output / "tokenizer")}
    return train(stages, "generator", args.generator_config, output / "runs" / "generator", output / "generator",
                 overrides + shlex.split(args.generator_args), inputs)


def classifier_stage(args, stages: Stages) -> float:
    extra = data_overrides(args.dataset, args.root) + shlex.split(args.classifier_args)
    return train(stages, "classifier", args.classifier_config, args.output / "runs" / "classifier",
                 args.output / "classifier", extra, inputs={})


def sample_stage(args, sampler) -> dict:
    """Always run: it is cheap, and its numbers must come from the models as they are now. `sampler`: what the
    sampling flags built (a sampler or a decoding strategy)."""
    from torchvision.utils import save_image

    from flexar import Pipeline
    from flexar.eval.fid import compute_metrics, reference_images
    from flexar.hub import load_model

    output = args.output
    # refuses a generator trained on another tokenizer's ids (its recorded provenance)
    pipe = Pipeline(load_model(output / "tokenizer"), load_model(output / "generator"))
    pipe.save_pretrained(output / "pipeline")
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
    from flexar.cli.common import ScriptParser, add_sampling_arguments

    parser = ScriptParser(prog="demo.py", description=__doc__)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--tokenizer-config", type=Path, default=ROOT / "configs" / "tokenizers" / "titok.yaml")
    parser.add_argument("--generator-config", type=Path, default=ROOT / "configs" / "generators" / "raster.yaml")
    parser.add_argument("--classifier-config", type=Path, default=ROOT / "configs" / "eval" / "classifier.yaml")
    parser.add_argument("--tokenizer-args", default="", help="extra flexar-train overrides, e.g. '--trainer.max_epochs=5'")
    parser.add_argument("--generator-args", default="", help="extra flexar-train overrides for the generator")
    parser.add_argument("--classifier-args", default="", help="extra flexar-train overrides for the FID classifier")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated images scored by FID")
    parser.add_argument("--reference-limit", type=int, default=None, help="test images in the FID reference (default all)")
    # the sampling flags of flexar-sample (CFG 2 by default), checked here, before minutes of training
    sampling = add_sampling_arguments(parser)
    args = parser.parse_args(argv)
    try:
        sampler = sampling.build(args)
    except (ValueError, TypeError) as error:
        parser.error(f"sampler: {error}")
    args.output = args.output.resolve()  # the same folder, however it is spelt, gives the same recorded recipes
    args.output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    stages = Stages(args.output)
    recon = tokenizer_stage(args, stages)
    tokens_stage(args, stages)
    generator_stage(args, stages)
    classifier_stage(args, stages)
    fid = sample_stage(args, sampler)
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
