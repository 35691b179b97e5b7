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
    add_decoding_arguments(parser)


def sampler_from_args(args: argparse.Namespace):
    sampler = Sampler(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_scale=args.cfg_scale,
        cfg_schedule=args.cfg_schedule,
    )
    return decoding_from_args(args, sampler)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of entropy-aware sampling and of the decoding strategies (speculative, LANTERN, ScalingAR)."""
    group = parser.add_argument_group("entropy-aware sampling (arXiv 2510.09012)")
    group.add_argument("--entropy-temperature", action="store_true", help="T = T0 (a exp(-H/b) + c), T0 = --temperature")
    group.add_argument("--entropy-a", type=float, default=2.5)
    group.add_argument("--entropy-b", type=float, default=3.0)
    group.add_argument("--entropy-c", type=float, default=0.6)
    group.add_argument("--entropy-top-k", action="store_true", help="keep k(H) tokens, k growing with the entropy")
    group.add_argument("--top-k-min", type=int, default=16)
    group.add_argument("--top-k-max", type=int, default=0, help="0 = vocabulary")
    group = parser.add_argument_group("decoding strategy")
    group.add_argument("--decoding", default="sample", choices=DECODINGS)
    group.add_argument("--draft", default=None, help="speculative / lantern: folder of a draft generator or EAGLE head")
    group.add_argument("--draft-length", type=int, default=5)
    group.add_argument("--lantern-k", type=int, default=1000)
    group.add_argument("--lantern-delta", type=float, default=0.1)
    group.add_argument("--lantern-lambda", type=float, default=None, help="LANTERN++ lambda (replaces delta)")
    group.add_argument("--lantern-rejection", default="exact", choices=("exact", "official"))
    group.add_argument("--num-trajectories", type=int, default=4, help="scalingar / best_of_n: N per label")
    group.add_argument("--entropy-weight", type=float, default=0.5)
    group.add_argument("--condition-weight", type=float, default=0.3)
    group.add_argument("--no-termination", action="store_true", help="scalingar: never terminate trajectories")
    group.add_argument("--threshold", type=float, default=0.97, help="scalingar: relative confidence threshold")
    group.add_argument("--checkpoints", type=float, nargs="+", default=[0.25, 0.5])
    group.add_argument("--guidance-gain", type=float, default=0.25)
    group.add_argument("--guidance-phase", type=float, default=0.5)


DECODINGS = ("sample", "speculative", "lantern", "scalingar", "best_of_n")


def decoding_from_args(args: argparse.Namespace, sampler: Sampler):
    """Wrap `sampler` as the flags ask: entropy-aware sampler, then a decoding strategy (or the sampler itself)."""
    from .entropy import EntropySampler

    if getattr(args, "entropy_temperature", False) or getattr(args, "entropy_top_k", False):
        sampler = EntropySampler(
            **sampler.to_dict(), entropy_temperature=args.entropy_temperature, entropy_a=args.entropy_a,
            entropy_b=args.entropy_b, entropy_c=args.entropy_c, entropy_top_k=args.entropy_top_k,
            top_k_min=args.top_k_min, top_k_max=args.top_k_max,
        )
    decoding = getattr(args, "decoding", "sample")
    if decoding in ("speculative", "lantern") and not args.draft:
        raise ValueError(f"--decoding {decoding} needs --draft FOLDER (a draft generator or an EAGLE head)")
    if decoding == "speculative":
        from .speculative import SpeculativeDecoder

        return SpeculativeDecoder(args.draft, sampler, args.draft_length)
    if decoding == "lantern":
        from .lantern import LanternDecoder

        return LanternDecoder(args.draft, sampler, args.draft_length, k=args.lantern_k, delta=args.lantern_delta,
                              lam=args.lantern_lambda, rejection=args.lantern_rejection)
    if decoding == "scalingar":
        from .scalingar import ScalingAR

        return ScalingAR(sampler, args.num_trajectories, args.entropy_weight, args.condition_weight,
                         terminate=not args.no_termination, threshold=args.threshold, checkpoints=args.checkpoints,
                         guidance_gain=args.guidance_gain, guidance_phase=args.guidance_phase)
    if decoding == "best_of_n":
        from .scalingar import BestOfN

        return BestOfN(sampler, args.num_trajectories, args.entropy_weight, args.condition_weight)
    return sampler
