import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from flexar.generators import RasterAR
from flexar.sampling import EntropySampler, Sampler, SamplingState, entropy, entropy_temperature, entropy_top_k
from flexar.sampling.entropy import temperature_from_entropy, top_k_from_entropy


def random_logits(*shape, seed=0, scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def chi_square_p_value(ids, probs):
    observed = torch.bincount(ids.flatten(), minlength=probs.numel()).double()
    support = probs > 0
    assert observed[~support].sum() == 0, "sampled a token outside the support"
    expected = probs[support].double() / probs[support].sum() * ids.numel()
    return stats.chisquare(observed[support].numpy(), expected.numpy()).pvalue


def test_temperature_rule_is_strictly_decreasing_with_paper_defaults():
    entropies = torch.linspace(0.0, 12.0, 200, dtype=torch.float64)
    temperatures = temperature_from_entropy(entropies, base=1.4)
    assert (temperatures.diff() < 0).all()
    assert temperatures[0].item() == pytest.approx(1.4 * (2.5 + 0.6))
    assert temperatures[-1].item() > 1.4 * 0.6
    assert EntropySampler().to_dict()["entropy_a"] == 2.5
    assert (EntropySampler().entropy_b, EntropySampler().entropy_c) == (3.0, 0.6)


def test_entropy_is_measured_after_the_filter():
    logits = random_logits(3, 40, seed=1)
    sampler = EntropySampler(top_k=5, top_p=0.9)
    state = SamplingState()
    sampler.process(logits, state)
    filtered = Sampler(top_k=5, top_p=0.9).process(logits)
    torch.testing.assert_close(state.extra["entropy"], entropy(filtered))
    assert (state.extra["entropy"] < entropy(logits)).all()
    expected_temperature = 1.0 * (2.5 * torch.exp(-entropy(filtered) / 3) + 0.6)
    torch.testing.assert_close(state.extra["temperature"], expected_temperature)


def numpy_entropy_temperature_probs(logits, top_k, base):
    """Independent reference: top-k, entropy of the kept softmax, divide, softmax."""
    values = logits.numpy().astype(np.float64)
    kept = np.argsort(-values)[:top_k]
    p = np.exp(values[kept] - values[kept].max())
    p /= p.sum()
    h = -(p * np.log(p)).sum()
    t = base * (2.5 * math.exp(-h / 3.0) + 0.6)
    q = np.exp((values[kept] - values[kept].max()) / t)
    out = np.zeros_like(values)
    out[kept] = q / q.sum()
    return torch.from_numpy(out)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_sampled_frequencies_match_softmax_over_entropy_temperature(scale):
    logits = random_logits(12, seed=2, scale=scale)
    sampler = EntropySampler(temperature=1.2, top_k=8)
    expected = numpy_entropy_temperature_probs(logits, 8, 1.2)
    torch.testing.assert_close(sampler.probs(logits[None])[0].double(), expected, atol=1e-6, rtol=1e-5)
    ids = sampler.sample(logits.expand(20_000, -1), SamplingState(), torch.Generator().manual_seed(3))
    assert chi_square_p_value(ids, expected) > 1e-3


def test_switched_off_equals_the_plain_sampler():
    logits = random_logits(6, 2, 30, seed=4)
    settings = dict(temperature=0.8, top_k=10, top_p=0.9, cfg_scale=1.0)
    off = EntropySampler(**settings, entropy_temperature=False, entropy_top_k=False)
    plain = Sampler(**settings)
    assert torch.equal(off.probs(logits), plain.probs(logits))
    first = off.sample(logits, SamplingState(), torch.Generator().manual_seed(5))
    assert torch.equal(first, plain.sample(logits, SamplingState(), torch.Generator().manual_seed(5)))


def test_entropy_top_k_support_is_k_of_h_and_grows_with_entropy():
    # rows from peaked to flat: entropies spread over [0, log V]
    scales = torch.linspace(0.05, 8.0, 24)
    logits = random_logits(24, 64, seed=6) * scales[:, None]
    state = SamplingState()
    filtered = entropy_top_k(logits, state, k_min=4, k_max=48)
    row_entropy = entropy(logits)
    expected_k = top_k_from_entropy(row_entropy, 64, 4, 48)
    assert torch.equal(torch.isfinite(filtered).sum(-1), expected_k)
    assert torch.equal(state.extra["top_k"], expected_k)
    # the kept tokens are the largest ones
    for row in range(24):
        kept = torch.isfinite(filtered[row])
        assert logits[row][kept].min() >= logits[row][~kept].max() if (~kept).any() else True
    order = row_entropy.argsort()
    assert (expected_k[order].diff() >= 0).all()
    # direction pinned: a flat row keeps more tokens than a peaked one
    flat, peaked = torch.zeros(1, 64), torch.zeros(1, 64).index_fill(1, torch.tensor([0]), 20.0)
    assert torch.isfinite(entropy_top_k(flat, SamplingState(), 4, 48)).sum() == 48
    assert torch.isfinite(entropy_top_k(peaked, SamplingState(), 4, 48)).sum() == 4


def test_entropy_top_k_inside_the_sampler_keeps_exactly_k_with_ties():
    sampler = EntropySampler(entropy_temperature=False, entropy_top_k=True, top_k_min=3, top_k_max=7)
    ties = torch.zeros(2, 10)
    probs = sampler.probs(ties)
    assert ((probs > 0).sum(-1) == 7).all()


def test_settings_round_trip_and_purity():
    sampler = EntropySampler(temperature=1.4, top_k=100, cfg_scale=7.5, entropy_top_k=True, top_k_min=8, top_k_max=64)
    rebuilt = EntropySampler.from_dict(json.loads(json.dumps(sampler.to_dict())))
    assert rebuilt.to_dict() == sampler.to_dict() and repr(rebuilt) == repr(sampler)
    with pytest.raises(TypeError):
        Sampler.from_dict(sampler.to_dict())
    with pytest.raises(ValueError, match="entropy_b"):
        EntropySampler(entropy_b=0.0)
    logits = random_logits(4, 20, seed=7)
    original = logits.clone()
    before = torch.get_rng_state()
    entropy_temperature(logits, SamplingState(), base=1.0)
    sampler.sample(logits, SamplingState(), torch.Generator().manual_seed(0))
    assert torch.equal(logits, original) and torch.equal(torch.get_rng_state(), before)


def test_greedy_entropy_sampler_is_argmax_and_generation_runs():
    logits = random_logits(5, 16, seed=8)
    assert torch.equal(EntropySampler(temperature=0.0).sample(logits), logits.argmax(-1))
    torch.manual_seed(0)
    model = RasterAR(vocab_size=16, max_tokens=6, num_classes=3, dim=32, depth=1, num_heads=2).eval()
    sampler = EntropySampler(cfg_scale=2.0, top_k=8, entropy_top_k=True, top_k_min=2)
    out = model.generate(torch.tensor([0, 2]), sampler, torch.Generator().manual_seed(1))
    assert out.ids.shape == (2, 6)
    again = model.generate(torch.tensor([0, 2]), sampler, torch.Generator().manual_seed(1))
    assert torch.equal(out.ids, again.ids)
