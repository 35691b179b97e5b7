"""Autoregressive generators: one family per file, all keeping the interface of :class:`Generator`.

Every family class carries its own size presets (``RasterAR.presets``, built with ``RasterAR.from_preset(name,
**overrides)``); ``flexar.hub.presets(Generator)`` lists them all.
"""
from .base import GenerationOutput, Generator, StepDecoding
from .raster import RasterAR
from .nar import NAR
from .npp import NPP
from .token_shuffle import TokenShuffleAR
from .eagle import EagleDraftHead
from .var import VAR
from .mvar import MVAR
from .xar import XAR

__all__ = ["GenerationOutput", "Generator", "StepDecoding", "RasterAR", "NAR", "NPP", "TokenShuffleAR",
           "EagleDraftHead", "VAR", "MVAR", "XAR"]
