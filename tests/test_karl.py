"""KARL: single-pass adaptive-length tokenizer over a frozen VQGAN2D (flexar/tokenizers/karl.py).

The helpers here (a briefly trained tiny base, flat and noise images) are shared with test_alit.py.
"""
import functools
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from flexar.tokenizers import KARL, VQGAN2D
from flexar.tokenizers.alit import two_way_mask
from flexar.tokenizers.karl import OFFICIAL_ERROR_BINS

from common import TokenizerContract, digits_batch

ROOT = Path(__file__).resolve().parents[1]
LEVELS = torch.tensor([-0.75, -0.25, 0.25, 0.75])
BASE_KWARGS = dict(image_size=16, channels=1, downsample=4, width=8, channel_multipliers=[1, 1, 1], num_res_blocks=0,
                   codebook_size=16, code_dim=8)


def flat_images(count=4, levels=LEVELS):
    """(count, 1, 16, 16) constant images, cycling through `levels`."""
    return levels[torch.arange(count) % len(levels)].view(count, 1, 1, 1).expand(count, 1, 16, 16).contiguous()


def cell_noise(count=4, seed=2):
    """(count, 1, 16, 16) images with an independent random level in every 4x4 cell of the base grid."""
    generator = torch.Generator().manual_seed(seed)
    levels = LEVELS[torch.randint(len(LEVELS), (count, 1, 4, 4), generator=generator)]
    return levels.repeat_interleave(4, 2).repeat_interleave(4, 3)


def pixel_noise(count=4, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 16, 16, generator=generator) * 2 - 1


def base_training_images():
    return torch.cat([digits_batch(8, 16)[0], flat_images(4), cell_noise(4)])


@functools.lru_cache(maxsize=None)
def trained_base_state() -> dict:
    """A tiny VQGAN2D fitted to `base_training_images` (100 full-batch steps; the images of the tokenizer contract,
    the flat images and the cell noise are among them), computed once per test process."""
    torch.manual_seed(0)
    base = VQGAN2D(**BASE_KWARGS)
    images = base_training_images()
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-2, weight_decay=0.0)
    base.train()
    for _ in range(100):
        loss, _ = base.training_loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in base.state_dict().items()}


def base_config():
    return {"class": "VQGAN2D", "kwargs": VQGAN2D(**BASE_KWARGS).config}


def with_trained_base(tokenizer):
    tokenizer.base.load_state_dict(trained_base_state())
    return tokenizer


def saved_base(folder, trained=True):
    """Write the tiny base to `folder` (trained or at its initialisation) and return the folder as a str."""
    torch.manual_seed(0)
    base = VQGAN2D(**BASE_KWARGS)
    if trained:
        base.load_state_dict(trained_base_state())
    base.save_pretrained(folder)
    return str(folder)


def tiny_karl(**overrides):
    kwargs = dict(base_config=base_config(), max_tokens=8, token_step=1, estimate_max_tokens=11, width=32, depth=1,
                  num_heads=2, codebook_size=64, code_dim=8, halting_width=32, dead_code_threshold=5)
    return with_trained_base(KARL(**{**kwargs, **overrides}))


class CountCalls:
    """Counts the forward calls of a module (a forward hook); `count` is the number so far."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.count += 1


class TestKARLContract(TokenizerContract):
    def make_tokenizer(self):
        return tiny_karl()


# -- conditioning, halting and the single pass -----------------------------------------------------------------------
def test_desired_error_rounds_up_to_its_bin():
    tokenizer = tiny_karl().eval()
    bins = torch.tensor(OFFICIAL_ERROR_BINS)
    errors = torch.tensor([0.0, 0.005, 0.0051, 0.05, 0.085, 0.38, 0.5])
    index = tokenizer.error_index(errors)
    assert bins[index].tolist() == pytest.approx([0.005, 0.005, 0.01, 0.05, 0.09, 0.38, 0.38])
    with pytest.raises(ValueError, match="desired_error must be a non-negative float"):
        tokenizer.encode(flat_images(2), desired_error=-0.1)
    with pytest.raises(ValueError, match=r"desired_error must be .* \(2,\) tensor"):
        tokenizer.encode(flat_images(2), desired_error=torch.tensor([0.1, 0.2, 0.3]))


def test_halting_head_is_layernorm_linear_tanh_linear():
    import inspect

    tokenizer = tiny_karl()
    layers = [type(layer) for layer in tokenizer.halting_head]
    assert layers == [torch.nn.LayerNorm, torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear]
    assert tokenizer.halting_head[1].out_features == 32 and tokenizer.halting_head[3].out_features == 1
    defaults = {name: p.default for name, p in inspect.signature(KARL.__init__).parameters.items()}
    assert defaults["halting_threshold"] == 0.75 and defaults["halting_width"] == 512


def test_encode_is_one_encoder_pass_with_per_image_lengths(monkeypatch):
    tokenizer = tiny_karl().eval()
    images = torch.cat([flat_images(3), pixel_noise(3)])
    encoder_calls, base_calls = CountCalls(tokenizer.encoder), CountCalls(tokenizer.base.encoder)
    # halting that depends on the image: the last latents of the noisy images are over the threshold
    probabilities = torch.full((6, 8), 0.1)
    probabilities[3:, 5:] = 0.9
    monkeypatch.setattr(tokenizer, "halting_logits",
                        lambda hidden: torch.logit(probabilities[: len(hidden), : hidden.shape[1]]))
    for desired in (0.05, torch.linspace(0.01, 0.3, 6)):
        encoder_calls.count = base_calls.count = 0
        encoded = tokenizer.encode(images, desired_error=desired)
        assert encoder_calls.count == 1 and base_calls.count == 1
        assert encoded.lengths.tolist() == [8, 8, 8, 5, 5, 5]
        assert encoded.ids.shape == (6, 8) and bool((encoded.ids[3:, 5:] == 0).all())
    encoder_calls.count = 0
    assert tokenizer.encode(images, num_tokens=3).lengths.tolist() == [3] * 6
    assert encoder_calls.count == 1


def test_lengths_are_one_past_the_last_active_latent():
    tokenizer = tiny_karl()
    halted = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    assert tokenizer.active_lengths(halted).tolist() == [4, 2, 3, 1, 2]


def test_halted_latents_are_masked_out_of_decoder_attention_both_ways():
    keep = torch.tensor([[True, False, True], [True, True, True]])
    mask = two_way_mask(keep, num_cells=2)[:, 0]  # (B, 5, 5): [2 grid tokens, 3 latents]
    halted = 2 + 1  # the second latent of row 0
    assert not mask[0, halted, [0, 1, 2, 4]].any() and not mask[0, [0, 1, 2, 4], halted].any()
    assert mask[0, halted, halted]  # it still attends to itself
    assert bool(mask[1].all()) and int(mask[0].sum()) == 16 + 1
    # the decoder's grid outputs never read a latent past `lengths` (nor a halted one)
    tokenizer = tiny_karl().eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([3, 6])
    changed = ids.clone()
    changed[0, 3:], changed[1, 6:] = 5, 7
    assert torch.equal(tokenizer.decode(ids, lengths), tokenizer.decode(changed, lengths))
    assert torch.allclose(tokenizer.decode(ids[:1, :3]), tokenizer.decode(ids[:1], lengths[:1]), atol=1e-5)


# -- the two-phase training step -------------------------------------------------------------------------------------
def spy_on_training_step(tokenizer, monkeypatch, budget):
    """Record what one training step feeds each phase."""
    calls = {"encode": [], "halting_targets": [], "keep": [], "achieved": [], "decoded_without_grad": []}
    monkeypatch.setattr(tokenizer, "sample_budget", lambda: budget)
    encode_hidden, halting_loss = tokenizer.encode_hidden, tokenizer.halting_loss
    decode_logits = tokenizer.decode_logits

    def encode_spy(tokens, error_index, count):
        calls["encode"].append((error_index.clone(), count))
        return encode_hidden(tokens, error_index, count)

    def halting_spy(logits, targets):
        calls["halting_targets"].append(targets)
        return halting_loss(logits, targets)

    def decode_spy(codes, keep=None):
        calls["keep"].append(keep)
        return decode_logits(codes, keep)

    monkeypatch.setattr(tokenizer, "encode_hidden", encode_spy)
    monkeypatch.setattr(tokenizer, "halting_loss", halting_spy)
    monkeypatch.setattr(tokenizer, "decode_logits", decode_spy)
    original_images, original_error = tokenizer.images_from_logits, tokenizer.reconstruction_error

    def images_spy(logits):
        calls["decoded_without_grad"].append(not torch.is_grad_enabled())
        return original_images(logits)

    def error_spy(images, reconstructions):
        achieved = original_error(images, reconstructions)
        calls["achieved"].append(achieved)
        return achieved

    monkeypatch.setattr(tokenizer, "images_from_logits", images_spy)
    monkeypatch.setattr(tokenizer, "reconstruction_error", error_spy)
    return calls


@pytest.mark.parametrize("budget", [3, 8, 11])
def test_phase_targets(budget, monkeypatch):
    torch.manual_seed(0)
    tokenizer = tiny_karl().train()
    images = torch.cat([flat_images(3), cell_noise(3)])
    calls = spy_on_training_step(tokenizer, monkeypatch, budget)
    loss, logs = tokenizer.training_loss(images)
    loss.backward()

    (phase1_bins, phase1_budget), (phase2_bins, phase2_budget) = calls["encode"]
    # phase 1: a random budget T, target errors from the categorical (only bins <= 0.04 at first), targets all 0
    assert phase1_budget == budget and float(tokenizer.error_bins[phase1_bins].max()) <= 0.04
    targets1, targets2 = calls["halting_targets"]
    assert targets1.shape == (6, budget) and not targets1.any()
    assert calls["keep"][0] is None  # nothing is halted in the decoder in phase 1
    # the achieved error: from the soft code, without gradient
    (achieved,) = calls["achieved"]
    assert calls["decoded_without_grad"] == [True] and not achieved.requires_grad
    # phase 2: the full budget, conditioned on the achieved error rounded up to its bin
    assert phase2_budget == tokenizer.max_tokens == 8
    bins = tokenizer.error_bins
    expected = [min(i for i, b in enumerate(bins.tolist()) if b >= e) if e <= bins[-1] else len(bins) - 1
                for e in achieved.tolist()]
    assert phase2_bins.tolist() == expected
    assert bool((bins[phase2_bins] >= torch.minimum(achieved, bins[-1])).all())
    # halting targets: 1 on the latents beyond T, 0 before (all 0 when T >= the budget)
    halted_from = min(budget, 8)
    assert targets2.shape == (6, 8)
    assert not targets2[:, :halted_from].any() and bool(targets2[:, halted_from:].all())
    # the phase-2 decoder sees the hard halting mask p > 0.75 of the phase-2 probabilities
    assert calls["keep"][1].shape == (6, 8) and calls["keep"][1].dtype == torch.bool
    assert logs["estimate_budget"] == budget and torch.isfinite(loss)


def test_halting_loss_is_the_official_pair_of_means():
    tokenizer = tiny_karl()
    logits = torch.tensor([[0.0, 1.0, -2.0, 3.0]])
    targets = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(logits[:, :2], targets[:, :2]) + bce(logits[:, 2:], targets[:, 2:])
    assert torch.allclose(tokenizer.halting_loss(logits, targets), expected)
    zeros = torch.zeros_like(logits)
    assert torch.allclose(tokenizer.halting_loss(logits, zeros), bce(logits, zeros))


def test_target_error_distribution_adapts_to_the_best_achieved_error(monkeypatch):
    torch.manual_seed(0)
    tokenizer = tiny_karl().train()
    initial = tokenizer.error_bin_probs.clone()
    assert torch.allclose(initial[:5], torch.full((5,), 0.2)) and not initial[5:].any()  # uniform over bins <= 0.04
    # bins at or above the batch's best error are multiplied by 0.99, then the distribution is renormalised
    tokenizer.update_error_distribution(torch.tensor([0.3, 0.015, 0.2]))
    expected = initial * torch.tensor([1.0, 1.0] + [0.99] * 17)
    assert torch.allclose(tokenizer.error_bin_probs, expected / expected.sum())
    # the training step decays with its phase-1 achieved errors
    calls = spy_on_training_step(tokenizer, monkeypatch, budget=4)
    updates = []
    update = tokenizer.update_error_distribution
    monkeypatch.setattr(tokenizer, "update_error_distribution",
                        lambda achieved: updates.append(achieved) or update(achieved))
    tokenizer.training_loss(torch.cat([flat_images(2), cell_noise(2)]))
    assert len(updates) == 1 and updates[0] is calls["achieved"][0]
    # eval mode and gradient-free steps leave the distribution alone
    before = tokenizer.error_bin_probs.clone()
    tokenizer.eval().training_loss(flat_images(2))
    with torch.no_grad():
        tokenizer.train().training_loss(flat_images(2))
    assert torch.equal(tokenizer.error_bin_probs, before) and len(updates) == 1
    # the distribution is saved with the model (a resumed or exported run keeps it)
    assert "error_bin_probs" in tokenizer.state_dict()


# -- allocation learned from the phase-2 targets ---------------------------------------------------------------------
# Fitting the whole tokenizer until its reconstruction error depends on the token count takes far longer than a unit
# test may run on a CPU, so the allocation is learned here from the phase-2 objective itself, with the achieved error
# of each (image, T) given by a complexity curve: noise stays 7.7 times above flat images at every budget, each
# halving per extra token. Every (image, T) pair trains at once; the conditions (achieved error rounded up to its
# bin) and the targets (1 beyond T) are KARL's own, those test_phase_targets checks in the real training step. The
# lengths are read back on the fitted images, in one encoder pass each.
BINS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32]


def flat_levels(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 1, 1, 1, generator=generator) * 1.6 - 0.8).expand(count, 1, 16, 16).contiguous()


def achieved_error(images, budget):
    complexity = torch.where(images.flatten(1).std(dim=1) > 0.1, 0.3, 0.039)
    return complexity / 2 ** (budget - 1)


@pytest.fixture(scope="module")
def allocating_karl():
    torch.manual_seed(0)
    tokenizer = KARL(base_config=base_config(), max_tokens=4, token_step=1, estimate_max_tokens=5, width=32, depth=1,
                     num_heads=2, codebook_size=16, code_dim=8, halting_width=32, error_bins=BINS,
                     initial_error_max=0.02)
    images = torch.cat([flat_levels(8, 1), pixel_noise(8, 2)])
    budgets = tokenizer.token_counts.tolist()
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=3e-3, weight_decay=0.0)
    tokenizer.train()
    for _ in range(100):
        tokens, _ = tokenizer.image_tokens(images)
        conditions = torch.cat([tokenizer.error_index(achieved_error(images, t)) for t in budgets])
        targets = torch.cat([tokenizer.allocation_targets(len(images), t) for t in budgets])
        hidden = tokenizer.encode_hidden(tokens.repeat(len(budgets), 1, 1), conditions, tokenizer.max_tokens)
        loss = tokenizer.halting_loss(tokenizer.halting_logits(hidden), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tokenizer.eval(), images[:8], images[8:]


def trained_bins(tokenizer, images):
    """Indices of the bins an image class was conditioned on in phase 2 (its achieved errors rounded up)."""
    return sorted({int(i) for t in tokenizer.token_counts.tolist()
                   for i in tokenizer.error_index(achieved_error(images[:1], t))})


def test_active_count_is_non_increasing_in_the_desired_error(allocating_karl):
    tokenizer, flat, noise = allocating_karl
    for images in (flat, noise):
        # over the errors its training covered (beyond them the network extrapolates)
        covered = trained_bins(tokenizer, images)
        errors = BINS[covered[0] : covered[-1] + 1]
        assert len(errors) >= 3
        lengths = torch.stack([tokenizer.encode(images, desired_error=e).lengths for e in errors], dim=1)
        assert bool((lengths[:, 1:] <= lengths[:, :-1]).all()), (errors, lengths)
        assert bool((lengths[:, -1] < lengths[:, 0]).all())


def test_noise_gets_more_tokens_than_flat_images_at_the_same_error(allocating_karl):
    tokenizer, flat, noise = allocating_karl
    for error in (0.02, 0.04):
        flat_lengths = tokenizer.encode(flat, desired_error=error).lengths
        noise_lengths = tokenizer.encode(noise, desired_error=error).lengths
        assert int(flat_lengths.max()) < int(noise_lengths.min()), (error, flat_lengths, noise_lengths)


# -- saving, configs and the CLI -------------------------------------------------------------------------------------
def test_a_saved_karl_loads_without_its_base_folder_from_any_directory(tmp_path, monkeypatch):
    base_folder = saved_base(tmp_path / "base")
    torch.manual_seed(0)
    tokenizer = KARL.from_preset("karl-tiny", base=base_folder).eval()
    assert tokenizer.image_size == 16 and tokenizer.channels == 1 and tokenizer.grid is None
    images = torch.cat([flat_images(2), cell_noise(2)])
    encoded = tokenizer.encode(images)
    tokenizer.save_pretrained(tmp_path / "karl")
    saved = json.loads((tmp_path / "karl" / "config.json").read_text())
    assert saved["kwargs"]["base"] is None and saved["kwargs"]["base_config"]["class"] == "VQGAN2D"
    for entry in (tmp_path / "base").iterdir():
        entry.unlink()
    (tmp_path / "base").rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = KARL.from_pretrained(tmp_path / "karl")
    assert torch.equal(loaded.encode(images).ids, encoded.ids)
    assert torch.equal(loaded.decode(encoded.ids, encoded.lengths), tokenizer.decode(encoded.ids, encoded.lengths))


def test_base_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="exactly one of base"):
        KARL.from_preset("karl-tiny")
    with pytest.raises(ValueError, match="exactly one of base"):
        KARL.from_preset("karl-tiny", base=str(tmp_path), base_config=base_config())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        KARL.from_preset("karl-tiny", base=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="width 8 must exceed the base's code_dim 8"):
        KARL.from_preset("karl-tiny", base_config=base_config(), width=8)
    with pytest.raises(ValueError, match="unknown KARL preset"):
        KARL.from_preset("karl-huge", base_config=base_config())
    assert {"karl-s", "karl-b", "karl-l", "karl-tiny", "karl-cpu"} <= set(KARL.presets)


def test_configs_name_constructor_arguments():
    import inspect

    accepted = set(inspect.signature(KARL.__init__).parameters)
    from test_configs import composed

    for name, files in (("karl_photos.yaml", ["tokenizers/karl.yaml"]),
                        ("karl_mnist.yaml", ["tokenizers/karl.yaml", "data/mnist.yaml", "tokenizers/mnist/karl.yaml"])):
        config = composed(*files)
        tokenizer = config["model"]["init_args"]["tokenizer"]
        assert tokenizer["class_path"] == "flexar.tokenizers.KARL"
        assert set(tokenizer["init_args"]) <= accepted and tokenizer["init_args"]["base"]
        assert KARL.presets["karl-cpu"].items() <= tokenizer["init_args"].items()  # the configs are the CPU preset
        assert config["data"]["init_args"]["dataset"] == name[len("karl_"):-len(".yaml")]


def test_training_through_the_cli(tmp_path):
    from flexar.train.cli import run

    from test_configs import composed

    config = composed("tokenizers/karl.yaml", "data/mnist.yaml", "tokenizers/mnist/karl.yaml")
    config["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                             log_every_n_steps=1)
    config["trainer"]["callbacks"][0]["init_args"].update(num_images=4, every_n_epochs=1)
    tokenizer = config["model"]["init_args"]["tokenizer"]["init_args"]
    tokenizer.update(base=saved_base(tmp_path / "base", trained=False), width=32, depth=1, num_heads=2, max_tokens=8,
                     token_step=2, estimate_max_tokens=10, codebook_size=32, halting_width=16)
    config["model"]["init_args"]["export_dir"] = str(tmp_path / "tokenizer")
    config["data"]["init_args"].update(dataset="digits", image_size=16, batch_size=8)
    (tmp_path / "karl.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "karl.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    exported = KARL.from_pretrained(tmp_path / "tokenizer")
    assert exported.max_tokens == 8 and exported.config["base"] is None
    assert list((tmp_path / "run").rglob("reconstructions_epoch000.png"))
    assert os.path.getsize(tmp_path / "tokenizer" / "model.safetensors") > 0
