"""One-D-Piece: TiTok with Tail Token Drop ("One-D-Piece: Image Tokenizer Meets Quality-Controllable Compression",
Miwa et al., 2025; turingmotors/One-D-Piece).

During training a kept count k ~ U{1, ..., K} is drawn and the decoder only sees the first k latent tokens, so the
information of an image is pushed toward the head of its sequence: any prefix decodes to an image, better with more
tokens. ``encode(images, num_tokens=k)`` keeps the first k ids; ``decode`` accepts any prefix. Everything else is
:class:`flexar.tokenizers.TiTok` (encoder, quantiser, decoder, losses).

Shapes: images (B, C, H, W) in [-1, 1]; ids (B, k) long with 1 <= k <= K = ``num_latent_tokens``.

Differences from the paper and its official code:
- dropped positions take TiTok's learned pad embedding in the decoder; the official code truncates the sequence,
  so the decoder attends to k latent tokens only. A learned constant in every dropped slot carries no information
  about the image, so the decoder sees the same evidence either way; the fixed-length input lets one batch mix
  lengths (``tail_drop_per_sample``) and keeps the decoder identical to TiTok's.
- ``tail_drop_per_sample`` (default False, the paper's one k per batch, as ``torch.randint(1, K + 1, (1,))`` in
  the official code) draws one k per image instead.
- single-stage pixel training, as flexar's TiTok (see its docstring); the paper fine-tunes TiTok's two-stage recipe.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..hub import register
from .titok import TiTok


def sample_kept_counts(batch_size: int, maximum: int, per_sample: bool, device=None, generator=None) -> Tensor:
    """k ~ U{1, ..., maximum}: (batch_size,) long, one draw shared by the batch unless ``per_sample``."""
    draws = batch_size if per_sample else 1
    counts = torch.randint(1, maximum + 1, (draws,), generator=generator, device=device)
    return counts.expand(batch_size).clone() if not per_sample else counts


@register
class OneDPiece(TiTok):
    """Flexible-length 1D tokenizer: TiTok trained with Tail Token Drop. See the module docstring."""

    presets = {
        # the paper's S/B/L-256: TiTok's ViT sizes with 256 tokens
        "onedpiece-s256": dict(TiTok.presets["titok-s"], num_latent_tokens=256),
        "onedpiece-b256": dict(TiTok.presets["titok-b"], num_latent_tokens=256),
        "onedpiece-l256": dict(TiTok.presets["titok-l"], num_latent_tokens=256),
        "onedpiece-digits": dict(TiTok.presets["titok-digits"], num_latent_tokens=16),
    }

    drops_tokens_in_training = True

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        patch_size: int = 4,
        num_latent_tokens: int = 32,
        width: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        mlp: str = "gelu",
        norm: str = "layer",
        quantizer: str = "vq",
        codebook_size: int = 1024,
        code_dim: int = 12,
        fsq_levels: list[int] | None = None,
        commitment: float = 0.25,
        dead_code_threshold: int = 0,
        reconstruction_loss: str = "l2",
        attention_backend: str = "auto",
        tail_drop: bool = True,
        tail_drop_per_sample: bool = False,
    ):
        super().__init__(
            image_size=image_size, channels=channels, patch_size=patch_size, num_latent_tokens=num_latent_tokens,
            width=width, depth=depth, num_heads=num_heads, decoder_width=decoder_width, decoder_depth=decoder_depth,
            mlp=mlp, norm=norm, quantizer=quantizer, codebook_size=codebook_size, code_dim=code_dim,
            fsq_levels=fsq_levels, commitment=commitment, dead_code_threshold=dead_code_threshold,
            reconstruction_loss=reconstruction_loss, attention_backend=attention_backend,
        )  # fmt: skip
        self.tail_drop = tail_drop
        self.tail_drop_per_sample = tail_drop_per_sample

    def sample_lengths(self, batch_size: int, device) -> Tensor | None:
        """Training: kept counts k ~ U{1..K} (B,); evaluation (or ``tail_drop=False``): None, all tokens kept."""
        if not (self.training and self.tail_drop):
            return None
        return sample_kept_counts(batch_size, self.max_tokens, self.tail_drop_per_sample, device)
