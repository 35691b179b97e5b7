r"""``flexar-fid``: sample N images from a pipeline and score FID / KID against a reference set with torch-fidelity.

    flexar-fid --pipeline runs/demo/pipeline --num-samples 1000 --reference digits \
        --extractor classifier:runs/demo/classifier

Reference: any flexar dataset name (digits, photos, mnist, cifar10, imagefolder:PATH) and --reference-split.
Extractor (features FID compares):
- ``classifier`` (default): the flexar DigitClassifier saved in PIPELINE/classifier, the usual choice for digits
  and MNIST; offline. Without that folder the run stops and names the flags below.
- ``classifier:PATH``: a DigitClassifier folder (``flexar-train fit --config configs/eval/classifier.yaml``).
- ``inception``: torch-fidelity's inception-v3-compat; its weights download on first use, or come from
  ``--inception-weights PATH`` offline.

Everything that can fail is checked before the first image is drawn: the counts, the sampler flags, the extractor
(its weights are loaded once, here) and the reference set. Sets of at most as many images as the extractor has
feature dimensions are scored with a warning (their covariance is singular, so FID is biased). The JSON goes to
runs/fid/PARENT-NAME.json for a pipeline folder PARENT/NAME (under the current directory) unless ``--output`` names a
file, and is printed as one line; it records the metrics, the batch size, the device and every sampling flag as given
(``sampler_arguments``; None where a flag was not given and the constructor's default applies) beside the sampler
that they built (``sampler``). Sampling defaults to classifier-free guidance 2 with the constant schedule, as
``flexar-sample`` does; the sampler flags are the constructor arguments of flexar's samplers and decoding strategies
(flexar/sampling/arguments.py), each listed by ``--help``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from flexar.cli.common import ScriptParser, add_flow_arguments, add_sampling_arguments, default_output, flow_sampler

# the extractor used when none is named: a DigitClassifier saved inside the pipeline folder
PIPELINE_CLASSIFIER = "classifier"


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


def resolve_extractor(extractor: str, pipeline: str | Path) -> str:
    """``"classifier"`` -> ``"classifier:PIPELINE/classifier"``, refused with the flags to pass when that folder is
    missing; any other name is returned as given (``flexar.eval.fid.load_extractor`` checks it)."""
    if extractor != PIPELINE_CLASSIFIER:
        return extractor
    folder = Path(pipeline) / PIPELINE_CLASSIFIER
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the default extractor is the classifier saved in the pipeline folder, and {folder} does not exist: "
            "pass --extractor classifier:PATH (a DigitClassifier folder, exported by flexar-train fit --config "
            "configs/eval/classifier.yaml) or --extractor inception (torch-fidelity's Inception; offline "
            "with --inception-weights PATH)"
        )
    return f"classifier:{folder}"


def build_parser() -> ScriptParser:
    """The parser of ``flexar-fid``; ``parser.sampling`` (:class:`flexar.sampling.arguments.SamplingFlags`) builds
    the sampler from the parsed flags."""
    parser = ScriptParser(prog="flexar-fid", description=__doc__)
    parser.add_argument("--pipeline", required=True, help="folder written by Pipeline.save_pretrained")
    parser.add_argument("--num-samples", type=count_at_least(2), default=1000, help="FID needs at least 2")
    parser.add_argument("--num-tokens", type=count_at_least(1), default=None,
                        help="tokens per image (flexible tokenizers)")
    parser.add_argument("--reference", default="digits")
    parser.add_argument("--reference-split", default="test", choices=["train", "test"])
    parser.add_argument("--reference-limit", type=count_at_least(2), default=None, help="first N reference images")
    parser.add_argument("--root", default=None, help="dataset root (default: $FLEXAR_DATA)")
    parser.add_argument("--extractor", default=PIPELINE_CLASSIFIER,
                        help="classifier (PIPELINE/classifier, the default), classifier:PATH or inception")
    parser.add_argument("--inception-weights", default=None,
                        help="local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (offline use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=count_at_least(1), default=100, help="images per generation batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default: runs/fid/PARENT-NAME.json for the pipeline folder PARENT/NAME)")
    parser.add_argument("--save-grid", type=Path, default=None, help="also save the first 64 samples as a PNG grid")
    parser.sampling = add_sampling_arguments(parser)
    add_flow_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flexar import Pipeline
    from flexar.eval.fid import SmallSetWarning, compute_metrics, load_extractor, reference_images, warn_small_sets

    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        sampler = parser.sampling.build(args, device=args.device)
    except (ValueError, TypeError) as error:
        parser.error(f"sampler: {error}")
    if args.inception_weights is not None and args.extractor != "inception":
        parser.error(f"--inception-weights applies to --extractor inception only (the extractor is {args.extractor})")
    try:
        extractor = load_extractor(resolve_extractor(args.extractor, args.pipeline), args.inception_weights)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        parser.error(f"--extractor {args.extractor}: {error}")
    pipe = Pipeline.from_pretrained(args.pipeline, device=args.device)
    if pipe.continuous:  # a flow generator (xAR): --flow-steps, --flow-noise and --cfg-scale
        try:
            sampler = flow_sampler(args, sampler)
        except ValueError as error:
            parser.error(f"sampler: {error}")
        if args.num_tokens is not None:
            parser.error(f"--num-tokens {args.num_tokens}: {type(pipe.generator).__name__} generates whole latents")
    elif args.num_tokens is not None and args.num_tokens > pipe.tokenizer.max_tokens:
        limit = pipe.tokenizer.max_tokens
        parser.error(f"--num-tokens {args.num_tokens}: the pipeline's tokenizer holds at most {limit}")
    try:
        reference = reference_images(args.reference, args.reference_split, pipe.tokenizer.image_size, args.root,
                                     args.reference_limit)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        parser.error(f"--reference {args.reference} (split {args.reference_split}): {error}")
    # before sampling, so that a run too small for its extractor is flagged at once, not after it is drawn
    warn_small_sets(args.num_samples, len(reference), extractor)
    output = args.output if args.output is not None else default_output("fid", args.pipeline, ".json")

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
        "sampler_arguments": {name: getattr(args, name) for name in parser.sampling.names()},
        "forward_passes": stats["forward_passes"],
        "sample_seconds": round(sample_seconds, 2),
    }
    print(json.dumps(result))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
