import json

import pytest
import torch
from scipy import stats

from flexar.sampling import (
    CFG_SCHEDULES,
    Sampler,
    SamplingState,
    categorical,
    classifier_free_guidance,
    guidance_scale,
    temperature,
    top_k,
    top_p,
)

STATE = SamplingState()


def random_logits(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(*shape, generator=generator, dtype=dtype)


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("k", [1, 3, 7, 15])
def test_top_k_keeps_exactly_k_largest(k):
    logits = random_logits(4, 5, 16)
    filtered = top_k(logits, STATE, k)
    kept = torch.isfinite(filtered)
    assert filtered.shape == logits.shape
    assert (kept.sum(-1) == k).all()
    assert torch.equal(filtered[kept], logits[kept])
    threshold = logits.topk(k, dim=-1).values[..., -1:]
    assert (logits[kept.logical_not()] < threshold.expand_as(logits)[kept.logical_not()]).all()


def test_top_k_keeps_exactly_k_with_ties():
    all_tied = torch.zeros(3, 10)
    assert (torch.isfinite(top_k(all_tied, STATE, 3)).sum(-1) == 3).all()
    boundary_tie = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]])
    filtered = top_k(boundary_tie, STATE, 2)
    assert torch.isfinite(filtered).sum() == 2
    assert filtered[0, 0] == 5.0


@pytest.mark.parametrize("k", [0, -1, 16, 40])
def test_top_k_out_of_range_is_a_no_op(k):
    logits = random_logits(2, 16)
    assert torch.equal(top_k(logits, STATE, k), logits)


# ----------------------------------------------------------------------------- top-p


def brute_force_top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for row, row_logits in enumerate(logits.softmax(-1).tolist()):
        ranked = sorted(range(len(row_logits)), key=lambda index: -row_logits[index])
        mass = 0.0
        for index in ranked:
            keep[row, index] = True
            mass += row_logits[index]
            if mass >= p:
                break
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_matches_brute_force(p):
    logits = random_logits(64, 20, seed=1, dtype=torch.float64)
    filtered = top_p(logits, STATE, p)
    kept = torch.isfinite(filtered)
    assert torch.equal(kept, brute_force_top_p_mask(logits, p))
    assert torch.equal(filtered[kept], logits[kept])
    assert (logits.softmax(-1).masked_fill(kept.logical_not(), 0).sum(-1) >= p - 1e-12).all()


def test_top_p_keeps_at_least_one_and_handles_extra_dimensions():
    logits = random_logits(2, 3, 12, seed=2)
    tiny = top_p(logits, STATE, 1e-9)
    assert (torch.isfinite(tiny).sum(-1) == 1).all()
    assert torch.equal(tiny.argmax(-1), logits.argmax(-1))
    assert torch.equal(top_p(logits, STATE, 1.0), logits)


def test_top_p_on_bfloat16_keeps_dtype():
    logits = random_logits(4, 12, seed=3).to(torch.bfloat16)
    filtered = top_p(logits, STATE, 0.7)
    assert filtered.dtype == torch.bfloat16
    assert (torch.isfinite(filtered).sum(-1) >= 1).all()


# ----------------------------------------------------------------------------- temperature


def test_temperature_divides_and_refuses_zero():
    logits = random_logits(2, 8)
    assert torch.allclose(temperature(logits, STATE, 2.0), logits / 2)
    # below 1 the logits are divided after a per-row shift: the same differences, the same softmax
    cooled = temperature(logits, STATE, 0.5)
    assert torch.allclose(cooled - cooled[:, :1], (logits - logits[:, :1]) * 2, atol=1e-5)
    assert torch.allclose(cooled.softmax(-1), (logits * 2).softmax(-1), atol=1e-6)
    with pytest.raises(ValueError, match="greedy"):
        temperature(logits, STATE, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiny_temperature_and_huge_guidance_do_not_overflow(dtype):
    """Settings float32 can hold are computed without overflow: the limit is the argmax, not token V - 1."""

    def is_row_maximum(values, ids):  # low precisions tie; any of the tied maxima is right
        return bool((values.gather(-1, ids.unsqueeze(-1)).squeeze(-1) == values.amax(-1)).all())

    logits = random_logits(64, 32, seed=21).to(dtype)
    generator = torch.Generator().manual_seed(0)
    for value in (1e-30, 2e-38):
        assert is_row_maximum(logits, Sampler(temperature=value).sample(logits, STATE, generator))
    guided = random_logits(128, 32, seed=22).to(dtype)
    conditional, unconditional = guided.chunk(2)
    ids = Sampler(cfg_scale=1e30).sample(guided, STATE, generator)
    assert is_row_maximum(conditional - unconditional, ids)
    assert torch.isfinite(Sampler(cfg_scale=1e30).probs(guided, STATE)).all()
    assert (ids != 31).any()


@pytest.mark.parametrize(("settings", "message"), [({"temperature": 1e-40}, "temperature"),
                                                   ({"temperature": 1e39}, "temperature"),
                                                   ({"cfg_scale": 1e39}, "cfg_scale")])
def test_settings_beyond_float32_are_refused(settings, message):
    with pytest.raises(ValueError, match=f"{message}.*float32"):
        Sampler(**settings)


def test_nan_rows_are_refused_by_categorical_and_the_sampler():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 16)
    probs[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"categorical: 1 of 5 rows .* rows 3\b"):
        categorical(probs, generator)
    for bad in (float("inf"), 0.0):
        other = torch.rand(5, 16)
        other[1] = bad
        with pytest.raises(ValueError, match="rows 1"):
            categorical(other, generator)
    logits = random_logits(4, 16)
    logits[2] = float("nan")
    for sampler in (Sampler(), Sampler(temperature=0.0), Sampler(top_k=4, top_p=0.9, temperature=0.5)):
        with pytest.raises(ValueError, match="decoding step 3"):
            sampler.sample(logits, SamplingState(step=3, num_steps=8), generator)
    with pytest.raises(ValueError, match="no probability mass"):
        Sampler(cfg_scale=2.0).sample(torch.cat([logits, logits]), STATE, generator)


def test_off_cpu_the_sampler_checks_once_at_each_end_of_the_schedule(monkeypatch):
    """Where a host synchronisation costs (an accelerator), the check stays on the device between the schedule's
    first and last step, and then names the first step that failed."""
    monkeypatch.setattr(Sampler, "synchronisation_is_free", staticmethod(lambda device: False))
    generator = torch.Generator().manual_seed(0)
    good, bad = random_logits(4, 16), random_logits(4, 16)
    bad[1] = float("nan")
    for sampler in (Sampler(), Sampler(temperature=0.0)):
        sampler.sample(good, SamplingState(step=0, num_steps=5), generator)
        sampler.sample(good, SamplingState(step=1, num_steps=5), generator)
        sampler.sample(bad, SamplingState(step=2, num_steps=5), generator)  # recorded, not yet raised
        sampler.sample(good, SamplingState(step=3, num_steps=5), generator)
        with pytest.raises(ValueError, match="1 of 4 rows .* decoding step 2"):
            sampler.sample(good, SamplingState(step=4, num_steps=5), generator)
        # the record is cleared: the next schedule starts clean, and a failure at its first step is raised at once
        sampler.sample(good, SamplingState(step=4, num_steps=5), generator)
        with pytest.raises(ValueError, match="decoding step 0"):
            sampler.sample(bad, SamplingState(step=0, num_steps=5), generator)


def test_temperature_zero_is_argmax():
    logits = random_logits(6, 4, 32, seed=4)
    sampler = Sampler(temperature=0.0, top_k=5, top_p=0.9)
    assert torch.equal(sampler.sample(logits, STATE), logits.argmax(-1))
    probs = sampler.probs(logits, STATE)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(6, 4))


def test_temperature_towards_zero_approaches_argmax():
    logits = random_logits(64, 32, seed=5)
    generator = torch.Generator().manual_seed(0)
    ids = Sampler(temperature=1e-4).sample(logits, STATE, generator)
    assert torch.equal(ids, logits.argmax(-1))


# ----------------------------------------------------------------------------- distributions


def chi_square_p_value(ids: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(ids.flatten(), minlength=probs.numel()).double()
    support = probs > 0
    assert observed[support.logical_not()].sum() == 0, "sampled a filtered-out token"
    expected = probs[support].double()
    expected = expected / expected.sum() * ids.numel()
    return stats.chisquare(observed[support].numpy(), expected.numpy()).pvalue


def test_unfiltered_sampling_matches_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    generator = torch.Generator().manual_seed(1234)
    ids = Sampler().sample(logits.expand(20_000, -1), STATE, generator)
    assert chi_square_p_value(ids, logits.softmax(-1)) > 1e-3


def test_filtered_sampling_matches_renormalised_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7, -0.1])
    sampler = Sampler(temperature=1.5, top_k=6, top_p=0.85)
    expected = sampler.probs(logits.unsqueeze(0), STATE)[0]
    assert 1 < int((expected > 0).sum()) < 6
    generator = torch.Generator().manual_seed(99)
    ids = sampler.sample(logits.expand(20_000, -1), STATE, generator)
    assert chi_square_p_value(ids, expected) > 1e-3


def test_categorical_draws_unnormalised_rows_with_zeros_by_their_law():
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]])
    generator = torch.Generator().manual_seed(7)
    ids = categorical(weights.repeat(10_000, 1).view(10_000, 2, 8), generator)
    assert ids.shape == (10_000, 2) and ids.dtype == torch.long
    for row in range(2):
        assert chi_square_p_value(ids[:, row], weights[row]) > 1e-3
    with pytest.raises(ValueError, match="empty"):
        categorical(torch.ones(3, 0), generator)


# ----------------------------------------------------------------------------- guidance


def test_cfg_scale_one_returns_conditional_rows_exactly():
    logits = random_logits(6, 3, 10, seed=6)
    guided = classifier_free_guidance(logits, STATE, 1.0)
    assert torch.equal(guided, logits[:3])
    conditional_only = random_logits(3, 10, seed=7)
    assert torch.equal(Sampler(cfg_scale=1.0).process(conditional_only, STATE), conditional_only)


def test_cfg_formula_and_sampler_halves_rows():
    logits = random_logits(4, 10, seed=8)
    conditional, unconditional = logits[:2], logits[2:]
    expected = unconditional + 3.0 * (conditional - unconditional)
    assert torch.allclose(classifier_free_guidance(logits, STATE, 3.0), expected)
    sampler = Sampler(cfg_scale=3.0)
    assert sampler.uses_cfg and not Sampler().uses_cfg
    assert sampler.probs(logits, STATE).shape == (2, 10)
    assert sampler.sample(logits, STATE, torch.Generator().manual_seed(0)).shape == (2,)
    with pytest.raises(ValueError, match="even"):
        classifier_free_guidance(logits[:3], STATE, 3.0)


def test_linear_cfg_schedule_ramps_from_one_to_scale():
    scale, num_steps = 4.0, 5
    assert guidance_scale(scale, SamplingState(0, num_steps), "linear") == 1.0
    assert guidance_scale(scale, SamplingState(2, num_steps), "linear") == pytest.approx(2.5)
    assert guidance_scale(scale, SamplingState(num_steps - 1, num_steps), "linear") == scale
    assert guidance_scale(scale, SamplingState(0, 1), "linear") == 1.0
    assert guidance_scale(scale, SamplingState(3, num_steps), "constant") == scale

    logits = random_logits(4, 10, seed=9)
    first = classifier_free_guidance(logits, SamplingState(0, num_steps), scale, "linear")
    assert torch.equal(first, logits[:2])
    last = classifier_free_guidance(logits, SamplingState(4, num_steps), scale, "linear")
    assert torch.allclose(last, classifier_free_guidance(logits, STATE, scale))


def test_unknown_cfg_schedule_lists_known_ones():
    with pytest.raises(ValueError) as error:
        classifier_free_guidance(torch.zeros(2, 4), STATE, 2.0, schedule="cosine")
    assert all(schedule in str(error.value) for schedule in CFG_SCHEDULES)


# ----------------------------------------------------------------------------- randomness


def test_same_seed_gives_bit_identical_samples():
    logits = random_logits(8, 16, 50, seed=10)
    sampler = Sampler(temperature=0.9, top_k=20, top_p=0.95)
    first = sampler.sample(logits, STATE, torch.Generator().manual_seed(7))
    second = sampler.sample(logits, STATE, torch.Generator().manual_seed(7))
    other = sampler.sample(logits, STATE, torch.Generator().manual_seed(8))
    assert first.dtype == torch.long and first.shape == (8, 16)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_sampling_leaves_global_rng_untouched():
    logits = random_logits(8, 50, seed=11)
    before = torch.get_rng_state()
    Sampler(top_k=10).sample(logits, STATE, torch.Generator().manual_seed(0))
    Sampler(temperature=0.0).sample(logits, STATE)
    assert torch.equal(torch.get_rng_state(), before)


def test_sampling_without_generator_is_refused():
    with pytest.raises(ValueError, match="Generator"):
        Sampler().sample(random_logits(2, 8), STATE)


# ----------------------------------------------------------------------------- purity and settings


def test_processors_and_sampler_leave_input_untouched():
    logits = random_logits(4, 3, 20, seed=12)
    original = logits.clone()
    classifier_free_guidance(logits, STATE, 2.0)
    temperature(logits, STATE, 0.7)
    top_k(logits, STATE, 5)
    top_p(logits, STATE, 0.6)
    sampler = Sampler(temperature=0.7, top_k=5, top_p=0.6, cfg_scale=2.0, cfg_schedule="linear")
    state = SamplingState(step=2, num_steps=4)
    sampler.process(logits, state)
    sampler.probs(logits, state)
    sampler.sample(logits, state, torch.Generator().manual_seed(0))
    assert torch.equal(logits, original)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
        ({"cfg_schedule": "cosine"}, "known schedules: constant, linear"),
    ],
)
def test_bad_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**settings)


def test_settings_round_trip_through_json():
    sampler = Sampler(temperature=0.8, top_k=100, top_p=0.9, cfg_scale=4.0, cfg_schedule="linear")
    rebuilt = Sampler.from_dict(json.loads(json.dumps(sampler.to_dict())))
    assert rebuilt.to_dict() == sampler.to_dict()
    assert repr(rebuilt) == repr(sampler)


def test_processor_chain_is_extensible():
    def only_token_two(logits, state):
        state.extra["seen"] = True
        return torch.full_like(logits, float("-inf")).index_fill(-1, torch.tensor([2]), 0.0)

    sampler = Sampler(top_k=4)
    sampler.processors.append(only_token_two)
    state = SamplingState()
    ids = sampler.sample(random_logits(5, 3, 8, seed=13), state, torch.Generator().manual_seed(0))
    assert (ids == 2).all() and state.extra["seen"]
