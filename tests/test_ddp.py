"""Real multi-process runs on 2 CPU processes (gloo): ``flexar-train fit`` with ``strategy=ddp``, and
``flexar-tokenize --devices 2`` (``trainer.predict``).

Each run is a child process (Lightning's DDP launcher re-executes its command line for rank 1). A probe callback
records the rows every rank trains on; the test checks that each epoch covers every row exactly once across the
ranks, that both ranks run the same number of steps, and that the exported weights (gathered on every rank, written
by rank zero) equal those of one process trained with the same global batch. Tokenizing on two processes writes
the very files one process writes.
"""
import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from probes import read_records, row_keys, write_index_cache

from flexar.data import build_dataset
from flexar.hub import load_weights
from flexar.train.cli import run

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64  # per rank; 1500 rows at a global batch of 128 give 11 full steps and one of 92 rows (46 per rank)


def trainer_config(devices: int, epochs: int, probe: Path, strategy: str = "ddp") -> dict:
    trainer = {"accelerator": "cpu", "devices": devices, "max_epochs": epochs, "logger": False,
               "default_root_dir": str(probe.parent / f"run_{probe.name}"),
               "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
               "num_sanity_val_steps": 0, "limit_val_batches": 0,
               "callbacks": [{"class_path": "probes.RunProbe", "init_args": {"folder": str(probe)}}]}
    if devices > 1:
        trainer["strategy"] = strategy
    return trainer


def tokenizer_config(tmp_path: Path, devices: int) -> dict:
    name = f"devices{devices}"
    tokenizer = {"class_path": "flexar.tokenizers.TiTok",
                 "init_args": {"image_size": 16, "channels": 1, "patch_size": 4, "num_latent_tokens": 4, "width": 32,
                               "depth": 1, "num_heads": 2, "quantizer": "fsq", "fsq_levels": [4, 4]}}
    # plain DDP: TiTok's pad embedding, which no training step reaches, is frozen, so DDP finds no unused parameter
    trainer = trainer_config(devices, 1, tmp_path / f"probe_{name}", strategy="ddp")
    return {"seed_everything": 0, "trainer": trainer,
            "model": {"class_path": "flexar.train.TokenizerModule",
                      "init_args": {"tokenizer": tokenizer, "lr": 1e-3, "warmup_steps": 1,
                                    "export_dir": str(tmp_path / f"export_{name}")}},
            "data": {"class_path": "flexar.data.ImageDataModule",
                     "init_args": {"dataset": "digits", "image_size": 16, "channels": 1,
                                   "batch_size": BATCH * 2 // devices}}}


def generator_config(tmp_path: Path, devices: int, cache: Path) -> dict:
    name = f"devices{devices}"
    generator = {"class_path": "flexar.generators.RasterAR",
                 "init_args": {"vocab_size": 64, "max_tokens": 4, "num_classes": 10, "dim": 32, "depth": 1,
                               "num_heads": 2, "class_dropout": 0.0}}
    return {"seed_everything": 0, "trainer": trainer_config(devices, 2, tmp_path / f"probe_{name}"),
            "model": {"class_path": "flexar.train.GeneratorModule",
                      # Adam scales a near-zero gradient up to a step of about lr, float noise included (DDP sums
                      # in another order than one process): a small lr keeps the runs well inside the tolerance
                      "init_args": {"generator": generator, "lr": 3e-4, "warmup_steps": 1,
                                    "export_dir": str(tmp_path / f"export_{name}")}},
            "data": {"class_path": "flexar.data.TokenDataModule",
                     "init_args": {"train": str(cache), "batch_size": BATCH * 2 // devices}}}


def fit_in_child(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    try:
        done = subprocess.run([sys.executable, "-m", "flexar.train.cli", "fit", "--config", str(path)], env=env,
                              cwd=path.parent, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the 2-process run did not finish in 150 s (ranks waiting on each other?)\n{error.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]


def epoch_records(folder: Path, rank: int) -> list[dict]:
    return [record for record in read_records(folder, rank) if "epoch_end" in record]


def check_rows_and_steps(probe: Path, expected_keys: list[str], epochs: int, steps: int) -> None:
    expected = collections.Counter(expected_keys)
    ranks = [epoch_records(probe, rank) for rank in range(2)]
    assert [len(records) for records in ranks] == [epochs, epochs]
    for epoch in range(epochs):
        per_rank = [records[epoch] for records in ranks]
        seen = collections.Counter(per_rank[0]["keys"] + per_rank[1]["keys"])
        summary = (f"epoch {epoch}: {sum(seen.values())} rows trained, {len(set(seen) & set(expected))} of"
                   f" {len(expected)} distinct rows, steps per rank {[record['steps'] for record in per_rank]}")
        # every row exactly once across the ranks: nothing lost, nothing twice
        assert seen == expected, summary
        assert [record["steps"] for record in per_rank] == [steps, steps], summary


def check_same_weights(tmp_path: Path) -> None:
    multi = load_weights(tmp_path / "export_devices2" / "model.safetensors")
    single = load_weights(tmp_path / "export_devices1" / "model.safetensors")
    assert multi.keys() == single.keys()
    difference = max(float((multi[k].float() - single[k].float()).abs().max()) for k in multi)
    assert difference < 1e-5, difference


def test_tokenizer_trains_with_two_processes(tmp_path):
    fit_in_child(tokenizer_config(tmp_path, 2), tmp_path / "tokenizer_ddp.yaml")
    run(["fit", "--config", str(write(tokenizer_config(tmp_path, 1), tmp_path / "tokenizer_single.yaml"))])
    dataset = build_dataset("digits", "train", image_size=16, channels=1)
    keys = row_keys(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    check_rows_and_steps(tmp_path / "probe_devices2", keys, epochs=1, steps=12)
    check_same_weights(tmp_path)


def test_generator_trains_with_two_processes_on_uneven_shards(tmp_path):
    cache = tmp_path / "tokens"
    ids = write_index_cache(cache, [400, 400, 400, 300], vocab_size=64, length=4, num_classes=10)
    fit_in_child(generator_config(tmp_path, 2, cache), tmp_path / "generator_ddp.yaml")
    run(["fit", "--config", str(write(generator_config(tmp_path, 1, cache), tmp_path / "generator_single.yaml"))])
    check_rows_and_steps(tmp_path / "probe_devices2", row_keys(ids), epochs=2, steps=12)
    single = epoch_records(tmp_path / "probe_devices1", 0)
    assert [record["steps"] for record in single] == [12, 12]
    check_same_weights(tmp_path)


def write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_tokenizing_with_two_processes_writes_the_cache_of_one(tmp_path):
    """flexar-tokenize --devices 2: each rank encodes its slice of every global batch, rank zero merges them in row
    order; the files equal those one process writes."""
    from flexar.data import write_token_cache
    from flexar.tokenizers import TiTok

    torch.manual_seed(0)
    TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
          codebook_size=32, code_dim=8).save_pretrained(tmp_path / "tokenizer")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # 297 test images at 32 per rank: 4 global batches of 64 and a last one of 41 rows, split 20 / 21
    command = [sys.executable, "-m", "flexar.data.token_cache", "--tokenizer", str(tmp_path / "tokenizer"),
               "--split", "test", "--output", str(tmp_path / "two"), "--batch-size", "32", "--shard-size", "100",
               "--devices", "2"]
    try:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the 2-process tokenizing did not finish in 150 s (ranks waiting on each other?)\n{error.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]
    tokenizer = TiTok.from_pretrained(tmp_path / "tokenizer")
    write_token_cache(tokenizer, build_dataset("digits", "test", image_size=16, channels=1), tmp_path / "one",
                      batch_size=32, shard_size=100, progress=False, tokenizer_folder=tmp_path / "tokenizer",
                      description={"dataset": "digits", "split": "test", "num_classes": 10})
    files = sorted(path.name for path in (tmp_path / "one").iterdir())
    assert len(files) == 4 and sorted(path.name for path in (tmp_path / "two").iterdir()) == files
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not list(tmp_path.glob(".two.*")), "no staging folder is left behind"
