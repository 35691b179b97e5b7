"""Rank-zero callbacks that write image grids during training (previews only; evaluation is in scripts/)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import save_image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] -> uint8 in [0, 255]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Save float images in [-1, 1] (B, C, H, W) as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.detach().float().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)
    return path


class ReconstructionGrid(L.Callback):
    """After each `every_n_epochs` validation, save originals next to reconstructions at each `num_tokens`.

    Rows of the grid: the originals, then one row per entry of `num_tokens` (None = the tokenizer's default).
    """

    def __init__(self, num_images: int = 8, num_tokens: list[int] | None = None, every_n_epochs: int = 1):
        super().__init__()
        self.num_images = num_images
        self.num_tokens = num_tokens
        self.every_n_epochs = every_n_epochs
        self._images = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and trainer.is_global_zero:
            self._images = batch[0][: self.num_images]

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero or self._images is None or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        tokenizer = pl_module.averaged_network()
        rows = [self._images]
        with torch.no_grad():
            for count in self.num_tokens or [None]:
                rows.append(tokenizer.reconstruct(self._images, count))
        root = Path(trainer.log_dir or trainer.default_root_dir)
        save_grid(torch.cat(rows), root / "images" / f"reconstructions_epoch{trainer.current_epoch:03d}.png", nrow=len(self._images))
