"""Command-line flags of the samplers and decoding strategies, read from their constructors' signatures.

``flexar-sample`` and ``flexar-fid`` (``scripts/sample.py``, ``scripts/eval_fid.py``) get their sampling flags here.
There is no table of flags: every keyword argument of a per-token sampler (:class:`~flexar.sampling.Sampler` and
its subclasses defined in flexar, e.g. :class:`~flexar.sampling.EntropySampler`) and of a decoding strategy (every
:class:`~flexar.sampling.DecodingStrategy` subclass with its own ``name``) is one flag, found by jsonargparse in the
constructor's signature (it follows ``**kwargs`` into the base class), with its type, its default and the help text
of the class docstring's ``Args:`` entry. A new constructor argument is a new flag, a new class a new group.

Spelling: the parameter's name with dashes, the underscore spelling also accepted (``top_k`` is ``--top-k`` or
``--top_k``). Values are parsed and checked by jsonargparse against the annotation; a boolean may stand alone
(``--entropy-temperature`` is ``--entropy-temperature true``); a sequence takes its values one after the other
(``--checkpoints 0.25 0.5``).

Which object the flags build:

- the per-token sampler is the first class, ``Sampler`` then its subclasses, whose constructor takes every sampler
  flag given: ``--entropy-a 2`` (or ``--entropy-temperature``) selects the ``EntropySampler``;
- ``--decoding NAME`` wraps it in the strategy of that ``name`` (``speculative``, ``lantern``, ``scalingar``,
  ``best_of_n``); ``sample`` (the default) is the sampler alone. A strategy flag that the chosen strategy does not
  take is refused by name, as is a missing required argument (``--decoding speculative`` without ``--draft``).

Three kinds of parameter are not plain values:

- a sampler (``sampler: Sampler``) receives the per-token sampler built from the sampler flags;
- a module (``draft: nn.Module``) is the folder of a saved model on the command line, loaded with
  :func:`flexar.hub.load_model` and moved to the run's device before the strategy is built;
- a tensor (LANTERN's ``neighbours``) has no flag: the strategy builds it from the pipeline (``prepare``).

Flags not given are ``None`` in the parsed namespace and leave the constructor's default in place (a default set
with ``defaults=``, such as the scripts' guidance scale, counts as given).
"""
from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import docstring_parser
import jsonargparse
import torch
from torch import nn

# jsonargparse's own reading of a signature (what ``add_class_arguments`` uses): parameters through ``**kwargs``,
# postponed annotations resolved, each with its docstring entry
from jsonargparse._parameter_resolvers import get_signature_parameters

from .sampler import Sampler
from .strategy import DecodingStrategy

# --decoding value of the per-token sampler alone
PLAIN = "sample"


def flexar_subclasses(base: type) -> list[type]:
    """``base`` and its subclasses defined in flexar's modules, base first, then breadth first in definition order.

    Subclasses defined elsewhere (a user's script, a test) are not picked up silently; pass them to
    :class:`SamplingFlags` explicitly.
    """
    found, queue = [], [base]
    while queue:
        cls = queue.pop(0)
        if cls not in found and cls.__module__.split(".")[0] == "flexar":
            found.append(cls)
        queue.extend(cls.__subclasses__())
    return found


def sampler_classes() -> list[type[Sampler]]:
    """The per-token samplers the command line can build: :class:`Sampler` first, then its flexar subclasses."""
    return flexar_subclasses(Sampler)


def strategy_classes() -> list[type[DecodingStrategy]]:
    """The decoding strategies the command line can build: flexar's strategies that set their own ``name``."""
    return [cls for cls in flexar_subclasses(DecodingStrategy) if cls is not DecodingStrategy and "name" in vars(cls)]


def _members(annotation) -> list:
    """The members of a union annotation (``X | None`` -> [X, NoneType]), or [annotation]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _takes(annotation, cls: type) -> bool:
    """Whether `annotation` (or a member of its union) is `cls` or a subclass of it."""
    return any(isinstance(member, type) and issubclass(member, cls) for member in _members(annotation))


def _sequence_element(annotation):
    """The element type of ``list[X]``, ``tuple[X, ...]``, ``Sequence[X]`` or a union of them; None otherwise."""
    elements = set()
    for member in _members(annotation):
        if member is type(None):
            continue
        origin, arguments = typing.get_origin(member), typing.get_args(member)
        if origin in (list, collections.abc.Sequence) and len(arguments) == 1:
            elements.add(arguments[0])
        elif origin is tuple and len(arguments) == 2 and arguments[1] is Ellipsis:
            elements.add(arguments[0])
        else:
            return None
    return elements.pop() if len(elements) == 1 else None


_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]+\.)?([^`]+)`")


def plain_text(text: str | None) -> str:
    """A docstring fragment as command-line help: reST roles and literals to plain words, one line."""
    if not text:
        return ""
    text = _ROLE.sub(r"\1", text).replace("``", "")
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """Up to the first full stop followed by a space (the whole text when there is none)."""
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0]


def summary(docstring: str | None) -> str:
    """The first paragraph of a docstring, as plain text ending in a full stop."""
    text = plain_text((docstring or "").strip().split("\n\n", 1)[0]).rstrip(".")
    return f"{text}." if text else ""


def _grouped_docs(cls: type) -> dict[str, str]:
    """Help of the ``Args:`` entries that document several parameters at once (``entropy_a, entropy_b: ...``),
    which jsonargparse leaves without help; searched along the class's bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for param in docstring_parser.parse(klass.__doc__ or "").params:
            names = [name.strip(" `") for name in param.arg_name.split(",")]
            if len(names) > 1:
                docs.update(dict.fromkeys(names, param.description or ""))
    return docs


@dataclass
class Flag:
    """One command-line flag: a constructor parameter ``name`` shared by the classes in ``owners``."""

    name: str
    annotation: Any
    default: Any  # the signature's default (or the one set with ``defaults=``); ``required`` when there is none
    required: bool
    help: str
    owners: list[type] = field(default_factory=list)

    @property
    def options(self) -> list[str]:
        dashed = "--" + self.name.replace("_", "-")
        return [dashed] if dashed == "--" + self.name else [dashed, "--" + self.name]

    @property
    def is_module(self) -> bool:
        return _takes(self.annotation, nn.Module)


class SamplingFlags:
    """The flags of a set of per-token samplers and decoding strategies, added to a jsonargparse parser, and the
    object they build.

    Args:
        samplers: per-token sampler classes, the first being the default (:func:`sampler_classes` when None).
        strategies: decoding strategy classes, each with its own ``name`` (:func:`strategy_classes` when None).
        defaults: flag defaults that replace the signatures' (``{"cfg_scale": 2.0}``); they count as given.
    """

    def __init__(self, samplers: list[type] | None = None, strategies: list[type] | None = None,
                 defaults: dict[str, Any] | None = None) -> None:
        self.samplers = list(samplers) if samplers is not None else sampler_classes()
        self.strategies = list(strategies) if strategies is not None else strategy_classes()
        if not self.samplers or not all(isinstance(cls, type) and issubclass(cls, Sampler) for cls in self.samplers):
            raise TypeError(f"samplers must be Sampler subclasses, got {self.samplers}")
        self.by_name: dict[str, type] = {}
        for cls in self.strategies:
            if not (isinstance(cls, type) and issubclass(cls, DecodingStrategy)):
                raise TypeError(f"strategies must be DecodingStrategy subclasses, got {cls!r}")
            if cls.name in self.by_name or cls.name == PLAIN:
                raise ValueError(f"two decoding strategies are named {cls.name!r}: {self.by_name.get(cls.name)} and "
                                 f"{cls}; --decoding needs one name each ({PLAIN!r} is the sampler alone)")
            self.by_name[cls.name] = cls
        self.flags: dict[str, Flag] = {}
        # class -> its parameters by kind: plain flags, the sampler it receives, module flags
        self.parameters: dict[type, list[str]] = {}
        self.sampler_parameters: dict[type, list[str]] = {}
        for cls in [*self.samplers, *self.strategies]:
            self._read(cls)
        unknown = sorted(set(defaults or {}) - set(self.flags))
        if unknown:
            raise ValueError(f"defaults for {unknown}, which no sampler or strategy takes; flags: {sorted(self.flags)}")
        for name, value in (defaults or {}).items():
            self.flags[name].default, self.flags[name].required = value, False
        self.defaults = dict(defaults or {})

    def _read(self, cls: type) -> None:
        grouped = _grouped_docs(cls)
        names, receives = [], []
        for param in get_signature_parameters(cls):
            if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            if _takes(param.annotation, Sampler):
                receives.append(param.name)  # given the per-token sampler, not a flag
                continue
            if _takes(param.annotation, torch.Tensor):
                continue  # built from the pipeline by the strategy (prepare), not from a command line
            names.append(param.name)
            flag = self.flags.get(param.name)
            if flag is None:
                required = param.default is inspect.Parameter.empty
                flag = self.flags[param.name] = Flag(param.name, param.annotation, None if required else param.default,
                                                     required, "")
            flag.help = flag.help or plain_text(param.doc or grouped.get(param.name))
            flag.owners.append(cls)
        self.parameters[cls] = names
        self.sampler_parameters[cls] = receives

    # -- parser --------------------------------------------------------------------------------------------------------
    def add_to(self, parser: jsonargparse.ArgumentParser) -> None:
        """Add one group per class (its first docstring line) holding the flags that class declares first, and
        ``--decoding``."""
        if not isinstance(parser, jsonargparse.ArgumentParser):
            raise TypeError("the sampling flags are read from the constructors by jsonargparse: pass a "
                            f"jsonargparse.ArgumentParser, not {type(parser).__module__}.{type(parser).__name__}")
        added: set[str] = set()
        for cls in self.samplers:
            role = "the per-token sampler" if cls is self.samplers[0] else "its own flags select it"
            self._add_group(parser, f"{cls.__name__} ({role})", cls, added)
        group = parser.add_argument_group("decoding strategy")
        names = ", ".join(f"{name} ({cls.__name__})" for name, cls in self.by_name.items())
        group.add_argument("--decoding", default=PLAIN, choices=[PLAIN, *self.by_name],
                           help=f"{PLAIN} (the per-token sampler alone, the default) or a strategy: {names}")
        for name, cls in self.by_name.items():
            self._add_group(parser, f"--decoding {name} ({cls.__name__})", cls, added)

    def _add_group(self, parser, title: str, cls: type, added: set[str]) -> None:
        earlier = [self.flags[name].options[0] for name in self.parameters[cls] if name in added]
        description = summary(cls.__doc__) + (f" Also takes {', '.join(earlier)}." if earlier else "")
        group = parser.add_argument_group(title, description)
        for name in self.parameters[cls]:
            if name in added:
                continue
            added.add(name)
            flag = self.flags[name]
            options: dict[str, Any] = {"dest": name, "default": self.defaults.get(name)}
            if flag.is_module:
                options.update(type=str, metavar="FOLDER")
                text = (f"folder of a saved model, loaded with flexar.hub.load_model onto the run's device "
                        f"({flag.owners[0].__name__}.{name}: {first_sentence(flag.help)})")
            else:
                element = _sequence_element(flag.annotation)
                if element is not None:
                    options.update(type=element, nargs="+")
                elif flag.annotation is bool:
                    options.update(type=bool, nargs="?", const=True)
                elif flag.annotation is not inspect.Parameter.empty:
                    options.update(type=flag.annotation)  # unannotated: taken as given, a string
                text = flag.help
            owners = ", ".join(owner.__name__ for owner in flag.owners)
            default = f"required by {owners}" if flag.required else f"default: {flag.default!r}; {owners}"
            group.add_argument(*flag.options, help=f"{text} ({default})", **options)

    def names(self) -> list[str]:
        """The parsed namespace's keys these flags fill: every flag's name and ``decoding``."""
        return sorted([*self.flags, "decoding"])

    # -- building ------------------------------------------------------------------------------------------------------
    def given(self, args) -> dict[str, Any]:
        """{flag: value} of the flags given (or defaulted with ``defaults=``) in a parsed namespace."""
        return {name: getattr(args, name) for name in self.flags if getattr(args, name, None) is not None}

    def build(self, args, device: str | torch.device | None = None) -> Sampler | DecodingStrategy:
        """The sampler, or the strategy wrapping it, that a parsed namespace asks for; models named by folder are
        loaded onto `device`. Raises ``ValueError`` naming the flags when they do not fit together."""
        given = self.given(args)
        decoding = getattr(args, "decoding", PLAIN) or PLAIN
        if decoding != PLAIN and decoding not in self.by_name:
            raise ValueError(f"--decoding {decoding}: unknown; choose from {[PLAIN, *self.by_name]}")
        strategy = self.by_name.get(decoding)
        sampler_flags = {name for name in given if any(name in self.parameters[cls] for cls in self.samplers)}
        strategy_flags = {name for name in given if any(name in self.parameters[cls] for cls in self.strategies)}

        sampler_cls = next((cls for cls in self.samplers if sampler_flags <= set(self.parameters[cls])), None)
        if sampler_cls is None:
            takes = "; ".join(f"{cls.__name__} takes {self._spell(self.parameters[cls])}" for cls in self.samplers)
            raise ValueError(f"no sampler takes all of {self._spell(sampler_flags)} together ({takes})")
        sampler = sampler_cls(**{name: given[name] for name in self.parameters[sampler_cls] if name in given})

        # a flag of the sampler's own class is never a misplaced strategy flag
        stray = sorted(strategy_flags - sampler_flags - set(self.parameters.get(strategy, [])))
        if stray:
            where = "; ".join(
                f"{self.flags[name].options[0]} is an argument of "
                + ", ".join(f"--decoding {cls.name}" for cls in self.flags[name].owners if cls in self.strategies)
                for name in stray
            )
            raise ValueError(f"--decoding {decoding} does not take {self._spell(stray)} ({where})")
        if strategy is None:
            return sampler
        missing = [name for name in self.parameters[strategy] if self.flags[name].required and name not in given]
        if missing:
            needs = "; ".join(
                self.flags[name].options[0]
                + (" FOLDER, the folder of a saved model" if self.flags[name].is_module else "")
                + f" ({strategy.__name__}.{name}: {first_sentence(self.flags[name].help)})"
                for name in missing
            )
            raise ValueError(f"--decoding {decoding} needs {needs}")
        kwargs = {name: sampler for name in self.sampler_parameters[strategy]}
        for name in self.parameters[strategy]:
            if name not in given:
                continue
            value = given[name]
            if self.flags[name].is_module:
                value = load_folder(value, self.flags[name].options[0], device)
            elif _sequence_element(self.flags[name].annotation) is not None and not isinstance(value, (list, tuple)):
                value = [value]
            kwargs[name] = value
        return strategy(**kwargs)

    def _spell(self, names) -> str:
        return ", ".join(self.flags[name].options[0] for name in sorted(names)) or "no flags"


def load_folder(folder: str, option: str, device: str | torch.device | None = None) -> nn.Module:
    """The model saved in `folder` (:func:`flexar.hub.load_model`), on `device`, in eval mode; a folder that does not
    load is refused with the flag that named it."""
    from flexar.hub import load_model

    try:
        model = load_model(folder)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as error:
        raise ValueError(f"{option} {folder}: {error}") from error
    return model.to(device).eval() if device is not None else model.eval()


def add_sampler_arguments(parser: jsonargparse.ArgumentParser, **defaults: Any) -> SamplingFlags:
    """Add the flags of flexar's samplers and decoding strategies to `parser`; keyword arguments replace flag
    defaults (``cfg_scale=2.0``). Returns the :class:`SamplingFlags`, whose ``build`` turns the parsed namespace
    into a sampler."""
    flags = SamplingFlags(defaults=defaults)
    flags.add_to(parser)
    return flags


def sampler_from_args(args, device: str | torch.device | None = None) -> Sampler | DecodingStrategy:
    """The sampler or strategy that a namespace parsed with :func:`add_sampler_arguments` asks for."""
    return SamplingFlags().build(args, device)
