"""Image tokenizers: one family per file, all keeping the interface of :class:`Tokenizer`."""
from .base import Encoded, Tokenizer
from .titok import TITOK_PRESETS, TiTok, titok_from_preset

TOKENIZERS = {**TITOK_PRESETS}

__all__ = ["Encoded", "Tokenizer", "TiTok", "TITOK_PRESETS", "TOKENIZERS", "titok_from_preset"]
