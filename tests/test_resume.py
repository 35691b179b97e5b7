"""Exact resume: a run killed with SIGKILL after writing checkpoints, resumed with ``--ckpt_path``, continues the
loss curve of the uninterrupted run step for step (same batches, same draws for class dropout and token drop).

The killed runs are child processes that kill themselves when step 9 begins; by then they have written
checkpoints in the middle of epoch 0 (step 4), at the end of epoch 0 (step 6, after validation) and in the middle
of epoch 1 (step 8). Each is resumed, and its losses and exported weights (the EMA weights for the generator) are
compared with an uninterrupted run.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from probes import read_records, write_index_cache

from flexar.hub import load_weights
from flexar.train.cli import run

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = 9
CHECKPOINTS = ("step=4", "end-epoch=0", "step=8")  # mid-epoch 0, end of epoch 0, mid-epoch 1 (6 steps per epoch)


def config(tmp_path: Path, name: str, model: dict, data: dict, kill: bool = False) -> Path:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / name / "checkpoints"), "filename": "{step}",
                       "every_n_train_steps": 4, "save_top_k": -1}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / name / "checkpoints"), "filename": "end-{epoch}",
                       "every_n_epochs": 1, "save_top_k": -1}},
        {"class_path": "probes.RunProbe",
         "init_args": {"folder": str(tmp_path / name / "probe"), "kill_at_step": KILL_AT if kill else None}},
    ]
    trainer = {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "limit_val_batches": 2, "default_root_dir": str(tmp_path / name),
               "callbacks": callbacks}
    if data["class_path"].endswith("ImageDataModule"):
        trainer["limit_train_batches"] = 6
    model = {**model, "init_args": {**model["init_args"], "export_dir": str(tmp_path / name / "export")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": 0, "trainer": trainer, "model": model, "data": data}))
    return path


def generator_setup(tmp_path: Path) -> tuple[dict, dict]:
    cache = tmp_path / "tokens"
    if not cache.exists():
        write_index_cache(cache, [40, 40, 16], vocab_size=16, length=4, num_classes=4)
    generator = {"class_path": "flexar.generators.RasterAR",
                 "init_args": {"vocab_size": 16, "max_tokens": 4, "num_classes": 4, "dim": 32, "depth": 1,
                               "num_heads": 2, "class_dropout": 0.5}}
    model = {"class_path": "flexar.train.GeneratorModule",
             "init_args": {"generator": generator, "lr": 3e-3, "warmup_steps": 2, "ema_decay": 0.9}}
    data = {"class_path": "flexar.data.TokenDataModule",
            "init_args": {"train": str(cache), "val": str(cache), "batch_size": 16, "seed": 1}}
    return model, data


def tokenizer_setup(tmp_path: Path) -> tuple[dict, dict]:
    tokenizer = {"class_path": "flexar.tokenizers.OneDPiece",
                 "init_args": {"image_size": 16, "channels": 1, "patch_size": 4, "num_latent_tokens": 6,
                               "width": 32, "depth": 1, "num_heads": 2, "codebook_size": 32, "code_dim": 8}}
    model = {"class_path": "flexar.train.TokenizerModule",
             "init_args": {"tokenizer": tokenizer, "lr": 3e-3, "warmup_steps": 2}}
    data = {"class_path": "flexar.data.ImageDataModule",
            "init_args": {"dataset": "digits", "image_size": 16, "channels": 1, "batch_size": 8}}
    return model, data


SETUPS = {"generator": generator_setup, "tokenizer": tokenizer_setup}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Both killed runs, started together: {name: folder}."""
    root = tmp_path_factory.mktemp("killed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    children = {}
    for name, setup in SETUPS.items():
        path = config(root, name, *setup(root), kill=True)
        children[name] = subprocess.Popen([sys.executable, "-m", "flexar.train.cli", "fit", "--config", str(path)],
                                          env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for name, child in children.items():
        _, stderr = child.communicate(timeout=300)
        assert child.returncode == -signal.SIGKILL, f"{name} run was not killed: {stderr[-3000:]}"
    return root


def losses(folder: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_records(folder / "probe") if "loss" in record}


@pytest.mark.parametrize("name", list(SETUPS))
def test_a_killed_run_resumes_exactly(name, killed, tmp_path):
    model, data = SETUPS[name](killed)
    run(["fit", "--config", str(config(tmp_path, "whole", model, data))])
    whole = losses(tmp_path / "whole")
    assert sorted(whole) == list(range(1, 19))
    before_kill = losses(killed / name)
    assert sorted(before_kill) == list(range(1, KILL_AT + 1))
    assert all(abs(before_kill[step] - whole[step]) <= 1e-6 for step in before_kill)
    checkpoints = {path.stem for path in (killed / name / "checkpoints").glob("*.ckpt")}
    assert set(CHECKPOINTS) <= checkpoints, checkpoints
    exported = load_weights(tmp_path / "whole" / "export" / "model.safetensors")
    for checkpoint in CHECKPOINTS:
        resumed_name = f"resumed-{checkpoint}"
        path = config(tmp_path, resumed_name, model, data)
        run(["fit", "--config", str(path), "--ckpt_path", str(killed / name / "checkpoints" / f"{checkpoint}.ckpt")])
        resumed = losses(tmp_path / resumed_name)
        start = int(checkpoint.split("=")[1]) if checkpoint.startswith("step") else 6
        assert sorted(resumed) == list(range(start + 1, 19)), (checkpoint, sorted(resumed))
        difference = max(abs(resumed[step] - whole[step]) for step in resumed)
        assert difference <= 1e-6, (checkpoint, difference)
        weights = load_weights(tmp_path / resumed_name / "export" / "model.safetensors")
        assert max(float((weights[k] - exported[k]).abs().max()) for k in exported) <= 1e-6, checkpoint
