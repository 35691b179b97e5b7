"""Checkpoints rebuild the run and export: a ``.ckpt`` alone gives the model folder (``flexar-export``), identical to
the run's own export, and ``load_from_checkpoint`` rebuilds the LightningModule from hyperparameters that hold no
pickled object. The export takes its state dict on every rank and writes on rank zero; the sample grid draws on
every rank."""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from flexar.generators import RasterAR
from flexar.hub import fingerprint, load_model, load_weights, model_fingerprint
from flexar.tokenizers import TiTok
from flexar.train import GeneratorModule, SampleGrid, TokenizerModule
from flexar.train.cli import run
from flexar.cli.export import main as export_main
from flexar.train.export import export_checkpoint
from test_train import caches, tiny_config, tiny_titok  # noqa: F401 (caches is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def flexar_export(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexar.cli.export", *map(str, arguments)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def with_last_checkpoint(config: Path, folder: Path) -> Path:
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"dirpath": str(folder), "save_last": True}})
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A tiny TiTok fitted through flexar-train with EMA, its export folder and its last checkpoint."""
    root = tmp_path_factory.mktemp("tokenizer_run")
    run(["fit", "--config", str(with_last_checkpoint(tiny_config(root), root / "checkpoints"))])
    return root


def test_flexar_export_of_a_checkpoint_equals_the_runs_own_export(tokenizer_run, tmp_path):
    done = flexar_export(tokenizer_run / "checkpoints" / "last.ckpt", tmp_path / "from_ckpt")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["class"] == "TiTok" and report["weights"] == "ema"
    # byte for byte the folder the fit wrote at its end (the EMA weights), so outputs are identical too
    assert report["fingerprint"] == fingerprint(tokenizer_run / "export") == fingerprint(tmp_path / "from_ckpt")
    exported, from_ckpt = TiTok.from_pretrained(tokenizer_run / "export"), TiTok.from_pretrained(tmp_path / "from_ckpt")
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.equal(from_ckpt.encode(images).ids, exported.encode(images).ids)
    assert torch.equal(from_ckpt.reconstruct(images), exported.reconstruct(images))


def test_flexar_export_trained_weights_and_refusals(tokenizer_run, tmp_path, capsys):
    checkpoint = tokenizer_run / "checkpoints" / "last.ckpt"
    assert export_main([str(checkpoint), str(tmp_path / "trained"), "--trained"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "trained"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    trained = load_weights(tmp_path / "trained" / "model.safetensors")
    assert all(torch.equal(value, state[f"tokenizer.{key}"]) for key, value in trained.items())
    ema = load_weights(tokenizer_run / "export" / "model.safetensors")
    assert any(not torch.equal(ema[key], value) for key, value in trained.items()), "EMA and trained weights differ"

    def refused(*arguments) -> str:
        assert export_main([str(argument) for argument in arguments]) == 2
        return capsys.readouterr().err

    message = refused(checkpoint, tmp_path / "trained")
    assert "already holds files" in message and "--overwrite" in message
    assert export_main([str(checkpoint), str(tmp_path / "trained"), "--overwrite"]) == 0
    # a checkpoint that is not a flexar module's, and a sharded FSDP checkpoint folder
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "foreign.ckpt")
    assert "has no 'flexar' entry" in refused(tmp_path / "foreign.ckpt", tmp_path / "foreign")
    (tmp_path / "sharded.ckpt").mkdir()
    assert "consolidate_checkpoint" in refused(tmp_path / "sharded.ckpt", tmp_path / "sharded")
    assert "does not exist" in refused(tmp_path / "nowhere.ckpt", tmp_path / "nowhere")


def test_a_checkpoint_alone_rebuilds_the_module(tokenizer_run):
    """Hyperparameters are class_path / init_args mappings (never pickled modules): the .ckpt loads with
    weights_only=True and load_from_checkpoint rebuilds the tokenizer from them."""
    checkpoint = tokenizer_run / "checkpoints" / "last.ckpt"
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["tokenizer"]["class_path"].endswith("TiTok")
    assert hparams["tokenizer"]["init_args"]["num_latent_tokens"] == 8 and hparams["ema_decay"] == 0.9
    module = TokenizerModule.load_from_checkpoint(checkpoint)
    assert isinstance(module.tokenizer, TiTok) and module.ema_decay == 0.9
    exported = TiTok.from_pretrained(tokenizer_run / "export")
    assert model_fingerprint(module.averaged_network()) == model_fingerprint(exported)


def test_a_module_built_in_python_records_its_model_by_class_path(tmp_path, caches):  # noqa: F811
    torch.manual_seed(0)
    generator = RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2)
    module = GeneratorModule(generator, warmup_steps=1, ema_decay=0.5, export_dir=str(tmp_path / "generator"),
                             optimizer=__import__("functools").partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    assert not any(isinstance(value, torch.nn.Module) for value in module.hparams.values())
    assert module.hparams["generator"] == {"class_path": "flexar.generators.raster.RasterAR",
                                           "init_args": generator.config}
    assert module.hparams["optimizer"]["init_args"] == {"lr": 0.05, "momentum": 0.9}
    from flexar.data import TokenDataModule

    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, TokenDataModule(str(caches / "train"), str(caches / "test"), batch_size=16))
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    rebuilt = GeneratorModule.load_from_checkpoint(tmp_path / "end.ckpt")
    assert isinstance(rebuilt.generator, RasterAR) and rebuilt.ema_decay == 0.5
    optimizer = rebuilt.build_optimizer()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    # the export of the checkpoint keeps the provenance: the fingerprint of the tokenizer of the token cache
    export_checkpoint(tmp_path / "end.ckpt", tmp_path / "from_ckpt")
    assert fingerprint(tmp_path / "from_ckpt") == fingerprint(tmp_path / "generator")
    loaded = load_model(tmp_path / "from_ckpt")
    assert loaded.provenance == {"tokenizer_fingerprint": fingerprint(caches / "tokenizer")}
    labels = torch.tensor([1, 2, 3])
    from flexar.sampling import Sampler

    ours = loaded.generate(labels, Sampler(), generator=torch.Generator().manual_seed(3)).ids
    theirs = load_model(tmp_path / "generator").generate(labels, Sampler(), generator=torch.Generator().manual_seed(3)).ids
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- every rank takes part


class RecordingStrategy:
    """What the export asks of a strategy, counting the state-dict calls (a collective under FSDP)."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def lightning_module_state_dict(self):
        self.calls += 1
        return self.module.state_dict()


class RankTrainer:
    """The parts of a Lightning Trainer that the export and the sample grid read, as rank `rank` of two."""

    def __init__(self, module, rank, folder):
        self.strategy = RecordingStrategy(module)
        self.global_rank, self.world_size, self.is_global_zero = rank, 2, rank == 0
        self.sanity_checking, self.current_epoch, self.global_step = False, 0, 0
        self.loggers, self.log_dir, self.default_root_dir = [], str(folder), str(folder)


@pytest.mark.parametrize("rank", [0, 1])
def test_the_export_takes_the_state_dict_on_every_rank_and_writes_on_rank_zero(tmp_path, rank):
    module = TokenizerModule(tiny_titok(), ema_decay=0.9)
    module._trainer = RankTrainer(module, rank, tmp_path)
    module._export_folder = tmp_path / "export"
    module.on_fit_end()
    assert module._trainer.strategy.calls == 1, "every rank takes part in the state dict"
    if rank:
        assert not (tmp_path / "export").exists()
    else:
        assert fingerprint(tmp_path / "export") == model_fingerprint(module.averaged_network())


@pytest.mark.parametrize("rank", [0, 1])
def test_the_sample_grid_draws_on_every_rank_inside_full_weights(tmp_path, rank):
    torch.manual_seed(0)
    module = GeneratorModule(RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2))
    module._trainer = RankTrainer(module, rank, tmp_path)
    entered = []

    @contextlib.contextmanager
    def full_weights(writeback=False):
        entered.append(rank)
        yield

    module.full_weights = full_weights
    callback = SampleGrid(per_class=1)
    callback._tokenizer = tiny_titok()
    callback.on_validation_epoch_end(module._trainer, module)
    assert entered == [rank]
    assert bool(list(tmp_path.rglob("samples_epoch000.png"))) == (rank == 0)
