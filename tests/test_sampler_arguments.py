"""Sampling flags of flexar-sample / flexar-fid come from the samplers' and strategies' constructors (jsonargparse):
a new constructor argument is a new flag that reaches the constructor, help comes from the docstrings, and the
README's commands keep their spelling."""
import inspect
import json
import re
import shlex
from pathlib import Path

import jsonargparse
import pytest
import torch
from torch import nn

from flexar.cli import fid, sample
from flexar.cli.common import ScriptParser
from flexar.generators import RasterAR
from flexar.hub import fingerprint
from flexar.sampling import (BestOfN, DecodingStrategy, EntropySampler, LanternDecoder, Sampler, ScalingAR,
                             SpeculativeDecoder)
from flexar.sampling import arguments
from flexar.sampling.arguments import SamplingFlags

from common import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


class FloorSampler(Sampler):
    """A sampler with one argument more than :class:`Sampler`.

    Args:
        min_p: drop tokens below ``min_p`` times the top probability.
    """

    def __init__(self, min_p: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_p = min_p

    def to_dict(self):
        return {**super().to_dict(), "min_p": self.min_p}


class EchoDecoder(DecodingStrategy):
    """A strategy with a required plain argument and an optional module.

    Args:
        sampler: the per-token sampler.
        repeats: how often.
        helper: a module it uses.
    """

    name = "echo"

    def __init__(self, repeats: int, sampler: Sampler | None = None, helper: nn.Module | None = None) -> None:
        super().__init__(sampler)
        self.repeats, self.helper = repeats, helper


def parser_for(flags: SamplingFlags) -> ScriptParser:
    parser = ScriptParser(prog="test", exit_on_error=False)
    flags.add_to(parser)
    return parser


def built(flags: SamplingFlags, argv: list[str], device=None):
    return flags.build(parser_for(flags).parse_args(argv), device=device)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("flags") / "models" / "digits")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("draft") / "draft"
    RasterAR(vocab_size=32, max_tokens=4, num_classes=10, dim=16, depth=1, num_heads=2).save_pretrained(folder)
    return folder


def test_flexars_samplers_and_strategies_are_found():
    assert arguments.sampler_classes() == [Sampler, EntropySampler]
    found = {cls.name: cls for cls in arguments.strategy_classes()}
    assert found == {"speculative": SpeculativeDecoder, "lantern": LanternDecoder, "scalingar": ScalingAR,
                     "best_of_n": BestOfN}


def test_every_constructor_argument_is_a_flag():
    # read with inspect here, independently of jsonargparse: every keyword a command line can give has a flag, with
    # the signature's default; the sampler a strategy wraps and LANTERN's tensor table are not flags
    flags = SamplingFlags()
    parser = parser_for(flags)
    options = parser._option_string_actions
    for cls in [*arguments.sampler_classes(), *arguments.strategy_classes()]:
        for name, param in inspect.signature(cls).parameters.items():
            if name in ("sampler", "neighbours"):
                assert name not in flags.flags and f"--{name}" not in options
                continue
            action = options["--" + name.replace("_", "-")]
            assert options["--" + name] is action and action.dest == name
            if param.default is not param.empty and name != "cfg_scale":
                assert flags.flags[name].default == param.default, (cls, name)
    assert parser.parse_args([]).cfg_scale is None  # not given: the constructor's default applies
    assert built(flags, []).to_dict() == Sampler().to_dict()


def test_a_new_sampler_argument_is_a_flag_that_reaches_the_constructor():
    flags = SamplingFlags(samplers=[Sampler, FloorSampler])
    parser = parser_for(flags)
    assert "drop tokens below min_p times the top probability" in parser.format_help()
    sampler = built(flags, ["--min-p", "0.05", "--top-k", "3"])
    assert type(sampler) is FloorSampler and sampler.min_p == 0.05 and sampler.top_k == 3
    assert built(flags, ["--min_p=0.2"]).min_p == 0.2
    # without its own flag the first class, Sampler, is built
    assert type(built(flags, ["--top-k", "3"])) is Sampler
    # two sampler subclasses whose own flags are given together: refused by flag
    both = SamplingFlags(samplers=[Sampler, FloorSampler, EntropySampler])
    with pytest.raises(ValueError, match=r"no sampler takes all of --entropy-a, --min-p together"):
        built(both, ["--min-p", "0.1", "--entropy-a", "2"])


def test_a_new_strategy_is_a_decoding_choice(draft_dir):
    flags = SamplingFlags(strategies=[EchoDecoder])
    strategy = built(flags, ["--decoding", "echo", "--repeats", "3", "--temperature", "0.5"])
    assert type(strategy) is EchoDecoder and strategy.repeats == 3 and strategy.helper is None
    assert strategy.sampler.temperature == 0.5
    # a module argument is a folder on the command line, loaded with load_model
    strategy = built(flags, ["--decoding", "echo", "--repeats", "1", "--helper", str(draft_dir)])
    assert isinstance(strategy.helper, RasterAR) and not strategy.helper.training
    assert strategy.helper.fingerprint == fingerprint(draft_dir)
    with pytest.raises(ValueError, match=r"--decoding echo needs --repeats \(EchoDecoder.repeats: how often.\)"):
        built(flags, ["--decoding", "echo"])


def test_the_sampler_flags_reach_flexar_sample(pipeline_dir, tmp_path, monkeypatch, capsys):
    # the console script builds its parser from whatever classes there are: no table to edit for a new argument
    monkeypatch.setattr(arguments, "sampler_classes", lambda: [Sampler, EntropySampler, FloorSampler])
    assert sample.main(["--pipeline", str(pipeline_dir), "--labels", "1", "--per-label", "2", "--min-p", "0.3",
                        "--output", str(tmp_path / "grid.png")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["sampler"] == {**Sampler(cfg_scale=2.0).to_dict(), "min_p": 0.3}


def test_speculative_draft_is_loaded_from_its_folder(pipeline_dir, draft_dir, tmp_path, capsys):
    flags = SamplingFlags()
    strategy = built(flags, ["--decoding", "speculative", "--draft", str(draft_dir), "--draft-length", "2",
                             "--cfg-scale", "1.5"])
    assert type(strategy) is SpeculativeDecoder and strategy.draft_length == 2
    assert isinstance(strategy.draft, RasterAR) and strategy.draft.fingerprint == fingerprint(draft_dir)
    assert strategy.sampler.cfg_scale == 1.5
    lantern = built(flags, ["--decoding", "lantern", "--draft", str(draft_dir), "--k", "4", "--delta", "0.2",
                            "--rejection", "official"])
    assert type(lantern) is LanternDecoder and (lantern.k, lantern.delta, lantern.rejection) == (4, 0.2, "official")
    # and through the console script, on the pipeline's device
    assert sample.main(["--pipeline", str(pipeline_dir), "--labels", "2", "--per-label", "2", "--decoding",
                        "speculative", "--draft", str(draft_dir), "--output", str(tmp_path / "grid.png")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["images"] == 2 and line["sampler"]["strategy"] == "speculative"


def test_readme_spellings_build_what_they_say():
    flags = SamplingFlags()
    scaling = built(flags, ["--entropy-temperature", "--decoding", "scalingar", "--num-trajectories", "4"])
    assert type(scaling) is ScalingAR and scaling.num_trajectories == 4
    assert type(scaling.sampler) is EntropySampler and scaling.sampler.entropy_temperature is True
    plain = built(flags, ["--temperature", "0.9", "--top-k", "5", "--top-p", "0.8", "--cfg-scale", "3",
                          "--cfg-schedule", "linear"])
    assert plain.to_dict() == Sampler(0.9, 5, 0.8, 3.0, "linear").to_dict()
    policy = built(flags, ["--decoding", "scalingar", "--checkpoints", "0.25", "0.75", "--terminate", "false"])
    assert policy.checkpoints == (0.25, 0.75) and policy.terminate is False
    entropy = built(flags, ["--entropy-top-k", "--entropy-temperature", "false", "--top-k-min", "4"])
    assert (entropy.entropy_top_k, entropy.entropy_temperature, entropy.top_k_min) == (True, False, 4)


def readme_commands(program: str) -> list[list[str]]:
    """Every `program` command line of the README's shell blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(program + " "):
            commands.append(shlex.split(line.split("#", 1)[0])[1:])
    return commands


@pytest.mark.parametrize("program, module", [("flexar-sample", sample), ("flexar-fid", fid)])
def test_readme_commands_parse(program, module):
    commands = readme_commands(program)
    assert commands, f"the README shows no {program} command"
    for argv in commands:
        args = module.build_parser().parse_args(argv)
        module.build_parser().sampling.build(args)


def test_help_comes_from_the_docstrings():
    text = sample.build_parser().format_help()
    assert "softmax temperature, >= 0; 0 is greedy decoding" in text  # Sampler's Args entry, reST markup dropped
    assert "the rule's constants (paper: 2.5, 3, 0.6)" in text  # an entry naming three arguments
    assert "--draft FOLDER" in text and "flexar.hub.load_model" in text
    assert re.search(r"--cfg-scale CFG_SCALE, --cfg_scale CFG_SCALE\s+classifier-free guidance scale", text)
    assert "default: 2.0" in text  # the scripts' guidance default, not the signature's


@pytest.mark.parametrize("argv, message", [
    (["--top-kk", "3"], r"unrecognized arguments: --top-kk 3\n  --top-kk: did you mean --top-k"),
    (["--cfg_scle", "2"], r"--cfg_scle: did you mean --cfg_scale"),
    (["--top", "3"], r"unrecognized arguments: --top 3"),  # no abbreviations
    (["--decoding", "speculative"],
     r"sampler: --decoding speculative needs --draft FOLDER, the folder of a saved model"),
    (["--decoding", "lantern", "--draft", "/no/such/folder"], r"--draft /no/such/folder: .*config.json"),
    (["--draft-length", "3"], r"--decoding sample does not take --draft-length \(--draft-length is an argument of "
                              r"--decoding speculative, --decoding lantern\)"),
    (["--decoding", "lantern", "--threshold", "0.5"], r"--decoding lantern does not take --threshold"),
    (["--decoding", "nope"], r"invalid choice: 'nope'"),
    (["--top-k", "many"], r"top_k"),
    (["--top-k", "-1"], r"top_k must be an integer >= 0"),
])
def test_bad_flags_are_refused_by_name(pipeline_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        sample.main(["--pipeline", str(pipeline_dir), *argv])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "runs").exists()


def test_a_plain_argparse_parser_is_refused():
    import argparse

    with pytest.raises(TypeError, match="pass a jsonargparse.ArgumentParser, not argparse.ArgumentParser"):
        arguments.add_sampler_arguments(argparse.ArgumentParser())
    parser = jsonargparse.ArgumentParser()
    flags = arguments.add_sampler_arguments(parser, cfg_scale=3.0)
    assert flags.build(parser.parse_args([])).cfg_scale == 3.0
    with pytest.raises(ValueError, match="defaults for \\['cfg'\\], which no sampler or strategy takes"):
        SamplingFlags(defaults={"cfg": 1.0})
