"""Thin LightningModules: the model is built from the config and passed in; the module owns the optimiser, the
learning-rate schedule, EMA, logging and the final export. The objective lives in the model's ``training_loss``.

Recipe, as in nanoGPT and LlamaGen (Sun et al., 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable
Image Generation"): AdamW with weight decay on every parameter of two or more dimensions (linear and convolution
weights, embedding tables, learned tokens such as TiTok's ``latent_tokens`` or a mask token) and none on parameters of
fewer (norm scales, biases); linear warmup then cosine decay; for generators, gradients clipped to norm 1.0 (LlamaGen's
``max_grad_norm``). Departure: TiTok's official training (1d-tokenizer) also exempts embeddings, latent and mask
tokens from decay by name; flexar keeps the one dimension rule for every model, tokenizers included, so that a
Linear called ``patch_embed`` or ``time_embed`` is decayed like any other Linear.

Optimiser and schedule from the config: ``optimizer`` takes any optimiser class from YAML (``class_path`` /
``init_args``, e.g. ``torch.optim.SGD`` with its ``lr``), called with the two parameter groups of the dimension rule:
the decayed group takes the optimiser's own ``weight_decay``, the other none. ``lr_scheduler`` takes any schedule
class (e.g. ``torch.optim.lr_scheduler.StepLR``), called with the optimiser and stepped after every optimiser step
(``ReduceLROnPlateau`` once per epoch on ``val_loss``). Left None, they are the recipe above: AdamW(``lr``,
``betas``, ``weight_decay``) and warmup-cosine over the run's optimiser steps.

Checkpoints rebuild the run: both modules call ``save_hyperparameters``. The models they wrap are recorded as
``class_path`` / ``init_args`` (LightningCLI's own parsed config, or, for a module built in Python, the model's
Configurable record), never pickled, so ``TokenizerModule.load_from_checkpoint(ckpt)`` and ``flexar-train fit
--ckpt_path ckpt`` need nothing but the ``.ckpt``. Every checkpoint also carries ``checkpoint["flexar"]``, the
description from which ``flexar-export CKPT OUTPUT`` writes the model folder (:mod:`flexar.train.export`).

EMA: an :class:`torch.optim.swa_utils.AveragedModel` of the wrapped model (parameters and buffers), updated right
after each optimiser step, used by validation, test, predict, the preview callbacks and the export. flexar keeps its
own rather than Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` callback, which (Lightning 2.6) averages the
whole LightningModule (a criterion's LPIPS network and discriminator, step counters), swaps the averaged weights
into the trained ones around validation, so that what another callback sees at ``on_validation_epoch_end`` depends
on the order of the callbacks, and states in its documentation that sharded models (FSDP) are not supported.

Strategies: under FSDP a state dict is a collective and parameters are shards outside the forward pass, so the
export gathers on every rank and writes on rank zero, the EMA update runs inside ``summon_full_params`` (one
all-gather per step), and the preview callbacks sample on every rank inside it. Plain ``ddp`` and one device need
none of this and pay nothing for it.

Safety: a non-finite training loss stops the run at once with a ``FloatingPointError`` that names the step and the
loss, before the optimiser applies it, and nothing is exported (checking costs one device synchronisation per step,
as LlamaGen's ``loss.item()`` per step and Lightning's progress bar already do). An export folder that already holds
files is refused when fitting starts, before any training, unless ``overwrite_export=True``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flexar.sampling import FlowSampler, Sampler
from flexar.tokenizers.base import check_criterion
from flexar.tokenizers.losses import ReconstructionLoss
from flexar.train.export import EMA_PREFIX, FLEXAR_KEY, describe_network, gathered_state_dict, network_weights, rebuild

# what LightningCLI writes into the hyperparameters of the modules it builds, so that load_from_checkpoint rebuilds
# nested class_path / init_args through jsonargparse; modules built in Python record the same
_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate: linear warmup, then cosine decay to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def refuse_existing_export(module: L.LightningModule, path: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` on every rank when `path` already holds files and `overwrite` is False.

    Rank zero looks and broadcasts what it found, so that no rank trains on while another one stops.
    """
    found = None
    if module.trainer.is_global_zero and not overwrite and path.exists():
        found = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else [path.name]
    found = module.trainer.strategy.broadcast(found)
    if found:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise FileExistsError(
            f"export folder {os.fspath(path)} already holds {listed}; refusing to overwrite it. Choose another "
            "folder with --model.init_args.export_dir, or replace it with --model.init_args.overwrite_export true"
        )


def check_finite_loss(module: L.LightningModule, loss: torch.Tensor, batch_idx: int, name: str = "training loss") -> None:
    """Raise ``FloatingPointError`` naming the step and the loss when `loss` is NaN or infinite on any rank.

    One device synchronisation (and, with several processes, one all-gather of a scalar) per call; every rank raises
    together, so none is left waiting in a collective.
    """
    values = loss.detach().float()
    if module.trainer.world_size > 1:
        values = module.all_gather(values)
    if bool(torch.isfinite(values).all()):
        return
    per_rank = values.reshape(-1).tolist()
    value = next(v for v in per_rank if not math.isfinite(v))
    where = f" (per rank: {', '.join(f'{v:g}' for v in per_rank)})" if len(per_rank) > 1 else ""
    lr = getattr(module, "lr", None)
    advice = f"lower the learning rate (lr={lr:g})" if lr is not None else "lower the learning rate"
    raise FloatingPointError(
        f"{name} is {value:g}{where} at step {module.global_step} (epoch {module.current_epoch}, batch {batch_idx}); "
        f"training stops and nothing is exported: {advice} or check the data"
    )


def class_path_config(value) -> dict | None:
    """``{"class_path", "init_args"}`` that rebuilds `value` through jsonargparse, or None when it cannot be said.

    A Configurable model is described by its recorded constructor arguments, a sampler by its ``to_dict``, an
    optimiser or schedule given as ``functools.partial(SomeClass, **keywords)`` by the class and the keywords.
    """
    if isinstance(value, nn.Module) and isinstance(getattr(value, "config", None), dict):
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": copy.deepcopy(value.config)}
    if isinstance(value, functools.partial):
        # partial(SomeClass, **keywords), or jsonargparse's partial(instantiator, SomeClass, **keywords)
        if isinstance(value.func, type) and not value.args:
            cls = value.func
        elif len(value.args) == 1 and isinstance(value.args[0], type):
            cls = value.args[0]
        else:
            return None
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(value.keywords)}
    if callable(getattr(value, "to_dict", None)) and callable(getattr(type(value), "from_dict", None)):
        cls = type(value)  # a Sampler: to_dict gives its constructor arguments
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": value.to_dict()}
    return None


class _ModelModule(L.LightningModule):
    """Shared optimisation plumbing for a wrapped model exposing ``training_loss(*batch) -> (loss, logs)``."""

    model_attribute = "model"

    def __init__(
        self,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        warmup_steps: int,
        min_lr_ratio: float,
        ema_decay: float | None,
        export_dir: str | None,
        overwrite_export: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.ema_decay = ema_decay
        self.export_dir = export_dir
        self.overwrite_export = overwrite_export
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._export_folder: Path | None = None

    def _record_hyperparameters(self, frame, **objects) -> None:
        """``save_hyperparameters`` of the calling ``__init__`` (`frame`), without pickling the `objects` it received.

        LightningCLI hands over its parsed config, where every object is already a ``class_path`` / ``init_args``
        mapping. A module built in Python describes each object with :func:`class_path_config`; one it cannot
        describe (a lambda, a criterion that records no config) is left out with a warning, and must be passed
        again to ``load_from_checkpoint``.
        """
        self.save_hyperparameters(ignore=list(objects), frame=frame)
        if "_instantiator" in self.hparams:  # built by LightningCLI: its config holds the objects as mappings
            self.save_hyperparameters(frame=frame)
            return
        for name, value in objects.items():
            if value is None:
                self._hparams[name] = None
                continue
            described = class_path_config(value)
            if described is None:
                warnings.warn(
                    f"{type(self).__name__}: argument {name!r} ({type(value).__name__}) cannot be recorded in the "
                    f"checkpoint's hyperparameters; pass {name}=... again to load_from_checkpoint",
                    stacklevel=3,
                )
                continue
            self._hparams[name] = described
        cls = type(self)
        self._hparams["_class_path"] = f"{cls.__module__}.{cls.__qualname__}"
        self._hparams["_instantiator"] = _INSTANTIATOR
        self._hparams_initial = copy.deepcopy(self._hparams)

    @property
    def network(self) -> nn.Module:
        return getattr(self, self.model_attribute)

    def setup_network(self) -> None:
        """Called once the wrapped network is set: record which of its parameters the weight decay applies to, and
        build the EMA copy."""
        # from the shapes as built: under FSDP (use_orig_params) every parameter is a flat 1-D shard by the time the
        # optimiser is configured, and the dimension rule would decay nothing
        self._decayed = {name for name, parameter in self.network.named_parameters() if parameter.dim() >= 2}
        self.ema = None
        if self.ema_decay is not None:
            self.ema = AveragedModel(self.network, multi_avg_fn=get_ema_multi_avg_fn(self.ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)

    def averaged_network(self) -> nn.Module:
        """The EMA weights when EMA is on, else the trained weights."""
        return self.ema.module if self.ema is not None else self.network

    def full_weights(self, writeback: bool = False):
        """Context in which every parameter is whole on this rank: FSDP's ``summon_full_params`` (a collective: every
        rank enters it; `writeback` keeps in-place changes), a no-op under every other strategy."""
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, FSDPStrategy) and strategy.model is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.summon_full_params(strategy.model, writeback=writeback)
        return contextlib.nullcontext()

    def parameter_groups(self, module_weight_decay: bool = True) -> list[dict]:
        """Optimiser groups of the trained parameters: decayed (two or more dimensions), then not decayed (weight
        decay 0). The decayed group carries ``weight_decay`` when `module_weight_decay`, else none, so that the
        optimiser's own applies (an ``optimizer`` from the config)."""
        decay, no_decay = [], []
        for name, parameter in self.network.named_parameters():
            if not parameter.requires_grad:
                continue
            # nanoGPT / LlamaGen: every matrix (and higher) is decayed, embedding tables and learned tokens included;
            # norm scales and biases (fewer than two dimensions) are not
            (decay if name in self._decayed else no_decay).append(parameter)
        decayed = {"params": decay, "weight_decay": self.weight_decay} if module_weight_decay else {"params": decay}
        return [decayed, {"params": no_decay, "weight_decay": 0.0}]

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The model's optimiser: ``optimizer`` over :meth:`parameter_groups`, or AdamW(lr, betas, weight_decay)."""
        if self.optimizer_factory is None:
            return torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        optimizer = self.optimizer_factory(self.parameter_groups(module_weight_decay=False))
        # the learning rate a non-finite loss names is the configured optimiser's
        self.lr = optimizer.param_groups[0]["lr"]
        return optimizer

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        return {"optimizer": optimizer, "lr_scheduler": self.build_schedule(optimizer)}

    def build_schedule(self, optimizer: torch.optim.Optimizer) -> dict:
        """Lightning's scheduler entry: ``lr_scheduler(optimizer)`` or warmup-cosine, stepped every optimiser step."""
        if self.lr_scheduler_factory is None:
            return {"scheduler": self.schedule(optimizer), "interval": "step"}
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            if not self.automatic_optimization:
                raise ValueError(f"lr_scheduler ReduceLROnPlateau needs a validation metric per step, which "
                                 f"{type(self).__name__}'s adversarial (manual) optimisation does not give; choose a "
                                 "schedule stepped by steps")
            return {"scheduler": scheduler, "interval": "epoch", "monitor": "val_loss"}
        return {"scheduler": scheduler, "interval": "step"}

    def schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total, self.min_lr_ratio)
        )

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self) -> None:
        """Fold the weights just stepped into the EMA. It runs right after each optimiser step, before any
        ``on_train_batch_end`` callback, so a checkpoint written at the end of a batch (ModelCheckpoint) holds the
        EMA of that very step and a resumed run continues it exactly. Under FSDP each rank holds shards of both
        copies, laid out differently, so the update runs on whole weights (``summon_full_params``)."""
        if self.ema is not None:
            with self.full_weights(writeback=True):
                self.ema.update_parameters(self.network)

    def evaluation_step(self, prefix: str, batch) -> None:
        """Log the training loss's metrics of `batch` under `prefix` ("val", "test"), with the averaged network."""
        raise NotImplementedError

    def validation_step(self, batch, batch_idx):
        self.evaluation_step("val", batch)

    def test_step(self, batch, batch_idx):
        self.evaluation_step("test", batch)

    def log_metrics(self, prefix: str, logs: dict, batch_size: int) -> None:
        on_step = prefix == "train"
        self.log_dict(
            {f"{prefix}/{k}": v.float() for k, v in logs.items()},
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=False,
            batch_size=batch_size,
            sync_dist=not on_step,
        )
        if "loss" in logs:
            self.log(f"{prefix}_loss", logs["loss"].float(), prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)

    # -- export ---------------------------------------------------------------------------------------------------

    def export_description(self) -> dict:
        """What ``checkpoint["flexar"]`` holds: the wrapped network's attribute, whether EMA is on, and the config
        (class, kwargs, provenance) of the network that is exported."""
        return {"network": self.model_attribute, "ema": self.ema is not None,
                "model": describe_network(self.averaged_network())}

    def exported_network(self) -> nn.Module | None:
        """The network the export writes (the EMA weights when EMA is on), rebuilt on the CPU on rank zero; None on
        the other ranks. Every rank must call it: under FSDP the state dict it reads is gathered from all of them."""
        description = self.export_description()
        state = gathered_state_dict(self)
        trainer = self._trainer
        if trainer is not None and not trainer.is_global_zero:
            return None
        prefix = EMA_PREFIX if description["ema"] else f"{self.model_attribute}."
        source = f"{type(self).__name__} state"
        return rebuild(description["model"], network_weights(state, prefix, source), source)

    def export_path(self) -> Path:
        """``export_dir``, else ``<trainer.log_dir>/pretrained``; every rank must call it (log_dir broadcasts)."""
        if self.export_dir is not None:
            return Path(self.export_dir)
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / "pretrained"

    def on_fit_start(self) -> None:
        # refused before any training, not after it
        self._export_folder = self.export_path()
        refuse_existing_export(self, self._export_folder, self.overwrite_export)

    def on_fit_end(self) -> None:
        from flexar.hub import save_model

        path = self._export_folder if self._export_folder is not None else self.export_path()
        model = self.exported_network()  # every rank: a collective under FSDP
        if model is not None:
            save_model(model, path)
            print(f"saved {type(model).__name__} to {os.fspath(path)}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FLEXAR_KEY] = self.export_description()
        # Lightning saves weights, optimiser, schedule and loop counters, not the global random stream that training
        # draws from (class dropout, token drop): save it too, so a resumed run draws what the uninterrupted one
        # would have. seed_everything seeds every rank alike, so rank zero's state, the one written, serves all.
        state = {"torch": torch.get_rng_state()}
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        checkpoint["rng_state"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rng_state")
        if state is None:  # a checkpoint written before random states were saved
            return
        torch.set_rng_state(state["torch"].cpu())  # both setters take a CPU byte tensor
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        if "cuda" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), device)

    def token_cache_meta(self, tokenizer_folder: str | os.PathLike | None = None) -> dict:
        """meta.json fields of a token cache written from this module's predictions (see
        :class:`flexar.data.TokenCacheWriter`); every rank must call it."""
        raise NotImplementedError

    def _exported_fingerprint(self) -> str | None:
        """:func:`flexar.hub.fingerprint` of the folder the export would write, on rank zero (every rank calls)."""
        from flexar.hub import model_fingerprint

        model = self.exported_network()
        return model_fingerprint(model) if model is not None else None


class TokenizerModule(_ModelModule):
    """Trains a :class:`flexar.tokenizers.Tokenizer` on (images, labels) batches.

    ``loss`` (a :class:`flexar.tokenizers.ReconstructionLoss`) replaces the tokenizer's built-in pixel loss with
    pixel + perceptual + adversarial terms, in the families that take one (``takes_criterion``; the others are
    refused when the module is built).
    When the criterion holds a discriminator, training switches to manual optimisation with two optimisers (AdamW,
    or ``optimizer``): per batch one tokenizer step (the generator side of the criterion, with VQGAN's adaptive
    weight), then one discriminator step on the same, detached reconstructions. The criterion's
    ``discriminator_start`` counts tokenizer steps (``tokenizer_steps``, saved in checkpoints). Lightning's
    ``global_step`` counts every optimiser step in manual optimisation, so a ``trainer.max_steps`` counts the
    discriminator's steps too once they start: bound GAN runs with ``max_epochs`` / ``limit_train_batches``.
    Validation and test report the tokenizer's own loss (pixel + quantiser), comparable across criteria.

    ``trainer.test`` reports the validation metrics (``test/...``) on the data module's test loader;
    ``trainer.predict`` tokenizes: each batch gives ``{"ids" (B, max_tokens) int32, zero past "lengths" (B,) int32,
    "labels" (B,) long}`` with ``predict_num_tokens`` kept tokens (None: the tokenizer's default), which
    :class:`flexar.data.TokenCacheWriter` writes as a token cache.
    """

    model_attribute = "tokenizer"

    def __init__(
        self,
        tokenizer: nn.Module,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = None,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        loss: ReconstructionLoss | None = None,
        discriminator_lr: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        predict_num_tokens: int | None = None,
    ):
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, ema_decay, export_dir, overwrite_export,
                         optimizer, lr_scheduler)
        self._record_hyperparameters(inspect.currentframe(), tokenizer=tokenizer, loss=loss, optimizer=optimizer,
                                     lr_scheduler=lr_scheduler)
        self.tokenizer = tokenizer
        self.loss = loss
        if loss is not None:
            # refused now rather than at the first step: a family whose objective has no pixel term to replace
            check_criterion(tokenizer, loss)
            if loss.discriminator is not None and loss.channels != tokenizer.channels:
                raise ValueError(f"loss.channels {loss.channels} differs from the tokenizer's {tokenizer.channels} channels")
        self.adversarial = loss is not None and loss.discriminator is not None
        self.automatic_optimization = not self.adversarial
        self.discriminator_lr = discriminator_lr
        self.predict_num_tokens = predict_num_tokens
        self.register_buffer("tokenizer_steps", torch.zeros((), dtype=torch.long))
        self.setup_network()

    def setup(self, stage: str) -> None:
        if self.adversarial and self.ema is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            # manual optimisation steps inside the training step, where FSDP cannot gather whole weights for the EMA
            raise ValueError("TokenizerModule: EMA (ema_decay) of an adversarial tokenizer (a loss with a "
                             "discriminator) is not supported under FSDP; use strategy: ddp, or ema_decay: null")

    def configure_optimizers(self):
        tokenizer_side = super().configure_optimizers()
        if not self.adversarial:
            return tokenizer_side
        parameters = list(self.loss.discriminator.parameters())
        if self.optimizer_factory is None:
            # LlamaGen / ReTok: Adam on the discriminator with the tokenizer's betas, no weight decay
            lr = self.discriminator_lr if self.discriminator_lr is not None else self.lr
            optimizer = torch.optim.AdamW(parameters, lr=lr, betas=self.betas, weight_decay=0.0)
        else:
            group = {"params": parameters, "weight_decay": 0.0}
            if self.discriminator_lr is not None:
                group["lr"] = self.discriminator_lr
            optimizer = self.optimizer_factory([group])
        discriminator_side = {"optimizer": optimizer, "lr_scheduler": self.build_schedule(optimizer)}
        return [tokenizer_side, discriminator_side]

    def training_step(self, batch, batch_idx):
        images = batch[0]
        step = int(self.tokenizer_steps)
        if not self.adversarial:
            # every tokenizer's training_loss takes (images, criterion=None, step=0)
            loss, logs = self.tokenizer.training_loss(images, criterion=self.loss, step=step)
            check_finite_loss(self, loss, batch_idx)
        else:
            loss, logs = self.adversarial_step(images, step, batch_idx)
        self.tokenizer_steps += 1
        self.log_metrics("train", logs, images.shape[0])
        return loss

    def adversarial_step(self, images, step: int, batch_idx: int = 0):
        tokenizer_optimizer, discriminator_optimizer = self.optimizers()
        tokenizer_schedule, discriminator_schedule = self.lr_schedulers()
        # the discriminator is frozen while the tokenizer steps (no gradient wasted on it)
        self.toggle_optimizer(tokenizer_optimizer)
        loss, logs = self.tokenizer.training_loss(images, criterion=self.loss, step=step)
        check_finite_loss(self, loss, batch_idx)
        tokenizer_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        tokenizer_optimizer.step()
        self.update_ema()
        self.untoggle_optimizer(tokenizer_optimizer)
        tokenizer_schedule.step()
        if self.loss.adversarial_active(step):
            self.toggle_optimizer(discriminator_optimizer)
            discriminator_loss, discriminator_logs = self.loss.discriminator_loss(images, self.loss.last_reconstruction, step)
            check_finite_loss(self, discriminator_loss, batch_idx, name="discriminator loss")
            discriminator_optimizer.zero_grad(set_to_none=True)
            self.manual_backward(discriminator_loss)
            discriminator_optimizer.step()
            self.untoggle_optimizer(discriminator_optimizer)
            # the discriminator's warmup begins with its first step
            discriminator_schedule.step()
            logs.update(discriminator_logs)
        return loss, logs

    def evaluation_step(self, prefix: str, batch) -> None:
        images = batch[0]
        tokenizer = self.averaged_network()
        loss, logs = tokenizer.training_loss(images)
        self.log_metrics(prefix, logs, images.shape[0])

    def predict_step(self, batch, batch_idx, dataloader_idx=0) -> dict:
        from flexar.data.token_cache import cache_rows

        # ids and lengths from a tokenizer of ids, latents from a continuous one (a VAE: a latent cache)
        return cache_rows(self.averaged_network(), batch[0], batch[1], self.predict_num_tokens)

    def token_cache_meta(self, tokenizer_folder: str | os.PathLike | None = None) -> dict:
        """The tokenizer's fields (:func:`flexar.data.token_cache.tokenizer_meta`); without `tokenizer_folder` the
        fingerprint is that of the folder the export (or ``flexar-export``) writes, known on rank zero."""
        from flexar.data.token_cache import tokenizer_meta
        from flexar.hub import fingerprint

        tokenizer = self.averaged_network()
        if tokenizer_folder is not None:
            return tokenizer_meta(tokenizer, fingerprint(tokenizer_folder), Path(tokenizer_folder).resolve())
        return tokenizer_meta(tokenizer, self._exported_fingerprint(), None)


class GeneratorModule(_ModelModule):
    """Trains a :mod:`flexar.generators` model on (ids, labels, lengths) batches from a token cache.

    ``max_grad_norm`` clips the global gradient norm before every optimiser step (LlamaGen's default 1.0; None turns
    clipping off). A ``trainer.gradient_clip_val`` given to the Trainer takes precedence over it.

    A continuous generator (``continuous = True``, xAR) trains on (latents (B, C, h, w), labels, lengths) batches
    from a latent cache of the same shape (``latent_channels``, ``latent_size``); a token cache for it, or a latent
    cache for a generator of ids, is refused when the run starts.

    ``trainer.test`` reports the validation metrics (``test/...``) on the data module's test loader;
    ``trainer.predict`` generates: each batch of (ids, labels, lengths) gives one sample per label, drawn with
    ``predict_sampler`` (None: ``Sampler()``, temperature 1 without guidance) from a ``torch.Generator`` seeded with
    ``predict_seed + batch_idx * world_size + global_rank``, as ``{"ids" (B, max_tokens) int32, "lengths" (B,) int32, "labels"
    (B,) long}``, which :class:`flexar.data.TokenCacheWriter` writes as a token cache of the generator's tokenizer. A
    continuous generator samples with ``predict_sampler`` (None: ``flexar.sampling.FlowSampler()``) and gives
    ``{"latents" (B, C, h, w), "labels" (B,) long}``, written as a latent cache of its VAE.
    """

    model_attribute = "generator"

    def __init__(
        self,
        generator: nn.Module,
        lr: float = 6e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = None,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        max_grad_norm: float | None = 1.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        predict_sampler: Sampler | FlowSampler | None = None,
        predict_seed: int = 0,
    ):
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, ema_decay, export_dir, overwrite_export,
                         optimizer, lr_scheduler)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None (no clipping), got {max_grad_norm}")
        self._record_hyperparameters(inspect.currentframe(), generator=generator, optimizer=optimizer,
                                     lr_scheduler=lr_scheduler, predict_sampler=predict_sampler)
        self.max_grad_norm = max_grad_norm
        self.generator = generator
        self.predict_sampler = predict_sampler
        self.predict_seed = predict_seed
        self.setup_network()

    def training_step(self, batch, batch_idx):
        ids, labels, lengths = batch
        loss, logs = self.generator.training_loss(ids, labels, lengths)
        check_finite_loss(self, loss, batch_idx)
        self.log_metrics("train", logs, ids.shape[0])
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val is None and self.max_grad_norm is not None:
            wrapped = self.trainer.strategy.model
            if isinstance(self.trainer.strategy, FSDPStrategy) and callable(getattr(wrapped, "clip_grad_norm_", None)):
                # FSDP: the root module computes the norm over every shard (Lightning's FSDP precision refuses to)
                wrapped.clip_grad_norm_(self.max_grad_norm)
                return
            gradient_clip_val, gradient_clip_algorithm = self.max_grad_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def evaluation_step(self, prefix: str, batch) -> None:
        ids, labels, lengths = batch
        loss, logs = self.averaged_network().training_loss(ids, labels, lengths)
        self.log_metrics(prefix, logs, ids.shape[0])

    def predict_step(self, batch, batch_idx, dataloader_idx=0) -> dict:
        _, labels, _ = batch
        generator = self.averaged_network()
        continuous = getattr(generator, "continuous", False)
        sampler = self.predict_sampler
        if sampler is None and continuous:
            sampler = FlowSampler()  # its own defaults, without guidance, as Sampler() for ids
        elif sampler is None:
            sampler = Sampler()
        # a stream of its own for every batch of every rank, the same on a rerun with the same devices
        seed = self.predict_seed + batch_idx * self.trainer.world_size + self.trainer.global_rank
        rng = torch.Generator(device=labels.device).manual_seed(seed)
        out = generator.generate(labels, sampler, generator=rng)
        if continuous:
            # every row is a whole latent grid: no lengths to keep
            return {"latents": out.latents, "labels": labels.long()}
        ids = torch.zeros(labels.shape[0], generator.max_tokens, dtype=torch.int32, device=labels.device)
        ids[:, : out.ids.shape[1]] = out.ids.int()
        # a generator with an end-of-sequence token chooses each row's length; the ids are zero past it
        return {"ids": ids, "lengths": out.lengths.int(), "labels": labels.long()}

    def token_cache_meta(self, tokenizer_folder: str | os.PathLike | None = None) -> dict:
        """The kind of cache the generator's samples make, their shape (vocabulary and length; for a continuous
        generator the latent shape [C, h, w], h * w positions and the grid [h, w]), the tokenizer of its training
        cache (whose ids or latents it samples), and ``generator`` (class, kwargs, fingerprint of its export on rank
        zero)."""
        generator = self.averaged_network()
        meta = getattr(self.trainer.datamodule, "meta", None) or {}
        description = describe_network(generator)
        described = {"class": description["class"], "kwargs": description["kwargs"],
                     "fingerprint": self._exported_fingerprint()}
        if getattr(generator, "continuous", False):
            side = generator.latent_size
            return {"kind": "latents", "tokenizer": meta.get("tokenizer"),
                    "latent_shape": [generator.latent_channels, side, side], "max_tokens": side * side,
                    "grid": [side, side], "generator": described}
        return {
            "kind": "tokens",
            "tokenizer": meta.get("tokenizer"),
            "vocab_size": generator.vocab_size,
            "max_tokens": generator.max_tokens,
            "grid": meta.get("grid"),
            "generator": described,
        }

    def on_train_epoch_start(self) -> None:
        # families whose objective follows an epoch schedule (NPP's patch sizes) own it: tell them (and the EMA copy,
        # which validation uses) which epoch starts
        for model in (self.generator, self.ema.module if self.ema is not None else None):
            hook = getattr(model, "on_epoch_start", None)
            if callable(hook):
                hook(self.current_epoch, self.trainer.max_epochs)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        meta = getattr(datamodule, "meta", None)
        if not meta:
            return
        from flexar.data.token_cache import LATENTS, cache_kind

        kind, generator = cache_kind(meta), self.generator
        name, cache = type(generator).__name__, f"{getattr(datamodule, 'train_path', 'the training cache')}/meta.json"
        if getattr(generator, "continuous", False) and kind is not LATENTS:
            raise ValueError(
                f"{name} is a continuous generator (it models latents), but {cache} is a token cache (field 'kind' "
                f"{meta.get('kind', 'tokens')!r}); train it on a latent cache: flexar-tokenize --tokenizer VAE_FOLDER")
        if not getattr(generator, "continuous", False) and kind is LATENTS:
            raise ValueError(
                f"{name} models token ids, but {cache} is a latent cache (field 'kind' 'latents'), which trains a "
                "continuous generator (such as XAR); train it on the token cache of a discrete tokenizer")
        if kind is LATENTS:
            channels, height, width = meta["latent_shape"]
            side = generator.latent_size
            problems = []
            if generator.latent_channels != channels:
                problems.append(f"latent_channels: generator {generator.latent_channels} vs latent cache {channels}")
            if (side, side) != (height, width):
                problems.append(f"latent_size: generator {side} (latents {side} x {side}) vs latent cache "
                                f"latent_shape {meta['latent_shape']}")
        else:
            problems = [
                f"{field}: generator {getattr(generator, field)} vs token cache {meta[field]}"
                for field in ("vocab_size", "max_tokens") if getattr(generator, field) != meta[field]
            ]
        if meta.get("num_classes") is not None and generator.num_classes != meta["num_classes"]:
            problems.append(f"num_classes: generator {generator.num_classes} vs {kind.what} {meta['num_classes']}")
        if problems:
            raise ValueError(f"generator does not match its {kind.what} ({cache}): " + "; ".join(problems))
        # the export names the tokenizer whose ids the generator learns, so that flexar.Pipeline can refuse another
        # one; the EMA copy (the one exported when EMA is on) records it too
        tokenizer = meta.get("tokenizer")
        if isinstance(tokenizer, dict) and tokenizer.get("fingerprint"):
            for model in (self.generator, self.ema.module if self.ema is not None else None):
                if model is not None:
                    model.provenance = {"tokenizer_fingerprint": tokenizer["fingerprint"]}
