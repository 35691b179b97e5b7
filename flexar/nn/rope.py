"""Rotary position embeddings (RoFormer, Su et al. 2021) in 1D and 2D.

The 2D form splits each head's dimensions in two halves, rotating the first by the row index and the second by the
column index, as LlamaGen and NAR do for token grids. Positions are integer tensors; a position of -1 (on any axis
in 2D) means "no rotation", which the generators use for condition tokens that carry no spatial position.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for `axes` = 1 (sequence) or 2 (grid) rotary embeddings over `head_dim` dimensions."""

    def __init__(self, head_dim: int, axes: int = 1, base: float = 10000.0):
        super().__init__()
        if axes not in (1, 2):
            raise ValueError(f"axes must be 1 or 2, got {axes}")
        if head_dim % (2 * axes) != 0:
            raise ValueError(f"head_dim must be divisible by {2 * axes} for {axes}D rotary embeddings, got {head_dim}")
        self.head_dim = head_dim
        self.axes = axes
        self.base = base
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self, device=None) -> Tensor:
        """(head_dim / axes / 2,) float32 inverse frequencies, computed in float64."""
        axis_dim = self.head_dim // self.axes
        exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim
        return (1.0 / self.base ** exponents).float()

    def _apply(self, fn, recurse=True):
        # the tables stay float32 whatever the model's dtype: a bf16 copy of inv_freq would move the angles of far
        # positions by whole fractions of a turn (``model.to(torch.bfloat16)`` casts every floating buffer)
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = self.frequencies(self.inv_freq.device)
        return self

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (..., L) for 1D or (..., L, 2) for 2D -> (cos, sin), each (..., L, head_dim / 2) (a leading
        batch dimension gives every row its own positions, as a KV cache with rows of different lengths needs)."""
        positions = positions.to(self.inv_freq.device)
        if self.axes == 1:
            positions = positions.unsqueeze(-1)
        if positions.dim() < 2 or positions.shape[-1] != self.axes:
            raise ValueError(f"expected positions of shape (..., L, {self.axes}), got {tuple(positions.shape)}")
        angles = torch.cat([positions[..., i : i + 1].float() * self.inv_freq for i in range(self.axes)], dim=-1)
        off = (positions < 0).any(dim=-1, keepdim=True)
        cos = torch.where(off, torch.ones_like(angles), angles.cos())
        sin = torch.where(off, torch.zeros_like(angles), angles.sin())
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of the last dim. x: (B, H, L, D); cos, sin: (L, D/2) or (B, L, D/2)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def grid_positions(height: int, width: int, device=None) -> Tensor:
    """(height * width, 2) row/column indices of a grid in raster order."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack((rows, cols), dim=-1)
