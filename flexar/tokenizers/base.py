"""The interface every tokenizer keeps (see DESIGN.md).

- ``encode(images (B, C, H, W) in [-1, 1], num_tokens=None) -> Encoded(ids (B, L) long, lengths (B,) long)``
- ``decode(ids (B, L), lengths=None) -> images (B, C, H, W)``
- ``training_loss(images) -> (loss, logs)``: the family's objective (the LightningModule only optimises it)
- attributes ``codebook_size``, ``max_tokens``, ``grid`` (None for 1D), ``image_size``, ``channels``
- ``code_vectors() -> (V, D)``: the embedding of every id, for samplers that need token geometry (LANTERN)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..hub import Configurable, PretrainedMixin


@dataclass
class Encoded:
    """ids: (B, L) long; lengths: (B,) long, the number of valid tokens of each row (ids past it are padding)."""

    ids: Tensor
    lengths: Tensor


class Tokenizer(Configurable, PretrainedMixin, nn.Module):
    codebook_size: int
    max_tokens: int
    grid = None
    image_size: int
    channels: int

    def check_images(self, images: Tensor) -> None:
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")

    def check_num_tokens(self, num_tokens: int | None) -> int:
        if num_tokens is None:
            return self.max_tokens
        if not isinstance(num_tokens, int) or not 1 <= num_tokens <= self.max_tokens:
            raise ValueError(f"num_tokens must be an int in [1, {self.max_tokens}], got {num_tokens!r}")
        return num_tokens

    def check_ids(self, ids: Tensor, lengths: Tensor | None) -> Tensor:
        """Validate ids and return per-row lengths (B,)."""
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids must be a (B, L) long tensor, got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.max_tokens:
            raise ValueError(f"got {ids.shape[1]} tokens per image; {type(self).__name__} holds at most {self.max_tokens}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got [{ids.min()}, {ids.max()}]")
        if lengths is None:
            return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        return lengths.to(ids.device).long()

    @torch.no_grad()
    def reconstruct(self, images: Tensor, num_tokens: int | None = None) -> Tensor:
        encoded = self.encode(images, num_tokens)
        return self.decode(encoded.ids, encoded.lengths)
