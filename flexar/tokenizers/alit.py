"""ALIT: adaptive-length tokenization by recurrent allocation ("Adaptive Length Image Tokenization via Recurrent
Allocation", Duggal et al., ICLR 2025; ShivamDuggal4/adaptive-length-tokenizer, adaptive_tokenizers/adaptive_vqgan.py),
and the latent-distillation machinery it shares with KARL (:mod:`flexar.tokenizers.karl`).

Latent distillation (both families). A frozen 2D VQ tokenizer (:class:`flexar.tokenizers.VQGAN2D`, in the role of
the official MAGE VQGAN) gives each image an h x w grid of base ids. Image token n = [patch embedding of grid cell n
(a conv whose kernel and stride are the base's downsampling), the base's pre-quantisation latent of cell n], N = h * w
tokens of ``width``. An encoder transformer distils them into 1D latent tokens; each latent is projected to
``code_dim`` (factorised) and quantised by an l2-normalised VQ, whose ids are this tokenizer's tokens. A decoder
transformer over [N mask tokens (+ grid positions), latent codes (+ latent positions)] predicts logits over the base
codebook at every cell. Objective: cross-entropy with the base ids + MSE between the soft code (softmax(logits) @ the
base codebook) and the base code + the VQ loss. Images come back through the frozen base decoder from the soft code.

ALIT. Rollout iteration t (t = 1 .. ``max_iterations``) appends ``tokens_per_iteration`` new latents (the same
learned vectors + their position embedding + iteration t's embedding) to the encoder's previous *output* state,
passes [image tokens, all latents] through ``encoder_ln_recursive`` (a LayerNorm) and the encoder again, so that
earlier latents and the image tokens are refined, never re-embedded; the t * k latents so far are quantised and
decoded. Dynamic halting: after iteration t, each image token whose base id the decoder already predicts with
probability p >= ``halting_threshold`` (0.55) is replaced in the state by the mask token + its position (in
training where additionally Bernoulli(p) = 1). Loss: sum over iterations of ``loss_weights[t]`` * cross-entropy +
code MSE + VQ loss. Inference (:meth:`ALIT.encode`): the first iteration whose reconstruction error is below
``error_threshold`` (0.07), else the iteration of lowest error; ``num_tokens`` forces a length.

Shapes: images (B, C, H, W) in [-1, 1]; ids (B, L <= t * k) long, padded with 0 past ``lengths``; base grid N cells.

Differences from the paper and the official code (the latent-distillation ones hold for KARL too):

- latent distillation only (the official first stage). The second stage (fine-tuning the base decoder with LPIPS
  and one PatchGAN per iteration) is not implemented: the base decoder stays frozen, and ``training_loss`` takes
  no ``criterion``.
- the official criterion is built with label smoothing 0.1 but only its NLL term is added to the loss, so the
  effective objective is plain cross-entropy; ``label_smoothing`` (default 0.0, that behaviour) turns smoothing on.
- errors are mean absolute errors on the [0, 1] pixel scale, as the official code measures them on its [0, 1]
  images (flexar's [-1, 1] errors are halved), so thresholds and KARL's error bins keep their published values.
  Reconstructions are clamped to the image range before the error is taken.
- images are reconstructed from the soft code (the official full-fine-tuning path and KARL's). The official
  first-stage ALIT samples base ids from the logits instead; the soft code keeps decoding deterministic.
- no CLS token in the encoder or the decoder: the official encoder's CLS gets no learning signal (its docstring says
  so) and the decoder's is discarded; positions are learned tables at the trained grid (no resizing).
- image tokens are [patch embedding, base latent] in that order for both families (official ALIT puts the latent
  first; a permutation of the first layer's inputs). The transformer blocks are flexar's (pre-norm LayerNorm with eps
  1e-6, GELU MLP of 4x width, attention projections without bias); the official blocks wrap nn.MultiheadAttention
  (with biases, LayerNorm eps 1e-5). The encoder's final norm is the code head's LayerNorm (``encoder_ln_post``).
- the inference choice is made per image; the official ``encode`` takes the L1 error of the whole batch.
- inference is deterministic: the halting mask is p >= ``halting_threshold`` (the mode of the official
  Bernoulli draw, which is 1 exactly when p > 0.5). ``inference_halting="sampled"`` keeps the official draw at
  inference too, from the ``generator`` given to ``encode`` (a generator seeded with 0 when none is given).
  Training always draws, from the global stream, as the official code does; the validation loss (``training_loss``
  in eval mode) uses the inference mask.
- the halting step after the last iteration is skipped (the official guard meant to do so compares Python's builtin
  ``iter`` and never fires); its result is never read, so outputs are unchanged.
- ``loss_weights=None`` takes the official [2.5, 2.0, 1.5, 1.25, 1, 1, 1, 1], cut to ``max_iterations`` or
  extended with 1.0. The official option to take the loss at a random subset of iterations is not kept (its default
  is every iteration, as here).
- ``num_tokens`` that is not a multiple of ``tokens_per_iteration`` keeps the first ``num_tokens`` latents of the
  next iteration (the decoder was trained on whole iterations only); ``decode`` accepts any lengths.
- learned tokens and positions start from N(0, 0.02) and linear layers from PyTorch's default (the official code
  draws tokens at width ** -0.5 and re-draws linear weights from a truncated normal with std 0.02); the latent
  codebook starts as :class:`flexar.quantizers.VQ` starts an l2-normalised one (normal rows, not uniform in
  +-1 / V), with the same loss (codebook + 0.25 * commitment) and straight-through gradient.
- ``dead_code_threshold`` (restarting unused latent codes, off by default) is a flexar addition.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import build_from_config, load_model, register
from ..nn import Transformer
from ..quantizers import VQ, QuantizerOutput
from ..utils import psnr
from .base import Encoded, Tokenizer, check_criterion

# the paper's base tokenizer, MAGE's VQGAN (the MaskGIT layout, VQGAN2D.presets["vq2d-maskgit-f16"]), as the
# architecture record of KARL's and ALIT's paper presets; a run replaces it with the trained base's folder,
# ``from_preset(name, base=FOLDER, base_config=None)``
PAPER_BASE = {"class": "VQGAN2D", "kwargs": dict(image_size=256, channels=3, downsample=16, width=128,
                                                  channel_multipliers=[1, 1, 2, 2, 4], num_res_blocks=2,
                                                  codebook_size=1024, code_dim=256, l2_norm=False)}

# the official per-iteration weights of the cross-entropy (adaptive_vqgan.py, lambda_loss_weight)
OFFICIAL_LOSS_WEIGHTS = (2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0)
INFERENCE_HALTING = ("threshold", "sampled")


def load_base(base: str | os.PathLike | None, base_config: dict | None, owner: str) -> Tokenizer:
    """The frozen base 2D VQ: loaded from the folder ``base`` (training time) or built from ``base_config`` (a saved
    tokenizer's record, filled from that tokenizer's own weights afterwards). Exactly one of the two is given."""
    from .vqgan2d import VQGAN2D

    if (base is None) == (base_config is None):
        raise ValueError(f"{owner} needs exactly one of base (the folder of a trained flexar VQGAN2D) and base_config "
                         f'(its {{"class", "kwargs"}}, as a saved {owner} records it), got base={base!r}, '
                         f"base_config={base_config!r}")
    if base is not None:
        model = load_model(base, kind=VQGAN2D)
    else:
        model = build_from_config(base_config, kind=VQGAN2D, source=f"{owner} base_config")
    return model.requires_grad_(False).eval()


def two_way_mask(keep: Tensor, num_cells: int) -> Tensor:
    """keep (B, T) bool over the latents -> (B, 1, N + T, N + T) bool attention mask (True = attend) for the decoder
    sequence [N grid tokens, T latents]: a dropped latent neither attends nor is attended to, except by itself."""
    batch, count = keep.shape
    keep = torch.cat([keep.new_ones(batch, num_cells), keep], dim=1)
    mask = keep[:, :, None] & keep[:, None, :]
    mask = mask | torch.eye(num_cells + count, dtype=torch.bool, device=keep.device)
    return mask[:, None]


class LatentDistillation(Tokenizer):
    """Shared by ALIT and KARL: the frozen base, image tokens, the latent VQ and the decoder to base-code logits (see
    the module docstring). Not a family of its own; subclasses add the encoder's schedule and the objective."""

    normalize_image_tokens = False  # ALIT l2-normalises the image tokens, KARL does not (as in the official code)

    def __init__(
        self,
        base: str | None,
        base_config: dict | None,
        max_latents: int,
        width: int,
        depth: int,
        num_heads: int,
        decoder_width: int | None,
        decoder_depth: int | None,
        decoder_heads: int | None,
        codebook_size: int,
        code_dim: int,
        commitment: float,
        dead_code_threshold: int,
        label_smoothing: float,
        attention_backend: str,
    ):
        super().__init__()
        name = type(self).__name__
        self.base = load_base(base, base_config, name)
        if self.base.grid is None:
            raise ValueError(f"{name} needs a 2D base tokenizer (one with a grid), got {type(self.base).__name__}")
        if width <= self.base.code_dim:
            raise ValueError(f"{name} width {width} must exceed the base's code_dim {self.base.code_dim}: image tokens "
                             f"are [patch embedding (width - code_dim), base latent (code_dim)]")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.image_size, self.channels = self.base.image_size, self.base.channels
        self.base_grid = tuple(self.base.grid)
        self.num_cells = self.base_grid[0] * self.base_grid[1]
        self.label_smoothing = label_smoothing
        decoder_width = decoder_width or width
        decoder_depth = decoder_depth or depth
        decoder_heads = decoder_heads or max(1, num_heads * decoder_width // width)
        patch = self.base.downsample

        # image tokens and encoder (the encoder runs without its final norm: that norm is the code head's LayerNorm)
        self.patch_embed = nn.Conv2d(self.channels, width - self.base.code_dim, kernel_size=patch, stride=patch)
        self.cell_pos = nn.Parameter(torch.randn(self.num_cells, width) * 0.02)
        self.encoder_ln_pre = nn.LayerNorm(width)
        self.encoder = Transformer(width, depth, num_heads, mlp="gelu", norm="layer", backend=attention_backend)

        # factorised latent VQ
        self.to_code = nn.Linear(width, code_dim)
        self.quantizer = VQ(codebook_size, code_dim, beta=commitment, l2_norm=True,
                            dead_code_threshold=dead_code_threshold)
        self.codebook_size, self.code_dim = codebook_size, code_dim

        # decoder to base-code logits
        self.from_code = nn.Linear(code_dim, decoder_width)
        self.decoder_latent_pos = nn.Parameter(torch.randn(max_latents, decoder_width) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(decoder_width) * 0.02)
        self.mask_pos = nn.Parameter(torch.randn(self.num_cells, decoder_width) * 0.02)
        self.decoder_ln_pre = nn.LayerNorm(decoder_width)
        self.decoder = Transformer(decoder_width, decoder_depth, decoder_heads, mlp="gelu", norm="layer",
                                   backend=attention_backend)
        self.to_logits = nn.Sequential(nn.Linear(decoder_width, 2 * decoder_width), nn.Tanh(),
                                       nn.Linear(2 * decoder_width, self.base.codebook_size))

    def _saved_config(self, config: dict) -> dict:
        """Record the base's config instead of the folder it was read from: the saved folder (whose weights hold the
        base's) alone rebuilds this tokenizer, on any machine and from any working directory."""
        config = dict(config)
        config["base"] = None
        config["base_config"] = {"class": type(self.base).__name__, "kwargs": self.base.config}
        return config

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # frozen
        return self

    # -- pieces ----------------------------------------------------------------------------------------------------
    def image_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W) -> (image tokens (B, N, width), base ids (B, N) long), cells in raster order."""
        with torch.no_grad():
            latents = self.base.encoder(images).flatten(2).transpose(1, 2)  # (B, N, base code_dim), pre-quantisation
            ids = self.base.quantizer.codes_to_ids(latents)
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([patches, latents.to(patches.dtype)], dim=-1)
        return (F.normalize(tokens, dim=-1) if self.normalize_image_tokens else tokens), ids

    def latent_codes(self, hidden: Tensor) -> QuantizerOutput:
        """encoder outputs at the latent positions (B, T, width) -> quantised latents (codes (B, T, code_dim))."""
        return self.quantizer(self.to_code(self.encoder.final_norm(hidden)))

    def decode_logits(self, codes: Tensor, keep: Tensor | None = None) -> Tensor:
        """codes (B, T, code_dim), keep (B, T) bool or None -> base-code logits (B, N, base V). Latents where keep is
        False are masked out of the decoder's attention both ways (:func:`two_way_mask`)."""
        batch, count = codes.shape[:2]
        latents = self.from_code(codes.to(self.from_code.weight.dtype)) + self.decoder_latent_pos[:count]
        masks = (self.mask_token + self.mask_pos).expand(batch, -1, -1)
        x = self.decoder_ln_pre(torch.cat([masks, latents], dim=1))
        mask = None if keep is None or bool(keep.all()) else two_way_mask(keep, self.num_cells)
        return self.to_logits(self.decoder(x, mask=mask)[:, : self.num_cells])

    def soft_codes(self, logits: Tensor) -> Tensor:
        """logits (B, N, base V) -> expected base code (B, N, base code_dim) under softmax(logits)."""
        return logits.float().softmax(dim=-1) @ self.base.code_vectors()

    def images_from_logits(self, logits: Tensor) -> Tensor:
        """logits (B, N, base V) -> images (B, C, H, W) through the frozen base decoder, from the soft code."""
        return self.base.decode_codes(self.soft_codes(logits))

    def distillation_terms(self, logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cross-entropy with the base ids, MSE between soft and base codes) for logits (B, N, V), ids (B, N)."""
        cross_entropy = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(),
                                        label_smoothing=self.label_smoothing)
        code_mse = F.mse_loss(self.soft_codes(logits), F.embedding(ids, self.base.code_vectors()))
        return cross_entropy, code_mse

    @staticmethod
    def reconstruction_error(images: Tensor, reconstructions: Tensor) -> Tensor:
        """(B,) mean absolute error on the [0, 1] pixel scale (half the error of [-1, 1] images), as the official
        code measures it; reconstructions are clamped to the image range first."""
        difference = reconstructions.float().clamp(-1.0, 1.0) - images.float()
        return difference.abs().flatten(1).mean(dim=1) / 2

    def pad_past(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """ids (B, T), lengths (B,) -> ids (B, max(lengths)) with 0 past each row's length."""
        ids = ids[:, : int(lengths.max())]
        kept = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        return torch.where(kept, ids, torch.zeros_like(ids))

    # -- interface -------------------------------------------------------------------------------------------------
    def decode(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """ids (B, L), lengths (B,) -> images (B, C, H, W); the latents past each length are left out of the
        decoder's attention, so the ids there are never read."""
        lengths = self.check_ids(ids, lengths)
        codes = self.quantizer.ids_to_codes(ids)
        keep = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        return self.images_from_logits(self.decode_logits(codes, keep))

    def code_vectors(self) -> Tensor:
        return self.quantizer.code_vectors()


@dataclass
class RolloutStep:
    """One ALIT iteration: ``hidden`` (B, t * k, width) encoder outputs at the latents, ``quantized`` their codes,
    ``logits`` (B, N, base V), ``masked`` (B, N) bool (the image tokens replaced by the mask token after this
    iteration; None when dynamic halting is off or at the last iteration)."""

    hidden: Tensor
    quantized: QuantizerOutput
    logits: Tensor
    masked: Tensor | None


@register
class ALIT(LatentDistillation):
    """Adaptive-length 1D tokenizer by recurrent rollouts: ``max_tokens`` = ``tokens_per_iteration`` *
    ``max_iterations``; ``encode`` picks the iteration per image (see the module docstring)."""

    normalize_image_tokens = True
    presets = {
        # the paper's sizes (adaptive_tokenizers/__init__.py: alit_small, alit_base, alit_semilarge) over the paper's
        # base; the constructor's defaults are the paper's rollout (8 iterations of 32 tokens, 4096 x 12 codes,
        # halting at 0.55, inference threshold 0.07)
        "alit-s": dict(base_config=PAPER_BASE, width=1024, depth=8, num_heads=8),
        "alit-b": dict(base_config=PAPER_BASE, width=768, depth=12, num_heads=12),
        "alit-l": dict(base_config=PAPER_BASE, width=1024, depth=16, num_heads=16),
        # CPU-sized: tests (16x16, a 4x4 base grid) and 32x32 MNIST / photos crops (an 8x8 base grid)
        "alit-tiny": dict(width=32, depth=1, num_heads=2, tokens_per_iteration=2, max_iterations=4, codebook_size=64,
                          code_dim=8),
        "alit-cpu": dict(width=96, depth=2, num_heads=4, tokens_per_iteration=4, max_iterations=8, codebook_size=256,
                         code_dim=8, dead_code_threshold=20),
    }

    def __init__(
        self,
        base: str | None = None,
        base_config: dict | None = None,
        tokens_per_iteration: int = 32,
        max_iterations: int = 8,
        width: int = 1024,
        depth: int = 8,
        num_heads: int = 8,
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        codebook_size: int = 4096,
        code_dim: int = 12,
        commitment: float = 0.25,
        dead_code_threshold: int = 0,
        dynamic_halting: bool = True,
        halting_threshold: float = 0.55,
        loss_weights: list[float] | None = None,
        error_threshold: float = 0.07,
        inference_halting: str = "threshold",
        label_smoothing: float = 0.0,
        attention_backend: str = "auto",
    ):
        if tokens_per_iteration < 1 or max_iterations < 1:
            raise ValueError(f"tokens_per_iteration and max_iterations must be >= 1, got {tokens_per_iteration} and "
                             f"{max_iterations}")
        if inference_halting not in INFERENCE_HALTING:
            raise ValueError(f"inference_halting must be one of {INFERENCE_HALTING}, got {inference_halting!r}")
        if not 0.0 < halting_threshold <= 1.0:
            raise ValueError(f"halting_threshold must lie in (0, 1], got {halting_threshold}")
        if loss_weights is None:
            extra = max(0, max_iterations - len(OFFICIAL_LOSS_WEIGHTS))
            loss_weights = list(OFFICIAL_LOSS_WEIGHTS[:max_iterations]) + [1.0] * extra
        if len(loss_weights) != max_iterations or any(w < 0 for w in loss_weights):
            raise ValueError(f"loss_weights must hold max_iterations = {max_iterations} non-negative weights, got "
                             f"{loss_weights}")
        max_tokens = tokens_per_iteration * max_iterations
        super().__init__(base, base_config, max_tokens, width, depth, num_heads, decoder_width, decoder_depth,
                         decoder_heads, codebook_size, code_dim, commitment, dead_code_threshold, label_smoothing,
                         attention_backend)
        self.tokens_per_iteration, self.max_iterations = tokens_per_iteration, max_iterations
        self.max_tokens = max_tokens
        self.dynamic_halting, self.halting_threshold = dynamic_halting, halting_threshold
        self.loss_weights = [float(w) for w in loss_weights]
        self.error_threshold, self.inference_halting = error_threshold, inference_halting

        self.latent_tokens = nn.Parameter(torch.randn(tokens_per_iteration, width) * 0.02)
        self.latent_pos = nn.Parameter(torch.randn(tokens_per_iteration, width) * 0.02)
        self.iteration_embed = nn.Parameter(torch.randn(max_iterations, tokens_per_iteration, width) * 0.02)
        self.encoder_mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.encoder_ln_recursive = nn.LayerNorm(width)

    # -- rollout ---------------------------------------------------------------------------------------------------
    def halting_mask(self, logits: Tensor, ids: Tensor, sample: bool,
                     generator: torch.Generator | None = None) -> Tensor:
        """(B, N) bool: image tokens whose base id is predicted with p >= ``halting_threshold`` (and, with
        ``sample``, where Bernoulli(p) = 1, drawn from ``generator``, the global stream when None)."""
        with torch.no_grad():
            probability = logits.float().softmax(dim=-1).gather(-1, ids[..., None])[..., 0]
            confident = probability >= self.halting_threshold
            if not sample:
                return confident
            return confident & torch.bernoulli(probability, generator=generator).bool()

    def rollout(self, tokens: Tensor, ids: Tensor, iterations: int, sample: bool,
                generator: torch.Generator | None = None):
        """Yield one :class:`RolloutStep` per iteration, 1 .. ``iterations``, from image tokens (B, N, width) and the
        base ids (B, N) that dynamic halting compares the predictions with."""
        batch, cells = tokens.shape[:2]
        new_latents = self.latent_tokens + self.latent_pos  # the same learned vectors every iteration
        x = torch.cat([tokens + self.cell_pos, (new_latents + self.iteration_embed[0]).expand(batch, -1, -1)], dim=1)
        x = self.encoder_ln_pre(x)
        for t in range(iterations):
            x = self.encoder(x, final_norm=False)
            hidden = x[:, cells:]
            quantized = self.latent_codes(hidden)
            logits = self.decode_logits(quantized.codes)
            last = t == iterations - 1
            masked = None
            if self.dynamic_halting and not last:
                masked = self.halting_mask(logits, ids, sample, generator)
                fill = (self.encoder_mask_token + self.cell_pos).to(x.dtype).expand(batch, -1, -1)
                x = torch.cat([torch.where(masked[..., None], fill, x[:, :cells]), hidden], dim=1)
            yield RolloutStep(hidden, quantized, logits, masked)
            if not last:
                # the previous outputs (image tokens and latents) are refined, never re-embedded
                appended = (new_latents + self.iteration_embed[t + 1]).expand(batch, -1, -1)
                x = self.encoder_ln_recursive(torch.cat([x, appended], dim=1))

    def _sampled_halting(self, generator: torch.Generator | None, device) -> tuple[bool, torch.Generator | None]:
        if self.inference_halting != "sampled":
            return False, None
        return True, generator if generator is not None else torch.Generator(device=device).manual_seed(0)

    # -- interface -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor, num_tokens: int | None = None, error_threshold: float | None = None,
               generator: torch.Generator | None = None) -> Encoded:
        """images (B, C, H, W) -> ids (B, L) padded with 0 past lengths (B,).

        Without ``num_tokens``: per image, the first iteration whose reconstruction error (mean absolute error on the
        [0, 1] scale) is below ``error_threshold`` (default: the constructor's), else the iteration of lowest error;
        lengths are multiples of ``tokens_per_iteration``, and the rollout stops once every image has its iteration.
        With ``num_tokens``: that many tokens for every image. ``generator`` feeds the halting draws when
        ``inference_halting="sampled"``.
        """
        self.check_images(images)
        count = None if num_tokens is None else self.check_num_tokens(num_tokens)
        sample, generator = self._sampled_halting(generator, images.device)
        tokens, ids = self.image_tokens(images)
        step_size, batch = self.tokens_per_iteration, images.shape[0]
        if count is not None:
            for step in self.rollout(tokens, ids, math.ceil(count / step_size), sample, generator):
                pass
            lengths = torch.full((batch,), count, dtype=torch.long, device=images.device)
            return Encoded(step.quantized.ids[:, :count], lengths)

        threshold = self.error_threshold if error_threshold is None else float(error_threshold)
        chosen = torch.zeros(batch, dtype=torch.long, device=images.device)
        done = torch.zeros(batch, dtype=torch.bool, device=images.device)
        best = torch.full((batch,), math.inf, device=images.device)
        kept = torch.zeros(batch, self.max_tokens, dtype=torch.long, device=images.device)
        for t, step in enumerate(self.rollout(tokens, ids, self.max_iterations, sample, generator)):
            error = self.reconstruction_error(images, self.images_from_logits(step.logits))
            # an iteration under the threshold is also the best so far (every earlier one was above it)
            better = ~done & (error < best)
            width = (t + 1) * step_size
            kept[better] = F.pad(step.quantized.ids[better], (0, self.max_tokens - width))
            chosen[better], best[better] = t, error[better]
            done |= error < threshold
            if bool(done.all()):
                break
        lengths = (chosen + 1) * step_size
        return Encoded(self.pad_past(kept, lengths), lengths)

    # -- objective -------------------------------------------------------------------------------------------------
    def training_loss(self, images: Tensor, criterion=None, step: int = 0) -> tuple[Tensor, dict]:
        """Sum over iterations of ``loss_weights[t]`` * cross-entropy + code MSE + VQ loss (module docstring)."""
        check_criterion(self, criterion)
        self.check_images(images)
        tokens, ids = self.image_tokens(images)
        sample = self.training or self.inference_halting == "sampled"
        total, logs = 0.0, {}
        for t, step in enumerate(self.rollout(tokens, ids, self.max_iterations, sample)):
            cross_entropy, code_mse = self.distillation_terms(step.logits, ids)
            total = total + self.loss_weights[t] * cross_entropy + code_mse + step.quantized.loss
            count = (t + 1) * self.tokens_per_iteration
            logs[f"cross_entropy_{count}"] = cross_entropy.detach()
            logs[f"accuracy_{count}"] = (step.logits.argmax(-1) == ids).float().mean().detach()
            if step.masked is not None:
                logs[f"masked_{count}"] = step.masked.float().mean()
        with torch.no_grad():
            mse = F.mse_loss(self.images_from_logits(step.logits).float(), images.float())
        logs.update({"loss": total.detach(), "code_mse": code_mse.detach(), "quantizer": step.quantized.loss.detach(),
                     "psnr": psnr(mse),
                     **{(k if k.endswith("_loss") else f"codebook_{k}"): v for k, v in step.quantized.logs.items()}})
        return total, logs

