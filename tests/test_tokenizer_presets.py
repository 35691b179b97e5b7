"""Tokenizer presets: one ``presets`` dict per family class and one ``from_preset``, usable from YAML."""
import lightning as L
import pytest
import yaml

from flexar.tokenizers import TiTok
from flexar.train.cli import FlexarArgumentParser, FlexarCLI
from test_train import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")


def parsed_cli(tmp_path, tokenizer: dict, arguments=()) -> FlexarCLI:
    """The CLI of ``flexar-train`` after parsing a tiny TiTok run whose tokenizer entry is `tokenizer`: the model
    and data are built, nothing trains."""
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["model"]["init_args"]["tokenizer"] = tokenizer
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(config))
    return FlexarCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     args=["--config", str(path), *arguments], auto_configure_optimizers=False,
                     parser_class=FlexarArgumentParser, run=False)


def test_from_preset_in_a_yaml_model_config(tmp_path):
    """``class_path: ...TiTok.from_preset`` with the preset in ``init_args`` and the overrides in ``dict_kwargs``."""
    overrides = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, depth=1, codebook_size=64,
                     code_dim=8)
    cli = parsed_cli(tmp_path, {"class_path": "flexar.tokenizers.TiTok.from_preset",
                                "init_args": {"name": "titok-tiny"}, "dict_kwargs": overrides},
                     ["--model.init_args.tokenizer.dict_kwargs.num_heads", "2"])
    tokenizer = cli.model.tokenizer
    assert type(tokenizer) is TiTok
    expected = TiTok.from_preset("titok-tiny", **overrides, num_heads=2).config
    assert tokenizer.config == expected
    # the preset's own values survive: jsonargparse does not fill the overrides with the constructor's defaults
    assert tokenizer.config["width"] == TiTok.presets["titok-tiny"]["width"] != 128


def test_from_preset_in_yaml_refuses_an_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown TiTok preset 'titok-nope'"):
        parsed_cli(tmp_path, {"class_path": "flexar.tokenizers.TiTok.from_preset", "init_args": {"name": "titok-nope"}})
