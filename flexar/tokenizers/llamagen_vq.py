"""LlamaGen's image tokenizers VQ-16 and VQ-8 ("Autoregressive Model Beats Diffusion: Llama for Scalable Image
Generation", Sun et al. 2024; FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py), layer for layer.

The network is taming's VQGAN (Esser et al., CVPR 2021) with ViT-VQGAN's l2-normalised codebook (Yu et al. 2022):

- encoder: 3x3 conv stem to ``width`` channels, one level per entry of ``channel_multipliers`` with
  ``num_res_blocks`` ResNet blocks (GroupNorm(32, eps 1e-6), swish, 3x3 conv, twice; a 1x1 shortcut where the width
  changes), a single-head self-attention block after each ResNet block of the last (lowest-resolution) level, a
  stride-2 3x3 conv after zero padding (0, 1, 0, 1) between levels, a middle ResNet-attention-ResNet block, then
  GroupNorm, swish and a 3x3 conv to ``z_channels``;
- ``quant_conv`` (1x1, ``z_channels`` -> ``code_dim``), the l2-normalised nearest-code lookup of
  :class:`flexar.quantizers.VQ` over ``codebook_size`` codes, ``post_quant_conv`` (1x1, back to ``z_channels``);
- decoder: the mirror image, with ``num_res_blocks + 1`` ResNet blocks per level, the attention blocks at the first
  (lowest-resolution) level and nearest-neighbour 2x upsampling + 3x3 conv between levels.

The encoder and decoder are diffusers' VAE ``Encoder`` / ``Decoder`` (``AttnDownEncoderBlock2D`` /
``AttnUpDecoderBlock2D`` at the lowest resolution, ``downsample_padding=0``, which pads (0, 1, 0, 1) as taming does):
they compute the official equations, so the released weights load into them one to one
(:mod:`flexar.convert.llamagen_vq` maps the keys). diffusers' ``VQModel`` itself is not used because its quantiser
does not normalise latents and codes; flexar's VQ does.

Shapes: images (B, C, H, W) in [-1, 1], the official convention as well (LlamaGen normalises with mean 0.5, std 0.5
and its sampling scripts save with ``value_range=(-1, 1)``), so no rescaling happens at the boundary; latents
(B, code_dim, H / f, W / f) with f = 2 ** (len(channel_multipliers) - 1); ids (B, h * w) long in raster order (row by
row, the order of the official ``min_encoding_indices``), so ``grid = (h, w)`` and ``max_tokens = h * w``.

Differences from the official code:
- ``decode`` clamps to [-1, 1] (flexar's tokenizer contract); the official ``decode_code`` returns the raw decoder
  output and its scripts clamp when saving. ``decode_codes`` is the unclamped official decoder.
- attention runs through diffusers' ``Attention``: linear projections hold the official 1x1 conv weights and the
  product is ``scaled_dot_product_attention`` (the official code uses bmm + softmax): equal up to float rounding.
- the quantiser's training loss is codebook + beta * commitment between the normalised vectors, as the official one;
  its entropy term (``entropy_loss_ratio``, 0.0 in the released training runs) and its 65536-id usage window
  (``codebook_used``, a training statistic) are not kept. A freshly built codebook starts from flexar's VQ
  initialisation (a normal draw, normalised in use), not the official uniform(-1 / V, 1 / V) one; converted weights
  replace it.
- no dropout layers (the official ``dropout_p`` is 0.0 in every released model) and GroupNorm only (the official
  ``norm_type="batch"`` variant was never released).
- ``channel_multipliers[0]`` must be 1: diffusers' encoder stem outputs the first level's width, the official one
  ``width``; both official sizes start with 1, where the two are the same network.
- the architecture is fully convolutional apart from attention, and LlamaGen's 384 px generators use VQ-16 at 384 px
  (24 x 24 tokens): that is ``image_size=384`` with the same weights.
"""
from __future__ import annotations

import logging
import warnings

from torch import Tensor, nn

from ..hub import register
from ..quantizers import VQ
from .vqgan2d import GridVQ


def _diffusers_vae_blocks():
    """diffusers' VAE ``Encoder`` and ``Decoder`` classes."""
    # diffusers imports xformers, whose kernels may not load here; flexar never uses them through diffusers
    logging.getLogger("xformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers.models.autoencoders.vae import Decoder, Encoder
    return Encoder, Decoder


@register
class LlamaGenVQ(GridVQ):
    """LlamaGen's VQ tokenizer: an image becomes an (H / f) x (W / f) grid of ids from an l2-normalised codebook.
    Its objective (:class:`~flexar.tokenizers.vqgan2d.GridVQ`) is LlamaGen's L2 pixel term and codebook + 0.25 x
    commitment loss; a ReconstructionLoss criterion adds LPIPS and the PatchGAN hinge loss (LlamaGen: from step
    20000)."""

    presets = {
        # LlamaGen VQ-16 and VQ-8 (vq_model.py VQ_16 / VQ_8 with ModelArgs' defaults: ch 128, 2 res blocks,
        # z_channels 256, 16384 codes of 8 dims, l2-normalised), 256 px RGB; 71.9M and 70.1M parameters
        "vq-16": dict(image_size=256, channels=3, width=128, channel_multipliers=[1, 1, 2, 2, 4], num_res_blocks=2,
                      z_channels=256, codebook_size=16384, code_dim=8),
        "vq-8": dict(image_size=256, channels=3, width=128, channel_multipliers=[1, 2, 2, 4], num_res_blocks=2,
                     z_channels=256, codebook_size=16384, code_dim=8),
        # CPU-sized, for tests: 16 px grayscale to a 4 x 4 grid
        "vq-tiny": dict(image_size=16, channels=1, width=16, channel_multipliers=[1, 2, 2], num_res_blocks=1,
                        z_channels=16, codebook_size=64, code_dim=8, norm_groups=8),
    }

    def __init__(
        self,
        image_size: int = 256,
        channels: int = 3,
        width: int = 128,
        channel_multipliers: list[int] | None = None,
        num_res_blocks: int = 2,
        z_channels: int = 256,
        codebook_size: int = 16384,
        code_dim: int = 8,
        norm_groups: int = 32,
        commitment: float = 0.25,
        l2_norm: bool = True,
        dead_code_threshold: int = 0,
        reconstruction_loss: str = "l2",
    ):
        """
        Args:
            image_size: side of the square input images (256 for the released models; 384 runs them at 24 x 24).
            channels: image channels (3).
            width: the stem's width, ``ch`` in the official code (128).
            channel_multipliers: width multiplier per resolution, ``ch_mult`` (VQ-16 [1, 1, 2, 2, 4], VQ-8
                [1, 2, 2, 4]); their count sets the downsampling f = 2 ** (count - 1). The first must be 1.
            num_res_blocks: ResNet blocks per encoder level (the decoder has one more), 2.
            z_channels: channels around the quantiser's 1x1 convs (256).
            codebook_size: V, codes (16384).
            code_dim: D, dimensions per code (8).
            norm_groups: GroupNorm groups (the official 32; CPU-sized models may use fewer); every width must be
                divisible by it.
            commitment: beta of the commitment term (0.25).
            l2_norm: normalise latents and codes before the lookup (the official ``codebook_l2_norm=True``).
            dead_code_threshold: restart codes unused for this many training steps (0, off: not in LlamaGen).
            reconstruction_loss: pixel term without a criterion, ``"l2"`` (LlamaGen's) or ``"l1"``.
        """
        super().__init__()
        multipliers = [int(m) for m in (channel_multipliers if channel_multipliers is not None else [1, 1, 2, 2, 4])]
        if not multipliers or multipliers[0] != 1:
            raise ValueError(f"LlamaGenVQ: channel_multipliers must start with 1 (the stem's width is the first "
                             f"level's), got {multipliers}")
        widths = [width * m for m in multipliers]
        if norm_groups < 1 or any(channel % norm_groups for channel in widths):
            raise ValueError(f"LlamaGenVQ: every level width {widths} (width * channel_multipliers) must be divisible "
                             f"by norm_groups={norm_groups}")
        self.downsample = 2 ** (len(multipliers) - 1)
        if image_size % self.downsample:
            raise ValueError(f"LlamaGenVQ: image_size {image_size} must be divisible by the downsampling factor "
                             f"{self.downsample} (2 ** (len(channel_multipliers) - 1))")
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"LlamaGenVQ: reconstruction_loss must be 'l1' or 'l2', got {reconstruction_loss!r}")
        self.image_size, self.channels = image_size, channels
        side = image_size // self.downsample
        self.grid = (side, side)
        self.max_tokens = side * side
        self.codebook_size, self.code_dim, self.z_channels = codebook_size, code_dim, z_channels
        self.reconstruction_loss = reconstruction_loss

        encoder, decoder = _diffusers_vae_blocks()
        levels = len(multipliers)
        # attention at the lowest resolution only: the encoder's last level and the decoder's first
        self.encoder = encoder(
            in_channels=channels, out_channels=z_channels,
            down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
            block_out_channels=tuple(widths), layers_per_block=num_res_blocks, norm_num_groups=norm_groups,
            act_fn="silu", double_z=False, mid_block_add_attention=True,
        )
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.quantizer = VQ(codebook_size, code_dim, beta=commitment, l2_norm=l2_norm,
                            dead_code_threshold=dead_code_threshold)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        self.decoder = decoder(
            in_channels=z_channels, out_channels=channels,
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (levels - 1),
            block_out_channels=tuple(widths), layers_per_block=num_res_blocks, norm_num_groups=norm_groups,
            act_fn="silu", norm_type="group", mid_block_add_attention=True,
        )

    # -- encoder -------------------------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> latents before quantisation (after ``quant_conv``), (B, h * w, code_dim) in raster order."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images)).flatten(2).transpose(1, 2)

    # -- decoder -------------------------------------------------------------------------------------------------------
    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (B, h * w, code_dim) in raster order -> images (B, C, H, W), unclamped (the official decoder)."""
        latents = codes.transpose(1, 2).reshape(codes.shape[0], self.code_dim, *self.grid)
        return self.decoder(self.post_quant_conv(latents.to(self.post_quant_conv.weight.dtype)))

    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight
