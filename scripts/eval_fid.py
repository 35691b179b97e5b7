"""Sample N images from a pipeline and score FID / KID against a reference set with torch-fidelity.

    python scripts/eval_fid.py --pipeline runs/demo/pipeline --num-samples 1000 \
        --reference digits --extractor classifier:runs/demo/classifier --cfg-scale 2 --output runs/demo/fid.json

Reference: any flexar dataset name (digits, photos, mnist, cifar10, imagefolder:PATH) and --reference-split.
Extractor: `inception` (torch-fidelity's inception-v3-compat; offline with --inception-weights PATH) or
`classifier:PATH` (a flexar DigitClassifier, the usual choice for digits and MNIST).

Everything that can fail is checked before the first image is drawn: the counts, the sampler flags, the extractor
(its weights are loaded once, here) and the reference set. Sets of at most as many images as the extractor has
feature dimensions are scored with a warning (their covariance is singular, so FID is biased). The JSON records the
metrics, the batch size, the device and every sampling flag as given (``sampler_arguments``) beside the sampler
that they built (``sampler``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch


def count_at_least(minimum: int):
    """argparse type: an int >= minimum, with a message that names the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def sampler_argument_names() -> list[str]:
    """The destinations of every flag that ``add_sampler_arguments`` defines (recorded in the JSON)."""
    from flexar.sampling.arguments import add_sampler_arguments

    probe = argparse.ArgumentParser(add_help=False)
    add_sampler_arguments(probe)
    return sorted(vars(probe.parse_args([])))


def main(argv: list[str] | None = None) -> int:
    from flexar import Pipeline
    from flexar.eval.fid import SmallSetWarning, compute_metrics, load_extractor, reference_images, warn_small_sets
    from flexar.sampling.arguments import add_sampler_arguments, sampler_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="folder written by Pipeline.save_pretrained")
    parser.add_argument("--num-samples", type=count_at_least(2), default=1000, help="FID needs at least 2")
    parser.add_argument("--num-tokens", type=count_at_least(1), default=None,
                        help="tokens per image (flexible tokenizers)")
    parser.add_argument("--reference", default="digits")
    parser.add_argument("--reference-split", default="test", choices=["train", "test"])
    parser.add_argument("--reference-limit", type=count_at_least(2), default=None, help="first N reference images")
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--extractor", default="inception", help="inception or classifier:PATH")
    parser.add_argument("--inception-weights", default=None,
                        help="local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (offline use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=count_at_least(1), default=100, help="images per generation batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: print only)")
    parser.add_argument("--save-grid", type=Path, default=None, help="also save the first 64 samples as a PNG grid")
    add_sampler_arguments(parser)
    args = parser.parse_args(argv)

    try:
        sampler = sampler_from_args(args)
    except (ValueError, TypeError) as error:
        parser.error(f"sampler: {error}")
    try:
        extractor = load_extractor(args.extractor, args.inception_weights)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        parser.error(f"--extractor {args.extractor}: {error}")
    pipe = Pipeline.from_pretrained(args.pipeline, device=args.device)
    if args.num_tokens is not None and args.num_tokens > pipe.tokenizer.max_tokens:
        limit = pipe.tokenizer.max_tokens
        parser.error(f"--num-tokens {args.num_tokens}: the pipeline's tokenizer holds at most {limit}")
    try:
        reference = reference_images(args.reference, args.reference_split, pipe.tokenizer.image_size, args.root,
                                     args.reference_limit)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        parser.error(f"--reference {args.reference} (split {args.reference_split}): {error}")
    # before sampling, so that a run too small for its extractor is flagged at once, not after it is drawn
    warn_small_sets(args.num_samples, len(reference), extractor)

    labels = torch.arange(args.num_samples) % pipe.num_classes
    start = time.perf_counter()
    samples, stats = pipe.generate(labels, num_tokens=args.num_tokens, sampler=sampler, seed=args.seed,
                                   batch_size=args.batch_size, return_stats=True, progress=True)
    sample_seconds = time.perf_counter() - start
    if args.save_grid is not None:
        from torchvision.utils import save_image

        args.save_grid.parent.mkdir(parents=True, exist_ok=True)
        save_image(samples[:64].float() / 255, args.save_grid, nrow=8, padding=2, pad_value=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSetWarning)  # warned above already
        metrics = compute_metrics(samples, reference, extractor=extractor, device=args.device)
    result = {
        **metrics,
        "pipeline": str(args.pipeline),
        "reference": f"{args.reference}:{args.reference_split}",
        "reference_limit": args.reference_limit,
        "extractor_weights": extractor.source,
        "num_tokens": args.num_tokens,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": args.device,
        "sampler": sampler.to_dict(),
        "sampler_arguments": {name: getattr(args, name) for name in sampler_argument_names()},
        "forward_passes": stats["forward_passes"],
        "sample_seconds": round(sample_seconds, 2),
    }
    line = json.dumps(result)
    print(line)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
