"""Sample N images from a pipeline and score FID / KID against a reference set with torch-fidelity.

    python scripts/eval_fid.py --pipeline runs/demo/pipeline --num-samples 1000 \
        --reference digits --extractor classifier:runs/demo/classifier --cfg-scale 2 --output runs/demo/fid.json

Reference: any flexar dataset name (digits, photos, mnist, cifar10, imagefolder:PATH) and --reference-split.
Extractor: `inception` (torch-fidelity's inception-v3-compat; offline with --inception-weights PATH) or
`classifier:PATH` (a flexar DigitClassifier, the usual choice for digits and MNIST).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from flexar import Pipeline
    from flexar.eval.fid import compute_metrics, reference_images
    from flexar.sampling.arguments import add_sampler_arguments, sampler_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="folder written by Pipeline.save_pretrained")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-tokens", type=int, default=None, help="tokens per image (flexible tokenizers)")
    parser.add_argument("--reference", default="digits")
    parser.add_argument("--reference-split", default="test", choices=["train", "test"])
    parser.add_argument("--reference-limit", type=int, default=None)
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--extractor", default="inception", help="inception or classifier:PATH")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: print only)")
    parser.add_argument("--save-grid", type=Path, default=None, help="also save the first 64 samples as a PNG grid")
    add_sampler_arguments(parser)
    args = parser.parse_args(argv)

    sampler = sampler_from_args(args)
    pipe = Pipeline.from_pretrained(args.pipeline, device=args.device)
    labels = torch.arange(args.num_samples) % pipe.num_classes
    start = time.perf_counter()
    samples, stats = pipe.generate(labels, num_tokens=args.num_tokens, sampler=sampler, seed=args.seed,
                                   batch_size=args.batch_size, return_stats=True, progress=True)
    sample_seconds = time.perf_counter() - start
    if args.save_grid is not None:
        from torchvision.utils import save_image

        args.save_grid.parent.mkdir(parents=True, exist_ok=True)
        save_image(samples[:64].float() / 255, args.save_grid, nrow=8, padding=2, pad_value=1.0)
    reference = reference_images(args.reference, args.reference_split, pipe.tokenizer.image_size, args.root, args.reference_limit)
    metrics = compute_metrics(samples, reference, extractor=args.extractor, inception_weights=args.inception_weights,
                              device=args.device)
    result = {
        **metrics,
        "pipeline": str(args.pipeline),
        "reference": f"{args.reference}:{args.reference_split}",
        "num_tokens": args.num_tokens,
        "seed": args.seed,
        "sampler": sampler.to_dict(),
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
