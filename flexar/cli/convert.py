"""``flexar-convert``: write a released checkpoint as a flexar ``save_pretrained`` folder.

    flexar-convert llamagen-gpt c2i_B_256.pt runs/released/llamagen-gpt-b --preset gpt-b
    flexar-convert llamagen-vq vq_ds16_c2i.pt runs/released/llamagen-vq16 --preset vq-16

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
        model = convert(args.format, args.source, args.preset)
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
