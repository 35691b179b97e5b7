"""Reconstruction objectives shared by tokenizers: pixel, perceptual and adversarial terms.

- Pixel: L1 or L2 between reconstruction and image.
- Perceptual (LPIPS, Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
  version 0.1 with the VGG16 trunk of Simonyan & Zisserman 2015): activations of a frozen VGG16 at relu1_2, relu2_2,
  relu3_3, relu4_3 and relu5_3, each unit-normalised over channels, squared difference, weighted per channel by
  LPIPS's calibrated linear heads (1x1 convolutions fitted to human judgements, BAPPS), averaged over space and
  summed over the five layers:

      d(x, x0) = sum_l mean_{h,w} sum_c w_{l,c} (f_l(x) / |f_l(x)| - f_l(x0) / |f_l(x0)|)^2_{c,h,w}

  so ``perceptual_weight`` is on the scale of the papers' LPIPS weight (ReTok and LlamaGen use 1.0).
- Adversarial (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis", VQGAN): a PatchGAN
  discriminator (Isola et al. 2017, pix2pix) trained with the hinge loss; the generator term ``-mean(D(x_hat))``
  is switched on at ``discriminator_start`` and scaled by the adaptive weight

      lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4),  clamped to [0, max_adaptive_weight]

  where ``G_L`` is the weight of the decoder's last layer and ``L_rec`` the pixel + perceptual loss (VQGAN eq. 7).

:class:`ReconstructionLoss` combines the three. A tokenizer family whose ``training_loss`` accepts a ``criterion``
(TiTok and its subclasses) calls ``criterion(images, reconstruction, step, last_layer)`` in place of its own pixel
loss; :class:`flexar.train.TokenizerModule` takes the criterion as its ``loss`` argument and, when the criterion
holds a discriminator, alternates a tokenizer step and a discriminator step (``discriminator_loss``) per batch.

Shapes: images and reconstructions (B, C, H, W) in [-1, 1]; discriminator logits (B, 1, h, w).

Differences from the papers and their official code:
- the perceptual trunk's weights are not shipped: LPIPS uses torchvision's ImageNet VGG16 (``IMAGENET1K_V1``),
  which the user converts once and passes as a safetensors file (never downloaded, never unpickled):
  ``save_file({k: v for k, v in torch.load(pth).items() if k.startswith("features.")}, "vgg16.safetensors")``.
  A different VGG16 checkpoint gives a different distance than the papers'. The linear heads are LPIPS v0.1's own,
  converted from the lpips 0.1.4 wheel by ``scripts/convert_lpips.py`` and shipped in
  ``flexar/tokenizers/weights/lpips_vgg_lin.safetensors`` (BSD-2-Clause, ``LICENSE.lpips`` beside it).
- the input shift and scale are LPIPS's ``ScalingLayer``, which is torchvision's ImageNet normalisation written for
  [-1, 1] inputs (shift = 2 mean - 1, scale = 2 std): the two are identical, not approximately equal.
- grey images are repeated to three channels before the VGG (LPIPS takes RGB only).
- ``perceptual_network="vgg16-narrow"`` (an eighth of the channels, for tests and toy runs) has no calibrated
  heads: it needs ``perceptual_heads="baseline"``, the LPIPS paper's uncalibrated variant (every channel weight 1),
  which is about ten times LPIPS at the same weight on VGG16.
- ``discriminator_norm`` offers ``group`` besides pix2pix/VQGAN's ``batch`` (batch statistics of tiny CPU batches
  are noisy); the default is the papers' ``batch``.
- the defaults are ReTok's loss weights (L2 1.0, perceptual 1.0, GAN 0.5) and LlamaGen's discriminator start
  (20000 steps), on which ReTok's code is built; VQGAN's adaptive weight is on by default (LlamaGen and ReTok turn
  it off: ``adaptive_weight=False``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import load_weights

# torchvision's vgg16 "D" layout; "vgg16-narrow" keeps the layout with an eighth of the channels (tests, toy runs)
VGG_LAYOUTS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg16-narrow": [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64],
}
# indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
VGG_TAPS = (3, 8, 15, 22, 29)
# LPIPS v0.1's ScalingLayer for [-1, 1] inputs: (x - shift) / scale, i.e. torchvision's ImageNet mean (0.485, 0.456,
# 0.406) and std (0.229, 0.224, 0.225) applied to (x + 1) / 2
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# LPIPS v0.1's calibrated per-channel weights of the five VGG16 taps (head0 ... head4, shapes (64,), (128,), (256,),
# (512,), (512,)), converted by scripts/convert_lpips.py
LPIPS_HEADS_FILE = Path(__file__).resolve().parent / "weights" / "lpips_vgg_lin.safetensors"
PERCEPTUAL_HEADS = ("lpips", "baseline")


def pixel_loss(reconstruction: Tensor, images: Tensor, kind: str = "l2") -> Tensor:
    """Mean L1 or L2 error (a scalar)."""
    if kind == "l2":
        return F.mse_loss(reconstruction, images)
    if kind == "l1":
        return F.l1_loss(reconstruction, images)
    raise ValueError(f"pixel loss must be 'l1' or 'l2', got {kind!r}")


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), as in VQGAN."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: Tensor) -> Tensor:
    """-mean D(x_hat)."""
    return -logits_fake.mean()


def adaptive_weight(reconstruction_loss: Tensor, generator_loss: Tensor, last_layer: Tensor, maximum: float = 1e4) -> Tensor:
    """VQGAN's balance of the adversarial term: ratio of gradient norms at ``last_layer``, clamped and detached."""
    reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    generator_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grad.norm() / (generator_grad.norm() + 1e-4)
    return weight.clamp(0.0, maximum).detach()


def vgg_features(layout: list) -> nn.Sequential:
    """A VGG feature stack with torchvision's module indices (conv, relu, ..., maxpool), so its state-dict keys match
    ``torchvision.models.vgg16().features``."""
    layers: list[nn.Module] = []
    channels = 3
    for entry in layout:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, entry, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = entry
    return nn.Sequential(*layers)


class VGGFeatures(nn.Module):
    """Frozen VGG16 feature stack loaded from a safetensors file.

    forward(images (B, 1 or 3, H, W) in [-1, 1]) -> list of the five tapped activations (B, C_l, H_l, W_l).
    The file may hold the bare stack (``0.weight`` ...) or a whole torchvision VGG16 (``features.0.weight`` ...;
    the classifier keys are ignored). Anything that is not safetensors is refused before being read.
    """

    def __init__(self, weights: str | os.PathLike, network: str = "vgg16"):
        super().__init__()
        if network not in VGG_LAYOUTS:
            raise ValueError(f"unknown feature network {network!r}; known: {sorted(VGG_LAYOUTS)}")
        self.network = network
        self.layers = vgg_features(VGG_LAYOUTS[network])
        self.channels = [VGG_LAYOUTS[network][i] for i in (1, 4, 8, 12, 16)]
        state = load_weights(weights)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        expected = {k: v.shape for k, v in self.layers.state_dict().items()}
        found = {k: v.shape for k, v in state.items()}
        if found != expected:
            missing = sorted(set(expected) - set(found))[:4]
            unexpected = sorted(set(found) - set(expected))[:4]
            wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])[:4]
            raise ValueError(
                f"{weights} does not hold {network} features: missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
            )
        self.layers.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        # frozen: stays in eval mode whatever the enclosing module does
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in VGG_TAPS:
                taps.append(x)
        return taps


def load_lpips_heads(channels: list[int]) -> list[Tensor]:
    """LPIPS v0.1's VGG16 linear heads from the shipped file: one non-negative (C_l,) weight per tap."""
    state = load_weights(LPIPS_HEADS_FILE)
    heads = [state.get(f"head{layer}") for layer in range(len(channels))]
    for layer, (head, width) in enumerate(zip(heads, channels)):
        if head is None or tuple(head.shape) != (width,) or head.min() < 0:
            raise ValueError(
                f"{LPIPS_HEADS_FILE}: head{layer} must be a non-negative ({width},) tensor; rebuild the file with "
                "scripts/convert_lpips.py"
            )
    return heads


class PerceptualLoss(nn.Module):
    """LPIPS (Zhang et al. 2018, version 0.1, VGG16): forward(reconstruction, images) -> per-image distance (B,).

    Inputs (B, 1 or 3, H, W) in [-1, 1]. ``weights``: the VGG16 trunk (a safetensors file, see :class:`VGGFeatures`).
    ``heads``: ``"lpips"`` (the calibrated linear heads shipped with flexar; VGG16 only) or ``"baseline"`` (every
    channel weight 1, the LPIPS paper's uncalibrated variant). The heads are fixed buffers, not saved with the loss.
    """

    def __init__(self, weights: str | os.PathLike, network: str = "vgg16", heads: str = "lpips"):
        super().__init__()
        if heads not in PERCEPTUAL_HEADS:
            raise ValueError(f"perceptual heads must be one of {PERCEPTUAL_HEADS}, got {heads!r}")
        if heads == "lpips" and network != "vgg16":
            raise ValueError(
                f"LPIPS's calibrated heads exist for the vgg16 trunk only, not {network!r}; use heads='baseline' "
                "(perceptual_heads in ReconstructionLoss) for it"
            )
        self.features = VGGFeatures(weights, network)
        self.heads = heads
        weights_per_layer = (
            load_lpips_heads(self.features.channels) if heads == "lpips" else [torch.ones(c) for c in self.features.channels]
        )
        for layer, weight in enumerate(weights_per_layer):
            self.register_buffer(f"head{layer}", weight.view(1, -1, 1, 1), persistent=False)

    def forward(self, reconstruction: Tensor, images: Tensor) -> Tensor:
        distance = reconstruction.new_zeros(reconstruction.shape[0])
        for layer, (fake, real) in enumerate(zip(self.features(reconstruction), self.features(images))):
            # LPIPS's normalize_tensor: unit length over channels at every position
            fake = fake / (fake.norm(dim=1, keepdim=True) + 1e-10)
            real = real / (real.norm(dim=1, keepdim=True) + 1e-10)
            # the 1x1 linear head on the squared difference, then the spatial mean
            weighted = ((fake - real) ** 2 * getattr(self, f"head{layer}")).sum(dim=1)
            distance = distance + weighted.mean(dim=(1, 2))
        return distance


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix's NLayerDiscriminator as used by VQGAN): 4x4 convs, ``layers`` of them with stride 2,
    channels doubling up to 8x, then a stride-1 conv and a 1-channel output. forward((B, C, H, W)) -> (B, 1, h, w)."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"discriminator norm must be 'batch', 'group' or 'none', got {norm!r}")

        def normalisation(dim: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(dim)
            if norm == "group":
                return nn.GroupNorm(math.gcd(32, dim), dim)
            return nn.Identity()

        # no bias before a norm layer (pix2pix)
        bias = norm == "none"
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        multiplier = 1
        for index in range(1, layers + 1):
            previous, multiplier = multiplier, min(2**index, 8)
            stride = 2 if index < layers else 1
            blocks += [
                nn.Conv2d(width * previous, width * multiplier, 4, stride=stride, padding=1, bias=bias),
                normalisation(width * multiplier),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(width * multiplier, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*blocks)
        # VQGAN's weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class ReconstructionLoss(nn.Module):
    """Pixel + perceptual + adversarial reconstruction objective (see the module docstring).

    Args:
        channels: image channels (the discriminator's input).
        pixel: ``"l2"`` or ``"l1"``.
        pixel_weight: weight of the pixel term.
        perceptual_weight: weight of the LPIPS term (the papers' LPIPS weight); > 0 needs ``perceptual_weights``.
        perceptual_weights: safetensors file of the VGG16 feature stack.
        perceptual_network: ``"vgg16"`` or ``"vgg16-narrow"`` (the layout of the weights file).
        perceptual_heads: ``"lpips"`` (calibrated, vgg16 only) or ``"baseline"`` (uncalibrated, every channel weight 1).
        adversarial_weight: weight of the generator term; 0 builds no discriminator.
        discriminator_start: tokenizer step from which the adversarial terms are on (and the discriminator trains).
        discriminator_width, discriminator_layers, discriminator_norm: the PatchGAN's size and normalisation.
        adaptive_weight: scale the generator term by VQGAN's gradient-norm ratio.
        max_adaptive_weight: upper clamp of that ratio.

    ``forward(images, reconstruction, step=0, last_layer=None) -> (loss, logs)`` is the tokenizer's side; it keeps
    the detached reconstruction in ``last_reconstruction`` so that ``discriminator_loss`` can score the same images
    without running the tokenizer twice.
    """

    def __init__(
        self,
        channels: int = 3,
        pixel: str = "l2",
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_weights: str | None = None,
        perceptual_network: str = "vgg16",
        perceptual_heads: str = "lpips",
        adversarial_weight: float = 0.5,
        discriminator_start: int = 20000,
        discriminator_width: int = 64,
        discriminator_layers: int = 3,
        discriminator_norm: str = "batch",
        adaptive_weight: bool = True,
        max_adaptive_weight: float = 1e4,
    ):
        super().__init__()
        if pixel not in ("l1", "l2"):
            raise ValueError(f"pixel must be 'l1' or 'l2', got {pixel!r}")
        if min(pixel_weight, perceptual_weight, adversarial_weight) < 0:
            raise ValueError("loss weights must be non-negative")
        if perceptual_heads not in PERCEPTUAL_HEADS:
            raise ValueError(f"perceptual_heads must be one of {PERCEPTUAL_HEADS}, got {perceptual_heads!r}")
        if perceptual_weight > 0 and perceptual_weights is None:
            raise ValueError(
                f"perceptual_weight {perceptual_weight} needs perceptual_weights, a safetensors file of the "
                f"{perceptual_network} feature stack; set perceptual_weight to 0 to train without the perceptual term"
            )
        self.channels, self.pixel, self.pixel_weight = channels, pixel, pixel_weight
        self.perceptual_weight, self.adversarial_weight = perceptual_weight, adversarial_weight
        self.discriminator_start = discriminator_start
        self.use_adaptive_weight, self.max_adaptive_weight = adaptive_weight, max_adaptive_weight
        self.perceptual = (
            PerceptualLoss(perceptual_weights, perceptual_network, perceptual_heads) if perceptual_weight > 0 else None
        )
        self.discriminator = (
            PatchDiscriminator(channels, discriminator_width, discriminator_layers, discriminator_norm)
            if adversarial_weight > 0
            else None
        )
        self.last_reconstruction: Tensor | None = None

    def adversarial_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.discriminator_start

    def forward(self, images: Tensor, reconstruction: Tensor, step: int = 0, last_layer: Tensor | None = None):
        """The tokenizer's reconstruction loss (a scalar) and its logs."""
        self.last_reconstruction = reconstruction.detach()
        pixel = pixel_loss(reconstruction, images, self.pixel)
        loss = self.pixel_weight * pixel
        logs = {"reconstruction": pixel.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstruction, images).mean()
            loss = loss + self.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        if self.adversarial_active(step):
            generator = hinge_generator_loss(self.discriminator(reconstruction))
            weight = torch.ones((), device=images.device)
            if self.use_adaptive_weight and last_layer is not None and torch.is_grad_enabled() and generator.requires_grad:
                weight = adaptive_weight(loss, generator, last_layer, self.max_adaptive_weight)
            loss = loss + self.adversarial_weight * weight * generator
            logs["generator"] = generator.detach()
            logs["adaptive_weight"] = weight.detach()
        return loss, logs

    def discriminator_loss(self, images: Tensor, reconstruction: Tensor, step: int = 0) -> tuple[Tensor, dict]:
        """Hinge loss of the discriminator on real images and (detached) reconstructions; zero before the start."""
        if not self.adversarial_active(step):
            zero = images.new_zeros(())
            return zero, {"discriminator": zero}
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstruction.detach())
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        logs = {
            "discriminator": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs
