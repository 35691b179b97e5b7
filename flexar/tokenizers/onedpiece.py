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
  lengths (``lengths_per_sample``) and keeps the decoder identical to TiTok's.
- ``lengths_per_sample`` (default False, the paper's one k per batch, as ``torch.randint(1, K + 1, (1,))`` in
  the official code) draws one k per image instead.

The constructor takes the two Tail Token Drop switches; every other keyword argument is TiTok's, forwarded to
:class:`flexar.tokenizers.TiTok` (and recorded in the saved config like the switches).
- single-stage pixel training, as flexar's TiTok (see its docstring); the paper fine-tunes TiTok's two-stage recipe.
"""
from __future__ import annotations

from torch import Tensor

from ..hub import register
from .base import sample_lengths
from .titok import PAPER_LAYOUT, VIT_SIZES, TiTok


@register
class OneDPiece(TiTok):
    """Flexible-length 1D tokenizer: TiTok trained with Tail Token Drop. See the module docstring."""

    presets = {
        # the paper's S/B/L-256 (turingmotors/One-D-Piece configs/one-d-piece_{s,b,l}256.yaml): TiTok's layout and
        # ViT sizes with 256 tokens
        "onedpiece-s256": dict(PAPER_LAYOUT, num_latent_tokens=256, **VIT_SIZES["small"]),
        "onedpiece-b256": dict(PAPER_LAYOUT, num_latent_tokens=256, **VIT_SIZES["base"]),
        "onedpiece-l256": dict(PAPER_LAYOUT, num_latent_tokens=256, **VIT_SIZES["large"]),
        "onedpiece-digits": dict(TiTok.presets["titok-digits"], num_latent_tokens=16),
    }

    drops_tokens_in_training = True

    def __init__(self, tail_drop: bool = True, lengths_per_sample: bool = False, **kwargs):
        """``tail_drop``: train on random prefixes (the paper's Tail Token Drop); ``lengths_per_sample``: one kept
        count per image instead of one per batch; ``kwargs``: :class:`~flexar.tokenizers.TiTok`'s arguments."""
        super().__init__(**kwargs)
        self.tail_drop = tail_drop
        self.lengths_per_sample = lengths_per_sample

    def sample_lengths(self, batch_size: int, device) -> Tensor | None:
        """Training: kept counts k ~ U{1..K} (B,); evaluation (or ``tail_drop=False``): None, all tokens kept."""
        if not (self.training and self.tail_drop):
            return None
        return sample_lengths(batch_size, self.max_tokens, per_sample=self.lengths_per_sample, device=device)
