"""Converters from the checkpoints the papers released into flexar ``save_pretrained`` folders.

``flexar-convert FORMAT SOURCE OUTPUT`` (:mod:`flexar.cli.convert`) or :func:`convert` in Python. A format is a
module of this package registered in :data:`FORMATS`; it declares

- ``PRESETS``: {name: the official size's flexar constructor arguments} (its presets are the official sizes);
- ``CHECKPOINT_KEYS``: the top-level entries that may hold the weights in the official file, tried in order (e.g.
  LlamaGen's ``"model"`` / ``"ema"``); an empty tuple means the file is the state dict itself;
- ``build(preset: str, **overrides) -> nn.Module``: the flexar model of that size;
- ``load(model, weights: Weights) -> None``: copies every official tensor into `model`, taking each through
  :meth:`Weights.take` (or declaring it with :meth:`Weights.ignore` and the reason); :func:`convert` then refuses
  whatever was neither taken nor ignored;
- ``BINDS_TOKENIZER`` (optional, False by default): whether ``build`` takes ``tokenizer=FOLDER`` itself (VAR reads
  its VQVAE's codebook); for the other generator formats :func:`convert` records the folder's fingerprint as the
  generator's provenance after checking vocabulary and grid, so ``flexar.Pipeline`` checks the pair.

Reading is safe by construction (:func:`read_state_dict`): ``.safetensors`` through safetensors, and ``.pt`` /
``.pth`` / ``.bin`` / ``.ckpt`` through ``torch.load(weights_only=True)`` only, so a pickle that would run code is
refused with a message, never executed.
"""
from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

# format name -> converter module
FORMATS: dict[str, str] = {}
FORMATS["llamagen-gpt"] = "flexar.convert.llamagen_gpt"
FORMATS["llamagen-vq"] = "flexar.convert.llamagen_vq"
FORMATS["var"] = "flexar.convert.var"
FORMATS["titok"] = "flexar.convert.titok"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def format_module(name: str):
    """The converter module of format `name`; a ValueError naming the known formats for another name."""
    if name not in FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; known formats: {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name])


def read_state_dict(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The tensors of the checkpoint file `path`, on the CPU.

    ``.safetensors`` is read with safetensors; ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` with
    ``torch.load(weights_only=True)``: a pickle that needs more than tensors and plain containers is refused. When the
    file holds a dict of entries rather than the tensors themselves, the first of `keys` present is taken (LlamaGen
    saves ``{"model": ...}``); nested containers of tensors are refused with the keys they have.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path), device="cpu")
        except Exception as error:  # a truncated or foreign file
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickle that imports code, a truncated file, another format
            raise ValueError(f"{path} does not load with torch.load(weights_only=True), the only way flexar reads a "
                             f"pickle (a checkpoint that needs more could run code): {error}") from None
    else:
        raise ValueError(f"{path}: unknown checkpoint suffix {path.suffix!r}; expected .safetensors or one of "
                         f"{', '.join(PICKLE_SUFFIXES)}")
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors")
    if keys and not all(isinstance(value, Tensor) for value in loaded.values()):
        for key in keys:
            if key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
                break
        else:
            raise ValueError(f"{path} holds no state dict under {' or '.join(map(repr, keys))}; its top-level entries "
                             f"are {sorted(map(str, loaded))}")
    tensors = {key: value for key, value in loaded.items() if isinstance(value, Tensor)}
    others = sorted(str(key) for key in loaded if key not in tensors)
    if others:
        raise ValueError(f"{path}: the state dict has entries that are not tensors: {others[:10]}")
    return tensors


class Weights:
    """An official state dict being consumed: every key must be taken or ignored (with a reason) exactly once."""

    def __init__(self, state_dict: dict[str, Tensor], source: str = "the checkpoint"):
        self.state_dict = state_dict
        self.source = source
        self.taken: set[str] = set()
        self.ignored: dict[str, str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.state_dict

    def keys(self, prefix: str = "") -> list[str]:
        """The official keys under `prefix`, in the file's order."""
        return [key for key in self.state_dict if key.startswith(prefix)]

    def take(self, key: str, shape: tuple[int, ...] | torch.Size | None = None) -> Tensor:
        """The tensor at `key`, marked consumed; a KeyError naming it when absent, a ValueError when its shape is
        not `shape`."""
        if key not in self.state_dict:
            raise KeyError(f"{self.source} has no key {key!r} (missing key)")
        if key in self.taken:
            raise ValueError(f"key {key!r} of {self.source} is read twice")
        tensor = self.state_dict[key]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"key {key!r} of {self.source} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(shape)} (another size: choose the matching preset)")
        self.taken.add(key)
        return tensor

    def copy(self, key: str, target: Tensor) -> None:
        """Copy the tensor at `key` into `target` (same shape), in `target`'s dtype."""
        with torch.no_grad():
            target.copy_(self.take(key, target.shape).to(target.dtype))

    def copy_module(self, prefix: str, module: nn.Module, renames: dict[str, str] | None = None) -> None:
        """:meth:`copy` every parameter NAME of `module` from the official key ``prefix + NAME`` (`prefix` ends with
        a dot), `renames` mapping the first component of flexar's name to the official one
        (``{"skip": "nin_shortcut"}``)."""
        for name, parameter in module.named_parameters():
            head, _, rest = name.partition(".")
            official = (renames or {}).get(head, head) + ("." + rest if rest else "")
            self.copy(prefix + official, parameter)

    def ignore(self, pattern: str, reason: str) -> list[str]:
        """Declare the keys matching the regular expression `pattern` (full match) as deliberately unused, with the
        reason (buffers the flexar model recomputes, training-only state); returns them."""
        matched = [key for key in self.state_dict if re.fullmatch(pattern, key) and key not in self.taken]
        for key in matched:
            self.ignored[key] = reason
        return matched

    def finish(self) -> None:
        """A ValueError naming every key neither taken nor ignored (unexpected keys)."""
        left = [key for key in self.state_dict if key not in self.taken and key not in self.ignored]
        if left:
            shown = ", ".join(repr(key) for key in left[:12]) + (f" and {len(left) - 12} more" if len(left) > 12 else "")
            raise ValueError(f"{self.source} has {len(left)} unexpected key(s) the converter does not know: {shown}")


def convert(format: str, source: str | os.PathLike | dict, preset: str | None = None, **overrides) -> nn.Module:
    """The flexar model of the official checkpoint `source` (a file, or a state dict already read) in `format`, of
    the official size `preset` (default: the format's first preset) with constructor `overrides`; every key of the
    checkpoint is consumed or declared ignored. The model is returned in eval mode on the CPU."""
    module = format_module(format)
    if preset is None:
        preset = next(iter(module.PRESETS))
    if preset not in module.PRESETS:
        raise ValueError(f"unknown {format} preset {preset!r}; known: {', '.join(module.PRESETS)}")
    if isinstance(source, dict):
        state_dict, name = source, "the state dict"
    else:
        state_dict, name = read_state_dict(source, module.CHECKPOINT_KEYS), str(source)
    # a generator's tokenizer folder: a format whose model binds one (VAR reads its codebook) takes it as an
    # argument; for the others the folder is only recorded, so that a Pipeline checks the pair
    tokenizer = None if getattr(module, "BINDS_TOKENIZER", False) else overrides.pop("tokenizer", None)
    model = module.build(preset, **overrides)
    weights = Weights(state_dict, name)
    module.load(model, weights)
    weights.finish()
    if tokenizer is not None:
        record_tokenizer(model, tokenizer)
    return model.eval()


def record_tokenizer(generator: nn.Module, folder: str | os.PathLike) -> None:
    """Record the saved tokenizer `folder` as the one `generator` was trained on (its ``provenance``), after checking
    that the two fit: the same vocabulary, and the generator's grid and length within the tokenizer's."""
    from ..hub import fingerprint, load_model

    tokenizer = load_model(folder)
    vocabulary = getattr(generator, "vocab_size", None)
    if vocabulary is not None and vocabulary != tokenizer.codebook_size:
        raise ValueError(f"the generator has {vocabulary} codes, the tokenizer {folder} has {tokenizer.codebook_size}")
    grid = getattr(generator, "grid", None)
    if grid is not None and tokenizer.grid is not None and list(grid) != list(tokenizer.grid):
        raise ValueError(f"the generator's grid {list(grid)} differs from the tokenizer {folder}'s {list(tokenizer.grid)}"
                         " (pass the image size the two were released for)")
    generator.provenance = {"tokenizer_fingerprint": fingerprint(folder)}
