"""The README's main job (`make demo`) end to end at a tiny budget, its stage reuse on a re-run, and that a changed
stage is redone with every stage downstream of it."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from flexar.hub import fingerprint, load_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = "--trainer.max_epochs=1 --trainer.limit_train_batches=2 --trainer.limit_val_batches=2 --trainer.enable_progress_bar=false"
TOKENIZER = "--model.init_args.tokenizer.init_args.width=32 --model.init_args.tokenizer.init_args.depth=1"


def demo_command(output, tokenizer_args):
    return [
        sys.executable, str(ROOT / "scripts" / "demo.py"), "--output", str(output), "--num-samples", "40",
        "--reference-limit", "60",
        f"--tokenizer-args={tokenizer_args}",
        f"--generator-args={SMALL} --model.init_args.generator.init_args.dim=48 --model.init_args.generator.init_args.depth=1",
        f"--classifier-args={SMALL}",
    ]


def test_demo_end_to_end_reuse_and_redo_downstream(tmp_path):
    demo = tmp_path / "demo"
    command = demo_command(demo, f"{SMALL} {TOKENIZER}")
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("reconstructions.png", "samples.png", "reconstruction.json", "fid.json", "summary.json", "stages.json"):
        assert (demo / name).is_file(), name
    fid = json.loads((demo / "fid.json").read_text())
    assert fid["num_samples"] == 40 and fid["num_reference"] == 60 and fid["fid"] > 0
    assert json.loads((demo / "reconstruction.json").read_text())["num_tokens"] == 16
    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing") == 5  # tokenizer, two token caches, generator, classifier
    assert "summary" in second.stdout and "redoing" not in second.stdout

    # a new tokenizer (its folder deleted, as the README suggests, and another recipe): its token caches and the
    # generator are redone with it, and the FID classifier, which never reads it, is kept
    old_tokenizer, old_generator = fingerprint(demo / "tokenizer"), fingerprint(demo / "generator")
    classifier = fingerprint(demo / "classifier")
    shutil.rmtree(demo / "tokenizer")
    tokenizer_args = f"{SMALL.replace('limit_train_batches=2', 'limit_train_batches=3')} {TOKENIZER}"
    third = subprocess.run(demo_command(demo, tokenizer_args), capture_output=True, text=True, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"redoing {demo / 'tokens' / 'train'}: its inputs changed: tokenizer" in third.stdout
    assert f"redoing {demo / 'tokens' / 'test'}: its inputs changed: tokenizer" in third.stdout
    assert f"redoing {demo / 'generator'}: its inputs changed: tokenizer, tokens/test, tokens/train" in third.stdout
    assert third.stdout.count("reusing") == 1 and f"reusing {demo / 'classifier'}" in third.stdout
    new_tokenizer = fingerprint(demo / "tokenizer")
    assert new_tokenizer != old_tokenizer and fingerprint(demo / "generator") != old_generator
    assert fingerprint(demo / "classifier") == classifier
    # the generator and the pipeline that scored FID name the tokenizer they were made with
    stages = json.loads((demo / "stages.json").read_text())
    assert stages["tokens/train"]["inputs"]["tokenizer"] == new_tokenizer == stages["generator"]["inputs"]["tokenizer"]
    assert load_model(demo / "generator").provenance == {"tokenizer_fingerprint": new_tokenizer}
    assert load_model(demo / "pipeline" / "generator").provenance == {"tokenizer_fingerprint": new_tokenizer}
    assert fingerprint(demo / "pipeline" / "tokenizer") == new_tokenizer
