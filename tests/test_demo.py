"""The README's main job (`make demo`) end to end at a tiny budget, and its stage reuse on a re-run."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = "--trainer.max_epochs=1 --trainer.limit_train_batches=2 --trainer.limit_val_batches=2 --trainer.enable_progress_bar=false"


def test_demo_end_to_end_and_reuse(tmp_path):
    command = [
        sys.executable, str(ROOT / "scripts" / "demo.py"), "--output", str(tmp_path / "demo"), "--num-samples", "40",
        "--reference-limit", "60",
        f"--tokenizer-args={SMALL} --model.init_args.tokenizer.init_args.width=32 --model.init_args.tokenizer.init_args.depth=1",
        f"--generator-args={SMALL} --model.init_args.generator.init_args.dim=48 --model.init_args.generator.init_args.depth=1",
        f"--classifier-args={SMALL}",
    ]
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    demo = tmp_path / "demo"
    for name in ("reconstructions.png", "samples.png", "reconstruction.json", "fid.json", "summary.json"):
        assert (demo / name).is_file(), name
    fid = json.loads((demo / "fid.json").read_text())
    assert fid["num_samples"] == 40 and fid["num_reference"] == 60 and fid["fid"] > 0
    assert json.loads((demo / "reconstruction.json").read_text())["num_tokens"] == 16
    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing") == 5  # tokenizer, two token caches, generator, classifier
    assert "summary" in second.stdout
