"""``flexar-export``: write the model of a Lightning checkpoint as a ``save_pretrained`` folder.

    flexar-export runs/titok/lightning_logs/version_0/checkpoints/epoch=9-step=2350.ckpt runs/titok/best

Any checkpoint of ``flexar-train fit`` (a ``TokenizerModule`` or ``GeneratorModule``: the best one a
``ModelCheckpoint`` kept, a mid-epoch one) becomes the folder that ``flexar.hub.load_model``,
``Tokenizer.from_pretrained`` and ``flexar.Pipeline`` read: the EMA weights when the run kept an EMA (``--trained``
takes the trained weights instead), with the generator's provenance (the fingerprint of the tokenizer whose token
cache it trained on). The folder equals the one the run itself would have exported at that step. The checkpoint is
read with ``torch.load(weights_only=True)`` and the model class must be a registered flexar class, so a checkpoint
never runs code. Prints one JSON line: the folder, the class, the weights taken and the folder's fingerprint.
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexar-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("checkpoint", help="a .ckpt written while fitting a TokenizerModule or GeneratorModule")
    parser.add_argument("output", help="the folder to write (config.json + model.safetensors)")
    parser.add_argument("--trained", action="store_true", help="export the trained weights, not the EMA weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder that already holds files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flexar.hub import fingerprint, read_config
    from flexar.train.export import export_loaded, read_checkpoint, refuse_existing_output

    try:
        refuse_existing_output(args.output, args.overwrite)
        folder, weights = export_loaded(read_checkpoint(args.checkpoint), args.checkpoint, args.output,
                                        ema=not args.trained)
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as error:
        print(f"flexar-export: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(folder), "class": read_config(folder)["class"], "weights": weights,
                      "fingerprint": fingerprint(folder)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
