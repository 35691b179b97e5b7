"""``flexar-convert``: write a released checkpoint as a flexar ``save_pretrained`` folder.

    flexar-convert llamagen-gpt c2i_B_256.pt runs/released/llamagen-gpt-b --preset gpt-b
    flexar-convert llamagen-vq vq_ds16_c2i.pt runs/released/llamagen-vq16 --preset vq-16
    flexar-convert var vae_ch160v4096z32.pth runs/released/var-vqvae --preset vqvae
    flexar-convert var var_d16.pth runs/released/var-d16 --preset var-d16 --tokenizer runs/released/var-vqvae

The checkpoint is read safely (``.safetensors``, or a ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` pickle through
``torch.load(weights_only=True)`` only); every official key is consumed or deliberately ignored, and a missing or
unexpected key is an error naming it (see :mod:`flexar.convert`). Prints one JSON line: the folder, the class, the
preset, its parameter count and the folder's fingerprint. ``--list`` prints every format with its presets.
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    from flexar.convert import FORMATS

    parser = argparse.ArgumentParser(prog="flexar-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("format", nargs="?", choices=list(FORMATS), help="the official checkpoint's format")
    parser.add_argument("source", nargs="?", help="the official checkpoint file")
    parser.add_argument("output", nargs="?", help="the folder to write (config.json + model.safetensors)")
    parser.add_argument("--preset", default=None, help="the official size (default: the format's first; --list)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the image side the model was released for, where the format takes one (llamagen-gpt "
                             "and llamagen-vq at 384 px: --image-size 384)")
    parser.add_argument("--tokenizer", default=None,
                        help="a converted tokenizer folder whose codebook the generator reads (var: the VQVAE folder "
                             "for var-d* / mvar-d*)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder that already holds files")
    parser.add_argument("--list", action="store_true", help="print every format and its presets, and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from flexar.convert import FORMATS, convert, format_module

    if args.list:
        for name in FORMATS:
            print(f"{name}: {', '.join(format_module(name).PRESETS)}")
        return 0
    if args.output is None:
        parser.error("FORMAT, SOURCE and OUTPUT are required (or --list)")
    from flexar.hub import fingerprint, save_model
    from flexar.train.export import refuse_existing_output

    try:
        refuse_existing_output(args.output, args.overwrite)
        overrides = {name: value for name, value in (("image_size", args.image_size), ("tokenizer", args.tokenizer))
                     if value is not None}
        model = convert(args.format, args.source, args.preset, **overrides)
        folder = save_model(model, args.output)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError, TypeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"flexar-convert: error: {message}", file=sys.stderr)
        return 2
    preset = args.preset or next(iter(format_module(args.format).PRESETS))
    print(json.dumps({"output": str(folder), "class": type(model).__name__, "preset": preset,
                      "parameters": sum(p.numel() for p in model.parameters()), "fingerprint": fingerprint(folder)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
