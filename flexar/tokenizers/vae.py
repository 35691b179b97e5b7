"""A trainable KL autoencoder (the latent space of FlexTok's decoder), wrapping diffusers' ``AutoencoderKL``
("Auto-Encoding Variational Bayes", Kingma & Welling 2014; the Stable Diffusion VAE, Rombach et al. 2022).

flexar trains it first (``configs/tokenizers/vae.yaml``, through :class:`flexar.train.TokenizerModule`) and
then freezes it inside :class:`flexar.tokenizers.FlexTok` (``target="vae"``, ``vae_path=...``).

Objective: per-pixel L1 (or L2) reconstruction of a posterior sample plus ``kl_weight`` times the KL divergence to
N(0, I). Both terms are divided by the number of pixels, so ``kl_weight`` keeps the meaning it has in the Stable
Diffusion recipe (sum-reduced L1 and KL, weight 1e-6).

Latent normalisation: ``encode_latents`` returns (mean - shift) * scale, ``decode_latents`` inverts it, with shift
and scale = 1 / std running estimates over the training posterior means (persistent buffers, saved with the
weights), so that the frozen latents have roughly unit variance for flow matching (the role of diffusers'
``scaling_factor`` / ``shift_factor``, which it leaves to the user to fill in).

Shapes: images (B, C, H, W) in [-1, 1]; latents (B, latent_channels, H / f, W / f), f = 2 ** (len(blocks) - 1).

Differences from the Stable Diffusion / FlexTok VAEs: no LPIPS and no adversarial term (the paper's VAE is trained
with both); saving and loading go through :mod:`flexar.hub` (config.json + model.safetensors), never diffusers'
``from_pretrained``, so nothing is fetched from the Hugging Face hub.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import Configurable, PretrainedMixin, register
from ..utils import psnr
from .base import check_criterion


def _autoencoder_kl():
    # diffusers imports xformers, whose kernels may not load here; flexar never uses them through diffusers
    logging.getLogger("xformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import AutoencoderKL
    return AutoencoderKL


@register
class VAE(Configurable, PretrainedMixin, nn.Module):
    """KL autoencoder with ``training_loss``, ``encode_latents`` / ``decode_latents`` and ``reconstruct``."""

    presets = {
        # FlexTok's 16-channel f8 VAE at 256 px (EPFL-VILAB/flextok_vae_c16, an SDXL-style KL autoencoder: four
        # levels of 128, 256, 512, 512 channels, two ResNet blocks each, attention in the middle block)
        "vae-f8c16": dict(image_size=256, channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                          layers_per_block=2, norm_num_groups=32, mid_block_attention=True),
        # CPU-sized: 32 px digits / MNIST to an 8 x 8 x 4 latent (configs/tokenizers/vae.yaml)
        "vae-digits": dict(image_size=32, channels=1, latent_channels=4, block_out_channels=[32, 64, 64],
                           layers_per_block=1, norm_num_groups=16, mid_block_attention=False),
    }

    # training_loss takes the tokenizers' arguments; its objective (reconstruction + KL) has no criterion to use
    takes_criterion = False

    def __init__(
        self,
        image_size: int = 256,
        channels: int = 3,
        latent_channels: int = 16,
        block_out_channels: list[int] | None = None,
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        mid_block_attention: bool = True,
        kl_weight: float = 1e-6,
        reconstruction_loss: str = "l1",
        stats_momentum: float = 0.01,
    ):
        super().__init__()
        blocks = list(block_out_channels or [128, 256, 512, 512])
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {reconstruction_loss!r}")
        if any(width % norm_num_groups for width in blocks):
            raise ValueError(f"every entry of block_out_channels {blocks} must be divisible by norm_num_groups {norm_num_groups}")
        self.downsample = 2 ** (len(blocks) - 1)
        if image_size % self.downsample:
            raise ValueError(f"image_size {image_size} must be divisible by the downsampling factor {self.downsample}")
        if not 0.0 < stats_momentum <= 1.0:
            raise ValueError(f"stats_momentum must lie in (0, 1], got {stats_momentum}")
        self.image_size, self.channels, self.latent_channels = image_size, channels, latent_channels
        self.latent_size = image_size // self.downsample
        self.kl_weight, self.reconstruction_loss, self.stats_momentum = kl_weight, reconstruction_loss, stats_momentum
        self.model = _autoencoder_kl()(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * len(blocks),
            up_block_types=("UpDecoderBlock2D",) * len(blocks),
            block_out_channels=tuple(blocks),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=image_size,
            mid_block_add_attention=mid_block_attention,
        )
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("stats_updates", torch.zeros(()))

    def check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.channels or images.shape[-1] % self.downsample \
                or images.shape[-2] % self.downsample:
            raise ValueError(f"VAE expects images of shape (B, {self.channels}, H, W) with H and W divisible by "
                             f"{self.downsample}, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")

    def posterior(self, images: Tensor):
        """diffusers' diagonal Gaussian posterior q(z | images) (unnormalised latents)."""
        self.check_images(images)
        return self.model.encode(images).latent_dist

    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised posterior means (B, latent_channels, H / f, W / f)."""
        return (self.posterior(images).mean - self.latent_shift) * self.latent_scale

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, latent_channels, h, w) -> images (B, C, h * f, w * f)."""
        latents = latents.to(self.model.dtype)  # a generator's latents are float32 whatever this model's precision
        return self.model.decode(latents / self.latent_scale + self.latent_shift).sample

    @torch.no_grad()
    def reconstruct(self, images: Tensor, num_tokens: int | None = None) -> Tensor:
        """decode(encode(images)); ``num_tokens`` is accepted (and ignored) for the tokenizers' preview callback."""
        return self.decode_latents(self.encode_latents(images))

    @torch.no_grad()
    def _update_stats(self, means: Tensor) -> None:
        shift, std = means.mean(), means.std().clamp_min(1e-6)
        # a plain running average over the first 1 / momentum batches, an exponential one after them
        momentum = max(self.stats_momentum, 1.0 / float(self.stats_updates + 1))
        self.latent_shift.lerp_(shift, momentum)
        self.latent_scale.copy_(1.0 / torch.lerp(1.0 / self.latent_scale, std, momentum))
        self.stats_updates.add_(1)

    def training_loss(self, images: Tensor, criterion=None, step: int = 0) -> tuple[Tensor, dict]:
        check_criterion(self, criterion)
        posterior = self.posterior(images)
        if self.training:
            self._update_stats(posterior.mean.detach().float())
        reconstruction = self.model.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, images)
        pixel = mse if self.reconstruction_loss == "l2" else F.l1_loss(reconstruction, images)
        kl = posterior.kl().mean() / images[0].numel()
        loss = pixel + self.kl_weight * kl
        logs = {
            "loss": loss.detach(),
            "reconstruction": pixel.detach(),
            "kl": kl.detach(),
            "psnr": psnr(mse.detach()),
            "latent_std": 1.0 / self.latent_scale.detach(),
        }
        return loss, logs
