"""KARL: single-pass adaptive-length tokenization conditioned on a desired error ("Single-pass Adaptive Image
Tokenization for Minimum Program Search", Duggal et al., 2025; ShivamDuggal4/karl, kolmogorov_tokenizers/karl_vqgan.py).

KARL uses the latent distillation of ALIT (:mod:`flexar.tokenizers.alit`: frozen base 2D VQ, image tokens = [patch
embedding, base pre-quantisation latent], factorised l2-normalised VQ on the latents, a decoder over [mask tokens for
the grid, latents] predicting the base codes, reconstruction through the frozen base decoder), but allocates tokens
in ONE encoder pass instead of a search over rollouts:

- encoder input: [desired-error token, N image tokens (+ positions), the first T learned latent tokens], full
  attention. The desired error (a mean absolute error on the [0, 1] scale) is rounded UP to the nearest of
  ``error_bins`` (the last bin when above them all), and each bin has a learned embedding.
- halting head on every latent: LayerNorm -> Linear(width, ``halting_width``) -> Tanh -> Linear(1) -> sigmoid; a
  latent with p > ``halting_threshold`` (0.75) is halted. Halted latents are masked out of the decoder's attention
  both ways (they neither attend nor are attended to, except by themselves).

Training step (``training_loss``), two phases on the same batch:

1. estimate complexity: T drawn uniformly from {``token_step``, 2 * ``token_step``, ..., ``estimate_max_tokens``};
   each image's target error drawn from a categorical over the bins; encode at budget T, all halting targets 0,
   no halting mask; the distillation loss; the achieved error of each image, decoded from the soft code without
   gradient. The categorical starts uniform over the bins <= ``initial_error_max`` (0.04); every training step
   multiplies the bins at or above the batch's best achieved error by ``error_decay`` (0.99) and renormalises.
2. allocate: re-encode at the full budget ``max_tokens`` conditioned on each image's achieved error rounded up to
   its bin; halting targets 1 on the last ``max_tokens - T`` latents and 0 before (all 0 when T >= ``max_tokens``);
   the decoder sees the halting mask of the predicted probabilities; the distillation loss again.

The halting loss is the official pair of means: BCE over the latents with target 0 plus BCE over those with target 1.

What the recipe learns: the phase-2 condition is the only thing that tells the encoder which T a target came from.
An image whose achieved error stops changing with T (across bins) is conditioned on the same bin whatever T was,
so its halting targets average to P(T <= i), which stays below 0.75 when ``estimate_max_tokens`` > ``max_tokens``
(at most 15 / 23 at the official sizes): at that error such an image keeps the whole budget. Allocation is learned
from images whose error keeps falling with T; a model whose decoder does not yet use its latents halts nothing.

Inference (:meth:`KARL.encode`): one encoder pass at budget ``max_tokens`` conditioned on ``desired_error``; the
ids of every latent and the halting probabilities come out of it. ``num_tokens`` forces a length (the phase-1 mode:
budget ``num_tokens``, nothing halted).

Shapes: images (B, C, H, W) in [-1, 1]; ids (B, L <= ``max_tokens``) long, padded with 0 past ``lengths`` (B,).

Differences from the paper and the official code (besides those of the latent distillation listed in
:mod:`flexar.tokenizers.alit`: first stage only, plain cross-entropy by default, errors on the [0, 1] scale with
clamped reconstructions, flexar's transformer blocks, initialisation):

- ``lengths`` is a prefix: one past the last latent that is not halted. The official active count is the number
  of latents not halted wherever they are; halting is trained on the tail, so the two agree when the halted
  latents form a suffix, and otherwise the prefix also keeps the few halted latents before the last active one
  (the decoder reads them; the official decoder masks them). No active latent is ever dropped.
- the latent table holds max(``max_tokens``, ``estimate_max_tokens``) vectors (the official one holds 512, of
  which 368 are used).
- bin embeddings are learned vectors drawn from N(0, 0.02); the official ones start as the constant bin value in
  every channel, which the encoder's first LayerNorm maps to the same zero vector for every bin.
- the bin probabilities are a buffer of the module (saved with checkpoints and exported models); each process
  updates its own, as in the official code. Validation (eval mode, or no gradient) leaves them unchanged.
- ``encode`` runs without gradients; the official encode also decodes every budget it is given (flexar's
  ``decode`` does that on request). ``desired_error`` defaults to the official inference default 0.05 and
  ``max_tokens`` to its inference budget 256; phase 1 draws one T per batch, as officially.
- the official encoder's learned 64x64 position grid is resized to the image grid; here the table has the base
  grid's size (one resolution per model), as in ALIT's official code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from ..utils import psnr
from .alit import PAPER_BASE, LatentDistillation
from .base import Encoded, check_criterion

# the official error bins (karl_vqgan.py, rec_losses): mean absolute error on the [0, 1] scale
OFFICIAL_ERROR_BINS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.09, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.24,
                       0.28, 0.32, 0.38)


@register
class KARL(LatentDistillation):
    """Adaptive-length 1D tokenizer, one encoder pass per image set: ``max_tokens`` is the budget, ``encode`` halts
    latents per image for a desired error (see the module docstring)."""

    presets = {
        # the paper's sizes (kolmogorov_tokenizers/__init__.py: karl_small, karl_base, karl_semilarge) over the
        # paper's base (flexar.tokenizers.alit.PAPER_BASE); the constructor's defaults are the paper's budget (256
        # tokens, phase-1 budgets 16..368), codes (4096 x 12), halting head and error bins
        "karl-s": dict(base_config=PAPER_BASE, width=1024, depth=8, num_heads=8),
        "karl-b": dict(base_config=PAPER_BASE, width=768, depth=12, num_heads=12),
        "karl-l": dict(base_config=PAPER_BASE, width=1024, depth=16, num_heads=16),
        # CPU-sized: tests (16x16, a 4x4 base grid) and 32x32 MNIST / photos crops (an 8x8 base grid); the phase-1
        # range keeps the official ratio 368 / 256 of the budget
        "karl-tiny": dict(width=32, depth=1, num_heads=2, max_tokens=8, token_step=1, estimate_max_tokens=11,
                          codebook_size=64, code_dim=8, halting_width=32),
        "karl-cpu": dict(width=96, depth=2, num_heads=4, max_tokens=32, token_step=2, estimate_max_tokens=46,
                         codebook_size=256, code_dim=8, halting_width=96, dead_code_threshold=20),
    }

    def __init__(
        self,
        base: str | None = None,
        base_config: dict | None = None,
        max_tokens: int = 256,
        token_step: int = 16,
        estimate_max_tokens: int = 368,
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
        halting_threshold: float = 0.75,
        halting_width: int = 512,
        error_bins: list[float] | None = None,
        initial_error_max: float = 0.04,
        error_decay: float = 0.99,
        desired_error: float = 0.05,
        label_smoothing: float = 0.0,
        attention_backend: str = "auto",
    ):
        if max_tokens < 1 or token_step < 1 or estimate_max_tokens < token_step:
            raise ValueError(f"KARL needs max_tokens >= 1 and estimate_max_tokens >= token_step >= 1, got max_tokens="
                             f"{max_tokens}, token_step={token_step}, estimate_max_tokens={estimate_max_tokens}")
        bins = list(OFFICIAL_ERROR_BINS if error_bins is None else error_bins)
        if not bins or any(b <= 0 for b in bins) or any(a >= b for a, b in zip(bins, bins[1:])):
            raise ValueError(f"error_bins must be positive and strictly increasing, got {bins}")
        if initial_error_max < bins[0]:
            raise ValueError(f"initial_error_max {initial_error_max} leaves no error bin to draw from (smallest bin "
                             f"{bins[0]})")
        if not 0.0 < error_decay <= 1.0:
            raise ValueError(f"error_decay must lie in (0, 1], got {error_decay}")
        if not 0.0 < halting_threshold < 1.0:
            raise ValueError(f"halting_threshold must lie in (0, 1), got {halting_threshold}")
        table = max(max_tokens, estimate_max_tokens)
        super().__init__(base, base_config, table, width, depth, num_heads, decoder_width, decoder_depth,
                         decoder_heads, codebook_size, code_dim, commitment, dead_code_threshold, label_smoothing,
                         attention_backend)
        self.max_tokens, self.token_step, self.estimate_max_tokens = max_tokens, token_step, estimate_max_tokens
        self.halting_threshold, self.error_decay, self.desired_error = halting_threshold, error_decay, desired_error

        self.latent_tokens = nn.Parameter(torch.randn(table, width) * 0.02)
        self.error_embed = nn.Parameter(torch.randn(len(bins), width) * 0.02)
        self.halting_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, halting_width), nn.Tanh(),
                                          nn.Linear(halting_width, 1))
        self.register_buffer("error_bins", torch.tensor(bins), persistent=False)
        initial = (self.error_bins <= initial_error_max).float()
        self.register_buffer("error_bin_probs", initial / initial.sum())
        self.register_buffer("token_counts", torch.arange(token_step, estimate_max_tokens + 1, token_step),
                             persistent=False)

    # -- pieces ----------------------------------------------------------------------------------------------------
    def error_index(self, errors: Tensor) -> Tensor:
        """(B,) errors -> (B,) index of the smallest bin >= the error (the last bin when none is)."""
        above = self.error_bins[None, :] >= errors.to(self.error_bins)[:, None]
        last = torch.full_like(errors, len(self.error_bins) - 1, dtype=torch.long)
        return torch.where(above.any(dim=1), above.int().argmax(dim=1), last)

    def encode_hidden(self, tokens: Tensor, error_index: Tensor, budget: int) -> Tensor:
        """image tokens (B, N, width), bin indices (B,), budget T -> encoder outputs at the T latents (B, T, width)."""
        batch, cells = tokens.shape[:2]
        condition = self.error_embed[error_index][:, None]
        latents = self.latent_tokens[:budget].expand(batch, -1, -1)
        x = self.encoder_ln_pre(torch.cat([condition, tokens + self.cell_pos, latents], dim=1))
        return self.encoder(x, final_norm=False)[:, 1 + cells :]

    def halting_logits(self, hidden: Tensor) -> Tensor:
        """(B, T, width) -> (B, T) halting logits; p = sigmoid(logit), halted where p > ``halting_threshold``."""
        return self.halting_head(hidden)[..., 0]

    def halting_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """BCE over the latents with target 0 plus BCE over those with target 1 (each a mean, as officially)."""
        losses = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        halted = targets > 0.5
        loss = losses[~halted].mean() if bool((~halted).any()) else losses.new_zeros(())
        if bool(halted.any()):
            loss = loss + losses[halted].mean()
        return loss

    def allocation_targets(self, batch: int, budget: int, device=None) -> Tensor:
        """Phase-2 halting targets (B, ``max_tokens``): 1 on the last ``max_tokens - budget`` latents, 0 before."""
        targets = torch.zeros(batch, self.max_tokens, device=device)
        targets[:, min(budget, self.max_tokens):] = 1.0
        return targets

    def active_lengths(self, halted: Tensor) -> Tensor:
        """halted (B, T) bool -> (B,) one past the last latent that is not halted (at least 1)."""
        positions = torch.arange(1, halted.shape[1] + 1, device=halted.device)
        return (positions * ~halted).amax(dim=1).clamp_min(1)

    def _desired_errors(self, desired_error, batch: int, device) -> Tensor:
        value = self.desired_error if desired_error is None else desired_error
        errors = torch.as_tensor(value, dtype=torch.float32, device=device)
        if errors.dim() == 0:
            errors = errors.expand(batch)
        if errors.shape != (batch,) or not bool(torch.isfinite(errors).all()) or bool((errors < 0).any()):
            raise ValueError(f"desired_error must be a non-negative float or a ({batch},) tensor of them, "
                             f"got {value!r}")
        return errors

    # -- interface -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def halting_probabilities(self, images: Tensor, desired_error: float | Tensor | None = None) -> Tensor:
        """(B, ``max_tokens``) halting probabilities of every latent for ``desired_error`` (one encoder pass)."""
        self.check_images(images)
        tokens, _ = self.image_tokens(images)
        index = self.error_index(self._desired_errors(desired_error, images.shape[0], images.device))
        return self.halting_logits(self.encode_hidden(tokens, index, self.max_tokens)).sigmoid()

    @torch.no_grad()
    def encode(self, images: Tensor, num_tokens: int | None = None,
               desired_error: float | Tensor | None = None) -> Encoded:
        """images (B, C, H, W) -> ids (B, L) padded with 0 past lengths (B,), in one encoder pass.

        ``desired_error``: a mean absolute error on the [0, 1] scale (float, or (B,) per image; default the
        constructor's ``desired_error``), rounded up to its bin. Without ``num_tokens`` each image keeps the latents
        up to its last one that is not halted; with it, every image gets ``num_tokens`` latents (budget
        ``num_tokens``, nothing halted).
        """
        self.check_images(images)
        count = None if num_tokens is None else self.check_num_tokens(num_tokens)
        batch = images.shape[0]
        tokens, _ = self.image_tokens(images)
        index = self.error_index(self._desired_errors(desired_error, batch, images.device))
        hidden = self.encode_hidden(tokens, index, self.max_tokens if count is None else count)
        ids = self.latent_codes(hidden).ids
        if count is not None:
            return Encoded(ids, torch.full((batch,), count, dtype=torch.long, device=images.device))
        halted = self.halting_logits(hidden).sigmoid() > self.halting_threshold
        lengths = self.active_lengths(halted)
        return Encoded(self.pad_past(ids, lengths), lengths)

    # -- objective -------------------------------------------------------------------------------------------------
    def sample_budget(self) -> int:
        """Phase-1 budget T, uniform over ``token_counts`` (one per batch, as officially)."""
        return int(self.token_counts[torch.randint(len(self.token_counts), ())])

    def sample_target_errors(self, batch: int) -> Tensor:
        """Phase-1 bin indices (B,) drawn from the adaptive categorical ``error_bin_probs``."""
        return torch.multinomial(self.error_bin_probs, batch, replacement=True)

    @torch.no_grad()
    def update_error_distribution(self, achieved: Tensor) -> None:
        """Decay the probability of the bins at or above the batch's best achieved error, then renormalise."""
        decayed = self.error_bins >= achieved.min()
        self.error_bin_probs[decayed] *= self.error_decay
        self.error_bin_probs /= self.error_bin_probs.sum()

    def training_loss(self, images: Tensor, criterion=None, step: int = 0) -> tuple[Tensor, dict]:
        """The two-phase step of the module docstring: (loss, logs)."""
        check_criterion(self, criterion)
        self.check_images(images)
        batch = images.shape[0]
        tokens, ids = self.image_tokens(images)

        # phase 1: estimate complexity at a random budget T, small target error, nothing halted
        budget = self.sample_budget()
        hidden = self.encode_hidden(tokens, self.sample_target_errors(batch), budget)
        halting = self.halting_logits(hidden)
        estimate_halting = self.halting_loss(halting, torch.zeros_like(halting, dtype=torch.float32))
        quantized = self.latent_codes(hidden)
        logits = self.decode_logits(quantized.codes)
        estimate_ce, estimate_mse = self.distillation_terms(logits, ids)
        with torch.no_grad():
            reconstructions = self.images_from_logits(logits)
            achieved = self.reconstruction_error(images, reconstructions)
            mse = F.mse_loss(reconstructions.float().clamp(-1, 1), images.float())
        if self.training and torch.is_grad_enabled():
            self.update_error_distribution(achieved)
        estimate = estimate_ce + estimate_mse + quantized.loss + estimate_halting

        # phase 2: full budget, conditioned on the achieved error (rounded up), halting the tail beyond T
        hidden = self.encode_hidden(tokens, self.error_index(achieved), self.max_tokens)
        halting = self.halting_logits(hidden)
        allocate_halting = self.halting_loss(halting, self.allocation_targets(batch, budget, images.device))
        active = halting.detach().sigmoid() <= self.halting_threshold
        quantized = self.latent_codes(hidden)
        allocate_ce, allocate_mse = self.distillation_terms(self.decode_logits(quantized.codes, active), ids)
        allocate = allocate_ce + allocate_mse + quantized.loss + allocate_halting

        loss = estimate + allocate
        logs = {
            "loss": loss.detach(),
            "estimate_cross_entropy": estimate_ce.detach(),
            "allocate_cross_entropy": allocate_ce.detach(),
            "code_mse": allocate_mse.detach(),
            "estimate_halting": estimate_halting.detach(),
            "allocate_halting": allocate_halting.detach(),
            "quantizer": quantized.loss.detach(),
            "estimate_budget": torch.tensor(float(budget)),
            "achieved_error": achieved.mean(),
            "active_tokens": active.float().sum(dim=1).mean(),
            "psnr": psnr(mse),
            **{(k if k.endswith("_loss") else f"codebook_{k}"): v for k, v in quantized.logs.items()},
        }
        return loss, logs

