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


class SampleGrid(L.Callback):
    """Every `every_n_epochs`, sample `per_class` images for each of `num_classes` labels and save a grid.

    `tokenizer` is the folder of the tokenizer whose ids the generator models (loaded lazily on rank zero).
    """

    def __init__(self, tokenizer: str, per_class: int = 4, num_classes: int = 10, every_n_epochs: int = 1,
                 cfg_scale: float = 1.0, temperature: float = 1.0, seed: int = 0):
        super().__init__()
        self.tokenizer_path = tokenizer
        self.per_class, self.num_classes, self.every_n_epochs = per_class, num_classes, every_n_epochs
        self.cfg_scale, self.temperature, self.seed = cfg_scale, temperature, seed
        self._tokenizer = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        from flexar.hub import load_model
        from flexar.sampling import Sampler

        if self._tokenizer is None:
            self._tokenizer = load_model(self.tokenizer_path).eval()
        tokenizer = self._tokenizer.to(pl_module.device)
        generator_model = pl_module.averaged_network()
        labels = torch.arange(self.num_classes, device=pl_module.device).repeat_interleave(self.per_class)
        sampler = Sampler(temperature=self.temperature, cfg_scale=self.cfg_scale)
        rng = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = generator_model.training
        generator_model.eval()
        out = generator_model.generate(labels, sampler, generator=rng)
        generator_model.train(was_training)
        with torch.no_grad():
            images = tokenizer.decode(out.ids)
        root = Path(trainer.log_dir or trainer.default_root_dir)
        save_grid(images, root / "images" / f"samples_epoch{trainer.current_epoch:03d}.png", nrow=self.per_class * 2)
