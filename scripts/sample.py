"""Generate images from a saved pipeline and write them as one PNG grid (and optionally one file each).

    python scripts/sample.py --pipeline runs/demo/pipeline --labels 0 1 2 3 --per-label 8 --cfg-scale 2 --output grid.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image


def main(argv: list[str] | None = None) -> int:
    from flexar import Pipeline
    from flexar.sampling.arguments import add_sampler_arguments, sampler_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--labels", type=int, nargs="*", default=None, help="class labels (default: every class)")
    parser.add_argument("--per-label", type=int, default=8)
    parser.add_argument("--num-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("samples.png"))
    parser.add_argument("--individual", type=Path, default=None, help="folder for one PNG per image")
    add_sampler_arguments(parser)
    args = parser.parse_args(argv)

    pipe = Pipeline.from_pretrained(args.pipeline, device=args.device)
    classes = args.labels if args.labels else list(range(pipe.num_classes))
    labels = torch.tensor(classes).repeat_interleave(args.per_label)
    sampler = sampler_from_args(args)
    images, stats = pipe.generate(labels, num_tokens=args.num_tokens, sampler=sampler, seed=args.seed, return_stats=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float() / 255, args.output, nrow=args.per_label, padding=2, pad_value=1.0)
    if args.individual is not None:
        args.individual.mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels.tolist())):
            save_image(image.float() / 255, args.individual / f"{index:05d}_class{label}.png")
    print(json.dumps({"grid": str(args.output), "images": len(labels), "sampler": sampler.to_dict(), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
