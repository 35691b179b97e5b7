"""Callbacks that write image grids during training (previews only; evaluation is in scripts/).

Each grid is a PNG under ``<trainer.log_dir>/images`` and, when the trainer's logger takes images (TensorBoard's
``add_image``, or a ``log_image(key, images, step)`` method as Weights & Biases' logger has), an image in the logger
too; a CSV logger takes none, so there the PNG files are the previews.

Both find their output folder on every rank when the stage starts: ``trainer.log_dir`` broadcasts from rank zero, so
asking for it on rank zero alone would leave the other ranks of a multi-process run waiting. Every rank draws the
preview, inside the module's ``full_weights()`` (FSDP holds only shards of each weight outside the forward pass and
gathers them collectively; other strategies pay nothing), and rank zero writes it.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Float images in [-1, 1] (B, C, H, W) -> one grid (3 or C, H', W') in [0, 1], with white padding."""
    return make_grid((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Save float images in [-1, 1] (B, C, H, W) as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(images, nrow), path)
    return path


def log_grid(trainer, key: str, grid: torch.Tensor) -> None:
    """Send `grid` (C, H, W) in [0, 1] to every logger of `trainer` that takes images, at the current step."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=trainer.global_step)
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[grid], step=trainer.global_step)


def _images_folder(trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir) / "images"


def _full_weights(pl_module):
    full_weights = getattr(pl_module, "full_weights", None)
    return full_weights() if callable(full_weights) else contextlib.nullcontext()


def _write_preview(trainer, images: torch.Tensor, name: str, key: str, nrow: int, folder: Path | None) -> None:
    grid = image_grid(images, nrow)
    path = (folder or _images_folder(trainer)) / f"{name}_epoch{trainer.current_epoch:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    log_grid(trainer, key, grid)


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
        self._folder: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._folder = _images_folder(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # every rank keeps its own first batch: all of them reconstruct (see the module docstring), rank zero's is shown
        if batch_idx == 0:
            self._images = batch[0][: self.num_images]

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._images is None or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        tokenizer = pl_module.averaged_network()
        rows = [self._images]
        with torch.no_grad(), _full_weights(pl_module):
            for count in self.num_tokens or [None]:
                rows.append(tokenizer.reconstruct(self._images, count))
        if trainer.is_global_zero:
            _write_preview(trainer, torch.cat(rows), "reconstructions", "reconstructions", len(self._images),
                           self._folder)


class SampleGrid(L.Callback):
    """Every `every_n_epochs`, sample `per_class` images for each of `num_classes` labels and save a grid.

    `tokenizer` is the folder of the tokenizer whose ids the generator models; None (the default) takes the folder
    that the training token cache's meta.json records (``tokenizer.path``, written by ``flexar-tokenize``). Either
    way the folder is checked when fitting starts, before any training: it must hold a saved tokenizer whose
    fingerprint (:func:`flexar.hub.fingerprint`) equals the one the cache was written with, and whose vocabulary and
    length match the generator's. Rank zero checks it and tells the other ranks whether the check passed, so every
    rank stops together; then every rank loads it, since every rank draws the preview (see the module docstring).

    A continuous generator (``continuous = True``, xAR, trained on a latent cache) samples with
    ``flexar.sampling.FlowSampler(cfg_scale=cfg_scale)`` (`temperature` has no meaning there) and its
    ``GenerationOutput.latents`` are decoded with the tokenizer's ``decode_latents``; the tokenizer (a VAE) must
    have the generator's ``latent_channels`` and ``latent_size``.
    """

    def __init__(self, tokenizer: str | None = None, per_class: int = 4, num_classes: int = 10, every_n_epochs: int = 1,
                 cfg_scale: float = 1.0, temperature: float = 1.0, seed: int = 0):
        super().__init__()
        self.tokenizer_path = tokenizer
        self.per_class, self.num_classes, self.every_n_epochs = per_class, num_classes, every_n_epochs
        self.cfg_scale, self.temperature, self.seed = cfg_scale, temperature, seed
        self._tokenizer = None
        self._folder: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._folder = _images_folder(trainer)
        if stage != "fit":
            return
        problem, error = None, None
        if trainer.is_global_zero:
            try:
                self._tokenizer = self.load_checked_tokenizer(trainer, pl_module)
            except Exception as caught:  # broadcast first, so that no rank is left waiting
                problem, error = str(caught), caught
        problem = trainer.strategy.broadcast(problem)
        if error is not None:
            raise error
        if problem is not None:
            raise ValueError(problem)
        if self._tokenizer is None:
            # the other ranks draw the preview too (see the module docstring): the folder rank zero checked
            from flexar.hub import load_model

            self._tokenizer = load_model(self.tokenizer_folder(trainer)[0]).eval()

    def tokenizer_folder(self, trainer) -> tuple[Path, str | None, str]:
        """(folder, fingerprint recorded by the token cache or None, where the cache's meta.json is)."""
        datamodule = trainer.datamodule
        meta = getattr(datamodule, "meta", None)
        cache = f"{getattr(datamodule, 'train_path', 'the training token cache')}/meta.json"
        recorded = meta.get("tokenizer") if isinstance(meta, dict) else None
        recorded = recorded if isinstance(recorded, dict) else {}
        if self.tokenizer_path is not None:
            return Path(self.tokenizer_path), recorded.get("fingerprint"), cache
        if not isinstance(meta, dict):
            raise ValueError(
                f"SampleGrid(tokenizer=None) takes the tokenizer folder from the training token cache's meta.json, "
                f"but the datamodule ({type(datamodule).__name__}) has no token cache; pass tokenizer=FOLDER"
            )
        if not recorded.get("path"):
            raise ValueError(
                f"SampleGrid(tokenizer=None): {cache} records no tokenizer folder (field 'tokenizer.path' is "
                f"{recorded.get('path', 'absent')!r}: the cache was written from an in-memory tokenizer, or by an "
                "older flexar-tokenize); pass tokenizer=FOLDER, or re-run flexar-tokenize --tokenizer FOLDER"
            )
        return Path(recorded["path"]), recorded.get("fingerprint"), cache

    def load_checked_tokenizer(self, trainer, pl_module):
        """Load the tokenizer folder after checking it against the token cache and the generator."""
        from flexar.hub import fingerprint, load_model

        folder, expected, cache = self.tokenizer_folder(trainer)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"SampleGrid: tokenizer folder {folder} holds no saved tokenizer (no config.json); pass the folder "
                f"the token cache was written with{'' if self.tokenizer_path is None else ' as tokenizer=FOLDER'}"
            )
        actual = fingerprint(folder)
        if expected is None:
            warnings.warn(
                f"SampleGrid: {cache} records no tokenizer fingerprint, so tokenizer {folder} cannot be checked "
                "against the tokenizer that wrote the cache; re-run flexar-tokenize to record it",
                stacklevel=2,
            )
        elif actual != expected:
            raise ValueError(
                f"SampleGrid: tokenizer {folder} (fingerprint {actual[:12]}) is not the tokenizer that wrote {cache} "
                f"(field 'tokenizer.fingerprint' {expected[:12]}); its decodes of the generator's ids would be wrong. "
                "Pass the folder the cache was written with, or re-tokenize with this tokenizer"
            )
        tokenizer = load_model(folder).eval()
        generator = pl_module.averaged_network() if hasattr(pl_module, "averaged_network") else None
        continuous = bool(getattr(generator, "continuous", False))
        decoder = "decode_latents" if continuous else "decode"
        if generator is not None and not callable(getattr(tokenizer, decoder, None)):
            raise ValueError(
                f"SampleGrid: tokenizer {folder} ({type(tokenizer).__name__}) has no {decoder}, which the samples of "
                f"{type(generator).__name__} need ({'latents' if continuous else 'token ids'}); pass the folder the "
                "cache was written with")
        pairs = ((("latent_channels", "latent_channels"), ("latent_size", "latent_size")) if continuous
                 else (("codebook_size", "vocab_size"), ("max_tokens", "max_tokens")))
        for name, theirs in pairs:
            ours, wanted = getattr(tokenizer, name, None), getattr(generator, theirs, None)
            if ours is not None and wanted is not None and ours != wanted:
                raise ValueError(f"SampleGrid: tokenizer {folder} has {name} {ours}, the generator {theirs} {wanted}")
        return tokenizer

    def preview_sampler(self, generator):
        """The preview's sampler: ``Sampler(temperature, cfg_scale)``, or ``FlowSampler(cfg_scale=cfg_scale)`` for a
        continuous generator."""
        if getattr(generator, "continuous", False):
            from flexar.sampling import FlowSampler

            return FlowSampler(cfg_scale=self.cfg_scale)
        from flexar.sampling import Sampler

        return Sampler(temperature=self.temperature, cfg_scale=self.cfg_scale)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self._tokenizer is None:
            # a validation run outside fit: the same checks, now
            self._tokenizer = self.load_checked_tokenizer(trainer, pl_module)
        tokenizer = self._tokenizer.to(pl_module.device)
        generator_model = pl_module.averaged_network()
        labels = torch.arange(self.num_classes, device=pl_module.device).repeat_interleave(self.per_class)
        sampler = self.preview_sampler(generator_model)
        rng = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = generator_model.training
        generator_model.eval()
        with torch.no_grad(), _full_weights(pl_module):
            out = generator_model.generate(labels, sampler, generator=rng)
        generator_model.train(was_training)
        if trainer.is_global_zero:
            with torch.no_grad():
                # a flow generator's samples are latents for the VAE's decoder, the others' ids for the tokenizer's
                continuous = getattr(generator_model, "continuous", False)
                images = tokenizer.decode_latents(out.latents) if continuous else tokenizer.decode(out.ids)
            _write_preview(trainer, images, "samples", "samples", self.per_class * 2, self._folder)
