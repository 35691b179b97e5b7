"""Convert LPIPS's calibrated VGG16 linear heads (Zhang et al. 2018, version 0.1) to the safetensors file flexar ships.

    pip download --no-deps lpips==0.1.4 -d /tmp/lpips
    python scripts/convert_lpips.py /tmp/lpips/lpips-0.1.4-py3-none-any.whl

The lpips wheel holds the heads as a pickled state dict (``lpips/weights/v0.1/vgg.pth``: ``lin{l}.model.1.weight``,
shape (1, C_l, 1, 1), for the five VGG16 taps). This reads that member straight from the wheel (a zip) with the
restricted ``torch.load(weights_only=True)``, checks the five shapes and that every weight is non-negative (LPIPS
clamps them during calibration), and writes ``head0`` ... ``head4`` of shape (C_l,) with the source's sha256 in the
file's metadata. The heads are BSD-2-Clause (the lpips package's licence, kept beside the file as LICENSE.lpips).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

MEMBER = "lpips/weights/v0.1/vgg.pth"
CHANNELS = (64, 128, 256, 512, 512)  # VGG16 at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "flexar" / "tokenizers" / "weights" / "lpips_vgg_lin.safetensors"


def read_heads(source: Path) -> tuple[dict[str, torch.Tensor], str, str]:
    """Heads (C_l,) from an lpips wheel or from the extracted vgg.pth; also the source name and its sha256."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            if MEMBER not in wheel.namelist():
                raise ValueError(f"{source} has no {MEMBER}; is it an lpips wheel?")
            payload = wheel.read(MEMBER)
        name = f"{source.name}:{MEMBER}"
    else:
        payload = source.read_bytes()
        name = source.name
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{name} is not a plain state dict of tensors: {error}") from error
    heads = {}
    for layer, channels in enumerate(CHANNELS):
        key = f"lin{layer}.model.1.weight"
        if key not in state or tuple(state[key].shape) != (1, channels, 1, 1):
            found = tuple(state[key].shape) if key in state else "missing"
            raise ValueError(f"{name}: {key} must have shape (1, {channels}, 1, 1), found {found}")
        weight = state[key].float().flatten().contiguous()
        if weight.min() < 0:
            raise ValueError(f"{name}: {key} has negative weights; LPIPS's heads are non-negative")
        heads[f"head{layer}"] = weight
    return heads, name, hashlib.sha256(payload).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="lpips wheel (.whl) or its lpips/weights/v0.1/vgg.pth")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(f"{args.source} does not exist")
    heads, name, digest = read_heads(args.source)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"source": name, "source_sha256": digest, "version": "0.1", "network": "vgg16",
                "license": "BSD-2-Clause, Copyright (c) 2018 Richard Zhang, Phillip Isola, Alexei A. Efros, "
                           "Eli Shechtman, Oliver Wang"}  # fmt: skip
    save_file(heads, str(args.output), metadata=metadata)
    sums = ", ".join(f"{value.sum():.3f}" for value in heads.values())
    print(f"wrote {args.output} from {name} (sha256 {digest[:16]}...); per-layer weight sums {sums}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
