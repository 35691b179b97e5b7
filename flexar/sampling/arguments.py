"""Command-line flags for samplers, shared by scripts/sample.py and scripts/eval_fid.py."""
from __future__ import annotations

import argparse

from .sampler import Sampler


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=0, help="0 = off")
    group.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    group.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    group.add_argument("--cfg-schedule", default="constant", help="constant or linear (ramp from 1)")


def sampler_from_args(args: argparse.Namespace) -> Sampler:
    return Sampler(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_scale=args.cfg_scale,
        cfg_schedule=args.cfg_schedule,
    )
