"""Multi-scale residual VQ tokenizer: VAR's VQVAE ("Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction", Tian et al., NeurIPS 2024; FoundationVision/VAR, models/{quant,vqvae}.py), with the training
code VAR never released.

An image becomes a pyramid of token maps r_1, ..., r_S of sides ``scales`` (VAR's 256 px schedule: 1, 2, 3, 4, 5, 6,
8, 10, 13, 16 on a 16 x 16 latent, 680 tokens). The encoder's latent f (B, D, h, w) is quantised coarse to fine
against one shared codebook (VAR Algorithm 1):

    rest = f, f_hat = 0
    for s = 1 .. S:
        r_s    = nearest code of each vector of area_downsample(rest, side_s)        (L2; cosine with ``l2_norm``)
        z_s    = phi_s(bicubic_upsample(codebook[r_s], h))                            (no resampling at the last scale)
        f_hat += z_s;  rest -= z_s

with phi(z) = (1 - ratio) z + ratio conv3x3(z), ratio 0.5 (VAR's ``quant_resi``). ``shared_phi`` picks how many phi
convolutions the scales share, VAR's ``share_quant_resi``: 0 = one per scale, 1 = one for all, K = K convolutions,
scale s using the one whose tick (VAR's ``np.linspace`` ticks) is nearest to s / (S - 1); VAR's default is 4.
The decoder reads f_hat. The quantiser's loss is VAR's

    sum_s [beta * mse(sg[f_hat_s], f) + mse(f_hat_s, sg[f])] / S

over the running reconstructions f_hat_s, with a straight-through estimator from f_hat to f.

Ids: the scales' maps concatenated coarse to fine, each in raster order, so ``max_tokens = sum(side ** 2)``,
``grid`` = the list of sides, and :func:`scale_slices` / :meth:`MultiScaleVQ.split_scales` give each scale's part.
A prefix that ends on a scale boundary is a coarser image: ``encode(images, num_tokens)`` accepts the boundaries
(1, 5, 14, ... for VAR's schedule) and ``decode`` sums the contributions of the scales present in each row.
Codebook usage and perplexity are logged per scale (``codebook_usage_scale{s}``): collapse at the coarse scales is
the known failure of VAR reproductions.

Shapes: images (B, C, H, W) in [-1, 1]; latents f, f_hat (B, code_dim, h, w); ids (B, sum side ** 2) long.

By default (``architecture="flexar"``) the encoder and decoder are those of :mod:`flexar.tokenizers.vqgan2d`;
``architecture="var"`` builds VAR's own CNN (models/basic_vae.py, latent-diffusion's vq-f16 layout), which the
released VQVAE needs (:mod:`flexar.convert.var`): a self-attention block after every residual block of the lowest
resolution and one between the two middle blocks, stride-2 downsampling after zero padding of one pixel on the right
and bottom only, and ``num_res_blocks + 1`` residual blocks per decoder level. The objective takes the shared
reconstruction losses (:class:`flexar.tokenizers.ReconstructionLoss`: pixel, LPIPS, PatchGAN) as ``criterion``.

Differences from VAR's VQVAE and quantiser:
- with the default ``architecture="flexar"``: no self-attention in the encoder and decoder, symmetric padding in the
  stride-2 convs and ``num_res_blocks`` blocks per decoder level (the CNN shared with
  :class:`~flexar.tokenizers.VQGAN2D`). ``architecture="var"`` is VAR's CNN, except that a layer narrower than 32
  channels takes the largest divisor of its width as GroupNorm groups (VAR: always 32; equal at VAR's widths).
- VAR never released its VQVAE training: the objective here (the quantiser loss above plus the pixel / perceptual /
  adversarial terms of the shared criterion, VQGAN's recipe) is the paper's description, not VAR's code.
- with ``l2_norm`` the lookup is by cosine similarity, as VAR's ``using_znorm``, and the code added to f_hat is the
  raw codebook row, as in VAR; ``code_vectors`` returns the raw rows.
- the codebook starts uniform in [-1 / V, 1 / V] (taming's initialisation); VAR's ``eini`` is not in its code.
- usage is logged per batch (distinct ids / V and perplexity per scale); VAR keeps an EMA of per-scale hit counts
  and reports the share of codes above a margin.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from ..quantizers import codebook_stats
from ..utils import psnr
from .base import Encoded, Tokenizer
from .vqgan2d import Decoder, Encoder, ResBlock, group_norm

VAR_SCALES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
# schedules ending on the latent side: VAR's for 16 x 16 latents (256 px at f16), small ones for 32 px images
DEFAULT_SCALES = {16: VAR_SCALES, 8: [1, 2, 3, 4, 6, 8], 4: [1, 2, 3, 4]}


def check_scales(scales, name: str = "scales") -> list[int]:
    """`scales` as a list of at least two strictly increasing positive ints (the sides of the token maps)."""
    sides = [int(side) for side in scales]
    if len(sides) < 2 or sides[0] < 1 or any(b <= a for a, b in zip(sides, sides[1:])) or sides != list(scales):
        raise ValueError(f"{name} must be at least two strictly increasing positive ints (map sides), "
                         f"got {list(scales)}")
    return sides


def scale_slices(scales) -> list[slice]:
    """The slice of the concatenated ids that holds each scale's map: [slice(0, 1), slice(1, 5), ...]."""
    slices, start = [], 0
    for side in scales:
        slices.append(slice(start, start + side * side))
        start += side * side
    return slices


def scale_boundaries(scales) -> list[int]:
    """Token counts that end on a scale: [1, 5, 14, ...] (the valid prefix lengths)."""
    return [piece.stop for piece in scale_slices(scales)]


def scale_levels(scales) -> Tensor:
    """(L,) long: the scale index of every position of the concatenated ids."""
    return torch.cat([torch.full((side * side,), index, dtype=torch.long) for index, side in enumerate(scales)])


def phi_ticks(count: int) -> np.ndarray:
    """VAR's ticks of ``count`` partially shared phi layers in [0, 1] (quant.py, PhiPartiallyShared)."""
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


class Phi(nn.Module):
    """phi(z) = (1 - ratio) z + ratio conv3x3(z); (B, D, h, w) -> (B, D, h, w)."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.ratio = abs(ratio)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return z * (1 - self.ratio) + self.conv(z) * self.ratio


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual connection (VAR's and
    latent-diffusion's ``AttnBlock``): x + proj(softmax(q^T k / sqrt(C)) v), q, k, v 1x1 convs of GroupNorm(x).
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, 3, channels, height * width).unbind(1)
        weights = torch.softmax(q.transpose(1, 2) @ k * channels ** -0.5, dim=-1)  # (B, query, key)
        out = (v @ weights.transpose(1, 2)).view(batch, channels, height, width)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding of one pixel on the right and bottom (VAR's ``Downsample2x``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (VAR's ``Upsample2x``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution of :class:`VAREncoder` / :class:`VARDecoder`: residual blocks, each followed by self-attention
    when ``attend``, then an optional resampling layer."""

    def __init__(self, in_channels: int, out_channels: int, count: int, attend: bool, resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(in_channels if i == 0 else out_channels, out_channels)
                                    for i in range(count))
        self.attentions = nn.ModuleList(SpatialAttention(out_channels) for _ in range(count if attend else 0))
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if len(self.attentions):
                x = self.attentions[index](x)
        return self.resample(x)


class Middle(nn.Module):
    """Residual block, self-attention, residual block at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block1, self.attention, self.block2 = ResBlock(channels, channels), SpatialAttention(channels), \
            ResBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.attention(self.block1(x)))


class VAREncoder(nn.Module):
    """VAR's VQVAE encoder: (B, channels, H, W) -> (B, code_dim, H / f, W / f), f = 2 ** (len(multipliers) - 1).
    A 3x3 stem to ``width``, one :class:`Level` per multiplier (attention at the last), the middle, GroupNorm + SiLU
    and a 3x3 conv."""

    def __init__(self, channels: int, width: int, multipliers: list[int], num_res_blocks: int, code_dim: int):
        super().__init__()
        widths = [width * m for m in multipliers]
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        last = len(widths) - 1
        self.levels = nn.ModuleList(
            Level(([width] + widths)[i], widths[i], num_res_blocks, attend=i == last,
                  resample=Downsample(widths[i]) if i < last else None)
            for i in range(len(widths))
        )
        self.middle = Middle(widths[-1])
        self.norm = group_norm(widths[-1])
        self.head = nn.Conv2d(widths[-1], code_dim, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images)
        for level in self.levels:
            x = level(x)
        return self.head(F.silu(self.norm(self.middle(x))))


class VARDecoder(nn.Module):
    """VAR's VQVAE decoder: (B, code_dim, h, w) -> (B, channels, h * f, w * f). A 3x3 stem, the middle, then the
    levels from the lowest resolution up (``levels[0]`` is the lowest: VAR's ``up[-1]``), each with
    ``num_res_blocks + 1`` residual blocks (attention at the lowest) and a 2x upsampling except the last,
    GroupNorm + SiLU and a 3x3 conv."""

    def __init__(self, channels: int, width: int, multipliers: list[int], num_res_blocks: int, code_dim: int):
        super().__init__()
        widths = [width * m for m in multipliers][::-1]
        self.stem = nn.Conv2d(code_dim, widths[0], 3, padding=1)
        self.middle = Middle(widths[0])
        last = len(widths) - 1
        self.levels = nn.ModuleList(
            Level(([widths[0]] + widths)[i], widths[i], num_res_blocks + 1, attend=i == 0,
                  resample=Upsample(widths[i]) if i < last else None)
            for i in range(len(widths))
        )
        self.norm = group_norm(widths[-1])
        self.head = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, codes: Tensor) -> Tensor:
        x = self.middle(self.stem(codes))
        for level in self.levels:
            x = level(x)
        return self.head(F.silu(self.norm(x)))


ARCHITECTURES = {"flexar": (Encoder, Decoder), "var": (VAREncoder, VARDecoder)}


class MultiScaleResidualVQ(nn.Module):
    """The residual pyramid of VAR: a shared codebook (V, D), the phi layers and the scale schedule.

    Tokenizers train it (``forward``); generators keep a frozen copy to turn ids into the running reconstruction
    that their next scale reads (``teacher_inputs`` for training, ``next_input`` for decoding).
    """

    def __init__(self, codebook_size: int, dim: int, scales: list[int], beta: float = 0.25, l2_norm: bool = False,
                 phi_ratio: float = 0.5, shared_phi: int = 4):
        super().__init__()
        self.scales = check_scales(scales)
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook_size and dim must be >= 1, got {codebook_size}, {dim}")
        if isinstance(shared_phi, bool) or not isinstance(shared_phi, int) or shared_phi < 0:
            raise ValueError(f"shared_phi must be an int >= 0 (0: one phi per scale), got {shared_phi!r}")
        self.codebook_size, self.dim, self.beta, self.l2_norm = codebook_size, dim, beta, l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        count = len(self.scales) if shared_phi == 0 else shared_phi
        self.phis = nn.ModuleList(Phi(dim, phi_ratio) if phi_ratio != 0 else nn.Identity() for _ in range(count))
        last = len(self.scales) - 1
        ticks = phi_ticks(count)
        self.phi_of_scale = [int(np.argmin(np.abs(ticks - index / last))) for index in range(len(self.scales))]

    @property
    def side(self) -> int:
        return self.scales[-1]

    def lookup(self, vectors: Tensor) -> Tensor:
        """(N, D) -> (N,) long ids of the nearest codes (squared L2, or cosine with ``l2_norm``), in float32."""
        with torch.no_grad(), torch.autocast(device_type=vectors.device.type, enabled=False):
            vectors, codebook = vectors.float(), self.embedding.weight.float()
            if self.l2_norm:
                return (F.normalize(vectors, dim=-1) @ F.normalize(codebook, dim=-1).t()).argmax(dim=-1)
            distances = vectors.pow(2).sum(-1, keepdim=True) - 2 * vectors @ codebook.t() + codebook.pow(2).sum(-1)
            return distances.argmin(dim=-1)

    def code_map(self, ids: Tensor, side: int) -> Tensor:
        """(B, side * side) ids -> (B, D, side, side) codebook rows in raster order."""
        return self.embedding(ids).transpose(1, 2).reshape(ids.shape[0], self.dim, side, side)

    def contribution(self, index: int, ids: Tensor) -> Tensor:
        """z_s = phi_s(upsample(codebook[ids])): scale `index`'s term of f_hat, (B, side_s ** 2) -> (B, D, h, w)."""
        # outside autocast, as the tokenizer computes f_hat: generators read the same pyramid under bf16 training
        with torch.autocast(device_type=ids.device.type, enabled=False):
            z = self.code_map(ids, self.scales[index])
            if self.scales[index] != self.side:
                z = F.interpolate(z, size=(self.side, self.side), mode="bicubic")
            return self.phis[self.phi_of_scale[index]](z)

    def downsample(self, f: Tensor, side: int) -> Tensor:
        return f if side == f.shape[-1] else F.interpolate(f, size=(side, side), mode="area")

    def _pyramid(self, f: Tensor):
        """Yield (scale index, ids (B, side ** 2), contribution z_s) of VAR's residual loop over latents f."""
        rest = f.detach().float()
        batch = f.shape[0]
        for index, side in enumerate(self.scales):
            vectors = self.downsample(rest, side).permute(0, 2, 3, 1).reshape(-1, self.dim)
            ids = self.lookup(vectors).view(batch, side * side)
            z = self.contribution(index, ids)
            rest = rest - z.detach()
            yield index, ids, z

    def check_latents(self, f: Tensor) -> None:
        if f.dim() != 4 or f.shape[1] != self.dim or f.shape[-2:] != (self.side, self.side):
            raise ValueError(f"latents must be (B, {self.dim}, {self.side}, {self.side}), got {tuple(f.shape)}")

    def forward(self, f: Tensor) -> tuple[Tensor, list[Tensor], Tensor, dict]:
        """Quantise latents f (B, D, h, w) for training.

        Returns f_hat (B, D, h, w) (its value the reconstruction, its gradient straight through to f), the ids of
        every scale [(B, side_s ** 2)], the quantiser loss (float32 scalar) and logs (per-scale usage, perplexity,
        codebook and commitment terms).
        """
        self.check_latents(f)
        with torch.autocast(device_type=f.device.type, enabled=False):
            target = f.float()
            f_hat = torch.zeros_like(target)
            codebook_loss = commitment_loss = target.new_zeros(())
            ids_per_scale, logs = [], {}
            for index, ids, z in self._pyramid(target):
                f_hat = f_hat + z
                codebook_loss = codebook_loss + F.mse_loss(f_hat, target.detach())
                commitment_loss = commitment_loss + F.mse_loss(f_hat.detach(), target)
                ids_per_scale.append(ids)
                for key, value in codebook_stats(ids, self.codebook_size).items():
                    logs[f"{key}_scale{index}"] = value
            count = len(self.scales)
            loss = (codebook_loss + self.beta * commitment_loss) / count
            straight_through = target + (f_hat - target).detach()
        logs.update(codebook_stats(torch.cat(ids_per_scale, dim=1), self.codebook_size))
        logs["codebook_loss"] = codebook_loss.detach() / count
        logs["commitment_loss"] = commitment_loss.detach() / count
        return straight_through.to(f.dtype), ids_per_scale, loss, logs

    @torch.no_grad()
    def encode(self, f: Tensor) -> list[Tensor]:
        """Latents (B, D, h, w) -> ids of every scale [(B, side_s ** 2)]."""
        self.check_latents(f)
        return [ids for _, ids, _ in self._pyramid(f)]

    def contributions(self, ids_per_scale: list[Tensor]) -> list[Tensor]:
        """[z_s (B, D, h, w)] for the given scales, coarse to fine; their sum is f_hat."""
        return [self.contribution(index, ids) for index, ids in enumerate(ids_per_scale)]

    def reconstruct(self, ids_per_scale: list[Tensor]) -> Tensor:
        """f_hat (B, D, h, w) = the sum of the contributions of the given (first k) scales."""
        return torch.stack(self.contributions(ids_per_scale)).sum(0)

    def teacher_inputs(self, ids_per_scale: list[Tensor]) -> Tensor:
        """VAR's teacher-forcing inputs (``idxBl_to_var_input``): for s = 1 .. S-1, the running reconstruction of
        scales < s area-downsampled to side_s. [(B, side_s ** 2)] * S -> (B, L - side_1 ** 2, D) float32."""
        f_hat, inputs = None, []
        for index in range(len(self.scales) - 1):
            z = self.contribution(index, ids_per_scale[index])
            f_hat = z if f_hat is None else f_hat + z
            inputs.append(self.downsample(f_hat, self.scales[index + 1]).flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def next_input(self, index: int, f_hat: Tensor | None, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Decoding: add scale `index`'s contribution to f_hat (None before the first scale) and return it with the
        next scale's input map (B, side_{s+1} ** 2, D) (None after the last scale)."""
        z = self.contribution(index, ids)
        f_hat = z if f_hat is None else f_hat + z
        if index == len(self.scales) - 1:
            return f_hat, None
        return f_hat, self.downsample(f_hat, self.scales[index + 1]).flatten(2).transpose(1, 2)


@register
class MultiScaleVQ(Tokenizer):
    """Multi-scale residual VQ tokenizer: an image becomes the token maps of ``scales`` (see the module docstring).

    ``grid`` is the list of scale sides; ids (B, sum side ** 2) concatenate the maps coarse to fine.
    """

    takes_criterion = True

    presets = {
        # VAR's VQVAE layout: f16, ch 160, ch_mult (1, 1, 2, 2, 4), 2 res blocks, 4096 codes of 32 dims, 10 scales
        "msvq-f16": dict(image_size=256, channels=3, downsample=16, width=160, channel_multipliers=[1, 1, 2, 2, 4],
                         num_res_blocks=2, codebook_size=4096, code_dim=32, scales=VAR_SCALES),
        # CPU-sized presets for tests, digits and MNIST (32 px at f4: an 8 x 8 latent, 6 scales, 130 tokens)
        "msvq-tiny": dict(image_size=16, channels=1, downsample=4, width=8, channel_multipliers=[1, 2, 2],
                          num_res_blocks=1, codebook_size=32, code_dim=8, scales=[1, 2, 3, 4]),
        "msvq-digits": dict(image_size=32, channels=1, downsample=4, width=32, channel_multipliers=[1, 2, 2],
                            num_res_blocks=1, codebook_size=256, code_dim=8, scales=[1, 2, 3, 4, 6, 8]),
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
        scales: list[int] | None = None,
        commitment: float = 0.25,
        l2_norm: bool = False,
        phi_ratio: float = 0.5,
        shared_phi: int = 4,
        quant_conv_kernel: int = 3,
        reconstruction_loss: str = "l2",
        architecture: str = "flexar",
    ):
        """``architecture``: the encoder / decoder CNN, ``"flexar"`` (:mod:`~flexar.tokenizers.vqgan2d`'s) or
        ``"var"`` (VAR's VQVAE CNN with self-attention, for its released weights); see the module docstring."""
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(map(repr, ARCHITECTURES))}, got {architecture!r}")
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two (4 for f4, 16 for f16), got {downsample}")
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} must be divisible by downsample {downsample}")
        levels = int(math.log2(downsample)) + 1
        if channel_multipliers is None:
            channel_multipliers = ([1] + [2] * (levels - 2) + [4])[:levels] if levels > 1 else [1]
        channel_multipliers = [int(m) for m in channel_multipliers]
        if len(channel_multipliers) != levels:
            raise ValueError(f"downsample {downsample} needs {levels} channel_multipliers, got {channel_multipliers}")
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {reconstruction_loss!r}")
        if quant_conv_kernel < 1 or quant_conv_kernel % 2 == 0:
            raise ValueError(f"quant_conv_kernel must be an odd int >= 1, got {quant_conv_kernel}")
        side = image_size // downsample
        if scales is None:
            if side not in DEFAULT_SCALES:
                raise ValueError(f"no default scale schedule for a {side}x{side} latent; pass scales ending in {side}")
            scales = DEFAULT_SCALES[side]
        scales = check_scales(scales)
        if scales[-1] != side:
            raise ValueError(f"the last scale must be the latent side {side} (image_size / downsample), got {scales}")
        self.image_size, self.channels, self.downsample = image_size, channels, downsample
        self.grid = list(scales)
        self.max_tokens = sum(s * s for s in scales)
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.reconstruction_loss = reconstruction_loss

        encoder, decoder = ARCHITECTURES[architecture]
        self.encoder = encoder(channels, width, channel_multipliers, num_res_blocks, code_dim)
        padding = quant_conv_kernel // 2
        self.quant_conv = nn.Conv2d(code_dim, code_dim, quant_conv_kernel, padding=padding)
        self.quantizer = MultiScaleResidualVQ(codebook_size, code_dim, scales, beta=commitment, l2_norm=l2_norm,
                                              phi_ratio=phi_ratio, shared_phi=shared_phi)
        self.post_quant_conv = nn.Conv2d(code_dim, code_dim, quant_conv_kernel, padding=padding)
        self.decoder = decoder(channels, width, channel_multipliers, num_res_blocks, code_dim)

    @property
    def scales(self) -> list[int]:
        return self.grid

    def scale_slices(self) -> list[slice]:
        """The slice of the ids that holds each scale's map (see :func:`scale_slices`)."""
        return scale_slices(self.grid)

    def split_scales(self, ids: Tensor) -> list[Tensor]:
        """(B, L) ids, L a scale boundary -> each present scale's map [(B, side_s, side_s)], coarse to fine."""
        maps = []
        for side, piece in zip(self.grid, self.scale_slices()):
            if piece.stop > ids.shape[1]:
                break
            maps.append(ids[:, piece].reshape(ids.shape[0], side, side))
        return maps

    def check_num_tokens(self, num_tokens) -> int:
        count = super().check_num_tokens(num_tokens)
        if count not in scale_boundaries(self.grid):
            raise ValueError(f"{type(self).__name__} encodes whole scales: num_tokens must be None or one of "
                             f"{scale_boundaries(self.grid)} (the ends of scales {self.grid}), got {num_tokens}")
        return count

    # -- encoder -------------------------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> latents f before quantisation, (B, code_dim, h, w)."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode(self, images: Tensor, num_tokens: int | None = None) -> Encoded:
        count = self.check_num_tokens(num_tokens)
        ids = torch.cat(self.quantizer.encode(self.encode_latents(images)), dim=1)[:, :count]
        return Encoded(ids, torch.full((images.shape[0],), count, dtype=torch.long, device=images.device))

    # -- decoder -------------------------------------------------------------------------------------------------------
    def decode_codes(self, f_hat: Tensor) -> Tensor:
        """f_hat (B, code_dim, h, w) -> images (B, C, H, W), unclamped."""
        return self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype)))

    def decode(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """ids (B, L), L a scale boundary; each row decodes the scales inside its length (a scale boundary too)."""
        lengths = self.check_ids(ids, lengths)
        boundaries = scale_boundaries(self.grid)
        bad = sorted(n for n in {ids.shape[1], *lengths.unique().tolist()} if n not in boundaries)
        if bad:
            raise ValueError(f"{type(self).__name__} decodes whole scales: ids width and lengths must be among "
                             f"{boundaries} (the ends of scales {self.grid}), got {bad}")
        maps = [m.flatten(1) for m in self.split_scales(ids)]
        f_hat = torch.zeros(ids.shape[0], self.code_dim, self.grid[-1], self.grid[-1], device=ids.device)
        for z, end in zip(self.quantizer.contributions(maps), boundaries):
            present = (lengths >= end).to(z.dtype).view(-1, 1, 1, 1)
            f_hat = f_hat + z * present
        return self.decode_codes(f_hat)

    def code_vectors(self) -> Tensor:
        return self.quantizer.embedding.weight.float()

    @torch.no_grad()
    def codebook_usage(self, ids: Tensor) -> list[float]:
        """Share of the codebook that each scale uses over a set of whole pyramids, ids (N, max_tokens)."""
        return [float(ids[:, piece].unique().numel()) / self.codebook_size for piece in self.scale_slices()]

    # -- objective -----------------------------------------------------------------------------------------------------
    def training_loss(self, images: Tensor, criterion=None, step: int = 0) -> tuple[Tensor, dict]:
        """Reconstruction + the quantiser loss; ``criterion`` (a ReconstructionLoss) replaces the pixel term with its
        pixel, perceptual and adversarial terms at tokenizer step ``step``."""
        f_hat, _, quantizer_loss, quantizer_logs = self.quantizer(self.encode_latents(images))
        recon = self.decode_codes(f_hat)
        mse = F.mse_loss(recon, images)
        if criterion is None:
            pixel_loss = mse if self.reconstruction_loss == "l2" else F.l1_loss(recon, images)
            criterion_logs = {"reconstruction": pixel_loss.detach()}
        else:
            pixel_loss, criterion_logs = criterion(images, recon, step=step, last_layer=self.decoder.head.weight)
        loss = pixel_loss + quantizer_loss
        logs = {
            "loss": loss.detach(),
            **criterion_logs,
            "quantizer": quantizer_loss.detach(),
            "psnr": psnr(mse.detach()),
            **{(k if k.endswith("_loss") else f"codebook_{k}"): v for k, v in quantizer_logs.items()},
        }
        return loss, logs
