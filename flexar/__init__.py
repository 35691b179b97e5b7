"""flexar: autoregressive image generation with adaptive 1D tokenizers."""
from .hub import load_model, registered
from .pipeline import Pipeline

__version__ = "0.1.0"

__all__ = ["Pipeline", "load_model", "registered", "__version__"]
