"""Quantizers: map continuous latents (..., D) to discrete codes and ids, returning a :class:`QuantizerOutput`.

- :class:`FSQ`: finite scalar quantization, an implicit product-grid codebook (Mentzer et al. 2023).
- :class:`VQ`: learned codebook, optionally l2-normalised, with dead-code restarts (van den Oord et al. 2017).
"""
from flexar.quantizers.fsq import FSQ, QuantizerOutput, codebook_stats
from flexar.quantizers.vq import VQ

__all__ = ["FSQ", "VQ", "QuantizerOutput", "codebook_stats"]
