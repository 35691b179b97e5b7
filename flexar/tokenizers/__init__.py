"""Image tokenizers: one family per file, all keeping the interface of :class:`Tokenizer`.

Every family class carries its named sizes in ``presets`` and builds one with ``from_preset(name, **overrides)``
(:class:`flexar.hub.Configurable`); :func:`flexar.hub.presets` lists them all.
"""
from .base import Encoded, Tokenizer
from .titok import TiTok
from .flextok import FlexTok
from .vae import VAE
from .losses import PatchDiscriminator, PerceptualLoss, ReconstructionLoss
from .onedpiece import OneDPiece
from .retok import ReTok
from .vqgan2d import VQGAN2D
from .llamagen_vq import LlamaGenVQ
from .multiscale import MultiScaleResidualVQ, MultiScaleVQ
from .alit import ALIT
from .karl import KARL

__all__ = ["Encoded", "Tokenizer", "TiTok", "VQGAN2D", "LlamaGenVQ", "FlexTok", "VAE", "OneDPiece", "ReTok",
           "MultiScaleVQ", "MultiScaleResidualVQ", "ALIT", "KARL", "ReconstructionLoss", "PerceptualLoss",
           "PatchDiscriminator"]
