"""The console scripts flexar-sample and flexar-fid: one implementation each (flexar.cli), installed as commands,
writing under runs/ by default, with sampling defaults that agree with the README."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexar import Pipeline
from flexar.cli import fid, sample
from flexar.cli.common import CFG_SCALE
from flexar.eval.classifier import DigitClassifier

from common import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A tiny pipeline saved at <tmp>/models/digits, with a FID classifier in its classifier/ sub-folder."""
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("scripts") / "models" / "digits")
    DigitClassifier(in_channels=1, image_size=16, width=8, feature_dim=16).save_pretrained(folder / "classifier")
    return folder


def written(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


def test_the_scripts_are_the_package_entry_points():
    # scripts/sample.py and scripts/eval_fid.py run the package's main, not a copy of it
    for name, module in (("sample", sample), ("eval_fid", fid)):
        spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        assert script.main is module.main
    entry_points = (ROOT / "setup.py").read_text()
    for command in ('"flexar-sample=flexar.cli.sample:main"', '"flexar-fid=flexar.cli.fid:main"'):
        assert command in entry_points


def test_sample_writes_under_runs_by_default(pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--pipeline", str(pipeline_dir), "--labels", "1", "2", "--per-label", "3"]) == 0
    assert written(tmp_path) == ["runs", "runs/samples", "runs/samples/models-digits.png"]
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["grid"] == "runs/samples/models-digits.png" and line["images"] == 6
    assert line["sampler"]["cfg_scale"] == CFG_SCALE == 2.0 and line["sampler"]["cfg_schedule"] == "constant"
    # --output and --individual name their own places; --cfg-scale 1 turns guidance off
    assert sample.main(["--pipeline", str(pipeline_dir), "--labels", "4", "--per-label", "2", "--cfg-scale", "1",
                        "--output", "grid.png", "--individual", "each"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["grid"] == "grid.png" and line["sampler"]["cfg_scale"] == 1.0
    assert {"grid.png", "each/00000_class4.png", "each/00001_class4.png"} <= set(written(tmp_path))


def test_sample_grid_holds_the_pipelines_images(pipeline_dir, tmp_path, capsys):
    from PIL import Image

    assert sample.main(["--pipeline", str(pipeline_dir), "--labels", "3", "--per-label", "1", "--seed", "7",
                        "--output", str(tmp_path / "one.png")]) == 0
    capsys.readouterr()
    expected = Pipeline.from_pretrained(pipeline_dir).generate([3], sampler=sample_default_sampler(), seed=7)[0]
    grid = torch.from_numpy(np.asarray(Image.open(tmp_path / "one.png").convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(grid, expected)


def sample_default_sampler():
    parser = sample.build_parser()
    return parser.sampling.build(parser.parse_args(["--pipeline", "unused"]))


def test_sampling_defaults_agree_with_the_readme():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start in Python", 1)[1].split("\n## ", 1)[0]
    scales = {float(value) for value in re.findall(r"Sampler\([^)]*cfg_scale=([0-9.]+)", quick_start)}
    assert scales == {CFG_SCALE}
    for module in (sample, fid):
        assert module.build_parser().parse_args(["--pipeline", "unused"]).cfg_scale == CFG_SCALE
    assert sample_default_sampler().to_dict()["cfg_scale"] == CFG_SCALE


def test_console_scripts_run(pipeline_dir, tmp_path):
    # the installed commands (pip install -e . writes them next to the interpreter), from another directory; the
    # in-process tests above and test_eval's flexar-fid tests run the rest of the same main functions
    out = subprocess.run([str(BIN / "flexar-sample"), "--pipeline", str(pipeline_dir), "--labels", "0", "--per-label",
                          "2"], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["images"] == 2
    assert written(tmp_path) == ["runs", "runs/samples", "runs/samples/models-digits.png"]
    out = subprocess.run([str(BIN / "flexar-fid"), "--help"], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.startswith("usage: flexar-fid") and "--inception-weights" in out.stdout


def test_fid_without_a_classifier_names_the_flags(pipeline_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(pipeline_dir, bare, ignore=shutil.ignore_patterns("classifier"))
    with pytest.raises(SystemExit) as exit_info:
        fid.main(["--pipeline", str(bare), "--output", str(tmp_path / "fid.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "fid.json").exists()
    message = capsys.readouterr().err
    assert f"{bare / 'classifier'} does not exist" in message
    assert "--extractor classifier:PATH" in message and "--extractor inception" in message
    assert "--inception-weights PATH" in message


@pytest.mark.parametrize("arguments, message", [
    (["--per-label", "-1"], r"--per-label must be an integer >= 1, got -1"),
    (["--per-label", "0"], r"--per-label must be an integer >= 1, got 0"),
])
def test_sample_refuses_bad_counts_by_flag(pipeline_dir, tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        sample.main(["--pipeline", str(pipeline_dir), "--labels", "1", *arguments])
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_demo_checks_its_sampling_flags_before_training(tmp_path, monkeypatch, capsys):
    # the demo takes flexar-sample's sampling flags, and a bad one stops it before minutes of training
    spec = importlib.util.spec_from_file_location("script_demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    def never(*args, **kwargs):
        raise AssertionError("a stage started before the sampling flags were checked")

    monkeypatch.setattr(demo, "Stages", never)
    for flags, message in ((["--top-k", "-1"], "sampler: top_k must be an integer >= 0"),
                           (["--decoding", "lantern"], "sampler: --decoding lantern needs --draft FOLDER"),
                           (["--top-kk", "3"], "--top-kk: did you mean --top-k")):
        with pytest.raises(SystemExit) as stop:
            demo.main(["--output", str(tmp_path / "demo"), *flags])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    with pytest.raises(AssertionError, match="a stage started"):
        demo.main(["--output", str(tmp_path / "demo"), "--entropy-temperature", "--cfg-scale", str(CFG_SCALE)])
