import math

import jsonargparse
import pytest
import torch

from flexar.generators import RasterAR
from flexar.sampling import BestOfN, Sampler, ScalingAR
from flexar.sampling.arguments import add_sampler_arguments, sampler_from_args
from flexar.sampling.scalingar import condition_strength, fused_confidence, token_uncertainty


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny(**overrides):
    torch.manual_seed(0)
    kwargs = dict(vocab_size=16, max_tokens=12, num_classes=3, dim=32, depth=1, num_heads=2, init_std=0.3)
    return RasterAR(**{**kwargs, **overrides}).eval()


def test_uncertainty_is_bounded_increasing_in_entropy_and_decreasing_in_margin():
    logits = 4 * torch.randn(200, 10, generator=seeded(0))
    for weight in (0.0, 0.3, 1.0):
        u = token_uncertainty(logits, weight)
        assert (u >= 0).all() and (u <= 1).all()
    # entropy grows, margin fixed: p = [0.5, 0.3, 0.2 spread over m tokens]
    rows = []
    for spread in range(1, 9):
        probs = torch.full((10,), 1e-12)
        probs[0], probs[1] = 0.5, 0.3
        probs[2 : 2 + spread] = 0.2 / spread
        rows.append(probs.log())
    u = token_uncertainty(torch.stack(rows), 0.5)
    assert (u.diff() > 0).all()
    # the margin term alone (entropy weight 0): a larger top-1 / top-2 gap lowers the uncertainty
    peaked, flat = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 0.9, 0.0])
    assert token_uncertainty(peaked, 0.0) < token_uncertainty(flat, 0.0)
    probs = torch.softmax(logits, -1).topk(2, -1).values
    torch.testing.assert_close(token_uncertainty(logits, 0.0), 1 - (probs[:, 0] - probs[:, 1]))
    assert token_uncertainty(torch.zeros(1, 10), 1.0).item() == pytest.approx(1.0)


def test_condition_strength_and_fused_confidence_are_in_unit_range():
    a, b = 3 * torch.randn(50, 16, generator=seeded(1)), 3 * torch.randn(50, 16, generator=seeded(2))
    strength = condition_strength(a, b)
    assert (strength >= 0).all() and (strength <= 1).all()
    assert torch.allclose(condition_strength(a, a), torch.zeros(50), atol=1e-6)
    confidence = fused_confidence(a, a, b, 0.5, 0.3)
    assert (confidence >= 0).all() and (confidence <= 1).all()
    assert torch.equal(fused_confidence(a), 1 - token_uncertainty(a))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_no_termination_and_constant_guidance_equals_best_of_n(cfg_scale):
    model = tiny()
    sampler = Sampler(cfg_scale=cfg_scale, top_k=12)
    labels = torch.tensor([0, 1, 2, 1])
    scaling = ScalingAR(sampler, num_trajectories=3, terminate=False, guidance_gain=0.0)
    baseline = BestOfN(sampler, num_trajectories=3)
    first = model.generate_with(labels, scaling, seeded(4))
    second = model.generate_with(labels, baseline, seeded(4))
    assert torch.equal(first.ids, second.ids)
    assert first.stats["selected"] == second.stats["selected"]
    torch.testing.assert_close(torch.tensor(first.stats["scores"]), torch.tensor(second.stats["scores"]), atol=1e-5, rtol=0)
    assert first.stats["tokens_consumed"] == second.stats["tokens_consumed"] == 4 * 3 * 12
    # the trajectories themselves are plain decoding of the repeated labels
    plain = model.generate(labels.repeat_interleave(3), sampler, seeded(4)).ids.view(4, 3, 12)
    assert torch.equal(first.ids, plain[torch.arange(4), torch.tensor(first.stats["selected"])])


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_tokens_consumed_is_the_sum_of_surviving_lengths(cfg_scale):
    model = tiny()
    fed = []
    model.transformer.register_forward_hook(lambda module, inputs, output: fed.append(inputs[0].shape[0]))
    copies = 2 if cfg_scale != 1.0 else 1
    scaling = ScalingAR(Sampler(cfg_scale=cfg_scale), num_trajectories=4, threshold=0.99, checkpoints=[0.25, 0.5, 0.75])
    out = model.generate_with(torch.tensor([0, 1, 2]), scaling, seeded(1))
    lengths = torch.tensor(out.stats["trajectory_lengths"])
    assert out.stats["tokens_consumed"] == int(lengths.sum()) == sum(fed) // copies
    assert out.stats["tokens_consumed"] < out.stats["tokens_full"] == 3 * 4 * 12
    assert set(lengths.flatten().tolist()) <= {3, 6, 9, 12}
    assert all(count >= 1 for count in out.stats["survivors"])
    # every label keeps a full-length trajectory, and the returned one is a survivor
    for label, selected in enumerate(out.stats["selected"]):
        assert lengths[label, selected] == 12
    assert out.ids.shape == (3, 12) and out.stats["forward_passes"] == 12


def test_threshold_one_keeps_only_the_best_and_guidance_follows_confidence():
    model = tiny()
    labels = torch.tensor([0, 2])
    strict = model.generate_with(labels, ScalingAR(Sampler(cfg_scale=2.0), 4, threshold=1.0, checkpoints=[0.5]), seeded(2))
    assert strict.stats["survivors"] == [1, 1]
    assert strict.stats["tokens_consumed"] == 2 * (4 * 6 + 6)
    constant = ScalingAR(Sampler(cfg_scale=2.0), 4, terminate=False, guidance_gain=0.0, guidance_phase=0.0)
    scheduled = ScalingAR(Sampler(cfg_scale=2.0), 4, terminate=False, guidance_gain=2.0, guidance_phase=0.0)
    first = model.generate_with(labels, constant, seeded(3))
    second = model.generate_with(labels, scheduled, seeded(3))
    assert first.stats["scores"] != second.stats["scores"]
    # without CFG there is nothing to schedule: the gain changes nothing
    plain = [model.generate_with(labels, ScalingAR(Sampler(), 4, guidance_gain=gain), seeded(3)).ids for gain in (0.0, 2.0)]
    assert torch.equal(*plain)


def test_selectable_from_flags_and_reproducible():
    parser = jsonargparse.ArgumentParser()
    add_sampler_arguments(parser)
    args = parser.parse_args(["--decoding", "scalingar", "--num-trajectories", "3", "--cfg-scale", "2",
                              "--threshold", "0.9", "--checkpoints", "0.3", "--entropy-temperature"])
    strategy = sampler_from_args(args)
    assert isinstance(strategy, ScalingAR) and strategy.num_trajectories == 3 and strategy.checkpoints == (0.3,)
    assert strategy.sampler.to_dict()["entropy_temperature"] is True
    model = tiny()
    first = model.generate_with(torch.tensor([0, 1]), strategy, seeded(5))
    second = model.generate_with(torch.tensor([0, 1]), strategy, seeded(5))
    assert torch.equal(first.ids, second.ids)
    assert isinstance(sampler_from_args(parser.parse_args(["--decoding", "best_of_n"])), BestOfN)
    with pytest.raises(ValueError, match="checkpoints"):
        ScalingAR(checkpoints=[1.5])
    assert math.isfinite(first.stats["scores"][0][0])


def count_network_calls(model):
    """A list that grows by one at every pass of the model's network (prefill, step or full forward)."""
    calls = []
    model.transformer.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[1]))
    return calls


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("num_tokens", [1, 12])
def test_forward_passes_count_every_network_call(cfg_scale, num_tokens):
    sampler = Sampler(cfg_scale=cfg_scale)
    labels = torch.tensor([0, 2])
    for strategy in (BestOfN(sampler, 3), ScalingAR(sampler, 3), ScalingAR(sampler, 3, terminate=False)):
        model = tiny()
        calls = count_network_calls(model)
        out = model.generate_with(labels, strategy, seeded(1), num_tokens=num_tokens)
        assert out.stats["forward_passes"] == len(calls), type(strategy).__name__
    # best-of-N: N trajectories decoded in one batch (num_tokens passes), then one prefill and one teacher-forced step
    model = tiny()
    calls = count_network_calls(model)
    out = model.generate_with(labels, BestOfN(sampler, 3), seeded(1), num_tokens=num_tokens)
    assert out.stats["forward_passes"] == len(calls) == num_tokens + min(num_tokens, 2)


def test_best_of_n_refuses_a_family_without_step_decoding_before_sampling():
    from flexar.generators import NAR

    torch.manual_seed(0)
    model = NAR(vocab_size=16, max_tokens=4, grid=[2, 2], num_classes=3, dim=16, depth=1, num_heads=2).eval()
    calls = []
    model.transformer.blocks[0].register_forward_hook(lambda module, inputs, output: calls.append(1))
    for strategy in (BestOfN(Sampler(), 2), ScalingAR(Sampler(), 2)):
        with pytest.raises(ValueError, match=rf"{type(strategy).__name__} cannot decode with NAR"):
            model.generate_with(torch.tensor([0]), strategy, seeded())
    assert calls == []
