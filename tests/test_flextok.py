import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from flexar.hub import Configurable, PretrainedMixin, register
from flexar.tokenizers import FlexTok
from flexar.tokenizers.base import sample_lengths
from flexar.tokenizers.flextok import (
    causal_last_mask,
    euler_sample,
    flow_interpolant,
    sample_sigmas,
)

from common import TokenizerContract, digits_batch

ROOT = Path(__file__).resolve().parents[1]


def tiny_flextok(**overrides):
    kwargs = dict(image_size=16, channels=1, patch_size=4, num_registers=8, width=32, depth=1, num_heads=2,
                  decoder_depth=2, fsq_levels=[5, 4, 4], num_steps=6, guidance_scale=1.0)
    return FlexTok(**{**kwargs, **overrides})


def wake(model):
    """Fill the zero-initialised layers (AdaLN-zero, velocity head) so the decoder depends on its inputs."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def images():
    return digits_batch(6, 16, 1)[0]


class TestFlexTok(TokenizerContract):
    def make_tokenizer(self):
        return tiny_flextok()


class TestFlexTokSharedModulation(TokenizerContract):
    def make_tokenizer(self):
        return tiny_flextok(separate_modulation=False, length_sampling="uniform_pow2")


# -- encoder: causal_last --------------------------------------------------------------------------------------------
def test_causal_last_mask_pattern():
    allowed = causal_last_mask(3).dense(6, 6)
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("backend", ["math", "auto"])
def test_first_k_registers_ignore_later_registers(backend, images):
    tokenizer = tiny_flextok(depth=2, attention_backend=backend).eval()
    target = tokenizer.to_target(images)
    with torch.no_grad():
        patches_all, registers_all = tokenizer.encoder_hidden(target)
        for k in (1, 3, 8):
            patches_k, registers_k = tokenizer.encoder_hidden(target, num_registers=k)
            torch.testing.assert_close(registers_k, registers_all[:, :k], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(patches_k, patches_all, atol=1e-6, rtol=1e-5)
        # patch outputs do not depend on the register tokens at all
        tokenizer.register_tokens.add_(1.0)
        patches_moved, registers_moved = tokenizer.encoder_hidden(target)
    torch.testing.assert_close(patches_moved, patches_all, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(registers_moved, registers_all)
    # so encoding k tokens equals truncating the N-token encoding
    full = tokenizer.encode(images)
    assert torch.equal(tokenizer.encode(images, num_tokens=3).ids, full.ids[:, :3])


def test_flex_backend_matches_math(images):
    torch.manual_seed(0)
    reference = wake(tiny_flextok(depth=2, attention_backend="math"))
    flex = tiny_flextok(depth=2, attention_backend="flex").eval()
    flex.load_state_dict(reference.state_dict())
    target = reference.to_target(images)
    with torch.no_grad():  # one sequence length: each new FlexAttention shape costs seconds on CPU
        for got, want in zip(flex.encoder_hidden(target), reference.encoder_hidden(target)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(flex.encode(images).ids, reference.encode(images).ids)


# -- nested dropout ----------------------------------------------------------------------------------------------------
def test_length_sampler_supports():
    draws = {mode: sample_lengths(4000, 16, mode, generator=seeded(1)) for mode in ("uniform", "pow2", "uniform_pow2")}
    assert set(draws["uniform"].tolist()) == set(range(1, 17))
    assert set(draws["pow2"].tolist()) == {1, 2, 4, 8, 16}
    assert set(draws["uniform_pow2"].tolist()) == {1, 2, 4, 8, 16}
    # uniform_pow2 rounds a uniform draw up to a power of two: P(2^j) = 2^(j-1) / N, P(1) = 1 / N
    frequencies = torch.bincount(draws["uniform_pow2"], minlength=17).float() / 4000
    for value, probability in ((1, 1 / 16), (2, 1 / 16), (4, 2 / 16), (8, 4 / 16), (16, 8 / 16)):
        assert abs(frequencies[value] - probability) < 0.03, (value, frequencies[value])
    frequencies = torch.bincount(draws["pow2"], minlength=17).float() / 4000
    assert all(abs(frequencies[v] - 0.2) < 0.03 for v in (1, 2, 4, 8, 16))
    assert torch.equal(sample_lengths(50, 16, "pow2", generator=seeded(7)), sample_lengths(50, 16, "pow2", generator=seeded(7)))
    with pytest.raises(ValueError, match="power-of-two"):
        sample_lengths(4, 12, "pow2")
    with pytest.raises(ValueError, match="unknown length sampling"):
        sample_lengths(4, 16, "geometric")
    assert set(sample_lengths(2000, 12, "uniform", generator=seeded(2)).tolist()) == set(range(1, 13))


def test_decoder_output_at_k_ignores_ids_from_k_on():
    tokenizer = wake(tiny_flextok())
    ids = torch.randint(0, tokenizer.codebook_size, (3, 8), generator=seeded(1))
    other = ids.clone()
    other[:, 3:] = torch.randint(0, tokenizer.codebook_size, (3, 5), generator=seeded(2))
    lengths = torch.full((3,), 3)
    for guidance in (1.0, 3.0):
        out = tokenizer.decode(ids, lengths, generator=seeded(5), guidance_scale=guidance)
        torch.testing.assert_close(tokenizer.decode(other, lengths, generator=seeded(5), guidance_scale=guidance), out)
        # a truncated sequence decodes like the full one with lengths = 3 (both pad with the mask token)
        torch.testing.assert_close(tokenizer.decode(ids[:, :3], generator=seeded(5), guidance_scale=guidance), out)
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1) % tokenizer.codebook_size
    assert not torch.allclose(tokenizer.decode(changed, lengths, generator=seeded(5)), tokenizer.decode(ids, lengths, generator=seeded(5)))
    # per-row lengths: row i keeps its own prefix
    mixed = torch.tensor([1, 4, 8])
    rows = tokenizer.decode(ids, mixed, generator=seeded(5))
    for row, length in enumerate(mixed.tolist()):
        uniform = tokenizer.decode(ids[:, :length], generator=seeded(5))
        torch.testing.assert_close(rows[row], uniform[row], atol=1e-5, rtol=1e-5)


def test_default_num_tokens_and_decode_arguments(images):
    tokenizer = wake(tiny_flextok(default_num_tokens=2))
    encoded = tokenizer.encode(images)
    assert encoded.ids.shape == (images.shape[0], 2) and torch.all(encoded.lengths == 2)
    assert tokenizer.encode(images, num_tokens=5).ids.shape[1] == 5
    first = tokenizer.decode(encoded.ids, generator=seeded(4))
    assert torch.equal(first, tokenizer.decode(encoded.ids, generator=seeded(4)))
    assert not torch.allclose(first, tokenizer.decode(encoded.ids, generator=seeded(9)))
    assert torch.equal(tokenizer.decode(encoded.ids), tokenizer.decode(encoded.ids))  # default generator is seeded
    state = torch.get_rng_state()
    tokenizer.decode(encoded.ids, num_steps=2)
    assert torch.equal(torch.get_rng_state(), state), "decoding must not touch the global RNG"


def test_guidance_uses_the_null_condition():
    tokenizer = wake(tiny_flextok())
    codes = tokenizer.quantizer.ids_to_codes(torch.randint(0, tokenizer.codebook_size, (2, 8), generator=seeded(1)))
    null = tokenizer.decode_codes(codes, torch.zeros(2, dtype=torch.long), seeded(3))
    # scale 0 keeps only the null branch (every register = mask token), scale 1 only the conditional one
    torch.testing.assert_close(tokenizer.decode_codes(codes, None, seeded(3), guidance_scale=0.0), null, atol=1e-5, rtol=1e-5)
    conditional = tokenizer.decode_codes(codes, None, seeded(3), guidance_scale=1.0)
    guided = tokenizer.decode_codes(codes, None, seeded(3), guidance_scale=2.0, num_steps=1)
    # one Euler step from sigma = 1 is linear in the velocity: guided = null + 2 * (conditional - null)
    one_conditional = tokenizer.decode_codes(codes, None, seeded(3), num_steps=1)
    one_null = tokenizer.decode_codes(codes, torch.zeros(2, dtype=torch.long), seeded(3), num_steps=1)
    torch.testing.assert_close(guided, one_null + 2.0 * (one_conditional - one_null), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(conditional, null)


def test_training_drops_registers_for_the_null_condition(images):
    tokenizer = tiny_flextok(null_condition_prob=0.5)
    torch.manual_seed(0)
    seen = []
    original = tokenizer.decoder_registers
    tokenizer.decoder_registers = lambda codes, keep: seen.append(keep.clone()) or original(codes, keep)
    for _ in range(5):
        tokenizer.training_loss(images)
    keeps = torch.cat(seen)
    assert (keeps == 0).any() and (keeps > 0).any()
    assert set(keeps[keeps > 0].tolist()) <= {1, 2, 4, 8}


# -- rectified flow ----------------------------------------------------------------------------------------------------
def test_flow_interpolant_and_velocity():
    x, noise = torch.randn(4, 5, 3, generator=seeded(1)), torch.randn(4, 5, 3, generator=seeded(2))
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t, velocity = flow_interpolant(x, noise, sigma)
    torch.testing.assert_close(x_t, sigma.view(-1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1)) * x)
    torch.testing.assert_close(x_t[0], x[0])
    torch.testing.assert_close(x_t[3], noise[3])
    torch.testing.assert_close(velocity, noise - x)
    step = 1e-3  # the velocity is the derivative of the path in sigma
    ahead, _ = flow_interpolant(x, noise, sigma.clamp(max=1 - step) + step)
    behind, _ = flow_interpolant(x, noise, sigma.clamp(max=1 - step))
    torch.testing.assert_close((ahead - behind) / step, velocity, atol=1e-3, rtol=1e-3)
    # on a straight path one Euler step is exact
    torch.testing.assert_close(euler_sample(lambda current, s: noise - x, noise, 1), x)


def test_euler_converges_with_more_steps():
    noise = torch.randn(8, 4, generator=seeded(0))
    rate = 1.5  # dx/dsigma = rate * cos(sigma) * x, so x(0) = x(1) * exp(-rate * sin(1))
    exact = noise * math.exp(-rate * math.sin(1.0))
    errors = []
    for steps in (1, 2, 4, 8, 16, 32, 64):
        result = euler_sample(lambda x, sigma: rate * torch.cos(sigma)[:, None] * x, noise, steps)
        errors.append((result - exact).abs().max().item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0]
    assert 1.6 < errors[-2] / errors[-1] < 2.4, errors  # first-order method
    with pytest.raises(ValueError, match="num_steps"):
        euler_sample(lambda x, sigma: x, noise, 0)


def test_sigmas_are_logit_normal():
    sigmas = sample_sigmas(20000, mean=0.5, std=0.8, generator=seeded(0))
    assert 0 < sigmas.min() and sigmas.max() < 1
    logits = torch.log(sigmas / (1 - sigmas))
    assert abs(logits.mean() - 0.5) < 0.03 and abs(logits.std() - 0.8) < 0.03


# -- REPA --------------------------------------------------------------------------------------------------------------
@register
class TinyFeatureNet(Configurable, PretrainedMixin, nn.Module):
    """A small random frozen CNN standing in for DINOv2: (B, 1, 16, 16) -> (B, 6, 8, 8)."""

    def __init__(self, channels: int = 1, features: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(channels, features, 3, stride=2, padding=1)

    def forward(self, images):
        return torch.tanh(self.conv(images))


def test_alignment_with_a_teacher_folder(images, tmp_path):
    torch.manual_seed(0)
    TinyFeatureNet().save_pretrained(tmp_path / "teacher")
    tokenizer = tiny_flextok(teacher=str(tmp_path / "teacher"), alignment_weight=0.5, alignment_layer=1, projector_dim=16)
    assert tokenizer.projector[-1].out_features == 6
    assert not any("teacher" in name for name in tokenizer.state_dict())
    loss, logs = tokenizer.training_loss(images)
    assert torch.isfinite(logs["alignment"]) and 0 <= logs["alignment"] <= 2
    torch.testing.assert_close(loss.detach(), logs["flow"] + 0.5 * logs["alignment"])
    loss.backward()
    assert tokenizer.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tokenizer._teacher.parameters())
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = FlexTok.from_pretrained(tmp_path / "tok")
    torch.testing.assert_close(loaded.state_dict()["projector.0.weight"], tokenizer.projector[0].weight.detach())


def test_alignment_with_a_callable_teacher(images):
    tokenizer = tiny_flextok(teacher_dim=4, alignment_weight=1.0, projector_dim=16)
    with pytest.raises(ValueError, match="no REPA teacher"):
        tokenizer.training_loss(images)
    # tokens (B, h * w, C) are accepted too
    tokenizer.set_teacher(lambda x: torch.nn.functional.avg_pool2d(x, 4).flatten(2).transpose(1, 2).repeat(1, 1, 4))
    loss, logs = tokenizer.training_loss(images)
    assert "alignment" in logs and torch.isfinite(loss)
    with pytest.raises(ValueError, match="needs teacher"):
        tiny_flextok(alignment_weight=1.0)
    with pytest.raises(ValueError, match="no REPA projector"):
        tiny_flextok().set_teacher(lambda x: x)


# -- saved folders -----------------------------------------------------------------------------------------------------
def test_a_saved_vae_target_flextok_loads_without_its_vae_folder_from_any_directory(images, tmp_path, monkeypatch):
    import shutil

    from flexar.hub import fingerprint, model_fingerprint
    from flexar.tokenizers import VAE

    torch.manual_seed(0)
    (tmp_path / "project").mkdir()
    VAE(image_size=16, channels=1, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
        mid_block_attention=False).save_pretrained(tmp_path / "project" / "vae")
    monkeypatch.chdir(tmp_path / "project")  # a relative vae_path, as the configs give it
    tokenizer = wake(tiny_flextok(patch_size=2, target="vae", vae_path="vae"))
    tokenizer.save_pretrained(tmp_path / "project" / "flextok")
    saved = json.loads((tmp_path / "project" / "flextok" / "config.json").read_text())["kwargs"]
    assert saved["vae_path"] is None and saved["vae_config"]["class"] == "VAE"
    assert saved["vae_config"]["kwargs"] == tokenizer.vae.config
    encoded = tokenizer.encode(images, num_tokens=4)
    decoded = tokenizer.decode(encoded.ids, generator=seeded(1))

    # another machine: the folder moved, the VAE folder gone, another working directory
    shutil.move(tmp_path / "project" / "flextok", tmp_path / "moved")
    shutil.rmtree(tmp_path / "project")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = FlexTok.from_pretrained(tmp_path / "moved")
    assert not loaded.training and not loaded.vae.training
    assert not any(parameter.requires_grad for parameter in loaded.vae.parameters())
    assert torch.equal(loaded.encode(images, num_tokens=4).ids, encoded.ids)
    torch.testing.assert_close(loaded.decode(encoded.ids, generator=seeded(1)), decoded, rtol=0, atol=0)
    # the loaded model saves the same folder again
    assert model_fingerprint(loaded) == fingerprint(tmp_path / "moved") == loaded.fingerprint
    with pytest.raises(ValueError, match="exactly one of vae_path"):
        tiny_flextok(patch_size=2, target="vae", vae_path="vae", vae_config=saved["vae_config"])


def test_a_saved_flextok_does_not_reread_its_teacher(images, tmp_path, monkeypatch):
    import shutil

    torch.manual_seed(0)
    TinyFeatureNet().save_pretrained(tmp_path / "teacher")
    tokenizer = tiny_flextok(teacher=str(tmp_path / "teacher"), alignment_weight=0.5, alignment_layer=1, projector_dim=16)
    tokenizer.save_pretrained(tmp_path / "tok")
    shutil.rmtree(tmp_path / "teacher")
    loaded = FlexTok.from_pretrained(tmp_path / "tok")
    assert loaded.config["teacher"] is None and loaded.config["teacher_dim"] == 6
    torch.testing.assert_close(loaded.projector[-1].weight, tokenizer.projector[-1].weight.detach())
    with pytest.raises(ValueError, match="no REPA teacher"):
        loaded.training_loss(images)


# -- construction ------------------------------------------------------------------------------------------------------
def test_config_presets_and_bad_arguments():
    tokenizer = tiny_flextok()
    assert FlexTok(**tokenizer.config).config == tokenizer.config
    assert json.loads(json.dumps(tokenizer.config)) == tokenizer.config
    assert tokenizer.codebook_size == 80 and tokenizer.max_tokens == 8
    assert FlexTok(image_size=16, patch_size=4, num_registers=4, width=16, depth=1, num_heads=2).codebook_size == 64000
    assert set(FlexTok.presets) >= {"flextok-d12-d12", "flextok-d18-d18", "flextok-d18-d28", "flextok-tiny"}
    assert FlexTok.from_preset("flextok-tiny", image_size=16, num_registers=4).decoder_width == 64
    with pytest.raises(ValueError, match="unknown FlexTok preset"):
        FlexTok.from_preset("flextok-d99")
    for bad, message in (
        (dict(length_sampling="pow2", num_registers=6), "power-of-two"),
        (dict(length_sampling="exponential"), "unknown length_sampling"),
        (dict(target="dino"), "unknown target"),
        (dict(target="vae"), "needs exactly one of vae_path"),
        (dict(patch_size=3), "divisible by patch_size"),
        (dict(default_num_tokens=9), "default_num_tokens"),
        (dict(null_condition_prob=1.0), "null_condition_prob"),
    ):
        with pytest.raises(ValueError, match=message):
            tiny_flextok(**bad)


@pytest.mark.parametrize("files", [["tokenizers/flextok.yaml"], ["tokenizers/flextok.yaml", "data/mnist.yaml", "tokenizers/mnist/flextok.yaml"]])
def test_configs_build_the_tokenizer(files):
    from test_configs import composed

    config = composed(*files)
    tokenizer = config["model"]["init_args"]["tokenizer"]
    assert tokenizer["class_path"] == "flexar.tokenizers.FlexTok"
    model = FlexTok(**tokenizer["init_args"])
    assert model.image_size == config["data"]["init_args"]["image_size"]


# -- after a short training --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """A tiny FlexTok trained 300 steps on 512 digits (a few seconds on one core).

    ``sigma_mean=1.0`` puts more of the training on high noise levels, where the registers carry the most
    information, so that the decoder starts using them within this budget; ``qk_norm`` off for the same reason.
    """
    from flexar.data import build_dataset

    train = build_dataset("digits", "train", image_size=16, channels=1)
    held_out = build_dataset("digits", "test", image_size=16, channels=1)
    train_images = torch.stack([train[i][0] for i in range(512)])
    held_out_images = torch.stack([held_out[i][0] for i in range(32)])
    torch.manual_seed(0)
    tokenizer = FlexTok(image_size=16, channels=1, patch_size=4, num_registers=8, width=32, depth=1, num_heads=2,
                        decoder_depth=2, qk_norm=False, fsq_levels=[8, 8, 8, 5, 5, 5], sigma_mean=1.0,
                        null_condition_prob=0.0, num_steps=8, guidance_scale=1.0)
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = tokenizer.training_loss(train_images[torch.randint(0, 512, (32,), generator=order)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokenizer.eval()
    counts = (1, 2, 4, 8)
    samples = {}  # k -> (seeds, B, C, H, W) decoded from the same noise for every k
    with torch.no_grad():
        for k in counts:
            encoded = tokenizer.encode(held_out_images, num_tokens=k)
            samples[k] = torch.stack([tokenizer.decode(encoded.ids, generator=seeded(s)) for s in range(3)])
    return held_out_images, samples


def test_reconstruction_error_non_increasing_in_k(trained):
    images, samples = trained
    errors = [((samples[k] - images) ** 2).mean().item() for k in sorted(samples)]
    assert all(later <= earlier + 2e-3 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0], errors


def test_timestep_max_period_switch_changes_the_time_features():
    from flexar.nn import timestep_embedding

    sigma = torch.tensor([0.3])
    assert not torch.allclose(timestep_embedding(sigma, 16, 256.0), timestep_embedding(sigma, 16, 10000.0))
    tokenizer = tiny_flextok(timestep_max_period=256.0)
    assert tokenizer.config["timestep_max_period"] == 256.0 and tokenizer.timestep_max_period == 256.0
