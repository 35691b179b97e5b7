from pathlib import Path

import pytest
import torch
import yaml

from flexar.generators import TokenShuffleAR
from flexar.generators.token_shuffle import shuffle_tokens, unshuffle_tokens
from flexar.sampling import Sampler, ScalingAR, SpeculativeDecoder

from common import GeneratorContract, random_ids, seeded

ROOT = Path(__file__).resolve().parents[1]


def tiny_shuffle(**overrides):
    kwargs = dict(vocab_size=16, max_tokens=16, grid=[4, 4], num_classes=4, shuffle=2, dim=32, depth=2, num_heads=2,
                  shuffle_mlps=1, init_std=0.2)
    return TokenShuffleAR(**{**kwargs, **overrides})


class TestTokenShuffleContract(GeneratorContract):
    def make_generator(self):
        return tiny_shuffle()


@pytest.mark.parametrize(("grid", "shuffle"), [((4, 4), 2), ((6, 4), 2), ((6, 6), 3), ((4, 4), 1)])
def test_unshuffle_inverts_shuffle(grid, shuffle):
    x = torch.randn(3, grid[0] * grid[1], 5, generator=seeded())
    merged = shuffle_tokens(x, grid, shuffle)
    assert merged.shape == (3, grid[0] * grid[1] // shuffle**2, shuffle**2 * 5)
    assert torch.equal(unshuffle_tokens(merged, grid, shuffle), x)


def test_windows_are_the_s_by_s_blocks_in_raster_order():
    model = tiny_shuffle()
    ids = torch.arange(16).view(1, 16)
    windows = model.to_windows(ids)
    assert windows[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert torch.equal(model.from_windows(windows), ids)


def test_sequence_length_is_n_over_s_squared_and_s_squared_tokens_per_pass():
    torch.manual_seed(0)
    model = tiny_shuffle(max_tokens=64, grid=[8, 8]).eval()
    lengths = []
    model.transformer.register_forward_hook(lambda module, inputs, output: lengths.append(inputs[0].shape[1]))
    ids = random_ids(model, 2)
    logits = model(model.to_windows(ids)[:, :-1], torch.tensor([0, 1]))
    assert lengths == [16] and logits.shape == (2, 16, 4, 16)  # class token + 15 windows, 4 tokens per row
    lengths.clear()
    out = model.generate(torch.tensor([0, 1]), Sampler(cfg_scale=2.0), seeded())
    assert out.stats["forward_passes"] == len(lengths) == 16 and lengths == [1] * 16
    assert out.stats["sequence_length"] == 17 and out.ids.shape == (2, 64)


def test_merged_token_depends_only_on_its_window():
    torch.manual_seed(0)
    model = tiny_shuffle()
    ids = random_ids(model, 1)
    embeddings = model.token_embed(ids).detach().requires_grad_(True)  # (1, 16, dim) raster order
    windowed = shuffle_tokens(embeddings, model.grid, model.shuffle).unflatten(-1, (4, -1))
    merged = model.shuffle_mlps(model.shuffle_in(windowed).flatten(2))
    members = model.to_windows(torch.arange(16).view(1, 16))[0]
    for window in range(4):
        (gradient,) = torch.autograd.grad(merged[0, window].sum(), embeddings, retain_graph=True)
        touched = gradient[0].abs().sum(-1) > 0
        assert set(touched.nonzero().flatten().tolist()) == set(members[window].tolist())


def test_predictions_for_window_i_depend_only_on_earlier_windows():
    torch.manual_seed(0)
    model = tiny_shuffle().eval()
    windows = model.to_windows(random_ids(model, 1))
    labels = torch.tensor([2])
    with torch.no_grad():
        base = model(windows, labels)  # row j predicts window j from windows < j
        for changed in range(4):
            other = windows.clone()
            other[0, changed] = (other[0, changed] + 3) % model.vocab_size
            logits = model(other, labels)
            torch.testing.assert_close(logits[:, : changed + 1], base[:, : changed + 1])
            assert not torch.allclose(logits[:, changed + 1 :], base[:, changed + 1 :])


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_generation_equals_recompute(cfg_scale):
    torch.manual_seed(0)
    model = tiny_shuffle().eval()
    sampler = Sampler(top_k=10, cfg_scale=cfg_scale)
    cached = model.generate(torch.tensor([0, 1, 3]), sampler, seeded(3))
    recomputed = model.generate(torch.tensor([0, 1, 3]), sampler, seeded(3), use_cache=False)
    assert torch.equal(cached.ids, recomputed.ids)


def test_cfg_schedule_option_overrides_the_sampler_schedule():
    torch.manual_seed(0)
    scheduled = tiny_shuffle(cfg_schedule="linear").eval()
    plain = tiny_shuffle().eval()
    plain.load_state_dict(scheduled.state_dict())
    labels = torch.tensor([0, 1])
    first = scheduled.generate(labels, Sampler(cfg_scale=4.0), seeded(1)).ids
    second = plain.generate(labels, Sampler(cfg_scale=4.0, cfg_schedule="linear"), seeded(1)).ids
    assert torch.equal(first, second)
    assert not torch.equal(first, plain.generate(labels, Sampler(cfg_scale=4.0), seeded(1)).ids)


def test_cfg_schedule_keeps_the_processors_a_caller_inserted():
    torch.manual_seed(0)
    scheduled = tiny_shuffle(cfg_schedule="linear").eval()
    plain = tiny_shuffle().eval()
    plain.load_state_dict(scheduled.state_dict())
    labels = torch.tensor([0, 1, 2])

    def no_low_ids(logits, state):  # a caller's processor: ids below 8 are never drawn
        return logits.index_fill(-1, torch.arange(8), float("-inf"))

    def sampler(schedule="constant"):
        chosen = Sampler(cfg_scale=4.0, cfg_schedule=schedule)
        chosen.processors.append(no_low_ids)
        return chosen

    given = sampler()
    first = scheduled.generate(labels, given, seeded(1)).ids
    assert first.min() >= 8
    assert torch.equal(first, plain.generate(labels, sampler("linear"), seeded(1)).ids)
    # the caller's sampler is left as it was
    assert given.cfg_schedule == "constant" and given.processors[-1] is no_low_ids and len(given.processors) == 2
    assert given.processors[0].keywords["schedule"] == "constant"


def test_training_refuses_lengths_short_of_the_grid():
    torch.manual_seed(0)
    model = tiny_shuffle().eval()
    ids, labels = random_ids(model, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"whole 4x4 grids.*every entry of lengths 16"):
        model.training_loss(ids, labels, torch.tensor([16, 9]))
    with torch.no_grad():
        full = model.training_loss(ids, labels, torch.tensor([16, 16]))[0]
        assert torch.equal(full, model.training_loss(ids, labels)[0])


def test_config_builds_the_model_and_one_token_strategies_refuse_it():
    config = yaml.safe_load((ROOT / "configs" / "generators" / "token_shuffle.yaml").read_text())
    generator = config["model"]["init_args"]["generator"]
    assert generator["class_path"] == "flexar.generators.TokenShuffleAR"
    # vocab_size, max_tokens and grid come from the token cache of the 2D VQ on digits (8 x 8 codes)
    model = TokenShuffleAR(**{**generator["init_args"], "dim": 32, "depth": 1, "num_heads": 2, "vocab_size": 256,
                              "max_tokens": 64, "grid": [8, 8]})
    assert model.num_windows == 16 and model.tokens_per_step == 4 and model.cfg_schedule == "linear"
    assert {"token-shuffle-2.7b", "token-shuffle-tiny", "token-shuffle-digits"} <= set(TokenShuffleAR.presets)
    for strategy in (ScalingAR(Sampler()), SpeculativeDecoder(tiny_shuffle())):
        with pytest.raises(ValueError, match="tokens per step"):
            model.generate_with(torch.tensor([0]), strategy, seeded())
    with pytest.raises(ValueError, match="grid"):
        tiny_shuffle(grid=None)
    with pytest.raises(ValueError, match="divisible by shuffle"):
        tiny_shuffle(max_tokens=12, grid=[3, 4])
    with pytest.raises(ValueError, match="whole grids"):
        tiny_shuffle().generate(torch.tensor([0]), Sampler(), seeded(), num_tokens=8)
