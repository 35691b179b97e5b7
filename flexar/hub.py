"""Saving and loading models as ``config.json`` + ``model.safetensors`` (no pickle anywhere).

Every tokenizer and generator records the keyword arguments of its constructor (:class:`Configurable`, in the spirit
of diffusers' ``register_to_config``), so the JSON alone rebuilds the object. Only classes registered with
:func:`register` can be named in a config: a config.json never makes flexar import arbitrary code, and a weights file
that is not safetensors is refused before anything in it is read.

This module sits below every model family: the families import it to register, and it depends on none of them. A
class name it does not know yet is looked up by importing flexar's own family packages (:data:`FAMILY_PACKAGES`), in
order, until one registers it; the name itself is never imported, so a config cannot reach code outside those
packages, and loading a tokenizer or a generator never imports the evaluation stack (Lightning, torch-fidelity).
"""
from __future__ import annotations

import collections.abc
import functools
import importlib
import inspect
import json
import os
import types
import typing
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# The packages whose modules register model classes, cheapest first: the FID classifier's package imports Lightning
# and torch-fidelity, so it is imported only for a name the tokenizers and generators do not register.
FAMILY_PACKAGES = ("flexar.tokenizers", "flexar.generators", "flexar.eval")

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: allow `cls` to be rebuilt from a saved config by its name."""
    _REGISTRY[cls.__name__] = cls
    return cls


def _import_families(until: str | None = None) -> None:
    """Import :data:`FAMILY_PACKAGES` in order, stopping as soon as `until` is registered (all of them when None)."""
    for package in FAMILY_PACKAGES:
        if until is not None and until in _REGISTRY:
            return
        importlib.import_module(package)


def registered(kind: type | None = None) -> dict[str, type]:
    """Registered classes (subclasses of `kind` when given), after importing every family so the list is complete."""
    _import_families()
    return {name: cls for name, cls in _REGISTRY.items() if kind is None or issubclass(cls, kind)}


def presets(kind: type | None = None) -> list[tuple[type, str]]:
    """Every (class, preset name) of the registered classes (subclasses of `kind` when given), sorted by class name
    and preset; a class lists only the presets it declares itself, not those it inherits."""
    return [(cls, name) for _, cls in sorted(registered(kind).items())
            for name in sorted(cls.__dict__.get("presets", {}))]


class Configurable:
    """Records the constructor's keyword arguments in ``self.config`` (outermost ``__init__`` only).

    A class whose constructor reads something outside its saved folder (another model's folder) overrides
    :meth:`_saved_config` to record what it read instead, so that the saved folder alone rebuilds it.

    Named sizes: every family class sets its own ``presets`` ({name: constructor keyword arguments}, DiT's
    ``DiT_models``) and builds one with :meth:`from_preset`. The built object records every keyword argument, the
    preset's included, so its saved config names the class and the full arguments, never the preset.
    """

    presets: ClassVar[dict[str, dict]] = {}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> nn.Module:
        """``cls(**presets[name], **overrides)``: the preset's arguments, each override replacing the preset's value.

        Overrides are checked before anything is built: a name the constructor does not take, or a value that does
        not fit its annotation, is refused by name.

        From YAML (LightningCLI / jsonargparse) the preset is the ``init_args`` and the overrides are jsonargparse's
        ``dict_kwargs`` (the arguments of a ``**kwargs`` that jsonargparse does not expand)::

            tokenizer:
              class_path: flexar.tokenizers.TiTok.from_preset
              init_args: {name: titok-s128}
              dict_kwargs: {image_size: 32, channels: 1}

        jsonargparse would fill every expanded argument with the constructor's default and so overwrite the
        preset's values; the ``**`` of a dict display below is what keeps it from expanding ``overrides``.
        """
        if name not in cls.presets:
            known = ", ".join(sorted(cls.presets)) or "none"
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known presets of {cls.__name__}: {known}")
        check_arguments(cls, overrides, f"{cls.__name__}.from_preset({name!r})")
        return cls(**{**cls.presets[name], **overrides})

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            outermost = not getattr(self, "_recording_config", False)
            if outermost:
                object.__setattr__(self, "_recording_config", True)
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                config = {}
                for name, value in list(bound.arguments.items())[1:]:
                    if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                        # forwarded to a parent's __init__: record its defaults too, so the config is complete
                        config.update(forwarded_defaults(cls))
                        config.update(value)
                    elif signature.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                        config[name] = value
            init(self, *args, **kw)
            if outermost:
                object.__setattr__(self, "config", _jsonable(self._saved_config(config)))
                object.__setattr__(self, "_recording_config", False)

        cls.__init__ = recording_init

    def _saved_config(self, config: dict) -> dict:
        """The keyword arguments to record, given those the constructor was called with (after ``__init__``)."""
        return config


def forwarded_defaults(cls: type) -> dict:
    """{name: default} of the parameters that ``cls.__init__`` takes through ``**kwargs`` (its parents' along the
    MRO, :func:`init_parameters`) and does not declare itself."""
    own = inspect.signature(inspect.unwrap(cls.__dict__["__init__"])).parameters
    parameters, _ = init_parameters(cls)
    return {name: p.default for name, p in parameters.items()
            if name not in own and p.default is not inspect.Parameter.empty}


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    # numpy scalars (a size read from an array, a count from np.arange) are saved as the Python numbers they hold
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        item = value.item()
        if isinstance(item, (bool, int, float)):
            return item
    raise TypeError(f"constructor argument {value!r} of type {type(value).__name__} cannot be saved in config.json")


def init_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters that ``cls(...)`` takes, following ``**kwargs`` up the MRO: a subclass whose
    ``__init__`` forwards ``**kwargs`` to its parent's takes its own parameters and the parent's.

    Returns ({name: parameter}, open_ended), each name from the nearest class that declares it; open_ended is True
    when the last ``__init__`` reached still takes ``**kwargs`` (then any name is accepted).
    """
    parameters: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        forwards = False
        for name, parameter in list(inspect.signature(inspect.unwrap(init)).parameters.items())[1:]:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                parameters.setdefault(name, parameter)
        if not forwards:
            return parameters, False
        if klass is object or klass is nn.Module:
            break
    return parameters, True


def _annotations(cls: type) -> dict[str, tuple[object, str]]:
    """{argument: (type hint, its source text)} of the parameters of :func:`init_parameters` (``__init__`` and the
    parents' it forwards ``**kwargs`` to); arguments whose hint cannot be resolved are left out (not checked)."""
    hints = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        init = inspect.unwrap(init)
        namespace = {**vars(typing), **getattr(init, "__globals__", {})}
        forwards = False
        for name, parameter in list(inspect.signature(init).parameters.items())[1:]:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            annotation = parameter.annotation
            if name in hints or annotation is inspect.Parameter.empty or parameter.kind in (
                    inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                continue
            text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
            if isinstance(annotation, str):
                try:  # annotation strings come from flexar's own source, never from a config file
                    annotation = eval(annotation, namespace)  # noqa: S307
                except Exception:
                    continue
            hints[name] = (annotation, text)
        if not forwards or klass is nn.Module:
            break
    return hints


def check_arguments(cls: type, kwargs: dict, where: str) -> None:
    """Refuse keyword arguments that ``cls`` does not take (with the closest names) or whose JSON form does not
    fit the constructor's annotation; forwarded ``**kwargs`` are checked against the parent that takes them."""
    parameters, open_ended = init_parameters(cls)
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown and not open_ended:
        import difflib

        close = sorted({m for key in unknown for m in difflib.get_close_matches(key, list(parameters), n=3)})
        hint = f"; closest: {close}" if close else ""
        raise ValueError(f"{where}: {cls.__name__} does not take {unknown}{hint}; it accepts {sorted(parameters)}")
    hints = _annotations(cls)
    for key, value in kwargs.items():
        if key not in hints:
            continue
        try:
            value = _jsonable(value)
        except TypeError:  # a module or a callable: nothing a config could hold, and nothing to check
            continue
        if not _matches(value, hints[key][0]):
            raise ValueError(f"{where}: argument {key!r} of {cls.__name__} must be {hints[key][1]}, "
                             f"got {json.dumps(value)}")


def _matches(value, hint) -> bool:
    """Whether a JSON value (None, bool, int, float, str, list, dict) fits a constructor's type hint."""
    if hint is typing.Any or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    sequence = origin if origin is not None else hint
    if sequence in (list, tuple, typing.Sequence, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):  # JSON stores tuples as arrays
            return False
        if sequence is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if sequence is dict:
        return isinstance(value, dict) and (not args or all(_matches(v, args[1]) for v in value.values()))
    return True  # modules, callables and other hints that no JSON value is declared against


def build_from_config(config: dict, kind: type | None = None, source: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild a registered class from ``{"class": name, "kwargs": {...}}``.

    Every keyword argument is checked against the constructor's type annotations before the constructor runs, so a
    hand-edited or foreign config (``null``, ``"16"`` or ``32.5`` for an int) is refused by field name. ``source``
    (the config file) is named in every message.
    """
    where = str(source) if source is not None else "config"
    name = config.get("class")
    cls = None
    if isinstance(name, str):
        _import_families(until=name)
        cls = _REGISTRY.get(name)
    if cls is None or (kind is not None and not issubclass(cls, kind)):
        what = kind.__name__ if kind is not None else "model"
        raise ValueError(f"{where}: field 'class' names {name!r}, which is not a registered flexar {what}; "
                         f"known: {sorted(registered(kind))}")
    if "kwargs" not in config:
        extra = sorted(set(config) - {"class", "provenance"})
        hint = (f"; its other fields {extra} look like an older layout (a classifier folder saved before classifiers "
                f"were registered loads with {name}.from_pretrained)" if extra else "")
        raise ValueError(f"{where}: field 'kwargs' (the constructor arguments of {name}) is missing{hint}")
    kwargs = config["kwargs"]
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: field 'kwargs' must be an object of {name}'s constructor arguments, "
                         f"got {type(kwargs).__name__}")
    parameters, open_ended = init_parameters(cls)
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown and not open_ended:
        raise ValueError(f"{where}: {name} does not take {unknown} (field 'kwargs'); it accepts {sorted(parameters)}")
    missing = sorted(
        key for key, p in parameters.items()
        if p.default is inspect.Parameter.empty and key not in kwargs
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    if missing:
        raise ValueError(f"{where}: field 'kwargs' lacks {missing}, which {name} requires")
    hints = _annotations(cls)
    for key, value in kwargs.items():
        if key in hints and not _matches(value, hints[key][0]):
            raise ValueError(f"{where}: field 'kwargs.{key}' of {name} must be {hints[key][1]}, got {json.dumps(value)}")
    return cls(**kwargs)


def _serialized(model: nn.Module, extra: dict | None = None) -> tuple[bytes, bytes]:
    """The exact bytes :func:`save_model` writes: (config.json, model.safetensors)."""
    from safetensors.torch import save

    if type(model).__name__ not in _REGISTRY:
        raise ValueError(f"{type(model).__name__} is not registered with flexar.hub.register")
    config = {"class": type(model).__name__, "kwargs": model.config}
    provenance = getattr(model, "provenance", None)
    if provenance:  # what the model was trained on (a generator's tokenizer); absent for models without one
        config["provenance"] = _jsonable(provenance)
    config.update(extra or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return json.dumps(config, indent=2).encode(), save(_untie(state))


def save_model(model: nn.Module, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `model` (a registered Configurable) to folder/config.json + folder/model.safetensors."""
    config, weights = _serialized(model, extra)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_bytes(config)
    (folder / WEIGHTS_NAME).write_bytes(weights)
    return folder


def _untie(state: dict) -> dict:
    """safetensors refuses shared storage; clone tensors that alias an earlier one (tied embeddings)."""
    seen, out = set(), {}
    for key, tensor in state.items():
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a folder written by save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or "class" not in config:
        raise ValueError(f"{path} has no 'class' field: not a flexar config")
    return config


def _digest(parts) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, chunks in parts:
        digest.update(name.encode())
        for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path: Path):
    with open(path, "rb") as handle:
        yield from iter(lambda: handle.read(1 << 20), b"")


def fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over a saved folder's config.json and model.safetensors (hex): names exactly one saved model.

    Token caches and generators record it, so a pipeline can tell the tokenizer that made a cache from another one
    with the same vocabulary and length. Equals :func:`model_fingerprint` of the model that was saved there.
    """
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"cannot fingerprint {folder}: no {name}")
    return _digest((name, _file_chunks(folder / name)) for name in (CONFIG_NAME, WEIGHTS_NAME))


def model_fingerprint(model: nn.Module, extra: dict | None = None) -> str:
    """:func:`fingerprint` of the folder that ``save_model(model, folder, extra)`` would write, without writing it."""
    config, weights = _serialized(model, extra)
    return _digest([(CONFIG_NAME, [config]), (WEIGHTS_NAME, [weights])])


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a truncated file) is refused without being executed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(8)
    header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header_size <= 0 or header_size > path.stat().st_size - 8:
        raise ValueError(f"{path} is not a safetensors file (flexar never loads pickled weights)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a valid safetensors file: {error}") from None


def read_provenance(config: dict, source: str | os.PathLike) -> dict:
    """The ``provenance`` field of a saved config (empty when absent), checked: an object whose
    ``tokenizer_fingerprint``, when present, is a sha256 hex digest."""
    provenance = config.get("provenance", {})
    if not isinstance(provenance, dict):
        raise ValueError(f"{source}: field 'provenance' must be an object, got {json.dumps(provenance)}")
    recorded = provenance.get("tokenizer_fingerprint")
    if recorded is not None and not (isinstance(recorded, str) and len(recorded) == 64
                                     and all(c in "0123456789abcdef" for c in recorded)):
        raise ValueError(f"{source}: field 'provenance.tokenizer_fingerprint' must be a sha256 hex digest, "
                         f"got {json.dumps(recorded)}")
    return dict(provenance)


def load_model(folder: str | os.PathLike, kind: type | None = None) -> nn.Module:
    """Rebuild and fill a model saved with :func:`save_model`; strict about missing or unexpected weights.

    The model comes back in eval mode (nothing trains, or restarts codes, by accident), with ``model.provenance``
    (the config's ``provenance``, empty when absent) and ``model.fingerprint`` (:func:`fingerprint` of `folder`).
    """
    path = Path(folder) / CONFIG_NAME
    config = read_config(folder)
    provenance = read_provenance(config, path)
    model = build_from_config(config, kind, source=path)
    state = load_weights(Path(folder) / WEIGHTS_NAME)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {folder} do not match {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.provenance = provenance
    model.fingerprint = fingerprint(folder)
    return model.eval()


class PretrainedMixin:
    """``save_pretrained(folder)`` / ``from_pretrained(folder)`` for registered Configurable modules."""

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        return save_model(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike):
        return load_model(folder, kind=cls)
