"""``flexar-train``: the LightningCLI entry point for every model (tokenizers, generators, classifiers).

    flexar-train fit --config configs/tokenizers/titok.yaml --trainer.default_root_dir runs/titok

Configs map one-to-one onto constructors through ``class_path`` / ``init_args``; the config.yaml that LightningCLI
writes into the run folder rebuilds the run, and so does a checkpoint (its hyperparameters are the model's
defaults, see :class:`FlexarCLI`). Several ``--config`` files merge in order (a family's config, then overlays such
as ``configs/gpu/bf16.yaml``), and values interpolate with OmegaConf across them (``${data.init_args.image_size}``).
Metrics go to a CSV logger under ``<default_root_dir>/lightning_logs/version_N`` unless the config names a logger
(TensorBoard's when it is installed), and the preview grids to loggers that take images.

Every subcommand works for tokenizers and generators::

    flexar-train fit      --config run.yaml
    flexar-train validate --config run.yaml --ckpt_path best.ckpt
    flexar-train test     --config run.yaml --ckpt_path best.ckpt    # validation metrics on the test split
    flexar-train predict  --config run.yaml --ckpt_path best.ckpt --return_predictions false \
        --trainer.callbacks+=flexar.data.TokenCacheWriter --trainer.callbacks.output runs/tokens/train

``predict`` tokenizes ``data.init_args.predict_split`` with a tokenizer, and samples one sequence per row of the
validation cache with a generator; :class:`flexar.data.TokenCacheWriter` writes either as a token cache, from every
device.

A generator trained on a token cache takes its sizes from the cache's meta.json (``vocab_size``, ``max_tokens``,
``grid``; for next-scale generators ``scales``, ``code_dim`` and the tokenizer folder): the config names the cache
(``data.init_args.train``) and leaves them out; one given that disagrees with the cache is refused by name.

Keys are never guessed: a misspelt key, in a YAML file or on the command line, at any depth of ``init_args``, is
refused with the closest valid keys of the object it was meant for, and abbreviated options (argparse's
``allow_abbrev``, which would read ``--trainer.max_step`` as ``--trainer.max_steps``) are refused the same way.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
import sys
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
import jsonargparse
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# jsonargparse's messages for a key that no argument takes; the nested ones come from the parser of the class named
# by the enclosing ``class_path``
_OPTION_NOT_ACCEPTED = re.compile(r"Option '(?P<key>[^']+)' is not accepted(?: before subcommand .*)?")
_SUBCOMMAND_REFUSES = re.compile(r"Subcommand '(?P<subcommand>[^']+)' does not accept option '(?P<key>[^']+)'")
_GROUP_REFUSES = re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'")
_UNRECOGNIZED = "unrecognized arguments: "
_CLASS_PATH = re.compile(r"Problem with given class_path '(?P<class_path>[^']+)':")
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')
_HINT = "  closest valid keys: "
_NO_CLOSE_HINT = "  no close match; valid keys: "


def closest(key: str, valid: list[str], count: int = 3) -> list[str]:
    """The entries of `valid` nearest to `key` (difflib's ratio), best first; empty when none is close."""
    return difflib.get_close_matches(key, valid, n=count, cutoff=0.6)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


class FlexarArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with abbreviations off and the closest valid keys named in every unknown-key error.

    jsonargparse checks the ``init_args`` of each ``class_path`` with a parser built for that class, whose own
    :meth:`error` sees the unknown key first: there the closest keys of that class are appended to the message.
    The top-level parser then reports each unknown key by its full path (``model.init_args.tokenizer.init_args.X``)
    with those suggestions, instead of the usage text and the nested union errors.
    """

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def add_function_arguments(self, function, *args, linked_targets=None, **kwargs):
        """jsonargparse passes the parse-time link targets (the generator sizes read from a token cache) down to
        every nested ``class_path``, but its ``add_function_arguments`` does not take them: a function class path
        (``TiTok.from_preset``) then fails. A preset function has no linked parameters, so they are dropped."""
        return super().add_function_arguments(function, *args, **kwargs)

    def valid_keys(self) -> list[str]:
        """Every key this parser takes (``trainer.max_epochs``, ``lr``, ...), without help and config options."""
        keys = []
        for action in self._actions:
            if isinstance(action, (argparse._HelpAction, ActionConfigFile)) or action.dest in (None, argparse.SUPPRESS):
                continue
            keys.append(action.dest)
        return keys

    def option_strings(self) -> list[str]:
        """The long option strings of :meth:`valid_keys` (``--trainer.max_epochs``, ...)."""
        keys = set(self.valid_keys())
        return [string for action in self._actions if action.dest in keys for string in action.option_strings
                if string.startswith("--")]

    def with_closest_keys(self, message: str, ex: Exception | None) -> str:
        """`message` with a line naming the closest valid keys, when it refuses an unknown key."""
        if message.startswith(_UNRECOGNIZED):
            valid = self.option_strings()
            lines = [message]
            for argument in message[len(_UNRECOGNIZED):].split():
                if not argument.startswith("--"):
                    continue
                name = argument.split("=", 1)[0]
                lines.append(_hint_line(name, valid))
            return "\n".join(lines)
        match = _SUBCOMMAND_REFUSES.fullmatch(message)
        if match:
            parser = getattr(ex, "subcommand_parser", None)
            valid = parser.valid_keys() if isinstance(parser, FlexarArgumentParser) else []
            return message + "\n" + _hint_line(match["key"], valid)
        match = _GROUP_REFUSES.fullmatch(message)
        if match:
            prefix = match["group"] + "."
            valid = [key[len(prefix):] for key in self.valid_keys() if key.startswith(prefix)]
            return message + "\n" + _hint_line(match["key"], valid)
        match = _OPTION_NOT_ACCEPTED.fullmatch(message)
        if match:
            return message + "\n" + _hint_line(match["key"], self.valid_keys())
        return message

    def error(self, message: str, ex: Exception | None = None):
        message = self.with_closest_keys(message, ex)
        if not self.exit_on_error:
            # a nested parser (one class's init_args): the enclosing parser reports the error
            super().error(message, ex)
        report = unknown_key_report(message)
        if report is None:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {report}\ntip: `{prog} --help` lists every option\n")
        self.exit(2)


def _hint_line(key: str, valid: list[str]) -> str:
    """``closest valid keys: ...`` for an unknown `key` (an option string ``--a.b`` or a bare key ``a.b``)."""
    # ``--trainer.callbacks+`` (append) and ``--model.help`` (class help) are ways to write a key, not keys
    valid = [entry for entry in valid if not entry.endswith(("+", ".help"))]
    matches = closest(key, valid)
    if not matches and "." in key:
        # a misspelt group (``--modl.init_args.lr``): the nearest group, with the rest as given
        head, rest = key.split(".", 1)
        heads = sorted({entry.split(".", 1)[0] for entry in valid})
        matches = [f"{match}.{rest}" for match in closest(head, heads)]
    if matches:
        abbreviated = key.startswith("--") and any(match.startswith(key) for match in matches)
        return _HINT + ", ".join(matches) + (" (options are never abbreviated)" if abbreviated else "")
    if len(valid) > 30:
        valid = sorted({entry.split(".", 1)[0] for entry in valid})
    return _NO_CLOSE_HINT + (", ".join(sorted(valid)) if valid else "none")


def unknown_key_report(message: str) -> str | None:
    """One line per unknown key in a (possibly nested) jsonargparse message, with its full path and the closest
    valid keys; None when the message refuses no unknown key."""
    lines = message.splitlines()
    reports = []
    for index, line in enumerate(lines):
        stripped = line.strip(" -")
        if stripped.startswith(_UNRECOGNIZED):
            hints = [hint for hint in lines[index + 1:] if hint.startswith(_HINT) or hint.startswith(_NO_CLOSE_HINT)]
            names = [argument for argument in stripped[len(_UNRECOGNIZED):].split() if argument.startswith("--")]
            if not names:
                return None
            for name, hint in zip(names, hints):
                reports.append(f"unknown option {name.split('=', 1)[0]}; {hint.strip()}")
            continue
        match = _SUBCOMMAND_REFUSES.fullmatch(stripped) or _GROUP_REFUSES.fullmatch(stripped)
        match = match or _OPTION_NOT_ACCEPTED.fullmatch(stripped)
        if not match:
            continue
        hint = lines[index + 1].strip() if index + 1 < len(lines) else ""
        if not (hint.startswith(_HINT.strip()) or hint.startswith(_NO_CLOSE_HINT.strip())):
            continue
        path, owner = _key_path(lines, index, match)
        reports.append(f"unknown key {path}{f' ({owner} has no such argument)' if owner else ''}; {hint}")
    return "\n       ".join(reports) if reports else None


def _key_path(lines: list[str], index: int, match: re.Match) -> tuple[str, str | None]:
    """Full dotted path of the key refused on `lines[index]`, from the enclosing ``Parser key`` and ``class_path``
    lines (each indented less than what it encloses), and the class that refused it."""
    parts = [match["key"]]
    if "group" in match.re.groupindex:
        parts.insert(0, match["group"])
    owner = None
    depth = _indent(lines[index])
    for line in reversed(lines[:index]):
        if _indent(line) >= depth:
            continue
        depth = _indent(line)
        class_path = _CLASS_PATH.search(line)
        if class_path:
            owner = owner or class_path["class_path"]
            parts.insert(0, "init_args")
            continue
        parser_key = _PARSER_KEY.search(line)
        if parser_key:
            parts.insert(0, parser_key["key"])
    return ".".join(parts), owner


def parser_mode() -> str:
    """OmegaConf interpolation, resolved once every --config file and command-line option is merged
    (jsonargparse's ``omegaconf+``): a base config may refer to a key an overlay sets
    (``${data.init_args.image_size}``), and a value set on the command line reaches every key that interpolates it.
    Paths are written from the top of a config file, as in plain ``omegaconf`` mode (jsonargparse rewrites them
    relative to where they appear, which puts them under the subcommand). A jsonargparse without that setting gets
    plain ``omegaconf``: interpolation within each file."""
    try:
        jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    except TypeError:
        return "omegaconf"
    return "omegaconf+"


# generator constructor arguments a token or latent cache fixes, each read from the cache's meta.json; None where the
# cache does not fix it (a latent cache has no vocabulary, a token cache no latent shape), so the config's value stays.
# Every link is computed for every generator; jsonargparse drops the value where the class has no such argument
# (``scales`` for RasterAR, ``vocab_size`` for XAR)
CACHE_FIELDS = {
    "vocab_size": lambda meta: meta.get("vocab_size"),
    "max_tokens": lambda meta: meta["max_tokens"],
    "grid": lambda meta: meta.get("grid"),
    # next-scale generators (VAR, MVAR): the tokenizer's scale sides, code width and folder
    "scales": lambda meta: meta.get("grid"),
    # a cache written without tokenizer metadata (by hand, or by an older flexar-tokenize) fixes neither
    "code_dim": lambda meta: ((meta.get("tokenizer") or {}).get("kwargs") or {}).get("code_dim"),
    "tokenizer": lambda meta: (meta.get("tokenizer") or {}).get("path"),
    # continuous generators (XAR) on a latent cache: latent_shape is [C, h, w], with square latents h = w
    "latent_channels": lambda meta: meta["latent_shape"][0] if "latent_shape" in meta else None,
    "latent_size": lambda meta: meta["latent_shape"][1] if "latent_shape" in meta else None,
}


def from_token_cache(argument: str, train: str, generator) -> object:
    """The value of the generator's constructor `argument` that the token or latent cache at `train`
    (``data.init_args.train``) fixes. A value the config gives is kept only when it agrees with the cache: any other
    is refused by name. A value equal to the constructor's default counts as not given; where the cache has none (a
    cache written without a tokenizer folder, a tokenizer without ``code_dim``, a vocabulary in a latent cache) the
    config's value stays. A continuous generator (``continuous = True``) on a token cache, or a generator of ids on a
    latent cache, is refused by name."""
    from flexar.data import read_meta

    meta = read_meta(train)
    kind = meta.get("kind", "tokens")
    cls = _generator_class(generator.class_path)
    if cls is not None and isinstance(getattr(cls, "continuous", None), bool):
        if cls.continuous != (kind == "latents"):
            if cls.continuous:
                models = "latents (a continuous generator)"
                advice = "write a latent cache with flexar-tokenize --tokenizer VAE_FOLDER"
            else:
                models, advice = "token ids", "give it the token cache of a discrete tokenizer"
            raise ValueError(
                f"model.init_args.generator: {cls.__name__} models {models}, but data.init_args.train {train} is a "
                f"{'latent' if kind == 'latents' else 'token'} cache (field 'kind' {kind!r} in its meta.json); "
                f"{advice}")
    value = CACHE_FIELDS[argument](meta)
    init_args = getattr(generator, "init_args", None)
    given = getattr(init_args, argument, None) if init_args is not None else None
    if value is None:
        return given
    if given is not None and given != _constructor_default(generator.class_path, argument):
        same = Path(given).resolve() == Path(value).resolve() if argument == "tokenizer" else list_or(given) == value
        if not same:
            what = "latent cache" if kind == "latents" else "token cache"
            raise ValueError(
                f"model.init_args.generator.init_args.{argument}: generator {given!r} vs {what} {value!r} "
                f"({train}/meta.json); leave {argument} out of the config to take the cache's")
    return value


def _generator_class(class_path: str) -> type | None:
    """The class a generator's ``class_path`` builds (a preset function ``RasterAR.from_preset`` builds its
    class), or None when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        # ``package.Class.function``: the class holds the function
        module, _, owner = module.rpartition(".")
        try:
            found = getattr(getattr(importlib.import_module(module), owner), name)
        except (ImportError, AttributeError, ValueError):
            return None
    if isinstance(found, type):
        return found
    bound = getattr(found, "__self__", None)
    return bound if isinstance(bound, type) else None


def list_or(value):
    """Tuples as lists, so a grid given as (8, 8) equals the cache's [8, 8]."""
    return list(value) if isinstance(value, tuple) else value


def _constructor_default(class_path: str, argument: str):
    """The default of `argument` as jsonargparse fills it: from the first class in the MRO whose ``__init__`` names it
    (MVAR forwards ``**kwargs`` to VAR)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    for klass in getattr(cls, "__mro__", ()):
        parameter = inspect.signature(klass.__init__).parameters.get(argument) if "__init__" in vars(klass) else None
        if parameter is not None:
            return None if parameter.default is inspect.Parameter.empty else parameter.default
    return None


class FlexarCLI(LightningCLI):
    """LightningCLI with flexar's parser, OmegaConf interpolation and checkpoint hyperparameters as model defaults.

    With ``--ckpt_path``, LightningCLI (2.6) parses the checkpoint's hyperparameters over the whole configuration,
    so a module argument given in a config file or on the command line (an ``export_dir``, a ``predict_num_tokens``)
    would be replaced by the one the checkpoint was trained with. Here the checkpoint's hyperparameters are the
    defaults of ``model`` instead: below the config files and the command line, above the class defaults. A config
    without ``model`` runs the checkpoint's model; one that names it keeps what it says.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"seed_everything": 0})
        # a generator's sizes are the token cache's: linked at parse time, so the config never retypes them
        for argument in CACHE_FIELDS:
            parser.link_arguments(("data.init_args.train", "model.init_args.generator"),
                                  f"model.init_args.generator.init_args.{argument}",
                                  compute_fn=partial(from_token_cache, argument), apply_on="parse")

    def parse_arguments(self, parser, args) -> None:
        self._arguments = args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if class_path is None:  # not a checkpoint of a LightningModule built from a class_path (not flexar's)
            return
        self._subcommand_parsers[subcommand].set_defaults({"model": {"class_path": class_path, "init_args": hparams}})
        super().parse_arguments(self.parser, self._arguments)


def run(args: list[str] | None = None) -> FlexarCLI:
    """Run the CLI and return it (tests and scripts use this; the console script calls :func:`main`)."""
    # Lightning warns about dataloader workers on every CPU run; flexar's defaults are deliberate there
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # flexar passes args from Python on purpose (scripts, tests); CSV logging without TensorBoard is the default here
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    warnings.filterwarnings("ignore", message=".*tensorboardX.*")
    # predict loaders yield whole batches; TokenCacheWriter needs no batch indices
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return FlexarCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        # the modules own their optimiser and schedule (their optimizer / lr_scheduler arguments)
        auto_configure_optimizers=False,
        parser_class=FlexarArgumentParser,
        parser_kwargs={"parser_mode": parser_mode()},
    )


def main(args: list[str] | None = None) -> None:
    run(args)


if __name__ == "__main__":
    main()
