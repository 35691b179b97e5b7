"""Embeddings of continuous scalars shared by the flow models (FlexTok's decoder, xAR)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(sigma: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Noise levels in [0, 1] of any shape (...) -> (..., dim) sinusoidal features of 1000 * sigma (DiT's timestep
    embedding, Peebles & Xie 2023; FlexTok's decoder and xAR's per-entity times use it)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    angles = 1000.0 * sigma.float()[..., None] * frequencies
    embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return F.pad(embedding, (0, dim % 2))
