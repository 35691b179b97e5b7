"""Autoregressive generators: one family per file, all keeping the interface of :class:`Generator`."""
from .base import GenerationOutput, Generator
from .raster import RASTER_PRESETS, RasterAR
from .nar import NAR, NAR_PRESETS
from .npp import NPP, NPP_PRESETS
from .token_shuffle import TOKEN_SHUFFLE_PRESETS, TokenShuffleAR
from .eagle import EagleDraftHead
from .var import VAR, VAR_PRESETS
from .mvar import MVAR, MVAR_PRESETS

GENERATORS = {**RASTER_PRESETS, **NAR_PRESETS, **NPP_PRESETS, **TOKEN_SHUFFLE_PRESETS, **VAR_PRESETS, **MVAR_PRESETS}

__all__ = ["GENERATORS", "GenerationOutput", "Generator", "RASTER_PRESETS", "RasterAR", "NAR", "NAR_PRESETS", "NPP", "NPP_PRESETS"]
__all__ += ["TOKEN_SHUFFLE_PRESETS", "TokenShuffleAR", "EagleDraftHead"]
__all__ += ["VAR", "VAR_PRESETS", "MVAR", "MVAR_PRESETS"]
