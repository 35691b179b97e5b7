"""flexar-train refuses misspelt and abbreviated keys by name, with the closest valid keys, before any training."""
import pytest
import yaml

from flexar.train.cli import closest, run
from test_train import caches, tiny_config  # noqa: F401 (caches is a fixture)


def refused(arguments, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run(arguments)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    # the refusal itself, not 49 lines of usage and nested union errors
    assert len(error.strip().splitlines()) <= 3, error
    return error


def test_yaml_typo_in_nested_init_args_names_path_and_closest_key(tmp_path, capsys):
    error = refused(["fit", "--config", str(tiny_config(tmp_path, num_latent_token=8))], capsys)
    assert "unknown key model.init_args.tokenizer.init_args.num_latent_token" in error
    assert "flexar.tokenizers.TiTok" in error and "closest valid keys: num_latent_tokens" in error


def test_command_line_typo_in_nested_init_args(tmp_path, capsys):
    error = refused(["fit", "--config", str(tiny_config(tmp_path)),
                     "--model.init_args.tokenizer.init_args.codebok_size", "32"], capsys)
    assert "model.init_args.tokenizer.init_args.codebok_size" in error and "codebook_size" in error
    error = refused(["fit", "--config", str(tiny_config(tmp_path)), "--data.init_args.batchsize", "4"], capsys)
    assert "data.init_args.batchsize" in error and "closest valid keys: batch_size" in error


def test_trainer_typos_on_the_command_line_and_in_yaml(tmp_path, capsys):
    config = tiny_config(tmp_path)
    error = refused(["fit", "--config", str(config), "--trainer.max_epocs", "1"], capsys)
    assert "unknown option --trainer.max_epocs" in error and "--trainer.max_epochs" in error
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"limit_train_batchs": 2}}))
    error = refused(["fit", "--config", str(config), "--config", str(extra)], capsys)
    assert "unknown key trainer.limit_train_batchs" in error and "trainer.limit_train_batches" in error


def test_callback_typo_names_the_callback(tmp_path, capsys):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["trainer"]["callbacks"][0]["init_args"] = {"num_image": 4}
    path = tmp_path / "callback.yaml"
    path.write_text(yaml.safe_dump(config))
    error = refused(["fit", "--config", str(path)], capsys)
    assert "flexar.train.ReconstructionGrid" in error and "closest valid keys: num_images" in error


def test_abbreviations_are_never_taken(tmp_path, capsys):
    """argparse would read --trainer.max_step as --trainer.max_steps (allow_abbrev)."""
    error = refused(["fit", "--config", str(tiny_config(tmp_path)), "--trainer.max_step", "1"], capsys)
    assert "unknown option --trainer.max_step" in error and "--trainer.max_steps" in error
    assert "never abbreviated" in error
    error = refused(["fit", "--conf", str(tiny_config(tmp_path))], capsys)
    assert "--conf" in error


def test_no_close_key_lists_the_valid_ones(tmp_path, capsys):
    error = refused(["fit", "--config", str(tiny_config(tmp_path)), "--model.init_args.xyzzy", "1"], capsys)
    assert "no close match; valid keys:" in error and "warmup_steps" in error and "ema_decay" in error


def test_closest_keys():
    assert closest("max_epocs", ["max_epochs", "min_epochs", "precision"]) == ["max_epochs", "min_epochs"]
    assert closest("xyzzy", ["max_epochs"]) == []


# ----------------------------------------------------------------------------- test and predict


def checkpointed(config_path, folder):
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": {"dirpath": str(folder), "save_last": True}})
    config_path.write_text(yaml.safe_dump(config))
    return config_path


def writer_arguments(output):
    """A TokenCacheWriter appended to the config's callbacks, from the command line."""
    return ["--trainer.callbacks+=flexar.data.TokenCacheWriter", f"--trainer.callbacks.output={output}",
            "--return_predictions=false"]


def test_test_and_predict_a_tokenizer_through_the_cli(tmp_path):
    import torch

    from flexar.data import TokenDataset, build_dataset, read_meta, write_token_cache
    from flexar.hub import fingerprint
    from flexar.tokenizers import TiTok

    config = checkpointed(tiny_config(tmp_path), tmp_path / "checkpoints")
    run(["fit", "--config", str(config)])
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    # test: the validation metrics on the test split, from the checkpoint's (EMA) weights
    tested = run(["test", "--config", str(config), "--ckpt_path", last])
    metrics = tested.trainer.callback_metrics
    assert {"test/loss", "test/psnr"} <= set(metrics) and float(metrics["test/psnr"]) > 0
    # predict: tokenize the test split into a token cache, the one write_token_cache writes with the export
    run(["predict", "--config", str(config), "--ckpt_path", last, "--data.init_args.predict_split=test",
         *writer_arguments(tmp_path / "tokens")])
    meta = read_meta(tmp_path / "tokens")
    assert meta["tokenizer"]["fingerprint"] == fingerprint(tmp_path / "export") and meta["tokenizer"]["path"] is None
    assert meta["dataset"] == "digits" and meta["split"] == "test" and meta["num_classes"] == 10
    exported = TiTok.from_pretrained(tmp_path / "export")
    test_split = build_dataset("digits", "test", image_size=16, channels=1)
    write_token_cache(exported, test_split, tmp_path / "expected", batch_size=8, progress=False,
                      description={"dataset": "digits", "split": "test", "num_classes": 10})
    ours, expected = TokenDataset(tmp_path / "tokens"), TokenDataset(tmp_path / "expected")
    assert len(ours) == len(test_split) == 297
    for column in ("ids", "labels", "lengths"):
        assert torch.equal(ours.column(column), expected.column(column)), column


def test_test_and_predict_a_generator_through_the_cli(tmp_path, caches):
    import torch

    from flexar.data import TokenDataset, read_meta
    from flexar.hub import fingerprint, load_model

    generator = {"class_path": "flexar.generators.RasterAR",
                 "init_args": {"vocab_size": 32, "max_tokens": 6, "num_classes": 10, "dim": 32, "depth": 1,
                               "num_heads": 2}}
    config = {"trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "logger": False,
                          "enable_progress_bar": False, "enable_model_summary": False,
                          "default_root_dir": str(tmp_path), "callbacks": []},
              "model": {"class_path": "flexar.train.GeneratorModule",
                        "init_args": {"generator": generator, "warmup_steps": 1,
                                      "export_dir": str(tmp_path / "generator")}},
              "data": {"class_path": "flexar.data.TokenDataModule",
                       "init_args": {"train": str(caches / "train"), "val": str(caches / "test"), "batch_size": 16}}}
    path = checkpointed(_write(tmp_path / "generator.yaml", config), tmp_path / "checkpoints")
    run(["fit", "--config", str(path)])
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    # without a logger every run writes its config.yaml into default_root_dir: each subcommand gets its own
    metrics = run(["test", "--config", str(path), "--ckpt_path", last,
                   f"--trainer.default_root_dir={tmp_path / 'test'}"]).trainer.callback_metrics
    assert {"test/loss", "test_loss"} <= set(metrics)
    # predict: one sample per row of the val cache, with its label, as a token cache of the same tokenizer
    run(["predict", "--config", str(path), "--ckpt_path", last, f"--trainer.default_root_dir={tmp_path / 'predict'}",
         "--model.init_args.predict_sampler=flexar.sampling.Sampler", "--model.init_args.predict_sampler.top_k=4",
         *writer_arguments(tmp_path / "samples")])
    meta, source = read_meta(tmp_path / "samples"), read_meta(caches / "test")
    assert meta["tokenizer"] == source["tokenizer"] and meta["num_items"] == source["num_items"] == 48
    assert meta["generator"]["fingerprint"] == fingerprint(tmp_path / "generator")
    samples = TokenDataset(tmp_path / "samples")
    assert torch.equal(samples.labels, TokenDataset(caches / "test").labels)
    assert int(samples.ids.max()) < 32 and torch.equal(samples.lengths, torch.full((48,), 6))
    # the samples decode with the cache's tokenizer
    tokenizer = load_model(caches / "tokenizer")
    assert tokenizer.decode(samples.ids[:4]).shape == (4, 1, 16, 16)


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return path
