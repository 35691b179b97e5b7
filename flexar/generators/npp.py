"""Next-patch prediction ("Next Patch Prediction for Autoregressive Visual Generation", Pang et al. 2024;
PKU-YuanGroup/Next-Patch-Prediction, a minimal diff on LlamaGen: autoregressive/models/gpt.py, utils/patchify.py,
autoregressive/train/train_c2i.py).

Training follows a coarse-to-fine schedule of patch sizes. At patch size p the h x w token grid is cut into
(h / p) x (w / p) non-overlapping p x p patches read in raster order on the coarse grid; each patch becomes one input
token, the *mean* of its members' token embeddings (the same embedding table, no new parameters). The transformer
reads [class token, patch_0, ..., patch_{P-2}] (the last patch is dropped, P = N / p^2) with a causal mask and 2D rotary
positions of the coarse grid, and the logits at input i predict every one of the p^2 tokens of patch i; the loss is
the cross-entropy averaged over all P * p^2 (patch, member) targets. At p = 1 this is exactly raster next-token
prediction, and the last stage of every schedule is p = 1, so the trained network is a plain :class:`RasterAR`:
inference is raster decoding, n^2 steps with a KV cache, inherited unchanged.

Schedule: ``patch_sizes`` lists the patch sides of the stages, coarse to fine (``[2, 1]``: 2x2-token patches, then
single tokens; ``[4, 2, 1]``); over E training epochs with ``epoch_rate`` r, stage i lasts until epoch boundary i of
``[int(E * r^k) for k in range(levels)]`` reversed (E = 300, r = 0.5, two levels -> [150, 300]). The generator holds
the schedule; whoever runs the epochs calls ``on_epoch_start(epoch, max_epochs)`` (flexar's GeneratorModule does,
from Lightning's epoch hook), which sets ``patch_size``, the stage that ``training_loss`` uses. ``patch_size`` is
also a constructor argument (None: the first stage) that every change of stage writes into ``model.config``, so a
model saved mid-schedule (or after it, at p = 1) reloads at the stage it was saved in.

Shapes: ids (B, N = h * w) long in raster order; labels (B,) long; patch logits (B, N / p^2, vocab_size).

Differences from the paper and its official code:
- ``patch_sizes`` are patch *sides* (2 means 2x2 tokens); the official code names stages by tokens per patch
  ([4, 1], [16, 4, 1]).
- the official code also restarts the learning-rate schedule in every stage (warmup, constant, linear decay per
  segment); flexar's GeneratorModule keeps one warmup + cosine schedule over the whole run.
- no token, residual or FFN dropout, as in flexar's :class:`RasterAR` (which lists its own differences from LlamaGen).
- ``lengths`` (flexible-length tokenizers) are honoured at p = 1 only; coarser stages need whole grids.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ..hub import register
from ..nn import grid_positions
from .raster import RasterAR, llamagen_size

def stage_boundaries(num_levels: int, max_epochs: int, epoch_rate: float = 0.5) -> list[int]:
    """The epoch at which each stage ends: [int(E * r^i) for i in range(levels)] reversed (the paper's rule)."""
    return [int(max_epochs * epoch_rate**level) for level in range(num_levels)][::-1]


@register
class NPP(RasterAR):
    """A raster generator trained with next-patch prediction; the same parameters as :class:`RasterAR`.

    Args (its own; :class:`RasterAR`'s are forwarded): ``patch_sizes`` and ``epoch_rate``, the schedule (module
    docstring); ``patch_size``, the current stage (None: ``patch_sizes[0]``), kept up to date in ``config`` by every
    change.
    """

    presets = {
        # NPP-B / L / XL / XXL (Pang et al. 2024): LlamaGen's GPT-B / L / XL / XXL in LlamaGen's ImageNet 256 setting,
        # "without introducing additional trainable parameters" (111M, 343M, 775M, 1.4B), on the two-level schedule
        # (2 x 2 patches, then single tokens) over the paper's 300 epochs (epoch_rate 0.5: stages end at 150 and 300)
        **{f"npp-{name}": dict(llamagen_size(dim, depth, heads), patch_sizes=[2, 1], epoch_rate=0.5)
           for name, (dim, depth, heads) in {"b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1280, 36, 20),
                                             "xxl": (1536, 48, 24)}.items()},
        # CPU-sized presets for tests, digits and MNIST (the caller gives the tokenizer's sizes)
        "npp-tiny": dict(dim=64, depth=2, num_heads=4),
        "npp-digits": dict(dim=256, depth=6, num_heads=8),
    }

    def __init__(
        self,
        patch_sizes: list[int] | None = None,
        epoch_rate: float = 0.5,
        patch_size: int | None = None,
        **kwargs,
    ):
        """NPP's schedule; every other keyword argument is :class:`RasterAR`'s, forwarded unchanged (``grid`` is
        required: patches are p x p blocks of it)."""
        if kwargs.get("grid") is None:
            raise ValueError("NPP needs a token grid (h, w): patches are p x p blocks of it")
        super().__init__(**kwargs)
        patch_sizes = [2, 1] if patch_sizes is None else [int(size) for size in patch_sizes]
        if not patch_sizes or patch_sizes[-1] != 1 or any(a <= b for a, b in zip(patch_sizes, patch_sizes[1:])):
            raise ValueError(
                f"patch_sizes must decrease strictly and end with 1 (e.g. [2, 1] or [4, 2, 1]), got {patch_sizes}"
            )
        for size in patch_sizes:
            if self.grid[0] % size or self.grid[1] % size:
                raise ValueError(f"patch size {size} does not divide the {self.grid[0]}x{self.grid[1]} token grid")
        if not 0.0 < epoch_rate < 1.0:
            raise ValueError(f"epoch_rate must lie in (0, 1), got {epoch_rate}")
        self.patch_sizes = patch_sizes
        self.epoch_rate = epoch_rate
        self.patch_size = patch_sizes[0] if patch_size is None else patch_size

    @property
    def patch_size(self) -> int:
        """The current stage: the patch side ``training_loss`` trains with, one of ``patch_sizes``."""
        return self._patch_size

    @patch_size.setter
    def patch_size(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or int(size) not in self.patch_sizes:
            raise ValueError(f"NPP patch_size must be one of patch_sizes {self.patch_sizes}, got {size!r}")
        size = int(size)
        self._patch_size = size
        # the stage belongs to the saved config: a reloaded model resumes (and validates) at the stage it was saved in
        config = self.__dict__.get("config")
        if config is not None:
            config["patch_size"] = size

    # -- schedule ------------------------------------------------------------------------------------------------------
    def stage_boundaries(self, max_epochs: int) -> list[int]:
        """Epoch at which each stage of ``patch_sizes`` ends, for a run of ``max_epochs`` epochs."""
        return stage_boundaries(len(self.patch_sizes), max_epochs, self.epoch_rate)

    def patch_size_at(self, epoch: int, max_epochs: int) -> int:
        """The patch size the paper's schedule trains with during ``epoch`` (0-based) of ``max_epochs``."""
        if max_epochs is None or max_epochs < 1:
            raise ValueError(f"NPP's schedule needs the number of training epochs (trainer.max_epochs), got {max_epochs}")
        for size, boundary in zip(self.patch_sizes, self.stage_boundaries(max_epochs)):
            if epoch < boundary:
                return size
        return self.patch_sizes[-1]

    def on_epoch_start(self, epoch: int, max_epochs: int) -> int:
        """Enter the stage of ``epoch``; returns the patch size ``training_loss`` now uses."""
        self.patch_size = self.patch_size_at(epoch, max_epochs)
        return self.patch_size

    # -- patches -------------------------------------------------------------------------------------------------------
    def _check_patch_size(self, patch_size: int) -> tuple[int, int]:
        if patch_size < 1 or self.grid[0] % patch_size or self.grid[1] % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the {self.grid[0]}x{self.grid[1]} token grid")
        return self.grid[0] // patch_size, self.grid[1] // patch_size

    def patch_targets(self, ids: Tensor, patch_size: int) -> Tensor:
        """(B, N) raster ids -> (B, P, p * p): the members of each patch (coarse raster order, row-major inside)."""
        rows, cols = self._check_patch_size(patch_size)
        blocks = ids.reshape(ids.shape[0], rows, patch_size, cols, patch_size).transpose(2, 3)
        return blocks.reshape(ids.shape[0], rows * cols, patch_size * patch_size)

    def patch_embeddings(self, ids: Tensor, labels: Tensor, patch_size: int) -> Tensor:
        """[class token, mean token embedding of every patch]: (B, N / p^2 + 1, dim)."""
        rows, cols = self._check_patch_size(patch_size)
        tokens = self.token_embed(ids).reshape(ids.shape[0], rows, patch_size, cols, patch_size, self.dim)
        means = tokens.mean(dim=(2, 4)).reshape(ids.shape[0], rows * cols, self.dim)
        return torch.cat([self.class_embed(labels).unsqueeze(1), means], dim=1)

    def patch_forward(self, ids: Tensor, labels: Tensor, patch_size: int) -> Tensor:
        """Logits (B, P, V): row i, after [class token, patches < i], predicts every token of patch i."""
        rows, cols = self._check_patch_size(patch_size)
        inputs = self.patch_embeddings(ids, labels, patch_size)[:, :-1]
        positions = torch.cat([torch.full((1, 2), -1), grid_positions(rows, cols)]).to(self.positions.device)
        mask = self.mask if inputs.shape[1] > 1 else None
        hidden = self.transformer(inputs, mask=mask, rope=self.rope(positions[:-1]))
        return self.head(hidden)

    def patch_loss(self, ids: Tensor, labels: Tensor, patch_size: int) -> tuple[Tensor, dict]:
        """Cross-entropy of every patch's logits against each of its p^2 tokens, averaged over all of them."""
        logits = self.patch_forward(ids, labels, patch_size)
        targets = self.patch_targets(ids, patch_size)
        log_probs = logits.float().log_softmax(dim=-1)
        loss = -log_probs.gather(-1, targets).mean()
        with torch.no_grad():
            accuracy = (logits.argmax(dim=-1, keepdim=True) == targets).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "perplexity": loss.detach().exp()}

    # -- objective -----------------------------------------------------------------------------------------------------
    def training_loss(self, ids: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """The loss of the current stage (``patch_size``): next-patch cross-entropy, or raster next-token at p = 1."""
        size = self.patch_size
        if size == 1:
            loss, logs = super().training_loss(ids, labels, lengths)
        else:
            labels = self.check_labels(labels)
            lengths = self.check_ids(ids, lengths)
            if ids.shape[1] != self.max_tokens or bool((lengths != self.max_tokens).any()):
                raise ValueError(f"next-patch training at patch size {size} needs whole grids: ids must be "
                                 f"(B, {self.max_tokens}) with every length {self.max_tokens}")
            if labels.shape[0] != ids.shape[0]:
                raise ValueError(f"got {labels.shape[0]} labels for {ids.shape[0]} rows of ids")
            loss, logs = self.patch_loss(ids, self.drop_labels(labels), size)
        logs["patch_size"] = torch.tensor(float(size))
        return loss, logs
