"""Image tokenizers: one family per file, all keeping the interface of :class:`Tokenizer`."""
from .base import Encoded, Tokenizer
from .titok import TITOK_PRESETS, TiTok, titok_from_preset
from .flextok import FLEXTOK_PRESETS, FlexTok, flextok_from_preset
from .vae import VAE
from .losses import PatchDiscriminator, PerceptualLoss, ReconstructionLoss
from .onedpiece import ONEDPIECE_PRESETS, OneDPiece, onedpiece_from_preset
from .retok import RETOK_PRESETS, ReTok, retok_from_preset
from .vqgan2d import VQGAN2D, VQGAN2D_PRESETS
from .multiscale import MULTISCALE_PRESETS, MultiScaleResidualVQ, MultiScaleVQ
from .alit import ALIT, ALIT_PRESETS
from .karl import KARL, KARL_PRESETS

TOKENIZERS = {**TITOK_PRESETS, **FLEXTOK_PRESETS, **VQGAN2D_PRESETS, **ONEDPIECE_PRESETS, **RETOK_PRESETS, **MULTISCALE_PRESETS}

__all__ = ["Encoded", "Tokenizer", "TiTok", "TITOK_PRESETS", "TOKENIZERS", "titok_from_preset", "VQGAN2D", "VQGAN2D_PRESETS", "FlexTok", "FLEXTOK_PRESETS", "flextok_from_preset", "VAE",
           "OneDPiece", "ONEDPIECE_PRESETS", "onedpiece_from_preset", "ReTok", "RETOK_PRESETS", "retok_from_preset",
           "ReconstructionLoss", "PerceptualLoss", "PatchDiscriminator"]
__all__ += ["MultiScaleVQ", "MultiScaleResidualVQ", "MULTISCALE_PRESETS"]
