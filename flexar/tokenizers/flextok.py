"""FlexTok: a flexible-length 1D tokenizer with a rectified-flow decoder ("FlexTok: Resampling Images into 1D Token
Sequences of Flexible Length", Bachmann et al., ICML 2025; apple/ml-flextok).

Encoder: a transformer over [P target patches; N learned register tokens] with the ``causal_last`` mask (patches
attend patches only; register i attends every patch and registers <= i), so the first k register outputs do not
depend on the registers after them. The register outputs are projected to len(fsq_levels) channels and quantised
with FSQ (levels [8, 8, 8, 5, 5, 5], 64,000 codes).

Nested dropout: during training each image keeps its first k registers, k drawn by ``length_sampling``:

- ``uniform``: k ~ U{1..N};
- ``pow2``: k uniform over the powers of two {1, 2, 4, ..., N};
- ``uniform_pow2`` (the official ``MaskedNestedDropout``): k ~ U{1..N}, then rounded up to the next power of two,
  so P(k = 2^j) = 2^(j-1) / N for j >= 1 and P(k = 1) = 1 / N (bias toward long sequences).

Registers at positions >= k are replaced by ONE learned mask token. ``encode(images, num_tokens=k)`` keeps the first
k ids (``default_num_tokens`` sets the default k); ``decode`` pads short or masked sequences with the same mask token.

Decoder: a transformer over [P noised target patches; N kept registers] (full attention), AdaLN-zero conditioned on
the flow time, predicting the rectified-flow velocity. With x_t = sigma * noise + (1 - sigma) * x and sigma
logit-normal, the target velocity is noise - x and the loss is its MSE. ``decode`` integrates the ODE with Euler
steps from sigma = 1 to 0 (``num_steps``, default 25), with classifier-free guidance against the null condition
(every register set to the mask token) when ``guidance_scale`` != 1; ``null_condition_prob`` drops all registers of
an image during training so that the null condition is learned (default 0, see below: set it, e.g. to 0.1, before
decoding with guidance). The target is either pixels (``target="pixels"``,
tiny images) or the latents of a frozen :class:`flexar.tokenizers.VAE` loaded from ``vae_path``
(``target="vae"``, as in the paper; a saved FlexTok records the VAE's own config instead, see below). An optional
REPA loss aligns the decoder's patch features after block ``alignment_layer`` (through an MLP projector) with a frozen
teacher's features of the clean image (negative cosine).

Shapes: images (B, C, H, W) in [-1, 1]; ids (B, L <= N) long; P = (target side / patch_size) ** 2.

Differences from the paper and its official code:

- separate AdaLN modulation for patches and registers (the official ``adaLN_expansion=2``) is implemented with
  flexar's per-token AdaLN: every token's condition is [t * is_patch, t * is_register, is_patch, is_register], so
  the zero-initialised modulation layer learns independent affine maps of SiLU(t) for the two token types.
  ``separate_modulation=False`` shares one modulation.
- the null condition for guidance is the all-mask-token register sequence (the k = 0 end of nested dropout); the
  official code has a separate null-condition module (zeros or a learned token). The released code has no training
  config, so no published rate exists; 0.1 is the usual classifier-free-guidance rate.
- the defaults are the recipe that makes the registers carry the image at small budgets: ``qk_norm=False``,
  ``sigma_mean=1.0`` and ``null_condition_prob=0`` (and learning rate 3e-3 in the configs). With QK-norm, the
  standard logit-normal (``sigma_mean=0``, as in SD3's rectified flow) and 10 % null-register dropout, flexar's
  ``tokens_vs_quality`` benchmark (1500 steps on MNIST) found that the decoder ignored the registers: MSE flat
  at 0.33 for every k. A mean of 1.0 puts more of the training on noisy inputs, where x_t alone says little and the
  decoder has to read the registers. Guidance (``guidance_scale`` != 1) needs a learned null condition, so a model
  meant for it trains with ``null_condition_prob`` > 0.
- default ``length_sampling`` is ``pow2`` (the paper trains on powers of two); the official module's default is
  ``uniform``. The pow2 modes require N to be a power of two, as the official code does.
- learned absolute position embeddings for patches and registers (the official code uses 2D sin-cos for patches).
- ``guidance_scale`` defaults to 1 (plain Euler); the paper reports reconstructions with CFG 7.5 plus APG
  (adaptive projected guidance), which flexar does not implement.
- ``alignment_weight`` defaults to 0: the paper aligns with DINOv2-L (weight 1), which has no counterpart at CPU scale.
  The teacher is pluggable: a folder written by ``save_pretrained`` of any flexar-registered model mapping images to
  features (B, C, h, w) or (B, h * w, C), or any callable through :meth:`FlexTok.set_teacher`. It is frozen
  and kept out of the state dict and out of the saved config (which records ``teacher_dim`` instead): a
  loaded FlexTok decodes without its teacher, and training it further with REPA needs the teacher attached again.
- the frozen VAE is a submodule whose weights are saved with the tokenizer. The saved config records the VAE's own
  config (``vae_config``: class and keyword arguments) in place of ``vae_path``, so a saved folder rebuilds the
  architecture and fills it from its own ``model.safetensors``, on any machine and from any working directory.
- the noise level enters the decoder as DiT's sinusoidal features of 1000 * sigma with ``max_period`` 10000; the
  official FlexTok uses ``max_period`` 256. ``timestep_max_period=256`` restores it.
- with ``target="vae"`` the flow runs on the VAE's standardised latents: :class:`flexar.tokenizers.VAE` subtracts
  a shift and multiplies by 1 / std, both running estimates over its training posteriors, so the latents have about
  unit variance; the official FlexTok applies the fixed scaling and shift factors stored with its released VAE.
- the paper presets (``flextok-d12-d12``, ``-d18-d18``, ``-d18-d28``) hold the official trunks: their attention and
  MLP weights, 12 * depth * width ** 2 per transformer (170M, 573M and 1.37B for encoder + decoder), match the
  official blocks within 0.1 % (``tests/test_tokenizer_presets.py``). The rest differs in form, so the totals do not
  match the official ones: the AdaLN modulation is the per-token form above (a (2 * width + 2) -> 6 * width layer
  per block where the official ``adaLN_expansion=2`` has width -> 12 * width), positions are learned tables, and the
  frozen VAE (84M) is a submodule counted with the tokenizer.
- ``decode`` runs without gradients; with ``generator=None`` image i of a batch draws its noise from the per-image
  stream (seed 0, index i) of :class:`flexar.sampling.streams.ImageStreams`, so ``decode`` and ``reconstruct`` are
  deterministic and an image's decode does not depend on the batch it is in (pass a seeded ``torch.Generator`` or
  ``ImageStreams`` for other draws).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import build_from_config, load_model, register
from ..nn import Mask, Transformer, timestep_embedding
from ..sampling.streams import ImageStreams, normal
from ..quantizers import FSQ
from .base import LENGTH_SAMPLING, Encoded, Tokenizer, check_criterion, sample_lengths
from .titok import patchify, unpatchify
from .vae import VAE


def flextok_size(encoder_depth: int, decoder_depth: int) -> dict:
    """The paper's "dE-dD" size: each transformer 64 * depth wide with heads of 64 channels."""
    return dict(width=64 * encoder_depth, depth=encoder_depth, num_heads=encoder_depth, decoder_width=64 * decoder_depth,
                decoder_depth=decoder_depth, decoder_heads=decoder_depth)


# the paper's 16-channel f8 VAE (EPFL-VILAB/flextok_vae_c16, an SDXL-style KL autoencoder), as FlexTok records it
FLEXTOK_VAE = {"class": "VAE", "kwargs": VAE.presets["vae-f8c16"]}
# the paper's layout around the transformers: 256 x 256 RGB through the frozen VAE (32 x 32 x 16 latents), 2 x 2
# patches (256 of them), 256 registers, FSQ [8, 8, 8, 5, 5, 5], powers-of-two nested dropout, the official blocks
# (GELU MLP, QK-norm, per-type AdaLN-zero), the SD3 logit-normal noise levels, a timestep embedding of period 256,
# REPA toward DINOv2-L's 1024 channels (weight 1; the teacher is attached with set_teacher), and guidance 7.5
# against a null condition trained on 10 % of the images
FLEXTOK_LAYOUT = dict(image_size=256, channels=3, patch_size=2, num_registers=256, target="vae", vae_config=FLEXTOK_VAE,
                      mlp="gelu", qk_norm=True, fsq_levels=[8, 8, 8, 5, 5, 5], length_sampling="pow2", sigma_mean=0.0,
                      sigma_std=1.0, timestep_max_period=256.0, teacher_dim=1024, alignment_weight=1.0,
                      guidance_scale=7.5, null_condition_prob=0.1)

TARGETS = ("pixels", "vae")


def causal_last_mask(num_patches: int) -> Mask:
    """Patches (positions < num_patches) attend patches only; each register attends all patches and the registers
    up to and including itself."""
    return Mask(lambda q, kv: (kv < num_patches) | ((q >= num_patches) & (kv <= q)), name="causal_last")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sample_sigmas(batch_size: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                  device=None) -> Tensor:
    """(batch_size,) logit-normal noise levels sigmoid(N(mean, std^2)) in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator)).to(device)


def flow_interpolant(x: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Rectified flow: x_t = sigma * noise + (1 - sigma) * x and the velocity dx_t / dsigma = noise - x.

    x, noise: (B, ...); sigma: (B,). Returns (x_t, velocity), both shaped like x.
    """
    sigma = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return sigma * noise + (1 - sigma) * x, noise - x


def euler_sample(velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, num_steps: int) -> Tensor:
    """Integrate dx/dsigma = velocity(x, sigma (B,)) from sigma = 1 (x = noise) to sigma = 0 in uniform Euler steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, device=noise.device)
    x = noise
    for step in range(num_steps):
        sigma = sigmas[step].expand(noise.shape[0])
        x = x + (sigmas[step + 1] - sigmas[step]) * velocity(x, sigma)
    return x


@register
class FlexTok(Tokenizer):
    """Flexible-length 1D tokenizer: ``encode(images, num_tokens=k)`` keeps the first k of ``num_registers`` ids."""

    presets = {
        # the paper's "dE-dD" tokenizers (encoder / decoder depth d, width 64 * d, head dim 64; apple/ml-flextok,
        # EPFL-VILAB/flextok_d*_in1k) on the whole paper layout, FLEXTOK_LAYOUT
        "flextok-d12-d12": dict(FLEXTOK_LAYOUT, **flextok_size(12, 12)),
        "flextok-d18-d18": dict(FLEXTOK_LAYOUT, **flextok_size(18, 18)),
        "flextok-d18-d28": dict(FLEXTOK_LAYOUT, **flextok_size(18, 28)),
        # CPU-sized presets for digits / MNIST
        "flextok-tiny": dict(width=64, depth=2, num_heads=4, decoder_width=64, decoder_depth=2, decoder_heads=4),
        "flextok-digits": dict(width=128, depth=3, num_heads=4, decoder_width=128, decoder_depth=3, decoder_heads=4),
    }

    decode_draws = True

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        patch_size: int = 4,
        num_registers: int = 32,
        width: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        mlp: str = "swiglu",
        norm: str = "layer",
        qk_norm: bool = False,
        fsq_levels: list[int] | None = None,
        length_sampling: str = "pow2",
        default_num_tokens: int | None = None,
        target: str = "pixels",
        vae_path: str | None = None,
        vae_config: dict | None = None,
        sigma_mean: float = 1.0,
        sigma_std: float = 1.0,
        num_steps: int = 25,
        guidance_scale: float = 1.0,
        null_condition_prob: float = 0.0,
        separate_modulation: bool = True,
        teacher: str | None = None,
        teacher_dim: int | None = None,
        alignment_weight: float = 0.0,
        alignment_layer: int | None = None,
        projector_dim: int = 2048,
        attention_backend: str = "auto",
        timestep_max_period: float = 10000.0,
    ):
        super().__init__()
        if length_sampling not in LENGTH_SAMPLING:
            raise ValueError(f"unknown length_sampling {length_sampling!r}; expected one of {LENGTH_SAMPLING}")
        if length_sampling != "uniform" and not is_power_of_two(num_registers):
            raise ValueError(f"length_sampling {length_sampling!r} needs a power-of-two num_registers, got {num_registers}")
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
        if default_num_tokens is not None and not 1 <= default_num_tokens <= num_registers:
            raise ValueError(f"default_num_tokens must lie in [1, {num_registers}], got {default_num_tokens}")
        if not 0.0 <= null_condition_prob < 1.0:
            raise ValueError(f"null_condition_prob must lie in [0, 1), got {null_condition_prob}")
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        self.max_tokens = num_registers
        self.length_sampling, self.default_num_tokens, self.target = length_sampling, default_num_tokens, target
        self.sigma_mean, self.sigma_std = sigma_mean, sigma_std
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self.timestep_max_period = timestep_max_period
        self.null_condition_prob, self.separate_modulation = null_condition_prob, separate_modulation

        self.vae = None
        target_channels, target_size = channels, image_size
        if target == "vae":
            if (vae_path is None) == (vae_config is None):
                raise ValueError('target="vae" needs exactly one of vae_path (the folder of a trained flexar VAE) and '
                                 'vae_config (its {"class", "kwargs"}, as a saved FlexTok records it), got '
                                 f"vae_path={vae_path!r}, vae_config={vae_config!r}")
            if vae_path is not None:
                source, self.vae = f"the VAE in {vae_path}", load_model(vae_path, kind=VAE)
            else:  # untrained here: a saved FlexTok fills it from its own weights file
                source, self.vae = "the VAE of vae_config", build_from_config(vae_config, kind=VAE, source="vae_config")
            self.vae.requires_grad_(False).eval()
            if self.vae.channels != channels or image_size % self.vae.downsample:
                raise ValueError(f"{source} takes {self.vae.channels}-channel images with sides divisible "
                                 f"by {self.vae.downsample}; this tokenizer has {channels} channels, side {image_size}")
            target_channels, target_size = self.vae.latent_channels, image_size // self.vae.downsample
        if target_size % patch_size:
            raise ValueError(f"the {target} grid side {target_size} must be divisible by patch_size {patch_size}")
        self.target_channels, self.target_size = target_channels, target_size
        self.num_patches = (target_size // patch_size) ** 2
        patch_dim = target_channels * patch_size * patch_size

        self.quantizer = FSQ(list(fsq_levels or [8, 8, 8, 5, 5, 5]))
        self.codebook_size, self.code_dim = self.quantizer.codebook_size, self.quantizer.dim

        # encoder
        self.mask = causal_last_mask(self.num_patches)
        self.patch_embed = nn.Linear(patch_dim, width)
        self.patch_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(num_registers, width) * 0.02)
        self.encoder = Transformer(width, depth, num_heads, mlp=mlp, norm=norm, qk_norm=qk_norm, backend=attention_backend)
        self.to_code = nn.Linear(width, self.code_dim)

        # decoder
        decoder_width = decoder_width or width
        decoder_depth = decoder_depth or depth
        decoder_heads = decoder_heads or max(1, num_heads * decoder_width // width)
        self.decoder_width = decoder_width
        self.time_embed = nn.Sequential(nn.Linear(decoder_width, decoder_width), nn.SiLU(), nn.Linear(decoder_width, decoder_width))
        self.noised_embed = nn.Linear(patch_dim, decoder_width)
        self.decoder_patch_pos = nn.Parameter(torch.randn(self.num_patches, decoder_width) * 0.02)
        self.from_code = nn.Linear(self.code_dim, decoder_width)
        self.register_pos = nn.Parameter(torch.randn(num_registers, decoder_width) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(decoder_width) * 0.02)
        cond_dim = 2 * decoder_width + 2 if separate_modulation else decoder_width
        self.decoder = Transformer(decoder_width, decoder_depth, decoder_heads, mlp=mlp, norm=norm, cond_dim=cond_dim,
                                   qk_norm=qk_norm, backend=attention_backend)
        self.to_velocity = nn.Linear(decoder_width, patch_dim)
        nn.init.zeros_(self.to_velocity.weight)  # start by predicting zero velocity (DiT's zero-initialised head)
        nn.init.zeros_(self.to_velocity.bias)

        # REPA
        self.alignment_weight = alignment_weight
        self.alignment_layer = alignment_layer or max(1, decoder_depth // 3)
        if not 1 <= self.alignment_layer <= decoder_depth:
            raise ValueError(f"alignment_layer must lie in [1, {decoder_depth}], got {alignment_layer}")
        object.__setattr__(self, "_teacher", None)  # frozen, deliberately not a submodule (not saved)
        if teacher is not None:
            teacher = load_model(teacher).requires_grad_(False).eval()
            object.__setattr__(self, "_teacher", teacher)
            teacher_dim = teacher_dim or self._teacher_features(torch.zeros(1, channels, image_size, image_size)).shape[-1]
        if alignment_weight > 0 and teacher_dim is None:
            raise ValueError("alignment_weight > 0 needs teacher (a folder) or teacher_dim with set_teacher()")
        self.projector = None
        if teacher_dim is not None:
            self.projector = nn.Sequential(
                nn.Linear(decoder_width, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                nn.SiLU(), nn.Linear(projector_dim, teacher_dim),
            )

    def _saved_config(self, config: dict) -> dict:
        """Record the frozen VAE's config instead of the folder it was read from, and the REPA teacher's width
        instead of its folder (the teacher is not saved), so that the saved folder alone rebuilds this tokenizer."""
        config = dict(config)
        if self.vae is not None:
            config["vae_path"] = None
            config["vae_config"] = {"class": type(self.vae).__name__, "kwargs": self.vae.config}
        if config.get("teacher") is not None:
            config["teacher"] = None
            config["teacher_dim"] = self.projector[-1].out_features
        return config

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen
        return self

    # -- targets ---------------------------------------------------------------------------------------------------
    def to_target(self, images: Tensor) -> Tensor:
        """Images -> the grid the flow models: the images themselves, or the frozen VAE's latents (B, C', h, w)."""
        self.check_images(images)
        if self.vae is None:
            return images
        with torch.no_grad():
            return self.vae.encode_latents(images)

    def from_target(self, target: Tensor) -> Tensor:
        return target if self.vae is None else self.vae.decode_latents(target)

    # -- encoder ---------------------------------------------------------------------------------------------------
    def encoder_hidden(self, target: Tensor, num_registers: int | None = None) -> tuple[Tensor, Tensor]:
        """target grid (B, C', h, w) -> encoder outputs (patches (B, P, width), registers (B, n, width)).

        With ``causal_last`` the first n register outputs are the same for any number of registers >= n.
        """
        count = self.max_tokens if num_registers is None else num_registers
        patches = self.patch_embed(patchify(target, self.patch_size)) + self.patch_pos
        registers = self.register_tokens[:count].expand(target.shape[0], -1, -1)
        hidden = self.encoder(torch.cat([patches, registers], dim=1), mask=self.mask)
        return hidden[:, : self.num_patches], hidden[:, self.num_patches :]

    def encode_latents(self, images: Tensor, num_registers: int | None = None) -> Tensor:
        """(B, C, H, W) -> continuous register latents before FSQ (B, n, code_dim)."""
        return self.to_code(self.encoder_hidden(self.to_target(images), num_registers)[1])

    @torch.no_grad()
    def encode(self, images: Tensor, num_tokens: int | None = None) -> Encoded:
        keep = self.check_num_tokens(num_tokens if num_tokens is not None else self.default_num_tokens)
        ids = self.quantizer(self.encode_latents(images, keep)).ids  # causal_last: k registers suffice for k ids
        return Encoded(ids, torch.full((images.shape[0],), keep, dtype=torch.long, device=images.device))

    # -- decoder ---------------------------------------------------------------------------------------------------
    def decoder_registers(self, codes: Tensor, keep: Tensor) -> Tensor:
        """codes (B, L <= N, code_dim), keep (B,) -> decoder register inputs (B, N, decoder_width); positions >= keep
        (and >= L) hold the mask token, so the output cannot depend on the codes there."""
        batch, length = codes.shape[:2]
        hidden = self.from_code(codes.to(self.from_code.weight.dtype))  # codes from ids are float32
        if length < self.max_tokens:
            hidden = torch.cat([hidden, self.mask_token.expand(batch, self.max_tokens - length, -1)], dim=1)
        kept = torch.arange(self.max_tokens, device=codes.device)[None, :] < keep[:, None]
        return torch.where(kept[..., None], hidden, self.mask_token) + self.register_pos

    def condition(self, sigma: Tensor) -> Tensor:
        """(B,) noise levels -> AdaLN condition (B, dim), or (B, P + N, 2 * dim + 2) with separate modulation."""
        features = timestep_embedding(sigma, self.decoder_width, self.timestep_max_period)  # float32
        time = self.time_embed(features.to(self.time_embed[0].weight.dtype))
        if not self.separate_modulation:
            return time
        is_register = (torch.arange(self.num_patches + self.max_tokens, device=sigma.device) >= self.num_patches)
        is_register = is_register.to(time.dtype)[None, :, None].expand(time.shape[0], -1, 1)
        is_patch = 1 - is_register
        time = time[:, None, :]
        return torch.cat([time * is_patch, time * is_register, is_patch, is_register], dim=-1)

    def velocity(self, noised: Tensor, registers: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """noised patches (B, P, patch_dim), registers (B, N, width), sigma (B,) -> (velocity (B, P, patch_dim),
        patch features after block ``alignment_layer`` (B, P, width))."""
        hidden = torch.cat([self.noised_embed(noised) + self.decoder_patch_pos, registers], dim=1)
        cond = self.condition(sigma)
        features = None
        for index, block in enumerate(self.decoder.blocks):
            hidden = block(hidden, cond=cond, layer_index=index)
            if index + 1 == self.alignment_layer:
                features = hidden[:, : self.num_patches]
        hidden = self.decoder.final_norm(hidden)
        shift, scale = self.decoder.final_modulation(cond if cond.dim() == 3 else cond[:, None]).chunk(2, dim=-1)
        hidden = hidden * (1 + scale) + shift
        return self.to_velocity(hidden[:, : self.num_patches]), features

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, lengths: Tensor | None = None, generator: torch.Generator | None = None,
                     num_steps: int | None = None, guidance_scale: float | None = None) -> Tensor:
        """codes (B, L <= N, code_dim) -> images (B, C, H, W) by Euler integration of the flow from seeded noise."""
        batch, device = codes.shape[0], codes.device
        keep = lengths.to(device).long() if lengths is not None else torch.full((batch,), codes.shape[1], device=device)
        registers = self.decoder_registers(codes, keep)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if scale != 1.0:
            registers = torch.cat([registers, self.decoder_registers(codes, torch.zeros_like(keep))])
        if generator is None:  # image i's noise depends on i alone, never on the batch it is decoded in
            generator = ImageStreams(0, torch.arange(batch), device)
        shape = (batch, self.num_patches, self.target_channels * self.patch_size**2)
        noise = normal(generator, shape, device).to(dtype=codes.dtype)

        def guided_velocity(x: Tensor, sigma: Tensor) -> Tensor:
            if scale == 1.0:
                return self.velocity(x, registers, sigma)[0]
            conditional, null = self.velocity(torch.cat([x, x]), registers, torch.cat([sigma, sigma]))[0].chunk(2)
            return null + scale * (conditional - null)

        patches = euler_sample(guided_velocity, noise, self.num_steps if num_steps is None else num_steps)
        return self.from_target(unpatchify(patches, self.patch_size, self.target_size))

    def decode(self, ids: Tensor, lengths: Tensor | None = None, generator: torch.Generator | None = None,
               num_steps: int | None = None, guidance_scale: float | None = None) -> Tensor:
        lengths = self.check_ids(ids, lengths)
        codes = self.quantizer.ids_to_codes(ids).to(self.mask_token.dtype)
        return self.decode_codes(codes, lengths, generator, num_steps, guidance_scale)

    def code_vectors(self) -> Tensor:
        return self.quantizer.code_vectors()

    # -- REPA ------------------------------------------------------------------------------------------------------
    def set_teacher(self, teacher: Callable[[Tensor], Tensor]) -> None:
        """Attach a frozen feature network (any callable images -> (B, C, h, w) or (B, h * w, C)); not saved."""
        if self.projector is None:
            raise ValueError("this FlexTok has no REPA projector: build it with teacher_dim (the teacher's channels)")
        if isinstance(teacher, nn.Module):
            teacher.requires_grad_(False).eval()
        object.__setattr__(self, "_teacher", teacher)

    def _teacher_features(self, images: Tensor) -> Tensor:
        """Frozen teacher features resampled to the decoder's patch grid: (B, P, C_teacher)."""
        teacher = self._teacher
        if isinstance(teacher, nn.Module):
            teacher.to(images.device)
        with torch.no_grad():
            features = teacher(images)
        if features.dim() == 3:  # (B, h * w, C) tokens on a square grid
            side = math.isqrt(features.shape[1])
            if side * side != features.shape[1]:
                raise ValueError(f"REPA teacher tokens must form a square grid, got {features.shape[1]}")
            features = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
        grid = self.target_size // self.patch_size
        features = F.interpolate(features.float(), size=(grid, grid), mode="bilinear", align_corners=False)
        return features.flatten(2).transpose(1, 2)

    # -- objective -------------------------------------------------------------------------------------------------
    def sample_lengths(self, batch_size: int, device) -> Tensor:
        """Training: registers kept per image under nested dropout, (B,) long, drawn by ``length_sampling``
        (:func:`flexar.tokenizers.base.sample_lengths`, one count per image as the official module draws)."""
        return sample_lengths(batch_size, self.max_tokens, self.length_sampling, per_sample=True, device=device)

    def training_loss(self, images: Tensor, criterion=None, step: int = 0) -> tuple[Tensor, dict]:
        check_criterion(self, criterion)
        grid = self.to_target(images)
        target = patchify(grid, self.patch_size)
        batch, device = images.shape[0], images.device
        quantized = self.quantizer(self.to_code(self.encoder_hidden(grid)[1]))
        keep = self.sample_lengths(batch, device)
        if self.null_condition_prob > 0:
            keep = torch.where(torch.rand(batch, device=device) < self.null_condition_prob, 0, keep)
        registers = self.decoder_registers(quantized.codes, keep)
        sigma = sample_sigmas(batch, self.sigma_mean, self.sigma_std, device=device)
        noised, velocity_target = flow_interpolant(target, torch.randn_like(target), sigma)
        velocity, features = self.velocity(noised, registers, sigma)
        flow = F.mse_loss(velocity, velocity_target)
        loss = flow
        logs = {"flow": flow.detach(), "lengths": keep.float().mean()}
        if self.alignment_weight > 0:
            if self._teacher is None:
                raise ValueError("alignment_weight > 0 but no REPA teacher is attached (teacher or set_teacher)")
            aligned = F.cosine_similarity(self.projector(features), self._teacher_features(images), dim=-1)
            alignment = (1 - aligned).mean()
            loss = loss + self.alignment_weight * alignment
            logs["alignment"] = alignment.detach()
        logs = {"loss": loss.detach(), **logs, **{f"codebook_{k}": v for k, v in quantized.logs.items()}}
        return loss, logs
