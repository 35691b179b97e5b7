"""``flexar-sample``: generate images from a saved pipeline and write them as one PNG grid (and optionally one
file each).

    flexar-sample --pipeline runs/demo/pipeline --labels 0 1 2 3 --per-label 8

Writes the grid to runs/samples/PARENT-NAME.png for a pipeline folder PARENT/NAME (runs/demo/pipeline ->
runs/samples/demo-pipeline.png, under the current directory) unless ``--output`` names a file, and prints one JSON
line: the grid's path, the image count, the sampler and the generation stats. Sampling defaults to classifier-free
guidance 2 with the constant schedule (``--cfg-scale 1`` turns it off). The sampler flags are the constructor
arguments of flexar's samplers and decoding strategies (flexar/sampling/arguments.py), each listed by ``--help``:

    flexar-sample --pipeline runs/demo/pipeline --temperature 0.9 --top-k 8
    flexar-sample --pipeline runs/demo/pipeline --entropy-temperature --decoding scalingar --num-trajectories 4
    flexar-sample --pipeline runs/demo/pipeline --decoding lantern --draft runs/eagle_digits/head --delta 0.2

A draft (``--draft FOLDER``) is loaded with flexar.hub.load_model onto ``--device``. A pipeline of a flow generator
(xAR) samples with ``--flow-steps``, ``--flow-noise`` and ``--cfg-scale``:

    flexar-sample --pipeline runs/xar_digits/pipeline --flow-steps 20 --cfg-scale 2
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from flexar.cli.common import ScriptParser, add_flow_arguments, add_sampling_arguments, default_output, flow_sampler


def build_parser() -> ScriptParser:
    """The parser of ``flexar-sample``; ``parser.sampling`` (:class:`flexar.sampling.arguments.SamplingFlags`)
    builds the sampler from the parsed flags."""
    parser = ScriptParser(prog="flexar-sample", description=__doc__)
    parser.add_argument("--pipeline", required=True, help="folder written by Pipeline.save_pretrained")
    parser.add_argument("--labels", type=int, nargs="*", default=None, help="class labels (default: every class)")
    parser.add_argument("--per-label", type=int, default=8, help="images per label: one grid row each")
    parser.add_argument("--num-tokens", type=int, default=None, help="tokens per image (flexible tokenizers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None,
                        help="PNG grid (default: runs/samples/PARENT-NAME.png for the pipeline folder PARENT/NAME)")
    parser.add_argument("--individual", type=Path, default=None, help="also write one PNG per image into this folder")
    parser.sampling = add_sampling_arguments(parser)
    add_flow_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from torchvision.utils import save_image

    from flexar import Pipeline

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.per_label < 1:
        parser.error(f"--per-label must be an integer >= 1, got {args.per_label}")
    try:
        sampler = parser.sampling.build(args, device=args.device)
    except (ValueError, TypeError) as error:
        parser.error(f"sampler: {error}")
    output = args.output if args.output is not None else default_output("samples", args.pipeline, ".png")

    pipe = Pipeline.from_pretrained(args.pipeline, device=args.device)
    if pipe.continuous:
        try:
            sampler = flow_sampler(args, sampler)
        except ValueError as error:
            parser.error(f"sampler: {error}")
    classes = args.labels if args.labels else list(range(pipe.num_classes))
    labels = torch.tensor(classes).repeat_interleave(args.per_label)
    images, stats = pipe.generate(labels, num_tokens=args.num_tokens, sampler=sampler, seed=args.seed,
                                  return_stats=True, output_type="pt")
    output.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, output, nrow=args.per_label, padding=2, pad_value=1.0)
    if args.individual is not None:
        args.individual.mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels.tolist())):
            save_image(image, args.individual / f"{index:05d}_class{label}.png")
    print(json.dumps({"grid": str(output), "images": len(labels), "sampler": sampler.to_dict(), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
