"""What the sampling and FID console scripts share: their parser, where outputs go by default, and the sampler
defaults."""
from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path

import jsonargparse

from flexar.sampling.arguments import SamplingFlags

# outputs go under runs/ of the current directory (git-ignored), never loose in the directory itself
RUNS = Path("runs")

# classifier-free guidance of the README's quick start and of every FID the README reports (constant schedule)
CFG_SCALE = 2.0

_UNRECOGNIZED = "unrecognized arguments: "


def run_name(pipeline: str | os.PathLike) -> str:
    """A file stem naming a pipeline folder by its last two path parts: runs/demo/pipeline -> "demo-pipeline"."""
    folder = Path(pipeline).resolve()
    return "-".join(part for part in (folder.parent.name, folder.name) if part) or "pipeline"


def default_output(kind: str, pipeline: str | os.PathLike, suffix: str) -> Path:
    """runs/<kind>/<run_name(pipeline)><suffix>, e.g. runs/samples/demo-pipeline.png."""
    return RUNS / kind / f"{run_name(pipeline)}{suffix}"


class ScriptParser(jsonargparse.ArgumentParser):
    """jsonargparse's parser as the scripts use it: the module docstring kept as written, no abbreviated options
    (``--top`` would be ambiguous between ``--top-k`` and ``--top-p``, and an abbreviation breaks when a flag is
    added), and an unknown flag answered with the closest known ones."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if message.startswith(_UNRECOGNIZED):
            known = [option for option in self._option_string_actions if option.startswith("--")]
            for argument in message[len(_UNRECOGNIZED):].split():
                if argument.startswith("--"):
                    name = argument.split("=", 1)[0]
                    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
                    hint = f"did you mean {' or '.join(close)}?" if close else "no flag is close; see --help"
                    message += f"\n  {name}: {hint}"
        return super().error(message, ex)


def add_sampling_arguments(parser: jsonargparse.ArgumentParser) -> SamplingFlags:
    """The sampler and decoding-strategy flags (read from their constructors, see :mod:`flexar.sampling.arguments`),
    with the scripts' shared default ``--cfg-scale`` ``CFG_SCALE``. Returns the flags, whose ``build`` makes the
    sampler."""
    flags = SamplingFlags(defaults={"cfg_scale": CFG_SCALE})
    flags.add_to(parser)
    return flags


def add_flow_arguments(parser: jsonargparse.ArgumentParser) -> None:
    """The flags of :class:`flexar.sampling.FlowSampler` (``--flow-steps``, ``--flow-noise``), for pipelines of a flow
    generator (xAR); :func:`flow_sampler` builds it."""
    flow = parser.add_argument_group("flow sampler", "for a pipeline of a flow generator over continuous latents (xAR); "
                                     "--cfg-scale sets its guidance, the token sampler's other flags do not apply")
    flow.add_argument("--flow-steps", type=int, default=40, help="integrator steps (network calls) per entity")
    flow.add_argument("--flow-noise", type=bool, default=True,
                      help="Euler-Maruyama on the reverse SDE (true) or Euler on the ODE (false)")


def flow_sampler(args, token_sampler):
    """The :class:`flexar.sampling.FlowSampler` of a flow pipeline, from ``--flow-steps``, ``--flow-noise`` and
    ``--cfg-scale``; a token sampler's own settings (temperature, top-k / top-p, a decoding strategy) are refused."""
    import inspect

    from flexar.sampling import FlowSampler, Sampler

    if type(token_sampler) is not Sampler:
        raise ValueError(f"a flow generator samples with a FlowSampler; {type(token_sampler).__name__} (--decoding, "
                         "--entropy-temperature) applies to logits")
    settings = token_sampler.to_dict()
    defaults = inspect.signature(Sampler).parameters
    changed = [name for name in ("temperature", "top_k", "top_p") if settings[name] != defaults[name].default]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ValueError(f"{flags} act on logits, which a flow generator has none of: use --flow-steps, "
                         "--flow-noise and --cfg-scale")
    return FlowSampler(steps=args.flow_steps, cfg_scale=settings["cfg_scale"], noise=args.flow_noise)
