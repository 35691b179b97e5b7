"""Training: thin LightningModules, rank-zero image callbacks and the LightningCLI entry point."""
from ..utils import to_uint8
from .callbacks import ReconstructionGrid, SampleGrid, save_grid
from .modules import GeneratorModule, TokenizerModule, warmup_cosine

__all__ = ["GeneratorModule", "ReconstructionGrid", "SampleGrid", "TokenizerModule", "save_grid", "to_uint8", "warmup_cosine"]
