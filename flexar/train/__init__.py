"""Training: thin LightningModules, rank-zero image callbacks and the LightningCLI entry point."""
from .callbacks import ReconstructionGrid, save_grid, to_uint8
from .modules import TokenizerModule, warmup_cosine

__all__ = ["ReconstructionGrid", "TokenizerModule", "save_grid", "to_uint8", "warmup_cosine"]
