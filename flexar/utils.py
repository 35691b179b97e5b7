"""Small helpers shared across flexar's layers; this module imports nothing from flexar, so any layer may use it."""
from __future__ import annotations

import torch
from torch import Tensor

# targets at this index add nothing to a cross-entropy loss (``F.cross_entropy``'s ``ignore_index`` default)
IGNORE_INDEX = -100


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) float in [-1, 1] -> uint8 in [0, 255]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(mse: Tensor) -> Tensor:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2), from their mean squared error."""
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
