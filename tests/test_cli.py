"""flexar-train refuses misspelt and abbreviated keys by name, with the closest valid keys, before any training."""
import pytest
import yaml

from flexar.train.cli import closest, run
from test_train import tiny_config


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
