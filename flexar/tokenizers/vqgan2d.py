"""A 2D grid tokenizer in the style of VQGAN ("Taming Transformers for High-Resolution Image Synthesis", Esser et al.,
CVPR 2021; CompVis/taming-transformers, taming/modules/diffusionmodules/model.py), with the l2-normalised codebook of
ViT-VQGAN / LlamaGen's VQ tokenizer (Yu et al. 2022; Sun et al. 2024).

Encoder: a 3x3 conv stem, then one level per entry of ``channel_multipliers`` with ``num_res_blocks`` residual blocks
(GroupNorm, SiLU, 3x3 conv, twice) at ``width * multiplier`` channels, a stride-2 conv between consecutive levels, two
residual blocks at the bottom, GroupNorm + SiLU and a 3x3 conv to ``code_dim``. The decoder mirrors it with
nearest-neighbour 2x upsampling + 3x3 conv between levels. ``downsample`` = 2 ** (levels - 1) (f4, f8, f16 ...).

Each of the (H / f) x (W / f) latent vectors is quantised by :class:`flexar.quantizers.VQ` (cosine lookup, straight-
through gradients, commitment loss); the ids are read in raster order (row by row), so ``grid = (h, w)`` and
``max_tokens = h * w``, which is what the 2D generators (raster, NAR, NPP) model.

Shapes: images (B, C, H, W) in [-1, 1]; latents (B, code_dim, h, w); ids (B, h * w) long in raster order.

Differences from taming's VQGAN and LlamaGen's VQ:
- no self-attention blocks in the encoder/decoder (taming puts one in the mid block and at the lowest resolutions):
  at the grids used here (4x4 to 16x16 latents of digits) convolutions already cover the whole latent.
- no quant_conv / post_quant_conv 1x1 layers: the encoder's last conv outputs ``code_dim`` channels directly and the
  decoder's first conv reads them (the two 1x1 convs compose with these into the same function class).
- by default the objective is reconstruction (L2 or L1) + codebook + beta * commitment. VQGAN's perceptual and
  PatchGAN terms come from :class:`flexar.tokenizers.losses.ReconstructionLoss` when it is passed as ``criterion``
  (TokenizerModule's ``loss``), with VQGAN's adaptive weight taken at the decoder's last conv; the perceptual term
  needs local VGG16 weights (nothing is downloaded), and on grayscale digits the pixel loss alone reconstructs well.
- encoding is always the full grid: a raster prefix of a 2D grid is not a coarser image, so ``num_tokens`` must be
  None or ``max_tokens`` and ``decode`` needs all h * w ids.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from ..quantizers import VQ
from .base import Encoded, Tokenizer


def group_norm(channels: int) -> nn.GroupNorm:
    # taming uses 32 groups; narrow CPU-sized layers take the largest divisor of their width that is <= 32
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W): two GroupNorm-SiLU-conv layers and a (1x1 projected) skip connection."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(B, channels, H, W) -> (B, code_dim, H / f, W / f) with f = 2 ** (len(multipliers) - 1)."""

    def __init__(self, channels: int, width: int, multipliers: list[int], num_res_blocks: int, code_dim: int):
        super().__init__()
        widths = [width * m for m in multipliers]
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        current = widths[0]
        for level, level_width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(current, level_width))
                current = level_width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
        layers += [ResBlock(current, current), ResBlock(current, current), group_norm(current), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(current, code_dim, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(self.stem(images)))


class Decoder(nn.Module):
    """(B, code_dim, h, w) -> (B, channels, h * f, w * f); the mirror image of :class:`Encoder`."""

    def __init__(self, channels: int, width: int, multipliers: list[int], num_res_blocks: int, code_dim: int):
        super().__init__()
        widths = [width * m for m in multipliers][::-1]
        current = widths[0]
        self.stem = nn.Conv2d(code_dim, current, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(current, current), ResBlock(current, current)]
        for level, level_width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(current, level_width))
                current = level_width
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(current, current, 3, padding=1)]
        layers += [group_norm(current), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(current, channels, 3, padding=1)

    def forward(self, codes: Tensor) -> Tensor:
        return self.head(self.body(self.stem(codes)))


class GridVQ(Tokenizer):
    """What every convolutional VQ tokenizer of a whole 2D grid shares (:class:`VQGAN2D`, LlamaGen's
    :class:`~flexar.tokenizers.LlamaGenVQ`): ``encode`` / ``decode`` of the whole grid in raster order through
    ``self.quantizer`` (a :class:`flexar.quantizers.VQ`), ``code_vectors`` and the reconstruction objective. A
    subclass provides ``encode_latents(images) -> (B, h * w, code_dim)``, ``decode_codes(codes) -> images``,
    ``last_layer()`` (the decoder's last weight, for the adaptive GAN weight) and the attributes ``grid``,
    ``code_dim`` and ``reconstruction_loss`` ("l2" or "l1")."""

    takes_criterion = True

    def check_num_tokens(self, num_tokens: int | None) -> int:
        count = super().check_num_tokens(num_tokens)
        if count != self.max_tokens:
            raise ValueError(
                f"{type(self).__name__} encodes the whole {self.grid[0]}x{self.grid[1]} grid: num_tokens must be None "
                f"or {self.max_tokens}, got {num_tokens}"
            )
        return count

    def encode(self, images: Tensor, num_tokens: int | None = None) -> Encoded:
        count = self.check_num_tokens(num_tokens)
        ids = self.quantizer.codes_to_ids(self.encode_latents(images))
        return Encoded(ids, torch.full((images.shape[0],), count, dtype=torch.long, device=images.device))

    def decode(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = self.check_ids(ids, lengths)
        if ids.shape[1] != self.max_tokens or bool((lengths != self.max_tokens).any()):
            raise ValueError(
                f"{type(self).__name__} decodes whole {self.grid[0]}x{self.grid[1]} grids: ids must be "
                f"(B, {self.max_tokens}) with every length {self.max_tokens}, got {tuple(ids.shape)}"
            )
        return self.decode_codes(self.quantizer.ids_to_codes(ids))

    def code_vectors(self) -> Tensor:
        """(V, code_dim) float32: the vectors the decoder reads (LANTERN's latent neighbours)."""
        return self.quantizer.code_vectors()

    def training_loss(self, images: Tensor, criterion=None, step: int = 0) -> tuple[Tensor, dict]:
        """Reconstruction + quantiser loss; ``criterion`` (a ReconstructionLoss) replaces the pixel term with its pixel,
        perceptual and adversarial terms at tokenizer step ``step``."""
        quantized = self.quantizer(self.encode_latents(images))
        return self.reconstruction_objective(images, self.decode_codes(quantized.codes), quantized, criterion, step)


@register
class VQGAN2D(GridVQ):
    """Convolutional VQ tokenizer: an image becomes an (H / downsample) x (W / downsample) grid of ids."""

    presets = {
        # LlamaGen's VQ-8 / VQ-16 sizes at 256 px RGB (ch 128, 2 res blocks, 16384 l2-normalised codes of 8 dims) in
        # this simpler network (no attention blocks, no 1x1 quant convs): LlamaGen's own architecture, which its
        # released weights need, is flexar.tokenizers.LlamaGenVQ
        "vq2d-f8": dict(image_size=256, channels=3, downsample=8, width=128, channel_multipliers=[1, 2, 2, 4],
                        num_res_blocks=2, codebook_size=16384, code_dim=8, l2_norm=True),
        "vq2d-f16": dict(image_size=256, channels=3, downsample=16, width=128, channel_multipliers=[1, 1, 2, 2, 4],
                         num_res_blocks=2, codebook_size=16384, code_dim=8, l2_norm=True),
        # the MaskGIT VQGAN layout (MAGE and ALIT / KARL use it as their base tokenizer, TiTok as its proxy-code
        # teacher): f16 at 256 px, ch 128, multipliers (1, 1, 2, 2, 4), 2 res blocks, 1024 codes of 256 dims, L2 lookup
        "vq2d-maskgit-f16": dict(image_size=256, channels=3, downsample=16, width=128,
                                 channel_multipliers=[1, 1, 2, 2, 4], num_res_blocks=2, codebook_size=1024,
                                 code_dim=256, l2_norm=False),
        # CPU-sized presets for tests, digits and MNIST
        "vq2d-tiny": dict(downsample=4, width=8, channel_multipliers=[1, 2, 2], num_res_blocks=1,
                          codebook_size=32, code_dim=8),
        "vq2d-digits": dict(downsample=4, width=32, channel_multipliers=[1, 2, 2], num_res_blocks=1,
                            codebook_size=256, code_dim=8),
    }

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        downsample: int = 4,
        width: int = 32,
        channel_multipliers: list[int] | None = None,
        num_res_blocks: int = 1,
        codebook_size: int = 256,
        code_dim: int = 8,
        commitment: float = 0.25,
        l2_norm: bool = True,
        dead_code_threshold: int = 0,
        reconstruction_loss: str = "l2",
    ):
        super().__init__()
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two (4 for f4, 8 for f8), got {downsample}")
        levels = int(math.log2(downsample)) + 1
        if channel_multipliers is None:
            channel_multipliers = ([1] + [2] * (levels - 2) + [4])[:levels] if levels > 1 else [1]
        channel_multipliers = [int(m) for m in channel_multipliers]
        if len(channel_multipliers) != levels:
            raise ValueError(
                f"downsample {downsample} needs {levels} channel_multipliers (one per resolution), got {channel_multipliers}"
            )
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} must be divisible by downsample {downsample}")
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {reconstruction_loss!r}")
        self.image_size, self.channels, self.downsample = image_size, channels, downsample
        side = image_size // downsample
        self.grid = (side, side)
        self.max_tokens = side * side
        self.reconstruction_loss = reconstruction_loss

        self.encoder = Encoder(channels, width, channel_multipliers, num_res_blocks, code_dim)
        self.quantizer = VQ(codebook_size, code_dim, beta=commitment, l2_norm=l2_norm,
                            dead_code_threshold=dead_code_threshold)
        self.decoder = Decoder(channels, width, channel_multipliers, num_res_blocks, code_dim)
        self.codebook_size = codebook_size
        self.code_dim = code_dim

    # -- encoder -------------------------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> continuous latents before quantisation, (B, h * w, code_dim) in raster order."""
        self.check_images(images)
        return self.encoder(images).flatten(2).transpose(1, 2)

    # -- decoder -------------------------------------------------------------------------------------------------------
    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (B, h * w, code_dim) in raster order -> images (B, C, H, W)."""
        batch = codes.shape[0]
        latents = codes.transpose(1, 2).reshape(batch, self.code_dim, *self.grid)
        return self.decoder(latents.to(self.decoder.stem.weight.dtype))

    def last_layer(self) -> Tensor:
        return self.decoder.head.weight
