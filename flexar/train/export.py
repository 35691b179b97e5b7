"""From a training run to a ``save_pretrained`` folder: the export at the end of fitting and ``flexar-export``.

Both take the same road: the LightningModule's state dict (gathered on every rank, so that it also holds under
FSDP, where taking a state dict is a collective), the weights of the network under one prefix (``ema.module.`` for
the EMA copy when EMA is on, else ``tokenizer.`` / ``generator.``), and the description that every flexar
checkpoint carries under ``checkpoint["flexar"]``::

    {"network": "generator", "ema": true,
     "model": {"class": "RasterAR", "kwargs": {...}, "provenance": {"tokenizer_fingerprint": "..."}}}

The network is rebuilt from that description by :func:`flexar.hub.build_from_config` (registered flexar classes
only), filled strictly from the state dict and saved with :func:`flexar.hub.save_model`, so the folder written from
a ``.ckpt`` is byte for byte the one the run itself would have exported at that step.

Checkpoints are read with ``torch.load(weights_only=True)``: nothing in them is unpickled as code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

FLEXAR_KEY = "flexar"  # the checkpoint entry that describes the network (see the module docstring)
EMA_PREFIX = "ema.module."


def describe_network(network: nn.Module) -> dict:
    """``{"class", "kwargs", "provenance"}`` of a registered Configurable network: its config.json without weights."""
    from flexar.hub import _REGISTRY

    name = type(network).__name__
    if _REGISTRY.get(name) is not type(network) or not isinstance(getattr(network, "config", None), dict):
        raise TypeError(f"{name} is not a registered flexar model (flexar.hub.register and Configurable): its "
                        "checkpoints could not be exported")
    return {"class": name, "kwargs": network.config, "provenance": dict(getattr(network, "provenance", None) or {})}


def gathered_state_dict(module) -> dict | None:
    """The LightningModule's whole state dict, taken on every rank; None on ranks that receive nothing.

    Under FSDP the parameters are sharded across ranks and a full state dict is a collective (every rank must call
    it; rank zero receives the gathered tensors, offloaded to the CPU). Other strategies hold whole tensors on each
    rank; there ``Strategy.lightning_module_state_dict`` (DeepSpeed and the like override it) is taken everywhere.
    """
    trainer = module._trainer
    if trainer is None:
        return module.state_dict()
    strategy = trainer.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
            state = strategy.model.state_dict()
        return state if trainer.is_global_zero else None
    return strategy.lightning_module_state_dict()


def network_weights(state: dict, prefix: str, source: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix`, with the prefix removed; refused by name when there are none."""
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not weights:
        prefixes = sorted({key.split(".", 1)[0] + "." for key in state})
        raise ValueError(f"{source} holds no weights under '{prefix}' (its state dict has {prefixes})")
    return weights


def rebuild(description: dict, weights: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The registered network `description` names, filled strictly with `weights`, carrying its provenance."""
    from flexar.hub import build_from_config

    # a fresh build draws its initial weights from the global random stream, which the caller's run still reads
    with torch.random.fork_rng(devices=[]):
        model = build_from_config({"class": description.get("class"), "kwargs": description.get("kwargs")},
                                  source=source)
    missing, unexpected = model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.provenance = dict(description.get("provenance") or {})
    return model.eval()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint file, loaded without unpickling code (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder: a sharded checkpoint (FSDP with state_dict_type='sharded'). Consolidate it into one "
            "file first with `python -m lightning.pytorch.utilities.consolidate_checkpoint "
            f"{path}`, or train with state_dict_type='full'"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code in it, a truncated file, another format
        raise ValueError(f"{path} is not a Lightning checkpoint that loads with weights_only=True: {error}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def checkpoint_description(checkpoint: dict, source: str) -> dict:
    """The ``checkpoint["flexar"]`` entry, checked (see the module docstring)."""
    entry = checkpoint.get(FLEXAR_KEY)
    if not isinstance(entry, dict):
        hparams = sorted(checkpoint.get("hyper_parameters") or {})
        raise ValueError(
            f"{source} has no '{FLEXAR_KEY}' entry: it was not written by a flexar TokenizerModule or GeneratorModule "
            f"(its hyperparameters are {hparams})"
        )
    for key, kind in (("network", str), ("ema", bool), ("model", dict)):
        if not isinstance(entry.get(key), kind):
            raise ValueError(f"{source}: field '{FLEXAR_KEY}.{key}' must be a {kind.__name__}, got {entry.get(key)!r}")
    return entry


def export_checkpoint(checkpoint_path: str | os.PathLike, output: str | os.PathLike, ema: bool = True,
                      overwrite: bool = False) -> Path:
    """Write the network of a flexar Lightning checkpoint as a ``save_pretrained`` folder.

    `ema`: the EMA weights when the run kept an EMA (else the trained weights, the only ones there are); False takes
    the trained weights. An `output` folder that already holds files is refused unless `overwrite`.
    """
    refuse_existing_output(output, overwrite)
    folder, _ = export_loaded(read_checkpoint(checkpoint_path), os.fspath(checkpoint_path), output, ema)
    return folder


def refuse_existing_output(output: str | os.PathLike, overwrite: bool) -> None:
    output = Path(output)
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"export folder {output} already holds files; refusing to overwrite it (pass --overwrite)")


def export_loaded(checkpoint: dict, source: str, output: str | os.PathLike, ema: bool = True) -> tuple[Path, str]:
    """:func:`export_checkpoint` of a checkpoint already read; returns the folder and which weights it holds
    (``"ema"`` or ``"trained"``)."""
    from flexar.hub import save_model

    entry = checkpoint_description(checkpoint, source)
    use_ema = ema and entry["ema"]
    prefix = EMA_PREFIX if use_ema else entry["network"] + "."
    model = rebuild(entry["model"], network_weights(checkpoint["state_dict"], prefix, source), source)
    return save_model(model, output), "ema" if use_ema else "trained"
