import math

import pytest
import torch
import yaml

from flexar.tokenizers import TiTok
from flexar.train import warmup_cosine
from flexar.train.cli import run


def tiny_config(tmp_path, **tokenizer_overrides):
    tokenizer = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=32, depth=1, num_heads=2,
                     codebook_size=64, code_dim=8)
    tokenizer.update(tokenizer_overrides)
    config = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 3, "log_every_n_steps": 1, "limit_val_batches": 1, "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "flexar.train.ReconstructionGrid", "init_args": {"num_images": 4}}],
        },
        "model": {
            "class_path": "flexar.train.TokenizerModule",
            "init_args": {"tokenizer": {"class_path": "flexar.tokenizers.TiTok", "init_args": tokenizer},
                          "warmup_steps": 1, "ema_decay": 0.9, "export_dir": str(tmp_path / "export")},
        },
        "data": {"class_path": "flexar.data.ImageDataModule",
                 "init_args": {"dataset": "digits", "image_size": 16, "channels": 1, "batch_size": 8}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_flexar_train_fit_tiny(tmp_path):
    run(["fit", "--config", str(tiny_config(tmp_path))])
    saved = list(tmp_path.rglob("config.yaml"))
    assert any(p.parent != tmp_path for p in saved), "LightningCLI writes its config into the run folder"
    tokenizer = TiTok.from_pretrained(tmp_path / "export")
    assert tokenizer.max_tokens == 8
    assert list(tmp_path.rglob("reconstructions_epoch000.png"))
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "val/psnr" in metrics and "train/codebook_usage" in metrics


def test_unknown_config_key_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(tiny_config(tmp_path, num_latent_tokns=8))])
    assert "num_latent_tokns" in capsys.readouterr().err


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, 10, 100, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
