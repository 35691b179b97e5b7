import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flexar.hub import load_model
from flexar.tokenizers import ReTok
from flexar.tokenizers.losses import VGG_LAYOUTS, vgg_features

from common import TokenizerContract
from test_onedpiece import assert_error_non_increasing_in_k, digit_split, train_briefly


def tiny_retok(**overrides):
    kwargs = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, redundant_tokens=6, width=32, depth=1,
                  num_heads=2, codebook_size=64, code_dim=8, dead_code_threshold=5)
    return ReTok(**{**kwargs, **overrides})


class TinyTeacher(nn.Module):
    """A tiny random frozen CNN: (B, 1, 16, 16) -> (B, 6, 4, 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1))

    def forward(self, images):
        return self.layers(images)


class TestReTok(TokenizerContract):
    def make_tokenizer(self):
        return tiny_retok()


class TestReTokWithTeacher(TokenizerContract):
    def make_tokenizer(self):
        tokenizer = tiny_retok(quantizer="fsq", fsq_levels=[5, 4, 4], teacher="module", teacher_dim=6, alignment_layer=1)
        tokenizer.set_teacher(TinyTeacher())
        return tokenizer

    @pytest.fixture
    def tokenizer(self):
        torch.manual_seed(0)
        return self.make_tokenizer().eval()

    def test_save_load_round_trip(self, tokenizer, images, tmp_path):
        # the teacher is not saved and not needed to encode or decode
        tokenizer.save_pretrained(tmp_path / "tok")
        loaded = ReTok.from_pretrained(tmp_path / "tok").eval()
        assert not any("teacher" in key for key in tokenizer.state_dict())
        encoded = tokenizer.encode(images)
        assert torch.equal(loaded.encode(images).ids, encoded.ids)
        assert torch.equal(loaded.decode(encoded.ids, encoded.lengths), tokenizer.decode(encoded.ids, encoded.lengths))


def test_redundant_queries_are_copies_of_the_tail_with_their_own_positions():
    tokenizer = tiny_retok()
    assert tokenizer.num_queries == 14 and tokenizer.max_tokens == 8
    assert torch.equal(tokenizer.padding_tokens.data, tokenizer.latent_tokens.data[2:8])
    assert tokenizer.padding_pos.shape == (6, 32) and tokenizer.padding_pos.abs().sum() > 0
    assert tokenizer.padding_tokens.data_ptr() != tokenizer.latent_tokens.data_ptr()
    # the padding queries take part in encoding: changing them changes the first N latents
    images = digit_split("test", 2)
    before = tokenizer.encode_latents(images)
    with torch.no_grad():
        tokenizer.padding_pos.add_(1.0)
    assert not torch.allclose(before, tokenizer.encode_latents(images))
    assert before.shape == (2, 8, tokenizer.code_dim)
    with pytest.raises(ValueError, match="redundant_tokens must lie in"):
        tiny_retok(redundant_tokens=9)


def test_keep_rate_per_position():
    tokenizer = tiny_retok().train()
    n, m = 8, 6
    exact = tokenizer.keep_probabilities()
    expected = torch.tensor([(n + m - i + 1) / (n + m) for i in range(1, n + 1)], dtype=torch.float64)
    torch.testing.assert_close(exact, expected)
    torch.manual_seed(0)
    draws = torch.cat([tokenizer.sample_lengths(1, "cpu") for _ in range(20000)])
    assert draws.min() == 1 and draws.max() == n + m
    # token i is kept when min(k, N) >= i
    empirical = torch.stack([(draws.clamp(max=n) >= i).double().mean() for i in range(1, n + 1)])
    assert torch.all((empirical - expected).abs() < 0.015), (empirical, expected)
    # without padding it is plain nested dropout: (N - i + 1) / N
    plain = tiny_retok(redundant_tokens=0).keep_probabilities()
    torch.testing.assert_close(plain, torch.tensor([(n - i + 1) / n for i in range(1, n + 1)], dtype=torch.float64))
    assert tokenizer.eval().sample_lengths(3, "cpu") is None


def test_alignment_weight_non_increasing_in_position():
    for decay in ("linear", "none"):
        weights = tiny_retok(alignment_decay=decay, alignment_weight=0.5).alignment_weights()
        assert weights.shape == (14,) and torch.all(weights[1:] <= weights[:-1]) and torch.all(weights > 0)
        assert weights[0] == pytest.approx(0.5)
    linear = tiny_retok().alignment_weights()
    assert torch.all(linear[1:] < linear[:-1])
    with pytest.raises(ValueError, match="alignment_decay"):
        tiny_retok(alignment_decay="cosine")


def test_alignment_term_uses_the_teacher_and_trains_the_projector(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_retok(teacher="module", teacher_dim=6, alignment_layer=1, alignment_weight=0.5)
    tokenizer.set_teacher(TinyTeacher())
    images = digit_split("train", 8)
    loss, logs = tokenizer.train().training_loss(images)
    assert -1.0 <= logs["alignment"] <= 1.0
    loss.backward()
    assert tokenizer.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tokenizer.teacher().parameters())
    # the teacher's contribution is the weighted alignment
    without, _ = tiny_retok(alignment_weight=0.0).train().training_loss(images)
    assert torch.isfinite(without)
    # a teacher loaded from a path: a narrow VGG stack in a safetensors file (channels of relu5_3: 64)
    torch.manual_seed(0)
    save_file(vgg_features(VGG_LAYOUTS["vgg16-narrow"]).state_dict(), str(tmp_path / "vgg.safetensors"))
    from_path = tiny_retok(teacher=f"vgg16-narrow:{tmp_path / 'vgg.safetensors'}", teacher_dim=64, alignment_layer=1)
    _, logs = from_path.train().training_loss(images)
    assert "alignment" in logs
    wrong_dim = tiny_retok(teacher=f"vgg16-narrow:{tmp_path / 'vgg.safetensors'}", teacher_dim=7, alignment_layer=1)
    with pytest.raises(ValueError, match="teacher_dim is 7"):
        wrong_dim.train().training_loss(images)
    with pytest.raises(ValueError, match="unknown teacher kind"):
        tiny_retok(teacher="dino:x", alignment_layer=1).train().training_loss(images)
    with pytest.raises(ValueError, match="alignment_layer must lie in"):
        tiny_retok(teacher="module", alignment_layer=2)
    with pytest.raises(ValueError, match="no projector"):
        tiny_retok().set_teacher(TinyTeacher())


def test_decoder_output_at_k_ignores_later_ids():
    tokenizer = tiny_retok().eval()
    ids = tokenizer.encode(digit_split("test", 4)).ids
    rng = torch.Generator().manual_seed(3)
    for k in (1, 4, 7):
        other = ids.clone()
        other[:, k:] = torch.randint(0, tokenizer.codebook_size, other[:, k:].shape, generator=rng)
        lengths = torch.full((4,), k)
        torch.testing.assert_close(tokenizer.decode(ids, lengths), tokenizer.decode(other, lengths))


def test_reconstruction_error_non_increasing_in_k():
    torch.manual_seed(0)
    tokenizer = tiny_retok(quantizer="fsq", fsq_levels=[8, 8, 8], lengths_per_sample=True)
    held_out = digit_split("test", 128)
    with torch.no_grad():
        before = torch.mean((tokenizer.eval().reconstruct(held_out) - held_out) ** 2).item()
    errors = assert_error_non_increasing_in_k(train_briefly(tokenizer))
    assert errors[-1] < 0.5 * before


def test_config_presets_and_registry(tmp_path):
    tokenizer = tiny_retok(teacher="vgg16:/nowhere.safetensors", teacher_dim=16, alignment_layer=1)
    assert ReTok(**tokenizer.config).config == tokenizer.config
    assert json.loads(json.dumps(tokenizer.config)) == tokenizer.config
    # building and saving never reads the teacher's file
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_model(tmp_path / "tok")
    assert isinstance(loaded, ReTok) and loaded.redundant_tokens == 6
    assert ReTok.presets["retok-s-s"]["num_latent_tokens"] == 256 and ReTok.presets["retok-s-s"]["redundant_tokens"] == 224
    with pytest.raises(ValueError, match="unknown ReTok preset"):
        ReTok.from_preset("retok-xxl")


def test_tied_padding_tokens_share_the_tail_queries_content():
    torch.manual_seed(0)
    tied = ReTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=32, depth=1, num_heads=2,
                 codebook_size=64, code_dim=8, redundant_tokens=4, tie_padding_tokens=True)
    assert tied.padding_tokens is None and "padding_tokens" not in tied.state_dict()
    assert torch.equal(tied.padding_content(), tied.latent_tokens[4:])
    tied.latent_tokens.data[4:] += 1.0  # moving the tail queries moves the redundant ones with them
    assert torch.equal(tied.padding_content(), tied.latent_tokens[4:])
    untied = ReTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=32, depth=1, num_heads=2,
                   codebook_size=64, code_dim=8, redundant_tokens=4)
    assert untied.padding_tokens is not None and untied.padding_content() is untied.padding_tokens
