"""Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

FSQ projects each of the D latent channels onto a small fixed grid: channel d is bounded to L_d values with tanh and
rounded with a straight-through estimator. The implicit codebook is the product grid of size prod(L_d), so there is
no codebook to learn, no auxiliary loss and no collapse. FlexTok uses levels [8, 8, 8, 5, 5, 5] (64,000 codes).

This file also holds :class:`QuantizerOutput` and :func:`codebook_stats`, the return type and the batch statistics
that every quantizer in :mod:`flexar.quantizers` shares.

Departures from the paper's reference code (Appendix A):

- the bound's shift is ``atanh(offset / half_width)`` so that ``bound(0) == 0``; the listing writes ``tan``, which
  only approximates it (they agree to ~1e-4 for the paper's levels).
- the scale of the bound is ``(L - 1) * (1 + eps) / 2`` rather than ``(1 - eps)``: with ``(1 - eps)`` the shift's
  ``atanh`` argument exceeds 1 for L = 2, and the rounded range is the same for every L >= 2 either way.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    """What every quantizer returns.

    Attributes:
        codes: (..., D) quantised vectors, same shape as the input; the forward value is the code, the gradient is
            the straight-through gradient to the input.
        ids: (...) long code indices.
        loss: scalar auxiliary loss (codebook + commitment for VQ, zero for FSQ).
        logs: detached scalar tensors: ``usage`` (fraction of the codebook hit in this batch), ``perplexity``
            (exp of the entropy of the batch's code histogram), plus quantizer-specific terms.
    """

    codes: Tensor
    ids: Tensor
    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


def codebook_stats(ids: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage and perplexity of a batch of code ids.

    Args:
        ids: (...) long ids in [0, codebook_size).
        codebook_size: V.

    Returns:
        ``usage``: distinct ids / V; ``perplexity``: exp(-sum p log p) of the id histogram, between 1 and V.
    """
    counts = torch.bincount(ids.detach().reshape(-1), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class FSQ(nn.Module):
    """Finite Scalar Quantization with an implicit product-grid codebook.

    Channel d with L_d levels is bounded to (-(L_d - 1) / 2, (L_d - 1) / 2) by a tanh, shifted by half a step when
    L_d is even so that rounding reaches exactly L_d integers, rounded (straight-through), and divided by L_d // 2
    so that codes lie in [-1, 1] (even L_d gives the asymmetric grid {-1, ..., 1 - 2 / L_d}).
    Ids are the mixed-radix number of the per-channel level indices, channel 0 least significant.

    Args:
        levels: number of levels per channel; ``dim = len(levels)``, ``codebook_size = prod(levels)``.
    """

    def __init__(self, levels: list[int] = [8, 8, 8, 5, 5, 5]):
        super().__init__()
        levels = list(levels)
        if not levels or any(isinstance(level, bool) or not isinstance(level, numbers.Integral) for level in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of ints, got {levels!r}")
        levels = [int(level) for level in levels]
        if any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must each be >= 2 (a channel needs at least two values), got {levels}")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        basis = [math.prod(levels[:index]) for index in range(self.dim)]
        # Buffers (not Python lists) so they follow the module's device; not saved, the levels rebuild them.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"

    def _check_dim(self, z: Tensor) -> None:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"FSQ with levels {self.levels} expects inputs of shape (..., {self.dim}), got {tuple(z.shape)}"
            )

    def _half_width(self) -> Tensor:
        return (self._levels // 2).float()

    def bound(self, z: Tensor) -> Tensor:
        """Continuous pre-rounding values in integer-step units.

        Args:
            z: (..., D) unbounded latents.

        Returns:
            (..., D) float32; channel d lies in [-(L_d // 2), L_d // 2 - 1 + L_d % 2] widened by (L_d - 1) * 5e-4
            on each side, so rounding reaches each of the L_d integers of that range and no other.
        """
        self._check_dim(z)
        eps = 1e-3
        levels = self._levels.float()
        half_width = (levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 1, 0.0, 0.5)
        shift = torch.atanh(offset / half_width)
        return torch.tanh(z.float() + shift) * half_width - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise latents.

        Args:
            z: (..., D) latents, any float dtype; the grid arithmetic runs in float32.

        Returns:
            :class:`QuantizerOutput` with ``codes`` (..., D) in [-1, 1] (dtype of ``z``), ``ids`` (...) long, a zero
            ``loss`` and ``usage`` / ``perplexity`` logs.
        """
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        codes = rounded / self._half_width()
        ids = self.codes_to_ids(codes.detach())
        loss = torch.zeros((), device=z.device)
        logs = codebook_stats(ids, self.codebook_size)
        return QuantizerOutput(codes=codes.to(z.dtype), ids=ids, loss=loss, logs=logs)

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """(..., D) grid codes in [-1, 1] -> (...) long ids in [0, codebook_size)."""
        self._check_dim(codes)
        half_width = self._half_width()
        level_index = torch.round(codes.float() * half_width + half_width).long()
        return (level_index * self._basis).sum(dim=-1)

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """(...) long ids -> (..., D) float32 grid codes in [-1, 1]; the exact inverse of :meth:`codes_to_ids`."""
        level_index = (ids.long().unsqueeze(-1) // self._basis) % self._levels
        half_width = self._half_width()
        return (level_index.float() - half_width) / half_width

    def code_vectors(self) -> Tensor:
        """(V, D) every code, row i = ``ids_to_codes(i)``."""
        return self.ids_to_codes(torch.arange(self.codebook_size, device=self._levels.device))
