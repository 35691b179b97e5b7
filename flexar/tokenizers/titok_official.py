"""The layers of the released TiTok tokenizers that flexar's shared blocks do not express (bytedance/1d-tokenizer,
"An Image is Worth 32 Tokens for Reconstruction and Generation", Yu et al., NeurIPS 2024).

:class:`~flexar.tokenizers.TiTok` builds them behind its switches (``official_blocks``, ``legacy_latent_reshape``,
``decoder_head="proxy-codes"``), and :mod:`flexar.convert.titok` fills them from the released checkpoints.

- :class:`ViT`: the official encoder / decoder transformer (``modeling/modules/blocks.py`` ResidualAttentionBlock,
  after open_clip): pre-LayerNorm blocks whose attention projections carry biases (``nn.MultiheadAttention``'s
  ``in_proj`` / ``out_proj``) and whose MLP is 4x wide with the exact (erf) GELU, then a final LayerNorm (the
  official ``ln_post``; a LayerNorm acts per token, so normalising every token and reading some equals normalising
  those alone). flexar's :class:`~flexar.nn.Transformer` has bias-free projections and the tanh GELU.
- :class:`LegacyLatentProjection`: the released encoders (the official ``is_legacy=True``) read their latent outputs
  (B, K, W) through a ``reshape`` to (B, W, K, 1) rather than a transpose before the 1x1 ``conv_out``, so each
  "channel" the projection sees mixes features of several tokens. The trained weights expect that layout.
- :class:`ProxyCodeDecoder`: the released decoder's output. The ViT's patch outputs are mapped by a two-layer 1x1
  convolution head (width -> 2 width, tanh, -> 1024) to logits over the 1024 codes of a MaskGIT-VQGAN (TiTok's
  stage-1 "proxy codes"); their softmax weights the VQGAN codebook (1024 x 256) into soft code vectors,
  ``z = sum_v softmax(logits)_v e_v``, which the VQGAN's pixel decoder (:class:`MaskGITDecoder`, fine-tuned in
  TiTok's stage 2) turns into pixels.
- :class:`MaskGITDecoder`: the MaskGIT-VQGAN pixel decoder (``modeling/modules/maskgit_vqgan.py`` Decoder, after
  taming's VQGAN without its attention layers): a 3x3 convolution from the codes, residual blocks at the coarsest
  scale, one level per channel multiplier from the coarsest up (residual blocks, then nearest 2x upsampling and a
  3x3 convolution except at the finest level), GroupNorm(32) + SiLU and a 3x3 convolution to the image.
  The official ``Conv2dSame`` pads "same" (TensorFlow style); for the odd kernels at stride 1 used here that is the
  symmetric ``padding = k // 2`` of ``nn.Conv2d``.

One quirk of the official residual block is kept because the trained weights rely on it: where a block changes the
channel count, the official code applies its 1x1 ``nin_shortcut`` to the block's own output and adds that, not to
the block's input (``h + shortcut(h)``): the input does not reach the output through a skip connection there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Mask, attention

# the MaskGIT-VQGAN that the released TiTok decoders predict (modeling/titok.py): 1024 codes of 256 dims, a pixel
# decoder of 128 base channels with multipliers (1, 1, 2, 2, 4) and 2 residual blocks per level (16x upsampling)
MASKGIT_VQGAN = dict(proxy_codebook_size=1024, proxy_code_dim=256, pixel_decoder_channels=128,
                     pixel_decoder_channel_mult=[1, 1, 2, 2, 4], pixel_decoder_res_blocks=2)
# every GroupNorm of the MaskGIT-VQGAN has 32 groups (so every channel count is a multiple of 32)
GROUPS = 32


class ViTBlock(nn.Module):
    """Pre-norm block with biased attention projections and an exact-GELU MLP. x: (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int, num_heads: int, norm_eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.backend = num_heads, backend
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        # rows [q; k; v] as in nn.MultiheadAttention's in_proj_weight, each split into heads of dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp_up = nn.Linear(dim, 4 * dim)
        self.mlp_down = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, mask: Mask | Tensor | None = None) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, mask=mask, backend=self.backend).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.proj(out)
        return x + self.mlp_down(F.gelu(self.mlp_up(self.norm2(x))))


class ViT(nn.Module):
    """A stack of :class:`ViTBlock` with a final LayerNorm; forward(x (B, L, C), mask) -> (B, L, C). Same attribute
    names as :class:`flexar.nn.Transformer` (``blocks``, ``final_norm``, ``depth``), so code that steps through a
    TiTok's blocks runs on either."""

    def __init__(self, dim: int, depth: int, num_heads: int, norm_eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.dim, self.depth, self.num_heads = dim, depth, num_heads
        self.blocks = nn.ModuleList(ViTBlock(dim, num_heads, norm_eps, backend) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor, mask: Mask | Tensor | None = None, final_norm: bool = True) -> Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x) if final_norm else x


class LegacyLatentProjection(nn.Linear):
    """The released encoders' ``conv_out``: x (B, K, W) is read as ``x.reshape(B, W, K)`` (a reshape, not a
    transpose), then each of the K columns is projected to ``out_features``: -> (B, K, out_features)."""

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        return super().forward(x.reshape(batch, width, tokens).transpose(1, 2))


def same_conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    """A stride-1 convolution that keeps the spatial size (the official ``Conv2dSame`` for odd kernels)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice (bias-free 3x3 convolutions). x: (B, C_in, h, w) -> (B, C_out, h, w); the
    output adds the input, or, where the channel count changes, its own 1x1 projection (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_channels, eps=1e-6)
        self.conv1 = same_conv(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(GROUPS, out_channels, eps=1e-6)
        self.conv2 = same_conv(out_channels, out_channels, 3, bias=False)
        self.shortcut = same_conv(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.shortcut is None else self.shortcut(h))


class UpsamplingLevel(nn.Module):
    """Residual blocks at one scale, then (except at the finest level) nearest 2x upsampling and a 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int, res_blocks: int, upsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock(in_channels if index == 0 else out_channels, out_channels) for index in range(res_blocks)
        )
        self.upsample = same_conv(out_channels, out_channels, 3) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class MaskGITDecoder(nn.Module):
    """The MaskGIT-VQGAN pixel decoder: codes (B, code_dim, h, w) -> images (B, channels, h * 2 ** (L - 1), ...)
    for L = ``len(channel_mult)`` levels. ``levels[i]`` works at ``channels * channel_mult[i]`` channels; they run
    from the coarsest (i = L - 1) to the finest (i = 0)."""

    def __init__(self, code_dim: int = 256, channels: int = 3, hidden_channels: int = 128,
                 channel_mult: tuple[int, ...] | list[int] = (1, 1, 2, 2, 4), res_blocks: int = 2):
        super().__init__()
        widths = [hidden_channels * multiplier for multiplier in channel_mult]
        if any(width % GROUPS for width in widths):
            raise ValueError(f"pixel decoder channels {widths} must be multiples of {GROUPS} (GroupNorm groups): "
                             f"choose pixel_decoder_channels and pixel_decoder_channel_mult accordingly")
        self.conv_in = same_conv(code_dim, widths[-1], 3)
        self.mid = nn.ModuleList(ResidualBlock(widths[-1], widths[-1]) for _ in range(res_blocks))
        # level i takes the channels of level i + 1 (the coarsest takes its own) and upsamples unless it is the finest
        self.levels = nn.ModuleList(
            UpsamplingLevel(widths[min(index + 1, len(widths) - 1)], width, res_blocks, upsample=index > 0)
            for index, width in enumerate(widths)
        )
        self.norm_out = nn.GroupNorm(GROUPS, widths[0], eps=1e-6)
        self.conv_out = same_conv(widths[0], channels, 3)

    def forward(self, codes: Tensor) -> Tensor:
        x = self.conv_in(codes)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.levels):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class ProxyCodeDecoder(nn.Module):
    """The released TiTok decoder head (module docstring): patch features (B, N, width) on a square grid ->
    proxy-code logits (B, V, g, g) -> soft codes (B, code_dim, g, g) -> images (B, channels, H, W)."""

    def __init__(self, width: int, channels: int = 3, proxy_codebook_size: int = 1024, proxy_code_dim: int = 256,
                 pixel_decoder_channels: int = 128,
                 pixel_decoder_channel_mult: tuple[int, ...] | list[int] = (1, 1, 2, 2, 4),
                 pixel_decoder_res_blocks: int = 2):
        super().__init__()
        self.head_in = nn.Conv2d(width, 2 * width, 1)
        self.head_out = nn.Conv2d(2 * width, proxy_codebook_size, 1)
        self.codebook = nn.Embedding(proxy_codebook_size, proxy_code_dim)
        self.pixel_decoder = MaskGITDecoder(proxy_code_dim, channels, pixel_decoder_channels,
                                            pixel_decoder_channel_mult, pixel_decoder_res_blocks)

    def logits(self, features: Tensor) -> Tensor:
        """(B, N, width) patch features in raster order -> (B, V, g, g) proxy-code logits, g = sqrt(N)."""
        batch, patches, width = features.shape
        grid = int(round(patches ** 0.5))
        x = features.transpose(1, 2).reshape(batch, width, grid, grid)
        return self.head_out(torch.tanh(self.head_in(x)))

    def forward(self, features: Tensor) -> Tensor:
        weights = self.logits(features).softmax(dim=1)
        codes = torch.einsum("bvhw,vd->bdhw", weights, self.codebook.weight.to(weights.dtype))
        return self.pixel_decoder(codes)
