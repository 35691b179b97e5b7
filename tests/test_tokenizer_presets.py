"""Tokenizer presets and the conventions every family shares: one ``presets`` dict per class and one
``from_preset`` (usable from YAML), the papers' whole configurations at the papers' parameter counts, subclasses that
forward their parent's arguments, and one ``training_loss`` signature."""
import inspect
import json

import pytest
import torch
import yaml

from flexar.hub import load_model, presets
from flexar.tokenizers import ALIT, KARL, VAE, VQGAN2D, FlexTok, MultiScaleVQ, OneDPiece, ReTok, TiTok, Tokenizer
from flexar.train.cli import FlexarCLI, run
from test_train import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(cls, name: str, **overrides):
    """The preset built on the meta device: shapes and counts without allocating the weights."""
    with torch.device("meta"):
        return cls.from_preset(name, **overrides)


# -- every preset ------------------------------------------------------------------------------------------------------
# (class, preset, image_size, channels, max_tokens, codebook_size) of the papers' configurations
PAPER_PRESETS = [
    (TiTok, "titok-l32", 256, 3, 32, 4096),
    (TiTok, "titok-b64", 256, 3, 64, 4096),
    (TiTok, "titok-s128", 256, 3, 128, 4096),
    (OneDPiece, "onedpiece-s256", 256, 3, 256, 4096),
    (OneDPiece, "onedpiece-b256", 256, 3, 256, 4096),
    (OneDPiece, "onedpiece-l256", 256, 3, 256, 4096),
    (ReTok, "retok-s-s", 256, 3, 256, 16384),
    (ReTok, "retok-s-b", 256, 3, 256, 16384),
    (FlexTok, "flextok-d12-d12", 256, 3, 256, 64000),
    (FlexTok, "flextok-d18-d18", 256, 3, 256, 64000),
    (FlexTok, "flextok-d18-d28", 256, 3, 256, 64000),
    (VQGAN2D, "vq2d-f8", 256, 3, 32 * 32, 16384),
    (VQGAN2D, "vq2d-f16", 256, 3, 16 * 16, 16384),
    (VQGAN2D, "vq2d-maskgit-f16", 256, 3, 16 * 16, 1024),
    (MultiScaleVQ, "msvq-f16", 256, 3, 680, 4096),
    (KARL, "karl-s", 256, 3, 256, 4096),
    (KARL, "karl-b", 256, 3, 256, 4096),
    (KARL, "karl-l", 256, 3, 256, 4096),
    (ALIT, "alit-s", 256, 3, 256, 4096),
    (ALIT, "alit-b", 256, 3, 256, 4096),
    (ALIT, "alit-l", 256, 3, 256, 4096),
]


@pytest.mark.parametrize("cls, name, image_size, channels, max_tokens, codebook_size", PAPER_PRESETS,
                         ids=[row[1] for row in PAPER_PRESETS])
def test_a_paper_preset_builds_the_papers_layout(cls, name, image_size, channels, max_tokens, codebook_size):
    tokenizer = on_meta(cls, name)
    assert type(tokenizer) is cls
    layout = (tokenizer.image_size, tokenizer.channels, tokenizer.max_tokens, tokenizer.codebook_size)
    assert layout == (image_size, channels, max_tokens, codebook_size)
    # the recorded arguments are the whole configuration, the preset's included: the saved config rebuilds it
    assert contained(cls.presets[name], tokenizer.config)
    assert json.loads(json.dumps(tokenizer.config)) == tokenizer.config


def contained(preset, config) -> bool:
    """Whether every value of `preset` is in `config` (nested records, such as a VAE's, may hold more fields)."""
    if isinstance(preset, dict):
        return isinstance(config, dict) and all(key in config and contained(value, config[key])
                                                for key, value in preset.items())
    return preset == config


def small_base(image_size: int) -> dict:
    return {"class": "VQGAN2D", "kwargs": dict(VQGAN2D.presets["vq2d-tiny"], image_size=image_size, channels=1)}


def test_every_registered_tokenizer_preset_builds():
    listed = presets(Tokenizer)
    assert {(TiTok, "titok-s128"), (FlexTok, "flextok-d18-d28"), (KARL, "karl-cpu")} <= set(listed)
    # KARL's and ALIT's CPU presets are sized for a base tokenizer trained on small images; the test gives one
    bases = {"karl-tiny": 16, "alit-tiny": 16, "karl-cpu": 32, "alit-cpu": 32}
    for cls, name in listed:
        overrides = {"base_config": small_base(bases[name])} if name in bases else {}
        tokenizer = on_meta(cls, name, **overrides)
        assert isinstance(tokenizer, cls) and tokenizer.max_tokens >= 1, name
    # every class lists only its own presets: One-D-Piece does not inherit TiTok's
    assert not set(OneDPiece.presets) & set(TiTok.presets) and not set(ReTok.presets) & set(TiTok.presets)


# -- parameter counts against the papers -------------------------------------------------------------------------------
# TiTok: the paper's tables give the generators' sizes, not the tokenizers'. The reference counts are those of the
# official model (bytedance/1d-tokenizer: modeling/titok.py, modeling/modules/blocks.py TiTokEncoder / TiTokDecoder,
# modeling/modules/maskgit_vqgan.py), counted layer by layer at 256 px: TiTok-L-32 641.05M, B-64 204.81M,
# S-128 83.67M in all, of which the MaskGIT-VQGAN pixel decoder and codebook (30.74M) and the proxy-code head
# (4.20M / 2.76M / 1.57M) are not flexar's (flexar.tokenizers.titok docstring). The part flexar keeps (encoder ViT
# with its embeddings and latent tokens, the 4096 x 12 codebook, decoder ViT with its embeddings) counts
# L-32 606,116,876, B-64 171,318,540, S-128 51,359,244; One-D-Piece's 256-token models (turingmotors/One-D-Piece,
# the same definition with 256 latent tokens) L-256 606,805,004, S-256 51,555,852.
OFFICIAL_TITOK_VIT_PARAMETERS = {
    (TiTok, "titok-l32"): 606_116_876,
    (TiTok, "titok-b64"): 171_318_540,
    (TiTok, "titok-s128"): 51_359_244,
    (OneDPiece, "onedpiece-l256"): 606_805_004,
    (OneDPiece, "onedpiece-s256"): 51_555_852,
}


@pytest.mark.parametrize("cls, name", list(OFFICIAL_TITOK_VIT_PARAMETERS), ids=lambda v: getattr(v, "__name__", v))
def test_titok_presets_have_the_official_vit_parameter_count(cls, name):
    tokenizer = on_meta(cls, name)
    vit = parameters(tokenizer) - parameters(tokenizer.to_pixels) - parameters(tokenizer.conv_out)
    assert abs(vit / OFFICIAL_TITOK_VIT_PARAMETERS[(cls, name)] - 1) < 0.01


# FlexTok: FlexTok d18-d18 and d18-d28 are listed at 573M and 1.4B parameters in later system-level comparisons
# (e.g. the ImageNet 256 table of "learnable global merging" variable-length tokenizers, 2026). Those are the
# attention and MLP weights of the two official trunks (apple/ml-flextok flextok/model/layers/transformer_blocks.py:
# no biases, MLP ratio 4, so 12 * width ** 2 per block, width 64 * depth): 573,308,928 and 1,365,639,168 (1.4B
# rounded); d12-d12 has 169,869,312 by the same count. flexar's AdaLN modulation and VAE differ in form (the
# flexar.tokenizers.flextok docstring), so the trunks are what is compared.
OFFICIAL_FLEXTOK_TRUNK_PARAMETERS = {
    "flextok-d12-d12": 169_869_312,
    "flextok-d18-d18": 573_308_928,
    "flextok-d18-d28": 1_365_639_168,
}


@pytest.mark.parametrize("name", list(OFFICIAL_FLEXTOK_TRUNK_PARAMETERS))
def test_flextok_presets_have_the_official_trunk_parameter_count(name):
    tokenizer = on_meta(FlexTok, name)
    trunks = sum(parameters(block.attn) + parameters(block.mlp)
                 for transformer in (tokenizer.encoder, tokenizer.decoder) for block in transformer.blocks)
    assert abs(trunks / OFFICIAL_FLEXTOK_TRUNK_PARAMETERS[name] - 1) < 0.01
    if name == "flextok-d18-d18":
        assert abs(trunks / 573e6 - 1) < 0.01  # the reported 573M
    if name == "flextok-d18-d28":
        assert round(trunks / 1e8) / 10 == 1.4  # the reported 1.4B, to its two figures


# -- from YAML -----------------------------------------------------------------------------------------------------
def parsed_cli(tmp_path, tokenizer: dict, arguments=()) -> FlexarCLI:
    """The CLI of ``flexar-train`` (:func:`flexar.train.cli.run`, its parser and settings) after parsing a tiny run
    whose tokenizer entry is `tokenizer`: the model and the data are built, nothing trains."""
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["model"]["init_args"]["tokenizer"] = tokenizer
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(config))
    build = FlexarCLI.__init__
    with pytest.MonkeyPatch.context() as patch:  # LightningCLI(run=False): parse and instantiate, no subcommand
        patch.setattr(FlexarCLI, "__init__", lambda self, *args, **kwargs: build(self, *args, **kwargs, run=False))
        return run(["--config", str(path), *arguments])


TINY = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, depth=1, codebook_size=64, code_dim=8)


def test_from_preset_in_a_yaml_model_config(tmp_path):
    """``class_path: ...TiTok.from_preset`` with the preset in ``init_args`` and the overrides in ``dict_kwargs``."""
    cli = parsed_cli(tmp_path, {"class_path": "flexar.tokenizers.TiTok.from_preset",
                                "init_args": {"name": "titok-tiny"}, "dict_kwargs": TINY},
                     ["--model.init_args.tokenizer.dict_kwargs.num_heads", "2"])
    tokenizer = cli.model.tokenizer
    assert type(tokenizer) is TiTok
    assert tokenizer.config == TiTok.from_preset("titok-tiny", **TINY, num_heads=2).config
    # the preset's own values survive: jsonargparse does not fill the overrides with the constructor's defaults
    assert tokenizer.config["width"] == TiTok.presets["titok-tiny"]["width"] != 128
    # the export names the class and every argument, so load_model rebuilds it
    tokenizer.save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["class"] == "TiTok" and load_model(tmp_path / "export").config == tokenizer.config


def test_from_preset_in_yaml_refuses_unknown_presets_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown TiTok preset 'titok-nope'"):
        parsed_cli(tmp_path, {"class_path": "flexar.tokenizers.TiTok.from_preset", "init_args": {"name": "titok-nope"}})
    with pytest.raises(ValueError, match=r"does not take \['num_latent_token'\]; closest: \['num_latent_tokens'\]"):
        parsed_cli(tmp_path, {"class_path": "flexar.tokenizers.TiTok.from_preset", "init_args": {"name": "titok-tiny"},
                              "dict_kwargs": {"num_latent_token": 8}})


def test_yaml_resolves_the_titok_arguments_a_subclass_forwards(tmp_path):
    own = dict(tail_drop=True, lengths_per_sample=True)
    cli = parsed_cli(tmp_path, {"class_path": "flexar.tokenizers.OneDPiece", "init_args": {**own, **TINY, "width": 32,
                                                                                         "num_heads": 2}})
    tokenizer = cli.model.tokenizer
    assert type(tokenizer) is OneDPiece and tokenizer.lengths_per_sample
    assert tokenizer.width == 32 and tokenizer.max_tokens == 8 and tokenizer.codebook_size == 64
    # jsonargparse knows TiTok's arguments of One-D-Piece: a misspelt one is refused with the closest valid keys
    with pytest.raises(SystemExit):
        parsed_cli(tmp_path, {"class_path": "flexar.tokenizers.OneDPiece", "init_args": {"widht": 32}})


# -- subclasses forward ----------------------------------------------------------------------------------------------
def test_subclasses_take_their_own_switches_and_forward_titok_arguments():
    for cls in (OneDPiece, ReTok):
        own = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert own[-1].kind is inspect.Parameter.VAR_KEYWORD, cls
        assert not {p.name for p in own} & set(inspect.signature(TiTok.__init__).parameters) - {"self", "kwargs"}
    # ReTok gained TiTok's newer switches; every argument is recorded, the forwarded defaults too
    tokenizer = ReTok(**TINY, width=32, num_heads=2, redundant_tokens=4, class_token=True, ln_pre=True, conv_out=True)
    assert tokenizer.decoder_class_token is not None and isinstance(tokenizer.conv_out, torch.nn.Conv2d)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    loss, _ = tokenizer.train().training_loss(images)
    loss.backward()
    assert tokenizer.encoder_class_token.grad is not None and tokenizer.conv_out.weight.grad is not None
    assert tokenizer.eval().reconstruct(images, num_tokens=3).shape == images.shape
    assert set(tokenizer.config) == set(inspect.signature(ReTok.__init__).parameters) - {"self", "kwargs"} | set(
        inspect.signature(TiTok.__init__).parameters) - {"self"}
    assert tokenizer.config["mlp"] == "gelu" and tokenizer.config["redundant_tokens"] == 4
    assert ReTok(**tokenizer.config).config == tokenizer.config
    with pytest.raises(ValueError, match=r"OneDPiece does not take \['widht'\]; closest: \['width'\]"):
        OneDPiece.from_preset("onedpiece-digits", widht=32)


# -- one training_loss signature -------------------------------------------------------------------------------------
def test_every_tokenizer_takes_the_same_training_loss_arguments():
    expected = [("images", inspect.Parameter.empty), ("criterion", None), ("step", 0)]
    for cls in [cls for cls, _ in presets(Tokenizer)] + [VAE]:
        signature = inspect.signature(cls.training_loss)
        assert [(p.name, p.default) for p in list(signature.parameters.values())[1:]] == expected, cls.__name__
    assert TiTok.takes_criterion and VQGAN2D.takes_criterion and MultiScaleVQ.takes_criterion and ReTok.takes_criterion
    assert not (FlexTok.takes_criterion or KARL.takes_criterion or ALIT.takes_criterion or VAE.takes_criterion)


def test_a_family_without_a_pixel_term_refuses_a_criterion_by_name():
    tokenizer = FlexTok(image_size=16, patch_size=4, num_registers=4, width=16, depth=1, num_heads=2).train()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    loss, _ = tokenizer.training_loss(images, criterion=None, step=3)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="FlexTok.training_loss takes no reconstruction criterion"):
        tokenizer.training_loss(images, criterion=object(), step=3)


def test_the_flextok_paper_presets_hold_the_paper_vae():
    vae = on_meta(VAE, "vae-f8c16")
    assert (vae.latent_channels, vae.downsample, vae.latent_size) == (16, 8, 32)
    tokenizer = on_meta(FlexTok, "flextok-d12-d12")
    assert contained(VAE.presets["vae-f8c16"], tokenizer.vae.config)
    # 32 x 32 latents in 2 x 2 patches: 256 patches, as many as the registers
    assert (tokenizer.target_size, tokenizer.num_patches, tokenizer.max_tokens) == (32, 256, 256)
    assert on_meta(VAE, "vae-digits").latent_size == 8
