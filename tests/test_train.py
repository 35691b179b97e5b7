import math
import re

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


# ----------------------------------------------------------------------------- shared tiny generator runs

import subprocess
import sys
from pathlib import Path

import lightning as L

from flexar.data import TokenDataModule, build_dataset, write_token_cache
from flexar.generators import RasterAR
from flexar.tokenizers import FlexTok
from flexar.train import GeneratorModule, SampleGrid, TokenizerModule

ROOT = Path(__file__).resolve().parents[1]


def tiny_titok(seed=0):
    torch.manual_seed(seed)
    return TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                 codebook_size=32, code_dim=8).eval()


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A saved tiny tokenizer and train / test token caches written from its folder (meta.json names it)."""
    root = tmp_path_factory.mktemp("caches")
    tiny_titok().save_pretrained(root / "tokenizer")
    tokenizer = TiTok.from_pretrained(root / "tokenizer")
    for split in ("train", "test"):
        dataset = torch.utils.data.Subset(build_dataset("digits", split, image_size=16, channels=1), range(48))
        write_token_cache(tokenizer, dataset, root / split, progress=False, description={"num_classes": 10},
                          tokenizer_folder=root / "tokenizer")
    # the same caches as written from an in-memory tokenizer: meta.json knows no folder
    write_token_cache(tokenizer, torch.utils.data.Subset(build_dataset("digits", "train", image_size=16, channels=1),
                                                         range(16)),
                      root / "anonymous", progress=False, description={"num_classes": 10})
    return root


def tiny_generator_run(tmp_path, caches, callbacks=(), train="train", max_epochs=1, logger=False, **module_args):
    torch.manual_seed(0)
    generator = RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2)
    module = GeneratorModule(generator, warmup_steps=1, export_dir=str(tmp_path / "generator"), **module_args)
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=list(callbacks), accelerator="cpu")
    data = TokenDataModule(str(caches / train), str(caches / "test"), batch_size=16)
    trainer.fit(module, data)
    return module, trainer


# ----------------------------------------------------------------------------- non-finite training


def test_non_finite_loss_fails_the_cli_run_and_exports_nothing(tmp_path):
    config = tiny_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "flexar.train.cli", "fit", "--config", str(config),
                             "--model.init_args.lr", "1e30"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert re.search(r"FloatingPointError: training loss is (nan|inf) at step \d+ \(epoch 0, batch \d+\)", result.stderr)
    assert "saved" not in result.stdout and not (tmp_path / "export").exists()


def test_non_finite_generator_loss_stops_before_export(tmp_path, caches):
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf) at step \d+.*lr=1e\+30"):
        tiny_generator_run(tmp_path, caches, lr=1e30, max_grad_norm=None)
    assert not (tmp_path / "generator").exists()


# ----------------------------------------------------------------------------- export folders


def test_existing_export_is_refused_before_training_unless_overwrite(tmp_path):
    config = tiny_config(tmp_path)
    run(["fit", "--config", str(config)])
    export = tmp_path / "export"
    before = (export / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=r"export.*already holds.*model\.safetensors.*overwrite_export true"):
        run(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "again")])
    assert not list((tmp_path / "again").rglob("*.ckpt")), "refused before training, not after"
    assert (export / "model.safetensors").stat().st_mtime_ns == before
    run(["fit", "--config", str(config), "--model.init_args.overwrite_export", "true"])
    assert (export / "model.safetensors").stat().st_mtime_ns != before


def test_existing_generator_and_classifier_exports_are_refused(tmp_path, caches):
    (tmp_path / "generator").mkdir()
    (tmp_path / "generator" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite_export"):
        tiny_generator_run(tmp_path, caches)
    assert not list(tmp_path.rglob("*.ckpt"))
    tiny_generator_run(tmp_path, caches, overwrite_export=True)
    assert RasterAR.from_pretrained(tmp_path / "generator").max_tokens == 6

    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "notes.txt").write_text("someone's files")
    arguments = ["fit", "--config", str(ROOT / "configs" / "eval" / "classifier.yaml"),
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                 "--model.init_args.image_size", "16", "--model.init_args.width", "8", "--data.init_args.image_size", "16",
                 "--model.init_args.export_dir", str(classifier)]
    with pytest.raises(FileExistsError, match="notes.txt"):
        run(arguments)
    run(arguments + ["--trainer.default_root_dir", str(tmp_path / "run2"), "--model.init_args.overwrite_export", "true"])
    assert (classifier / "config.json").is_file()


# ----------------------------------------------------------------------------- optimisation recipe


def test_weight_decay_follows_the_dimension_rule():
    """nanoGPT / LlamaGen: decay every tensor with dim >= 2 (Linear layers named *embed* included), none below."""
    tokenizer = FlexTok(image_size=16, channels=1, patch_size=4, num_registers=4, width=32, depth=1, num_heads=2)
    module = TokenizerModule(tokenizer, weight_decay=0.1)
    decayed, kept = (set(map(id, group["params"])) for group in module.parameter_groups())
    assert [group["weight_decay"] for group in module.parameter_groups()] == [0.1, 0.0]
    names = dict(tokenizer.named_parameters())
    for name, parameter in names.items():
        assert (id(parameter) in decayed) == (parameter.dim() >= 2), name
        assert (id(parameter) in kept) == (parameter.dim() < 2), name
    for name in ("patch_embed.weight", "time_embed.0.weight", "time_embed.2.weight", "noised_embed.weight"):
        assert id(names[name]) in decayed, name
    generator = RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2)
    decayed, _ = (set(map(id, group["params"])) for group in GeneratorModule(generator).parameter_groups())
    embeddings = [p for n, p in generator.named_parameters() if p.dim() >= 2 and "emb" in n]
    assert embeddings and all(id(p) in decayed for p in embeddings)


class GradientNorms(L.Callback):
    """The global gradient norm the optimiser stepped with (gradients are cleared only before the next step)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.generator.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


def test_generator_gradients_are_clipped_at_one_by_default(tmp_path, caches):
    # a loss scale that puts the raw gradient norm well above 1
    unclipped, clipped, trainer_clipped = GradientNorms(), GradientNorms(), GradientNorms()
    tiny_generator_run(tmp_path / "a", caches, [unclipped], max_grad_norm=None)
    assert min(unclipped.norms) > 1.0, "the test needs gradients above the clipping norm"
    module, _ = tiny_generator_run(tmp_path / "b", caches, [clipped])
    assert module.max_grad_norm == 1.0
    assert max(clipped.norms) == pytest.approx(1.0, rel=1e-4)
    # Trainer(gradient_clip_val=...) takes precedence
    torch.manual_seed(0)
    generator = RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / "c", callbacks=[trainer_clipped],
                        gradient_clip_val=0.5, accelerator="cpu")
    trainer.fit(GeneratorModule(generator, export_dir=str(tmp_path / "c" / "generator")),
                TokenDataModule(str(caches / "train"), batch_size=16))
    assert max(trainer_clipped.norms) == pytest.approx(0.5, rel=1e-4)


# ----------------------------------------------------------------------------- SampleGrid


def test_sample_grid_takes_its_tokenizer_from_the_token_cache(tmp_path, caches):
    tiny_generator_run(tmp_path, caches, [SampleGrid(per_class=1, every_n_epochs=1)])
    assert list(tmp_path.rglob("samples_epoch000.png"))


@pytest.mark.parametrize("case", ["other tokenizer", "missing folder", "cache without folder"])
def test_sample_grid_checks_its_tokenizer_when_fitting_starts(tmp_path, caches, case):
    """Refused at fit start, before any training (its first preview would only come at epoch 5)."""
    if case == "other tokenizer":
        # same sizes, other weights: its ids mean other images
        tiny_titok(seed=1).save_pretrained(tmp_path / "other")
        callback, train, error, message = SampleGrid(str(tmp_path / "other"), every_n_epochs=5), "train", ValueError, "fingerprint"
    elif case == "missing folder":
        callback, train, error, message = SampleGrid(str(tmp_path / "nowhere"), every_n_epochs=5), "train", FileNotFoundError, "no config.json"
    else:
        callback, train, error, message = SampleGrid(every_n_epochs=5), "anonymous", ValueError, "records no tokenizer folder"
    with pytest.raises(error, match=message):
        tiny_generator_run(tmp_path, caches, [callback], train=train)
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "generator").exists()


def test_no_shipped_generator_config_names_a_preview_tokenizer():
    """Previews decode through the tokenizer that wrote the cache, never through another run's folder."""
    for path in sorted((ROOT / "configs" / "generators").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        for callback in config.get("trainer", {}).get("callbacks") or []:
            if callback["class_path"].endswith("SampleGrid"):
                assert "tokenizer" not in (callback.get("init_args") or {}), path.name


DDP_RUN = """
import sys
import lightning as L
import torch
from flexar.data import TokenDataModule
from flexar.generators import RasterAR
from flexar.train import GeneratorModule, ReconstructionGrid, SampleGrid

caches, root = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
generator = RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2)
trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, strategy="ddp", devices=2, accelerator="cpu",
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                    callbacks=[SampleGrid(per_class=1)])
trainer.fit(GeneratorModule(generator, warmup_steps=1), TokenDataModule(caches + "/train", caches + "/test", batch_size=8))
"""


def test_sample_grid_and_default_export_under_two_process_ddp(tmp_path, caches):
    """The callback and the export ask for trainer.log_dir (a broadcast) on every rank: no rank is left waiting."""
    import os
    import signal

    # Lightning starts the second rank by re-running the script, so it must be a file
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN)
    process = subprocess.Popen([sys.executable, str(script), str(caches), str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError("the two-process run hung:\n" + output[-3000:])
    assert process.returncode == 0, output[-3000:]
    assert list(tmp_path.rglob("samples_epoch000.png"))
    assert RasterAR.from_pretrained(next(tmp_path.rglob("pretrained"))).max_tokens == 6


# ----------------------------------------------------------------------------- optimiser and schedule from the config


def tiny_tokenizer_module(**module_args) -> tuple[TokenizerModule, L.Trainer]:
    from flexar.data import ImageDataModule

    torch.manual_seed(0)
    module = TokenizerModule(tiny_titok(), warmup_steps=2, **module_args)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, ImageDataModule("digits", image_size=16, channels=1, batch_size=8))
    return module, trainer


def test_an_explicit_adamw_trains_exactly_like_the_default_recipe(tmp_path):
    import functools

    default, _ = tiny_tokenizer_module(export_dir=str(tmp_path / "a"))
    explicit, trainer = tiny_tokenizer_module(
        export_dir=str(tmp_path / "b"), optimizer=functools.partial(torch.optim.AdamW, lr=3e-4, betas=(0.9, 0.95),
                                                                    weight_decay=1e-4))
    # the optimiser's own weight decay goes to the two-or-more-dimensional parameters, none to the others
    assert [group["weight_decay"] for group in trainer.optimizers[0].param_groups] == [1e-4, 0.0]
    for (name, ours), theirs in zip(default.tokenizer.state_dict().items(), explicit.tokenizer.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_optimizer_and_schedule_from_yaml(tmp_path):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["model"]["init_args"].update(
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}},
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}})
    (tmp_path / "sgd.yaml").write_text(yaml.safe_dump(config))
    cli = run(["fit", "--config", str(tmp_path / "sgd.yaml")])
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)
    # stepped after each of the 3 optimiser steps
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


# ----------------------------------------------------------------------------- configs that compose


def test_configs_interpolate_within_and_across_files(tmp_path):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["data"]["init_args"]["image_size"] = "${model.init_args.tokenizer.init_args.image_size}"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    # an overlay that sets a value for the base's keys to follow, and one of its own from the base
    overlay = {"model": {"init_args": {"tokenizer": {"init_args": {"image_size": 24, "patch_size": 6}},
                                       "warmup_steps": "${trainer.log_every_n_steps}"}}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    cli = run(["fit", "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "overlay.yaml"),
               "--trainer.log_every_n_steps", "2", "--model.init_args.export_dir", str(tmp_path / "export24")])
    assert cli.datamodule.image_size == cli.model.tokenizer.image_size == 24
    assert cli.model.warmup_steps == 2
    assert TiTok.from_pretrained(tmp_path / "export24").image_size == 24


def test_a_csv_logger_by_default(tmp_path):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    del config["trainer"]["logger"]
    (tmp_path / "default_logger.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "default_logger.yaml")])
    metrics = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    assert "train/loss" in metrics.read_text()
    # a CSV logger takes no images: the previews are the PNG files
    assert list((tmp_path / "lightning_logs" / "version_0" / "images").glob("reconstructions_epoch000.png"))


class ImageLogger(L.pytorch.loggers.Logger):
    """A logger with ``log_image`` (as Weights & Biases' has): records what it is sent."""

    def __init__(self):
        super().__init__()
        self.images = []

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


def test_preview_grids_go_to_a_logger_that_takes_images(tmp_path, caches):
    from flexar.data import ImageDataModule
    from flexar.train import ReconstructionGrid

    logger = ImageLogger()
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=logger, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[ReconstructionGrid(num_images=4)])
    trainer.fit(TokenizerModule(tiny_titok(), warmup_steps=1, export_dir=str(tmp_path / "tokenizer")),
                ImageDataModule("digits", image_size=16, channels=1, batch_size=8))
    [(key, [grid], step)] = logger.images
    # originals and reconstructions: two rows of four 16x16 images with 2-pixel padding
    assert key == "reconstructions" and step == 2 and grid.shape == (3, 2 + 2 * 18, 2 + 4 * 18)
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    assert list(tmp_path.rglob("reconstructions_epoch000.png")), "the PNG is written as well"
    logger = ImageLogger()
    tiny_generator_run(tmp_path / "generator_run", caches, [SampleGrid(per_class=1)], logger=logger)
    assert [key for key, _, _ in logger.images] == ["samples"]


@pytest.mark.parametrize("strategy", ["bf16", "ddp", "fsdp"])
def test_gpu_configs_parse_over_a_family_config(strategy, capsys):
    with pytest.raises(SystemExit) as stop:
        run(["fit", "--config", str(ROOT / "configs" / "tokenizers" / "titok.yaml"),
             "--config", str(ROOT / "configs" / "data" / "mnist.yaml"),
             "--config", str(ROOT / "configs" / "gpu" / f"{strategy}.yaml"), "--print_config"])
    assert stop.value.code == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"
    if strategy == "ddp":
        assert trainer["strategy"] == "ddp"
    if strategy == "fsdp":
        assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
        assert trainer["strategy"]["init_args"]["state_dict_type"] == "full"
