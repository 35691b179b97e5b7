import json

import pytest
import torch

from flexar.hub import load_model
from flexar.tokenizers import TiTok
from flexar.tokenizers.titok import unpatchify

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


class TestTiTokOfficialLayout(TokenizerContract):
    def make_tokenizer(self):
        return tiny_titok(class_token=True, ln_pre=True, conv_out=True)


def test_official_layout_class_token_placement_does_not_change_the_encoder():
    # the official ViT prepends its class token; with full attention and learned positions appending it is the same
    torch.manual_seed(0)
    tokenizer = tiny_titok(class_token=True, ln_pre=True).eval()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    from flexar.tokenizers.titok import patchify

    patches = tokenizer.patch_embed(patchify(images, 4)) + tokenizer.patch_pos
    cls = tokenizer.encoder_class_token.expand(2, 1, -1)
    first = torch.cat([cls, patches, tokenizer.latent_tokens.expand(2, -1, -1)], dim=1)
    hidden = tokenizer.encoder(tokenizer.encoder_ln_pre(first))
    expected = tokenizer.to_code(hidden[:, 1 + tokenizer.num_patches :])
    torch.testing.assert_close(tokenizer.encode_latents(images), expected, atol=1e-5, rtol=1e-5)
    # the class token takes part: without it the latents differ
    tokenizer.encoder_class_token.data.zero_()
    assert not torch.allclose(tokenizer.encode_latents(images), expected, atol=1e-4)


def test_official_layout_switches_build_their_layers_and_cut_keeps_the_class_token():
    plain, official = tiny_titok(), tiny_titok(class_token=True, ln_pre=True, conv_out=True)
    assert plain.encoder_class_token is None and isinstance(plain.conv_out, torch.nn.Identity)
    assert isinstance(official.conv_out, torch.nn.Conv2d) and isinstance(official.decoder_ln_pre, torch.nn.LayerNorm)
    ids = torch.randint(0, 64, (2, 8))
    lengths = torch.tensor([3, 8])
    official.eval()
    assert official.decode(ids, lengths, fill="cut").shape == (2, 1, 16, 16)
    torch.testing.assert_close(official.decode(ids, None, fill="cut"), official.decode(ids, None, fill="pad"))


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
    assert set(TiTok.presets) >= {"titok-s128", "titok-b64", "titok-l32"}
    with pytest.raises(ValueError, match="unknown TiTok preset"):
        TiTok.from_preset("titok-xxl")


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


def trained_looking_titok():
    """A tiny TiTok whose pad embedding differs clearly from every code, so the three fills give different decodes."""
    torch.manual_seed(0)
    tokenizer = tiny_titok().eval()
    with torch.no_grad():
        tokenizer.pad_token.normal_(0, 1.0)
    return tokenizer


def test_fair_fills_at_full_length_are_the_normal_decode():
    tokenizer = trained_looking_titok()
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    ids = tokenizer.encode(images).ids
    tokenizer.fit_mean_fill(ids)
    normal = tokenizer.decode(ids)
    for fill in ("pad", "cut", "mean"):
        assert torch.equal(tokenizer.decode(ids, fill=fill), normal), fill
        assert torch.equal(tokenizer.decode(ids, torch.full((4,), 8), fill=fill), normal), fill


def test_fair_fills_are_deterministic_and_differ_from_pad():
    tokenizer = trained_looking_titok()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    tokenizer.fit_mean_fill(tokenizer.encode(torch.rand(16, 1, 16, 16) * 2 - 1).ids)
    short = tokenizer.encode(images, num_tokens=2)
    decodes = {}
    for fill in ("pad", "cut", "mean"):
        first = tokenizer.decode(short.ids, short.lengths, fill=fill)
        assert first.shape == images.shape and torch.isfinite(first).all()
        assert torch.equal(first, tokenizer.decode(short.ids, short.lengths, fill=fill)), fill
        decodes[fill] = first
    assert not torch.allclose(decodes["cut"], decodes["pad"], atol=1e-4)
    assert not torch.allclose(decodes["mean"], decodes["pad"], atol=1e-4)
    with pytest.raises(ValueError, match=r"fill must be one of \('pad', 'cut', 'mean'\)"):
        tokenizer.decode(short.ids, fill="zeros")


def test_cut_decodes_from_the_kept_tokens_alone():
    tokenizer = trained_looking_titok()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    full = tokenizer.encode(images).ids
    lengths = torch.tensor([2, 5, 8])
    cut = tokenizer.decode(full, lengths, fill="cut")
    # what the dropped positions hold cannot matter: another pad embedding, other ids past lengths
    with torch.no_grad():
        tokenizer.pad_token.normal_(0, 3.0)
    other = full.clone()
    other[0, 2:], other[1, 5:] = 0, 1
    torch.testing.assert_close(tokenizer.decode(other, lengths, fill="cut"), cut, rtol=0, atol=1e-6)
    # and each row equals a decoder run on the physically shortened sequence [N mask tokens; k latents]
    with torch.no_grad():
        for row, k in enumerate(lengths.tolist()):
            codes = tokenizer.quantizer.ids_to_codes(full[row : row + 1, :k])
            latents = tokenizer.from_code(codes) + tokenizer.latent_pos[:k]
            masks = (tokenizer.mask_token + tokenizer.mask_pos)[None]
            out = tokenizer.decoder(torch.cat([masks, latents], dim=1))[:, : tokenizer.num_patches]
            expected = unpatchify(tokenizer.to_pixels(out), tokenizer.patch_size, tokenizer.image_size).clamp(-1, 1)
            torch.testing.assert_close(cut[row : row + 1], expected, rtol=0, atol=1e-5)


def test_mean_fill_is_the_per_position_mean_code():
    tokenizer = trained_looking_titok()
    with pytest.raises(ValueError, match=r"fill='mean'.*fit_mean_fill"):
        tokenizer.decode(torch.zeros(2, 3, dtype=torch.long), fill="mean")
    with pytest.raises(ValueError, match=r"full-length training ids, a \(M >= 1, 8\) long tensor"):
        tokenizer.fit_mean_fill(torch.zeros(4, 3, dtype=torch.long))
    train_ids = tokenizer.encode(torch.rand(32, 1, 16, 16) * 2 - 1).ids
    means = tokenizer.fit_mean_fill(train_ids)
    codes = tokenizer.quantizer.ids_to_codes(train_ids)
    assert means.shape == (8, tokenizer.code_dim)
    torch.testing.assert_close(means, codes.mean(dim=0))
    # decoding k = 3 tokens with fill="mean" is decoding the codes with positions 3.. replaced by those means
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    short = tokenizer.encode(images, num_tokens=3)
    filled = torch.cat([tokenizer.quantizer.ids_to_codes(short.ids), means[3:].expand(2, -1, -1)], dim=1)
    with torch.no_grad():
        expected = tokenizer.decode_codes(filled).clamp(-1, 1)
        torch.testing.assert_close(tokenizer.decode(short.ids, short.lengths, fill="mean"), expected, rtol=0, atol=1e-6)
    # the means are not part of the saved weights (the model's fingerprint does not change)
    assert "mean_fill_codes" not in tokenizer.state_dict()


def test_pad_token_trains_only_where_training_drops_tokens():
    from flexar.tokenizers import OneDPiece, ReTok

    assert not tiny_titok().pad_token.requires_grad  # plain DDP would find it unused
    small = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=32, depth=1, num_heads=2,
                 codebook_size=64, code_dim=8)
    assert OneDPiece(**small).pad_token.requires_grad and ReTok(**small, redundant_tokens=4).pad_token.requires_grad
    tokenizer = tiny_titok().train()
    tokenizer.training_loss(torch.rand(4, 1, 16, 16) * 2 - 1)[0].backward()
    unused = [name for name, p in tokenizer.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
