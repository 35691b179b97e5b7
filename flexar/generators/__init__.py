"""Autoregressive generators: one family per file, all keeping the interface of :class:`Generator`."""
from .base import GenerationOutput, Generator
from .raster import RASTER_PRESETS, RasterAR

GENERATORS = {**RASTER_PRESETS}

__all__ = ["GENERATORS", "GenerationOutput", "Generator", "RASTER_PRESETS", "RasterAR"]
