"""Saved folders: what load_model returns (eval mode, fingerprint, provenance) and how a bad config.json is refused."""
import inspect
import json
import shutil

import numpy as np
import pytest

from flexar.generators import RasterAR
from flexar.hub import _annotations, _matches, fingerprint, load_model, model_fingerprint, registered
from flexar.tokenizers import TiTok

FINGERPRINT = "ab" * 32


def tiny_tokenizer():
    return TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                 codebook_size=32, code_dim=8)


def tiny_generator():
    return RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2)


def edited(source, folder, edit):
    """A copy of the saved folder `source` whose config.json went through `edit(config)`."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_load_model_returns_eval_mode_with_fingerprint_and_provenance(tmp_path):
    generator = tiny_generator().train()
    tiny_generator().save_pretrained(tmp_path / "plain")
    plain = load_model(tmp_path / "plain")
    assert not plain.training and not any(module.training for module in plain.modules())
    assert plain.provenance == {} and "provenance" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain.fingerprint == fingerprint(tmp_path / "plain") == model_fingerprint(plain)
    assert not RasterAR.from_pretrained(tmp_path / "plain").training

    generator.provenance = {"tokenizer_fingerprint": FINGERPRINT}
    generator.save_pretrained(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["provenance"] == generator.provenance
    loaded = load_model(tmp_path / "trained")
    assert loaded.provenance == generator.provenance
    # the hash of the in-memory model names the folder it writes, provenance included
    assert model_fingerprint(generator) == fingerprint(tmp_path / "trained") == loaded.fingerprint
    assert loaded.fingerprint != plain.fingerprint


@pytest.mark.parametrize("value", [None, "16", 32.5, True, [16]])
def test_a_wrong_type_for_an_int_argument_names_the_file_and_the_field(tmp_path, value):
    tiny_tokenizer().save_pretrained(tmp_path / "ok")
    folder = edited(tmp_path / "ok", tmp_path / "bad", lambda config: config["kwargs"].update(width=value))
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: field 'kwargs.width' of TiTok must be int, got"):
        load_model(folder)


def test_config_fields_are_checked_against_the_annotations(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "ok")
    cases = [
        (lambda c: c["kwargs"].update(decoder_width=None), None),  # int | None takes null
        (lambda c: c["kwargs"].update(commitment=1), None),  # a float takes an int
        (lambda c: c["kwargs"].update(commitment="0.25"), r"field 'kwargs.commitment' of TiTok must be float"),
        (lambda c: c["kwargs"].update(fsq_levels=["8", 5]), r"field 'kwargs.fsq_levels' of TiTok must be list\[int\] \| None"),
        (lambda c: c["kwargs"].update(mlp=3), r"field 'kwargs.mlp' of TiTok must be str, got 3"),
        (lambda c: c.update(kwargs=[1, 2]), r"field 'kwargs' must be an object"),
        (lambda c: c["kwargs"].update(widht=32), r"TiTok does not take \['widht'\]"),
        (lambda c: c.update({"class": "Pickle"}), r"field 'class' names 'Pickle'"),
        (lambda c: c.update(provenance=["x"]), r"field 'provenance' must be an object"),
        (lambda c: c.update(provenance={"tokenizer_fingerprint": "abc"}), r"'provenance.tokenizer_fingerprint' must be a sha256"),
    ]
    for index, (edit, message) in enumerate(cases):
        folder = edited(tmp_path / "ok", tmp_path / f"case{index}", edit)
        if message is None:
            load_model(folder)
            continue
        with pytest.raises(ValueError, match=message) as error:
            load_model(folder)
        assert str(folder / "config.json") in str(error.value)
    tiny_generator().save_pretrained(tmp_path / "gen")
    folder = edited(tmp_path / "gen", tmp_path / "incomplete", lambda c: c["kwargs"].pop("vocab_size"))
    with pytest.raises(ValueError, match=r"field 'kwargs' lacks \['vocab_size'\], which RasterAR requires"):
        load_model(folder)


def test_every_registered_default_fits_its_annotation():
    # a default that contradicted its own annotation would make every folder saved with it unloadable
    for name, cls in registered().items():
        hints = _annotations(cls)
        for key, parameter in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if parameter.default is not inspect.Parameter.empty and key in hints:
                assert _matches(parameter.default, hints[key][0]), (name, key, parameter.default, hints[key][1])



def test_numpy_integers_are_saved_as_ints(tmp_path):
    tokenizer = TiTok(image_size=np.int64(16), channels=1, patch_size=np.int32(4), num_latent_tokens=6, width=32,
                      depth=1, num_heads=2, codebook_size=np.int64(32), code_dim=8, commitment=np.float32(0.5))
    assert type(tokenizer.config["image_size"]) is int and type(tokenizer.config["commitment"]) is float
    tokenizer.save_pretrained(tmp_path / "tok")
    assert load_model(tmp_path / "tok").config == tokenizer.config


def test_from_preset_overrides_replace_preset_values_and_saves_the_full_arguments(tmp_path):
    assert TiTok.presets is not RasterAR.presets and "titok-tiny" in TiTok.presets
    tokenizer = TiTok.from_preset("titok-tiny", image_size=16, channels=1, patch_size=4, num_latent_tokens=6,
                                  depth=1, codebook_size=32, code_dim=8)
    assert tokenizer.config["width"] == TiTok.presets["titok-tiny"]["width"]  # from the preset
    assert tokenizer.config["depth"] == 1 != TiTok.presets["titok-tiny"]["depth"]  # the override wins
    tokenizer.save_pretrained(tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "config.json").read_text())
    # the folder names the class and every constructor argument, never the preset
    assert saved["class"] == "TiTok" and saved["kwargs"] == tokenizer.config
    assert set(saved["kwargs"]) == set(inspect.signature(TiTok.__init__).parameters) - {"self"}
    assert load_model(tmp_path / "tok").config == tokenizer.config


def test_from_preset_refuses_unknown_names_and_arguments_by_name():
    with pytest.raises(ValueError, match=r"unknown TiTok preset 'titok-xxl'; known presets of TiTok: .*titok-tiny"):
        TiTok.from_preset("titok-xxl")
    with pytest.raises(ValueError, match=r"TiTok does not take \['widht'\]; closest: \['width'\]"):
        TiTok.from_preset("titok-tiny", widht=32)
    with pytest.raises(ValueError, match=r"argument 'depth' of TiTok must be int, got \"2\""):
        TiTok.from_preset("titok-tiny", depth="2")


def test_a_saved_config_naming_a_class_outside_flexar_is_refused(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "ok")
    for name in ("os.system", "builtins.eval", "subprocess.Popen", "TiTok.from_preset"):
        folder = edited(tmp_path / "ok", tmp_path / name.replace(".", "_"), lambda c: c.update({"class": name}))
        with pytest.raises(ValueError, match="not a registered flexar model"):
            load_model(folder)


def test_forwarded_arguments_of_a_saved_subclass_are_checked_against_the_parent(tmp_path):
    """ReTok and One-D-Piece take TiTok's arguments through **kwargs: a saved config's TiTok fields are still
    checked by name and type, and a field neither class takes is still refused."""
    from flexar.tokenizers import OneDPiece, ReTok

    small = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                 codebook_size=32, code_dim=8)
    ReTok(**small, redundant_tokens=2).save_pretrained(tmp_path / "retok")
    OneDPiece(**small).save_pretrained(tmp_path / "onedpiece")
    saved = json.loads((tmp_path / "retok" / "config.json").read_text())["kwargs"]
    assert saved["width"] == 32 and saved["mlp"] == "gelu" and saved["redundant_tokens"] == 2  # forwarded ones recorded
    cases = [
        ("retok", lambda c: c["kwargs"].update(width="32"), r"field 'kwargs.width' of ReTok must be int, got \"32\""),
        ("retok", lambda c: c["kwargs"].update(class_token=1), r"field 'kwargs.class_token' of ReTok must be bool"),
        ("retok", lambda c: c["kwargs"].update(redundant_tokens=2.5), r"'kwargs.redundant_tokens' of ReTok must be int"),
        ("onedpiece", lambda c: c["kwargs"].update(fsq_levels="8"), r"'kwargs.fsq_levels' of OneDPiece must be list"),
        ("onedpiece", lambda c: c["kwargs"].update(widht=32), r"OneDPiece does not take \['widht'\]"),
    ]
    for index, (source, edit, message) in enumerate(cases):
        folder = edited(tmp_path / source, tmp_path / f"case{index}", edit)
        with pytest.raises(ValueError, match=message):
            load_model(folder)
    assert load_model(tmp_path / "retok").config == ReTok(**small, redundant_tokens=2).config
