import json

import pytest
import torch

from flexar.hub import load_model
from flexar.tokenizers import TITOK_PRESETS, TiTok, titok_from_preset

from common import TokenizerContract


def tiny_titok(**overrides):
    kwargs = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=32, depth=1, num_heads=2,
                  codebook_size=64, code_dim=8, dead_code_threshold=5)
    return TiTok(**{**kwargs, **overrides})


class TestTiTok(TokenizerContract):
    def make_tokenizer(self):
        return tiny_titok()


class TestTiTokFSQ(TokenizerContract):
    def make_tokenizer(self):
        return tiny_titok(quantizer="fsq", fsq_levels=[5, 4, 4])


def test_fixed_length_and_truncation():
    tokenizer = tiny_titok().eval()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    full = tokenizer.encode(images)
    assert full.ids.shape == (3, 8) and torch.all(full.lengths == 8)
    short = tokenizer.encode(images, num_tokens=3)
    assert torch.equal(short.ids, full.ids[:, :3]) and torch.all(short.lengths == 3)
    # decoding a truncated sequence equals decoding the full one with lengths = 3 (the tail is padding)
    torch.testing.assert_close(tokenizer.decode(short.ids), tokenizer.decode(full.ids, torch.full((3,), 3)))


def test_config_rebuilds_and_presets():
    tokenizer = tiny_titok()
    rebuilt = TiTok(**tokenizer.config)
    assert rebuilt.config == tokenizer.config
    assert json.loads(json.dumps(tokenizer.config)) == tokenizer.config
    assert set(TITOK_PRESETS) >= {"titok-s", "titok-b", "titok-l"}
    with pytest.raises(ValueError, match="unknown TiTok preset"):
        titok_from_preset("titok-xxl")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny_titok(image_size=18)
    with pytest.raises(ValueError, match="unknown quantizer"):
        tiny_titok(quantizer="rvq")


def test_refuses_files_that_are_not_what_they_claim(tmp_path):
    folder = tmp_path / "tok"
    tiny_titok().save_pretrained(folder)
    # a pickle posing as safetensors is refused before anything in it runs
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    (folder / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not a safetensors file|not a valid safetensors"):
        TiTok.from_pretrained(folder)
    assert not (tmp_path / "pwned").exists()
    # a config naming a class flexar does not know (or arbitrary code) is refused
    tiny_titok().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "class": "os.system"}))
    with pytest.raises(ValueError, match="not a registered flexar"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "kwargs": {**config["kwargs"], "widht": 3}}))
    with pytest.raises(ValueError, match=r"does not take \['widht'\]"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "missing")
