"""What the sampling and FID console scripts share: where outputs go by default, and the sampler defaults."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

# outputs go under runs/ of the current directory (git-ignored), never loose in the directory itself
RUNS = Path("runs")

# classifier-free guidance of the README's quick start and of every FID the README reports (constant schedule)
CFG_SCALE = 2.0


def run_name(pipeline: str | os.PathLike) -> str:
    """A file stem naming a pipeline folder by its last two path parts: runs/demo/pipeline -> "demo-pipeline"."""
    folder = Path(pipeline).resolve()
    return "-".join(part for part in (folder.parent.name, folder.name) if part) or "pipeline"


def default_output(kind: str, pipeline: str | os.PathLike, suffix: str) -> Path:
    """runs/<kind>/<run_name(pipeline)><suffix>, e.g. runs/samples/demo-pipeline.png."""
    return RUNS / kind / f"{run_name(pipeline)}{suffix}"


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampler and decoding-strategy flags, with the scripts' shared defaults (``--cfg-scale`` ``CFG_SCALE``)."""
    from flexar.sampling.arguments import add_sampler_arguments

    add_sampler_arguments(parser)
    parser.set_defaults(cfg_scale=CFG_SCALE)
