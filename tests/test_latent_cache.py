"""Latent caches: a continuous tokenizer's (VAE) latents written by the token-cache machinery with the same integrity
guarantees (staging and rename, shard headers naming the tokenizer, checks naming file and field), read memory-mapped,
and trained on by continuous generators through GeneratorModule, TokenCacheWriter, SampleGrid and flexar-train.

The generator side uses a tiny stand-in continuous generator (a linear layer under an MSE), so that these checks do
not depend on any one flow family."""
import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from common import FailingImages
from torch.utils.data import Subset

from flexar.data import TokenCacheWriter, TokenDataModule, TokenDataset, build_dataset, read_meta, write_token_cache
from flexar.data.token_cache import LATENTS, ShardWriter
from flexar.generators import XAR, Generator, RasterAR
from flexar.hub import _REGISTRY, fingerprint, load_model, model_fingerprint, register
from flexar.sampling import FlowSampler
from flexar.sampling.strategy import GenerationOutput
from flexar.tokenizers import TiTok, VAE
from flexar.train import GeneratorModule, SampleGrid
from flexar.train.cli import run


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return VAE(image_size=16, channels=1, latent_channels=2, block_out_channels=[8, 8], layers_per_block=1,
               norm_num_groups=4, mid_block_attention=False).eval()


@pytest.fixture(scope="module")
def images():
    return Subset(build_dataset("digits", "test", image_size=16, channels=1), range(40))


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    tiny_vae().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def latents(tmp_path_factory, images, vae_folder):
    """Train and test latent caches of the saved VAE (meta.json names its folder)."""
    root = tmp_path_factory.mktemp("latents")
    vae = load_model(vae_folder)
    for split, rows in (("train", range(48)), ("test", range(32))):
        dataset = Subset(build_dataset("digits", split, image_size=16, channels=1), rows)
        write_token_cache(vae, dataset, root / split, batch_size=16, shard_size=20, progress=False,
                          tokenizer_folder=vae_folder, description={"num_classes": 10})
    return root


def encoded(vae, images, batch_size):
    """encode_latents over `images` in batches of `batch_size`, as the writer runs it."""
    batches = torch.stack([images[i][0] for i in range(len(images))]).split(batch_size)
    with torch.no_grad():
        return torch.cat([vae.encode_latents(batch) for batch in batches])


# ---------------------------------------------------------------- writing and reading


def test_a_latent_cache_holds_encode_latents_of_the_images_in_order(tmp_path, images, vae_folder):
    vae = load_model(vae_folder)
    write_token_cache(vae, images, tmp_path / "cache", batch_size=8, shard_size=16, progress=False,
                      tokenizer_folder=vae_folder, description={"num_classes": 10})
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["kind"] == "latents" and meta["latent_shape"] == [2, 8, 8] and "vocab_size" not in meta
    assert meta["max_tokens"] == 64 and meta["grid"] == [8, 8] and meta["num_classes"] == 10
    assert meta["tokenizer"] == {"class": "VAE", "kwargs": vae.config, "fingerprint": fingerprint(vae_folder),
                                 "path": str(vae_folder.resolve())}
    assert [shard["count"] for shard in meta["shards"]] == [16, 16, 8] and meta["num_items"] == 40
    with safe_open(str(tmp_path / "cache" / "shard_00002.safetensors"), "pt") as shard:
        assert sorted(shard.keys()) == ["labels", "latents"]
        assert shard.metadata() == {"tokenizer_fingerprint": fingerprint(vae_folder)}
        assert shard.get_tensor("latents").dtype == torch.float32 and shard.get_tensor("labels").dtype == torch.int64
    cached = TokenDataset(tmp_path / "cache")
    rows, labels, lengths = cached[list(range(40))]
    assert rows.dtype == torch.float32 and rows.shape == (40, 2, 8, 8) and labels.dtype == lengths.dtype == torch.long
    assert torch.equal(rows, encoded(vae, images, 8)), "the rows are encode_latents of the images, in order"
    assert torch.equal(labels, torch.tensor([int(images[i][1]) for i in range(40)]))
    assert torch.equal(lengths, torch.full((40,), 64)), "every row holds all h * w latent positions"
    one = cached[-1]
    assert torch.equal(one[0], rows[39]) and int(one[1]) == int(labels[39]) and int(one[2]) == 64
    out_of_order = [33, 0, 17, 5]
    assert torch.equal(cached[out_of_order][0], rows[out_of_order])
    assert torch.equal(cached.latents, rows) and torch.equal(cached.lengths, lengths)
    assert all(isinstance(column, np.memmap) for shard in cached._columns() for column in shard.values())
    with pytest.raises(KeyError, match=r"is a latent cache: its columns are \['latents', 'labels'\], not 'ids'"):
        cached.ids
    assert not list(tmp_path.glob(".*")), "no staging folder is left behind"


def test_an_interrupted_rewrite_leaves_the_old_latent_cache_intact(tmp_path, images):
    old, new = tiny_vae(0), tiny_vae(1)
    write_token_cache(old, images, tmp_path / "cache", shard_size=8, batch_size=8, progress=False)
    before = {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        # shards 0 and 1 of the new cache are written before item 20 fails
        write_token_cache(new, FailingImages(images, 20), tmp_path / "cache", shard_size=8, batch_size=8,
                          progress=False)
    assert {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]
    # a complete rewrite replaces it, even by a cache of the other kind
    write_token_cache(new, images, tmp_path / "cache", shard_size=8, batch_size=8, progress=False)
    assert read_meta(tmp_path / "cache")["tokenizer"]["fingerprint"] == model_fingerprint(new)
    torch.manual_seed(0)
    titok = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                  codebook_size=32, code_dim=8)
    write_token_cache(titok, images, tmp_path / "cache", progress=False)
    meta = read_meta(tmp_path / "cache")
    assert meta["kind"] == "tokens" and meta["vocab_size"] == 32 and "latent_shape" not in meta
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]


@pytest.fixture
def cache(tmp_path, images):
    write_token_cache(tiny_vae(), images, tmp_path / "cache", shard_size=16, progress=False,
                      description={"num_classes": 10})
    return tmp_path / "cache"


def edit_meta(cache, change):
    meta = json.loads((cache / "meta.json").read_text())
    change(meta)
    (cache / "meta.json").write_text(json.dumps(meta))


def test_every_latent_shard_is_checked_against_meta(cache, images, tmp_path):
    shard = cache / "shard_00001.safetensors"
    original = shard.read_bytes()
    header = {"tokenizer_fingerprint": read_meta(cache)["tokenizer"]["fingerprint"]}
    labels = torch.zeros(16, dtype=torch.long)
    # integer latents, and latents of another shape than latent_shape
    save_file({"latents": torch.zeros(16, 2, 8, 8, dtype=torch.int32), "labels": labels}, str(shard), metadata=header)
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: tensor 'latents' has dtype I32; in a latent cache "
                                         r"it must have a float dtype"):
        TokenDataset(cache)
    save_file({"latents": torch.zeros(16, 2, 4, 4), "labels": labels}, str(shard), metadata=header)
    with pytest.raises(ValueError, match=r"tensor 'latents' has shape \[16, 2, 4, 4\], but .*meta.json field "
                                         r"'latent_shape' is \[2, 8, 8\]"):
        TokenDataset(cache)
    save_file({"latents": torch.zeros(16, 2, 8, 8), "labels": labels.float()}, str(shard), metadata=header)
    with pytest.raises(ValueError, match=r"tensor 'labels' has dtype F32; in a latent cache it must have an integer"):
        TokenDataset(cache)
    save_file({"latents": torch.zeros(16, 2, 8, 8)}, str(shard), metadata=header)
    with pytest.raises(ValueError, match=r"shard_00001.safetensors holds no 'labels' tensor .*a latent cache shard "
                                         r"holds \['latents', 'labels'\]"):
        TokenDataset(cache)
    # a truncated shard, and a shard of another tokenizer's cache
    shard.write_bytes(original[:-10])
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: tensor '\w+' does not fit in the file"):
        TokenDataset(cache)
    write_token_cache(tiny_vae(1), images, tmp_path / "other", shard_size=16, progress=False)
    shard.write_bytes((tmp_path / "other" / "shard_00001.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"shard_00001.safetensors was written by tokenizer \w+, but .*"
                                         r"'tokenizer.fingerprint' is \w+: the folder mixes shards"):
        TokenDataset(cache)
    shard.write_bytes(original)
    assert len(TokenDataset(cache)) == 40


def test_a_latent_meta_with_a_wrong_field_is_refused_by_name(cache):
    text = (cache / "meta.json").read_text()
    cases = [
        (lambda meta: meta.update(kind="pixels"), r"field 'kind' must be one of \['latents', 'tokens'\]"),
        (lambda meta: meta.update(latent_shape=[2, 8]), r"field 'latent_shape' must be a list \[channels, height, "),
        (lambda meta: meta.update(latent_shape=[2, 8, 8.0]), r"field 'latent_shape' must be a list"),
        (lambda meta: meta.pop("latent_shape"), r"field 'latent_shape' is missing \(a latent cache"),
        (lambda meta: meta.update(max_tokens=60), r"field 'max_tokens' is 60, but field 'latent_shape' \[2, 8, 8\] "
                                                  r"has 64 latent positions"),
        (lambda meta: meta.update(grid=[4, 16]), r"field 'grid' is \[4, 16\], but field 'latent_shape'"),
        (lambda meta: meta.update(vocab_size=32), r"field 'vocab_size' is 32, but a latent cache .* has no vocabulary"),
        (lambda meta: meta.update(num_items=41), r"field 'num_items' is 41, but the shards' counts add up to 40"),
    ]
    for change, message in cases:
        (cache / "meta.json").write_text(text)
        edit_meta(cache, change)
        with pytest.raises(ValueError, match=message):
            TokenDataset(cache)
    # a meta.json that says tokens over latent shards: the shards are refused by name
    (cache / "meta.json").write_text(text)
    edit_meta(cache, lambda meta: meta.update(kind="tokens", vocab_size=32))
    with pytest.raises(ValueError, match=r"shard_00000.safetensors holds no 'ids' tensor"):
        TokenDataset(cache)


def test_the_writer_refuses_rows_that_are_not_finite_float_latents(tmp_path):
    shards = ShardWriter(tmp_path, 8, None, LATENTS)
    with pytest.raises(ValueError, match="column 'latents' of a latent cache must be float, got torch.int64"):
        shards.add({"latents": torch.zeros(4, 2, 8, 8, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match="column 'latents' holds NaN or infinite values"):
        shards.add({"latents": torch.full((4, 2, 8, 8), float("nan")), "labels": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"rows of a latent cache hold \['latents', 'labels'\]; these lack \['labels'\]"):
        shards.add({"latents": torch.zeros(4, 2, 8, 8)})
    with pytest.raises(ValueError, match=r"column 'labels' of a latent cache has shape \(3,\) for 4 rows"):
        shards.add({"latents": torch.zeros(4, 2, 8, 8), "labels": torch.zeros(3, dtype=torch.long)})
    assert shards.total == 0 and not list(tmp_path.iterdir())


def test_token_datamodule_batches_latents_and_holds_val_to_the_same_kind_and_tokenizer(latents, images, tmp_path):
    module = TokenDataModule(str(latents / "train"), str(latents / "test"), batch_size=16, seed=3)
    module.setup("fit")
    everything = TokenDataset(latents / "train")
    index = {row.numpy().tobytes(): number for number, row in enumerate(everything.latents)}
    seen = []
    for rows, labels, lengths in module.train_dataloader():
        assert rows.shape[1:] == (2, 8, 8) and rows.dtype == torch.float32 and rows.shape[0] == 16
        assert labels.dtype == torch.long and torch.equal(lengths, torch.full((16,), 64))
        numbers = [index[row.numpy().tobytes()] for row in rows]
        assert torch.equal(labels, everything.labels[numbers])
        seen += numbers
    assert sorted(seen) == list(range(48)) and seen != list(range(48)), "every row once, shuffled"
    validation = torch.cat([batch[0] for batch in module.val_dataloader()])
    assert torch.equal(validation, TokenDataset(latents / "test").latents), "evaluation keeps row order"
    # val of another kind, or of another VAE, is refused
    torch.manual_seed(0)
    titok = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                  codebook_size=32, code_dim=8)
    write_token_cache(titok, images, tmp_path / "tokens", progress=False)
    write_token_cache(tiny_vae(1), images, tmp_path / "other", progress=False)
    for val, message in (("tokens", "kind latents vs tokens"), ("other", "tokenizer.fingerprint")):
        module = TokenDataModule(str(latents / "train"), val=str(tmp_path / val))
        with pytest.raises(ValueError, match=rf"latent caches .* come from different tokenizers: {message}"):
            module.setup("fit")


def test_flexar_tokenize_writes_with_a_vae_the_latent_cache_write_token_cache_writes(tmp_path, vae_folder, capsys):
    """flexar-tokenize (TokenCacheEncoder + TokenCacheWriter through trainer.predict) and write_token_cache give
    identical files for a VAE; --num-tokens with a VAE is refused."""
    from flexar.data.token_cache import main

    main(["--tokenizer", str(vae_folder), "--split", "test", "--output", str(tmp_path / "predicted"),
          "--batch-size", "64", "--shard-size", "100"])
    write_token_cache(load_model(vae_folder), build_dataset("digits", "test", image_size=16, channels=1),
                      tmp_path / "direct", batch_size=64, shard_size=100, progress=False, tokenizer_folder=vae_folder,
                      description={"dataset": "digits", "split": "test", "num_classes": 10})
    files = sorted(path.name for path in (tmp_path / "direct").iterdir())
    assert len(files) > 2 and files[0] == "meta.json"
    assert sorted(path.name for path in (tmp_path / "predicted").iterdir()) == files
    for name in files:
        assert (tmp_path / "predicted" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    assert read_meta(tmp_path / "predicted")["kind"] == "latents"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        main(["--tokenizer", str(vae_folder), "--output", str(tmp_path / "refused"), "--num-tokens", "4"])
    assert exit_status.value.code == 2
    assert "--num-tokens 4 with --tokenizer" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"num_tokens=4: VAE is a continuous tokenizer .* 2 x 8 x 8 latent grid"):
        write_token_cache(load_model(vae_folder), Subset(build_dataset("digits", "test", 16, 1), range(4)),
                          tmp_path / "refused", num_tokens=4, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["direct", "predicted"], "nothing else written"


# ---------------------------------------------------------------- continuous generators on latent caches


class TinyFlow(Generator):
    """A stand-in continuous generator: a class embedding plus a linear map of the latents under an MSE, and
    "sampling" that draws latents around the class embedding; it records what it was given."""

    continuous = True

    def __init__(self, latent_channels: int = 4, latent_size: int = 4, num_classes: int = 10):
        super().__init__()
        self.latent_channels, self.latent_size, self.num_classes = latent_channels, latent_size, num_classes
        self.vocab_size = None
        self.max_tokens = latent_size ** 2
        self.grid = (latent_size, latent_size)
        self.embed = nn.Embedding(num_classes + 1, latent_channels)
        self.proj = nn.Linear(latent_channels, latent_channels)
        self.batches, self.samplers = [], []

    def training_loss(self, latents, labels, lengths=None):
        if not latents.is_floating_point() or latents.shape[1:] != (self.latent_channels, *self.grid):
            raise ValueError(f"TinyFlow takes latents (B, {self.latent_channels}, {self.latent_size}, "
                             f"{self.latent_size}) float, got {tuple(latents.shape)} {latents.dtype}")
        self.batches.append((latents.dtype, tuple(latents.shape), lengths.tolist()))
        channels_last = latents.permute(0, 2, 3, 1)
        prediction = self.proj(channels_last) + self.embed(labels)[:, None, None]
        loss = F.mse_loss(prediction, channels_last)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def generate(self, labels, sampler, generator=None, num_tokens=None, use_cache=True, progress=False):
        labels = self.check_labels(labels)
        self.samplers.append(sampler)
        noise = torch.randn(labels.shape[0], self.latent_channels, *self.grid, generator=generator,
                            device=labels.device)
        latents = self.embed(labels)[:, :, None, None] + 0.1 * noise
        return GenerationOutput(ids=None, latents=latents, stats={"forward_passes": 1})


@pytest.fixture
def flow_classes():
    """TinyFlow registered while a test runs (an export rebuilds it by name), and left out of the registry after."""
    register(TinyFlow)
    yield
    _REGISTRY.pop("TinyFlow", None)


def trainer_for(tmp_path, callbacks=(), **arguments):
    return L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=tmp_path, callbacks=list(callbacks), **arguments)


def test_a_continuous_generator_trains_previews_and_predicts_on_a_latent_cache(tmp_path, latents, vae_folder,
                                                                              flow_classes):
    torch.manual_seed(0)
    generator = TinyFlow(latent_channels=2, latent_size=8)
    module = GeneratorModule(generator, warmup_steps=1, export_dir=str(tmp_path / "export"))
    data = TokenDataModule(str(latents / "train"), str(latents / "test"), batch_size=16)
    preview = SampleGrid(per_class=1, num_classes=10, cfg_scale=2.0)
    trainer_for(tmp_path, [preview]).fit(module, data)
    # training and validation read (latents float32 (B, 2, 8, 8), labels, lengths h * w)
    assert generator.batches[0] == (torch.float32, (16, 2, 8, 8), [64] * 16)
    # the preview decoded the sampled latents with the cache's VAE
    assert list(tmp_path.rglob("samples_epoch000.png"))
    assert isinstance(generator.samplers[-1], FlowSampler) and generator.samplers[-1].cfg_scale == 2.0
    exported = load_model(tmp_path / "export")
    assert exported.provenance == {"tokenizer_fingerprint": fingerprint(vae_folder)}
    # predict: one sample per row of the val cache, written as a latent cache of the same VAE
    writer = TokenCacheWriter(str(tmp_path / "samples"), shard_size=20)
    trainer_for(tmp_path, [writer]).predict(module, datamodule=data, return_predictions=False)
    meta, source = read_meta(tmp_path / "samples"), read_meta(latents / "test")
    assert meta["kind"] == "latents" and meta["latent_shape"] == [2, 8, 8] and meta["max_tokens"] == 64
    assert meta["tokenizer"] == source["tokenizer"] and meta["num_items"] == 32 and "vocab_size" not in meta
    assert meta["generator"]["class"] == "TinyFlow" and meta["generator"]["fingerprint"] == fingerprint(tmp_path / "export")
    assert isinstance(generator.samplers[-1], FlowSampler), "predict's default sampler"
    samples = TokenDataset(tmp_path / "samples")
    labels = TokenDataset(latents / "test").labels
    assert torch.equal(samples.labels, labels)
    # batch b was drawn from a generator seeded predict_seed + b (one process)
    expected = torch.cat([generator.generate(batch, None, generator=torch.Generator().manual_seed(number)).latents
                          for number, batch in enumerate(labels.split(16))])
    assert torch.equal(samples.latents, expected)
    with torch.no_grad():
        assert load_model(vae_folder).decode_latents(samples.latents[:2]).shape == (2, 1, 16, 16)


def test_a_latent_cache_and_a_generator_of_another_kind_or_shape_are_refused_by_name(tmp_path, latents, images,
                                                                                     flow_classes):
    def fit(generator, train):
        module = GeneratorModule(generator, warmup_steps=1, export_dir=str(tmp_path / "export"))
        trainer_for(tmp_path).fit(module, TokenDataModule(str(train), batch_size=16))

    with pytest.raises(ValueError, match=r"RasterAR models token ids, but .*train/meta.json is a latent cache"):
        fit(RasterAR(vocab_size=32, max_tokens=64, num_classes=10, dim=32, depth=1, num_heads=2), latents / "train")
    torch.manual_seed(0)
    titok = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                  codebook_size=32, code_dim=8)
    write_token_cache(titok, images, tmp_path / "tokens", progress=False)
    with pytest.raises(ValueError, match=r"TinyFlow is a continuous generator .*tokens/meta.json is a token cache"):
        fit(TinyFlow(latent_channels=2, latent_size=8), tmp_path / "tokens")
    with pytest.raises(ValueError, match=r"generator does not match its latent cache .*: latent_channels: generator 3 "
                                         r"vs latent cache 2; latent_size: generator 4 \(latents 4 x 4\) vs latent "
                                         r"cache latent_shape \[2, 8, 8\]"):
        fit(TinyFlow(latent_channels=3, latent_size=4), latents / "train")
    assert not (tmp_path / "export").exists()


def test_flexar_train_takes_the_latent_sizes_from_the_cache_and_refuses_another_kind(tmp_path, latents, vae_folder,
                                                                                     flow_classes, capsys):
    # TinyFlow's defaults (4 channels, 4 x 4) are not the cache's: the links must fill them
    config = {"trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "logger": False,
                          "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
                          "default_root_dir": str(tmp_path), "callbacks": []},
              "model": {"class_path": "flexar.train.GeneratorModule",
                        "init_args": {"generator": {"class_path": "test_latent_cache.TinyFlow",
                                                    "init_args": {"num_classes": 10}},
                                      "warmup_steps": 1, "export_dir": str(tmp_path / "export")}},
              "data": {"class_path": "flexar.data.TokenDataModule",
                       "init_args": {"train": str(latents / "train"), "val": str(latents / "test"), "batch_size": 16}}}
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(path)])
    exported = load_model(tmp_path / "export")
    assert exported.config["latent_channels"] == 2 and exported.config["latent_size"] == 8
    assert exported.provenance == {"tokenizer_fingerprint": fingerprint(vae_folder)}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'run2'}",
             "--model.init_args.generator.init_args.latent_channels", "3"])
    assert "latent_channels: generator 3 vs latent cache 2" in capsys.readouterr().err
    # a generator of ids on a latent cache is refused when the config is parsed, with its vocabulary left out
    config["model"]["init_args"]["generator"] = {"class_path": "flexar.generators.RasterAR",
                                                 "init_args": {"num_classes": 10, "dim": 32, "depth": 1, "num_heads": 2}}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'run3'}"])
    assert "RasterAR models token ids, but data.init_args.train" in capsys.readouterr().err
    # and a continuous generator on a token cache
    torch.manual_seed(0)
    titok = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                  codebook_size=32, code_dim=8)
    write_token_cache(titok, Subset(build_dataset("digits", "train", 16, 1), range(16)), tmp_path / "tokens",
                      progress=False)
    config["model"]["init_args"]["generator"] = {"class_path": "test_latent_cache.TinyFlow", "init_args": {}}
    config["data"]["init_args"].update(train=str(tmp_path / "tokens"), val=None)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'run4'}"])
    assert "TinyFlow models latents (a continuous generator), but data.init_args.train" in capsys.readouterr().err
    assert not any((tmp_path / run).exists() for run in ("run2", "run3", "run4"))


def test_xar_trains_through_flexar_train_on_a_latent_cache_and_predicts_one(tmp_path, latents, vae_folder):
    """The real continuous family: its latent sizes (required arguments) come from the cache, the preview decodes
    its samples with the cache's VAE, and its predictions are a latent cache of that VAE."""
    generator = {"class_path": "flexar.generators.XAR",
                 "init_args": {"num_classes": 10, "cell_size": 4, "dim": 32, "depth": 1, "decoder_depth": 1,
                               "num_heads": 2}}
    preview = {"class_path": "flexar.train.SampleGrid", "init_args": {"per_class": 1, "cfg_scale": 2.0}}
    config = {"trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "logger": False,
                          "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
                          "default_root_dir": str(tmp_path), "callbacks": [preview]},
              "model": {"class_path": "flexar.train.GeneratorModule",
                        "init_args": {"generator": generator, "warmup_steps": 1, "export_dir": str(tmp_path / "xar")}},
              "data": {"class_path": "flexar.data.TokenDataModule",
                       "init_args": {"train": str(latents / "train"), "val": str(latents / "test"), "batch_size": 16}}}
    (tmp_path / "xar.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "xar.yaml")])
    assert list(tmp_path.rglob("samples_epoch000.png"))
    model = load_model(tmp_path / "xar")
    assert isinstance(model, XAR) and (model.latent_channels, model.latent_size) == (2, 8)
    assert model.provenance == {"tokenizer_fingerprint": fingerprint(vae_folder)}
    module = GeneratorModule(model)
    module.predict_sampler = FlowSampler(steps=2)  # two calls per entity: the files, not the quality, are checked
    data = TokenDataModule(str(latents / "train"), str(latents / "test"), batch_size=16)
    trainer_for(tmp_path, [TokenCacheWriter(str(tmp_path / "samples"))]).predict(module, datamodule=data,
                                                                                  return_predictions=False)
    meta = read_meta(tmp_path / "samples")
    assert meta["kind"] == "latents" and meta["latent_shape"] == [2, 8, 8] and meta["generator"]["class"] == "XAR"
    samples = TokenDataset(tmp_path / "samples")
    assert samples.latents.shape == (32, 2, 8, 8) and torch.equal(samples.labels, TokenDataset(latents / "test").labels)
