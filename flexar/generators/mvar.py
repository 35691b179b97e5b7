"""Markovian next-scale prediction, MVAR ("MVAR: Visual Autoregressive Modeling with Scale and Spatial Markovian
Conditioning", Zhang et al., ICLR 2026, arXiv 2505.12742; CVL-UESTC/MVAR, models/{mvar,basic_mvar}.py, trainer.py).

MVAR keeps VAR's network, inputs and tokenizer (:class:`flexar.generators.VAR`, whose pyramid it reads; MVAR loads
VAR's VQVAE weights) and changes what a scale may attend to:

- scale-Markov: the input of scale s is VAR's, the running reconstruction of the earlier scales downsampled to
  side_s (the previous scale's map, which already sums everything before it), but attention is block-diagonal:
  a token sees only the tokens of its own scale (the official ``generate_backward_attn_mask_only_next``). Each
  scale is therefore one forward pass over that map alone, and generation needs no KV cache: passes = number of
  scales, and the memory of a pass is that of one map;
- spatial-Markov: on the larger scales (index >= ``refine_step``, 8 in MVAR: the 13 x 13 and 16 x 16 maps) each
  query attends only to the k x k neighbourhood around it (``kernel_size`` 7), with NATTEN's borders: the window is
  shifted inside the map, start = clamp(i - k // 2, 0, side - k) per axis, so every query sees exactly k * k keys.
  The neighbourhood is a :class:`flexar.nn.Mask` predicate, run by FlexAttention (block-sparse) or as a dense mask
  by the other backends; NATTEN is not needed.

Training follows MVAR's cycle (``train_one_ep_ratio_k``): of every ``joint_steps + S - refine_step`` training steps,
``joint_steps`` (ratio_k = 8) train the scales below ``refine_step`` together (one block-diagonal forward over their
tokens), and then one step trains each refined scale alone with neighbourhood attention. The per-token weight stays
1 / L in every step (no renormalisation to the tokens a step trains), as in MVAR's ``loss_weight``. The step counter
is a buffer (``train_steps``), so a resumed run continues the cycle; ``cycle=False`` trains every scale every step.
Evaluation-mode losses (validation) always cover every scale in one block-diagonal forward, which equals the
per-scale forwards (the test suite checks it).

Guidance as in VAR (t = cfg * s / (S - 1), see :mod:`flexar.generators.var`); MVAR evaluates at cfg 1.4, top-k 900,
top-p 0.96, i.e. ``Sampler(cfg_scale=2.4, top_k=900, top_p=0.96)``.

Shapes: as :class:`~flexar.generators.VAR`.

Differences from MVAR's official code (besides VAR's, listed in :mod:`flexar.generators.var`):
- neighbourhood attention is a FlexAttention / dense mask over the map instead of NATTEN's ``na2d`` kernel; the
  windows are NATTEN's (dilation 1), and maps smaller than the kernel are refused rather than left to NATTEN.
- the official joint step pads its sequence to a multiple of 8 for its fused kernels; here nothing is padded.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..hub import register
from ..nn import Mask
from ..tokenizers.multiscale import check_scales, scale_levels
from .var import VAR, var_size


def neighbourhood_mask(scales: list[int], kernel_size: int, refine_step: int, device=None) -> Mask:
    """Block-diagonal mask over the concatenated maps of `scales`, with k x k neighbourhood attention (NATTEN's
    shifted border windows) inside every map of index >= `refine_step`; full attention inside the others."""
    levels = scale_levels(scales)
    sides = torch.tensor(scales)[levels]
    local = torch.cat([torch.arange(side * side) for side in scales])
    rows, cols = local // sides, local % sides
    refined = levels >= refine_step
    levels, sides, rows, cols, refined = (t.to(device) for t in (levels, sides, rows, cols, refined))
    radius = kernel_size // 2

    def window_start(position: Tensor, side: Tensor) -> Tensor:
        return torch.minimum((position - radius).clamp(min=0), side - kernel_size)

    def allowed(q: Tensor, kv: Tensor) -> Tensor:
        top, left = window_start(rows[q], sides[q]), window_start(cols[q], sides[q])
        inside = (rows[kv] >= top) & (rows[kv] < top + kernel_size)
        inside = inside & (cols[kv] >= left) & (cols[kv] < left + kernel_size)
        return (levels[q] == levels[kv]) & (~refined[q] | inside)

    return Mask(allowed, name=f"scale_markov_k{kernel_size}")


@register
class MVAR(VAR):
    """Next-scale prediction with block-diagonal (scale-Markov) and neighbourhood (spatial-Markov) attention."""

    presets = {
        # MVAR-d16 / d20 / d24 (Zhang et al. 2026): VAR's networks (310M, 600M, 1.0B; MVAR adds no parameters and
        # fine-tunes VAR's checkpoints) with 7 x 7 neighbourhoods on scales 8 and 9 (13 x 13, 16 x 16)
        **{f"mvar-d{depth}": dict(var_size(depth), kernel_size=7, refine_step=8) for depth in (16, 20, 24)},
        # CPU-sized presets: 3 x 3 neighbourhoods on the two largest maps
        "mvar-tiny": dict(VAR.presets["var-tiny"], kernel_size=3, refine_step=3),
        "mvar-digits": dict(VAR.presets["var-digits"], kernel_size=3, refine_step=4),
    }

    def __init__(
        self,
        kernel_size: int = 7,
        refine_step: int = 8,
        joint_steps: int = 8,
        cycle: bool = True,
        **kwargs,
    ):
        """MVAR's own switches; every other keyword argument (sizes, scales, tokenizer, guidance schedule) is
        :class:`~flexar.generators.VAR`'s, forwarded unchanged.

        Args:
            kernel_size: side k of the neighbourhood on the refined scales (MVAR: 7).
            refine_step: index of the first scale with neighbourhood attention (MVAR: 8, the 13 x 13 map).
            joint_steps: training steps on the scales below ``refine_step`` per cycle (MVAR's ratio_k, 8).
            cycle: train by MVAR's cycle; False trains every scale every step.
        """
        super().__init__(**kwargs)
        scales = check_scales(self.grid)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1 (7 in MVAR), got {kernel_size!r}")
        if not 1 <= refine_step <= len(scales):
            raise ValueError(f"refine_step must lie in [1, {len(scales)}] (the first scale index with neighbourhood "
                             f"attention; {len(scales)} turns it off), got {refine_step}")
        small = [side for side in scales[refine_step:] if side < kernel_size]
        if small:
            raise ValueError(f"neighbourhood attention needs maps of side >= kernel_size {kernel_size} (NATTEN's "
                             f"windows), but scales from refine_step {refine_step} include {small}")
        if joint_steps < 1:
            raise ValueError(f"joint_steps must be >= 1 (MVAR's ratio_k, 8), got {joint_steps}")
        self.kernel_size, self.refine_step, self.joint_steps, self.cycle = kernel_size, refine_step, joint_steps, cycle
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    # -- masks ---------------------------------------------------------------------------------------------------------
    @property
    def mask(self) -> Mask:
        """The full-sequence mask: block-diagonal, neighbourhoods inside the maps of index >= refine_step."""
        return self.cached_mask("full", lambda device: neighbourhood_mask(self.grid, self.kernel_size,
                                                                          self.refine_step, device))

    def scale_mask(self, index: int) -> Mask | None:
        """The mask of scale `index`'s own map (local indices): neighbourhoods on refined scales, else None (full)."""
        if index < self.refine_step:
            return None
        side = self.grid[index]
        return self.cached_mask(("scale", index),
                                lambda device: neighbourhood_mask([side], self.kernel_size, 0, device))

    def forward_scale(self, index: int, x: Tensor, class_embedding: Tensor) -> Tensor:
        """One scale alone: inputs (B, side ** 2, dim) of map `index` -> logits (B, side ** 2, vocab_size)."""
        return self.network(x, class_embedding, self.scale_mask(index))

    # -- objective -----------------------------------------------------------------------------------------------------
    def training_part(self) -> tuple[int, int]:
        """Scales [first, last) that this training step trains, by MVAR's cycle; advances ``train_steps``."""
        phase = int(self.train_steps) % (self.joint_steps + len(self.grid) - self.refine_step)
        self.train_steps += 1
        if phase < self.joint_steps:
            return 0, self.refine_step
        scale = self.refine_step + phase - self.joint_steps
        return scale, scale + 1

    def training_loss(self, ids: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """Cross-entropy (per-token weight 1 / L) of the scales of this step's part of MVAR's cycle in training mode,
        of every scale otherwise. ids (B, L) whole pyramids; labels (B,)."""
        labels = self.check_whole(ids, labels, lengths)
        training = self.training and torch.is_grad_enabled()
        if training:
            self.check_training_pyramid()
        first, last = self.training_part() if training and self.cycle else (0, len(self.grid))
        class_embedding = self.class_embed(self.drop_labels(labels))
        start, end = self.scale_range(first).start, self.boundaries[last - 1]
        x = self.sequence_input(ids, class_embedding, start, end)
        if last - first == 1:
            logits = self.forward_scale(first, x, class_embedding)
        else:
            logits = self.network(x, class_embedding, self.mask)
        loss, accuracy = self.token_loss(logits, ids[:, start:end])
        if first > 0:
            # scale 1's start position is not in this step's graph: a zero term keeps every parameter in it, so that
            # DistributedDataParallel (find_unused_parameters=False, Lightning's default) reduces the same set
            loss = loss + 0.0 * self.pos_start.sum()
        logs = {"loss": loss.detach(), "accuracy": accuracy, "perplexity": loss.detach().exp(),
                "first_scale": ids.new_tensor(first).float(), "trained_tokens": ids.new_tensor(end - start).float()}
        return loss, logs

    # -- sampling: one forward per scale on its own map, no KV cache ---------------------------------------------------
    def compile_decoding(self, enabled: bool = True, mode: str | None = None, backend: str = "inductor") -> "MVAR":
        """Refused: MVAR's passes have no KV cache, and each scale runs on its own map under its own neighbourhood
        mask, so VAR's compiled cached pass does not apply. ``enabled=False`` is accepted (nothing to turn off)."""
        if enabled:
            raise NotImplementedError("MVAR has no compiled decoding step (one pass per scale on its own map, each "
                                      "with its own neighbourhood mask): decode it eagerly")
        return self

    def new_decoding_state(self, rows: int, count: int, use_cache: bool) -> dict:
        return {}

    def decode_scale(self, index: int, x: Tensor, class_embedding: Tensor, state: dict) -> Tensor:
        return self.forward_scale(index, x, class_embedding)
