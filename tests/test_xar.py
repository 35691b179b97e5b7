"""xAR (next-X prediction with flow matching): the entity partitions, the block-causal mask, noisy context learning,
the per-entity sampler with its KV cache, CFG ramp and call count, and the flow integrator on an exact velocity."""
import math

import pytest
import torch

from flexar.generators import XAR
from flexar.generators.xar import ENTITIES, entity_partition
from flexar.sampling import FlowSampler, Sampler

from common import seeded

SIDE, CHANNELS = 4, 2


def make(entity="cell", **overrides) -> XAR:
    torch.manual_seed(0)
    kwargs = dict(latent_channels=CHANNELS, latent_size=SIDE, num_classes=3, entity=entity, dim=32, depth=1,
                  decoder_depth=1, num_heads=2)
    return XAR(**{**kwargs, **overrides}).eval()


def scrambled(model: XAR, seed=1) -> XAR:
    """`model` with every weight random, the AdaLN modulations included (they start at zero, which would make each
    block the identity and hide what the context does)."""
    generator = seeded(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def latents(batch=3, seed=0):
    return torch.randn(batch, CHANNELS, SIDE, SIDE, generator=seeded(seed))


LABELS = torch.tensor([0, 1, 2])


# -- entity partitions -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entity", ENTITIES)
@pytest.mark.parametrize("side", [4, 8])
def test_every_partition_covers_each_position_once_and_inverts_exactly(entity, side):
    order, sizes = entity_partition(entity, side, cell_size=2, stride=2)
    assert sorted(order.tolist()) == list(range(side * side))
    assert int(sizes.sum()) == side * side and bool((sizes > 0).all())
    model = XAR(latent_channels=3, latent_size=side, entity=entity, dim=16, depth=1, decoder_depth=0, num_heads=1)
    x = torch.randn(2, 3, side, side)
    sequence = model.to_sequence(x)
    assert torch.equal(model.to_latents(sequence), x)
    # position j of the sequence is latent position order[j]
    assert torch.equal(sequence[:, 5], x.flatten(2)[:, :, int(order[5])])


def test_the_partitions_are_the_entities_they_name():
    # 4 x 4 raster indices:  0  1  2  3 /  4  5  6  7 /  8  9 10 11 / 12 13 14 15
    order, sizes = entity_partition("cell", 4, cell_size=2)
    assert sizes.tolist() == [4] * 4 and order[:8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    order, sizes = entity_partition("subsample", 4, stride=2)
    assert sizes.tolist() == [4] * 4 and order[:8].tolist() == [0, 2, 8, 10, 1, 3, 9, 11]
    order, sizes = entity_partition("scale", 4)
    assert sizes.tolist() == [1, 3, 12] and order[:4].tolist() == [0, 2, 8, 10]
    assert entity_partition("scale", 8)[1].tolist() == [1, 3, 12, 48]
    assert entity_partition("token", 4)[1].tolist() == [1] * 16
    assert entity_partition("image", 4)[1].tolist() == [16]
    assert entity_partition("cell", 8, cell_size=4)[1].tolist() == [16] * 4


def test_bad_partitions_are_refused_by_name():
    with pytest.raises(ValueError, match="entity must be one of"):
        entity_partition("patch", 4)
    with pytest.raises(ValueError, match="cell_size 3 must divide the latent side 4"):
        entity_partition("cell", 4, cell_size=3)
    with pytest.raises(ValueError, match="stride 3 must divide"):
        entity_partition("subsample", 6 - 2, stride=3)
    with pytest.raises(ValueError, match="power of two, got 6"):
        entity_partition("scale", 6)


def test_rope_positions_follow_the_reordering():
    model = make("subsample")
    rows, cols = model.positions[:, 0], model.positions[:, 1]
    assert torch.equal(rows * SIDE + cols, model.order)


# -- the mask --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entity", ["cell", "subsample", "scale"])
def test_the_mask_is_block_causal_by_entity(entity):
    model = make(entity)
    dense = model.mask.dense(SIDE * SIDE, SIDE * SIDE)
    ids = model.entity_ids
    assert torch.equal(dense, ids[None, :] <= ids[:, None])
    # behaviour: changing entity k's input changes no output of an earlier entity, and some output of entity k
    model = scrambled(model)
    tokens = torch.randn(2, SIDE * SIDE, CHANNELS, generator=seeded(2))
    times = torch.rand(2, SIDE * SIDE, generator=seeded(3))
    every = torch.arange(SIDE * SIDE)
    labels = torch.tensor([0, 1])
    base = model(tokens, times, labels, every)
    k = 1
    changed = tokens.clone()
    inside = ids == k
    changed[:, inside] += 1.0
    out = model(changed, times, labels, every)
    assert torch.allclose(out[:, ids < k], base[:, ids < k], atol=1e-6)
    assert not torch.allclose(out[:, inside], base[:, inside], atol=1e-3)


# -- training ----------------------------------------------------------------------------------------------------------
class Recorder:
    """Wraps a model's forward and keeps (tokens, times, index, output) of every call."""

    def __init__(self, model):
        self.calls = []
        original = model.forward

        def forward(tokens, times, labels, index, mask=None, kv_cache=None, commit=0):
            out = original(tokens, times, labels, index, mask=mask, kv_cache=kv_cache, commit=commit)
            self.calls.append(dict(tokens=tokens.clone(), times=times.clone(), index=index.clone(), out=out,
                                   commit=commit, cached=0 if kv_cache is None else kv_cache.length, labels=labels))
            return out

        model.forward = forward


@pytest.mark.parametrize("entity", ["cell", "scale", "token"])
def test_training_inputs_are_never_clean_each_entity_has_its_t_and_the_target_is_eps_minus_x(entity):
    model = make(entity).train()
    recorder = Recorder(model)
    x = latents()
    torch.manual_seed(4)
    loss, logs = model.training_loss(x, LABELS)
    (call,) = recorder.calls
    clean = model.to_sequence(x)
    times = call["times"]
    assert bool((times > 0).all()) and bool((times < 1).all())
    # one t per (image, entity), constant over the entity's positions, different between entities and images
    ids = model.entity_ids
    per_entity = torch.stack([times[:, ids == k][:, 0] for k in range(model.num_entities)], dim=1)
    for k in range(model.num_entities):
        assert torch.equal(times[:, ids == k], per_entity[:, k : k + 1].expand(-1, int((ids == k).sum())))
    assert len(set(per_entity.flatten().tolist())) == per_entity.numel()
    # no position is clean, and x_t = (1 - t) x + t eps with the eps the loss targets: eps - x
    assert bool(((call["tokens"] - clean).abs() > 0).all())
    t = times[..., None]
    eps = (call["tokens"] - (1 - t) * clean) / t
    expected = torch.mean((call["out"] - (eps - clean)) ** 2)
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-5)
    assert loss.requires_grad


def test_the_clean_context_ablation_reads_clean_entities_before_its_own():
    model = make("cell", noisy_context=False).train()
    recorder = Recorder(model)
    x = latents()
    model.training_loss(x, LABELS)
    (call,) = recorder.calls
    n = SIDE * SIDE
    assert call["tokens"].shape[1] == 2 * n
    assert torch.equal(call["tokens"][:, :n], model.to_sequence(x)) and bool((call["times"][:, :n] == 0).all())
    assert bool((call["times"][:, n:] > 0).all())
    dense = model.teacher_forcing_mask().dense(2 * n, 2 * n)
    ids = model.entity_ids
    assert torch.equal(dense[n:, :n], ids[None, :] < ids[:, None])  # noisy entity k reads clean entities < k
    assert torch.equal(dense[n:, n:], ids[None, :] == ids[:, None])  # and itself, never another noisy entity
    assert not bool(dense[:n, n:].any())  # the clean half never reads the noisy one


def test_a_short_training_run_lowers_the_flow_loss():
    torch.manual_seed(0)
    model = make("cell").train()
    x = latents(8, seed=5)
    labels = torch.arange(8) % 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        torch.manual_seed(100 + step % 4)  # four fixed draws of t and eps, seen in turn
        loss, _ = model.training_loss(x, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_bad_training_inputs_are_refused():
    model = make()
    with pytest.raises(ValueError, match=r"latents of shape \(B, 2, 4, 4\)"):
        model.training_loss(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="float tensor"):
        model.training_loss(torch.zeros(2, 2, 4, 4, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lengths must all be 16"):
        model.training_loss(latents(2), torch.tensor([0, 1]), torch.tensor([16, 8]))


# -- sampling ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entity, count", [("token", 16), ("cell", 4), ("subsample", 4), ("scale", 3), ("image", 1)])
@pytest.mark.parametrize("noise", [True, False])
def test_inference_makes_exactly_entities_times_steps_calls(entity, count, noise):
    model = make(entity)
    recorder = Recorder(model)
    out = model.generate(LABELS, FlowSampler(steps=3, cfg_scale=2.0, noise=noise), seeded())
    assert len(recorder.calls) == count * 3 == out.stats["forward_passes"]
    assert out.ids is None and out.latents.shape == (3, CHANNELS, SIDE, SIDE)
    assert out.lengths.tolist() == [SIDE * SIDE] * 3
    # CFG doubles the rows of each call, not the calls
    assert all(call["tokens"].shape[0] == 6 for call in recorder.calls)


def test_each_finished_entity_enters_the_cache_clean_at_t_zero():
    model = scrambled(make("cell"))
    recorder = Recorder(model)
    steps = 3
    out = model.generate(LABELS, FlowSampler(steps=steps), seeded())
    final = model.to_sequence(out.latents)
    starts = model.starts.tolist()
    for k in range(model.num_entities):
        first, *rest = recorder.calls[k * steps : (k + 1) * steps]
        size = starts[k + 1] - starts[k]
        if k == 0:
            assert first["tokens"].shape[1] == size and first["commit"] == 0
        else:
            previous = starts[k] - starts[k - 1]
            # entity k - 1 as it was finished, at t = 0, committed to the cache; entity k at t = 1
            assert torch.allclose(first["tokens"][:, :previous], final[:, starts[k - 1] : starts[k]])
            assert bool((first["times"][:, :previous] == 0).all()) and bool((first["times"][:, previous:] == 1).all())
            assert first["commit"] == previous and first["cached"] == starts[k]
        for call in rest:  # the other calls feed entity k alone against the cached prefix, which they leave as it is
            assert call["tokens"].shape[1] == size and call["commit"] == 0 and call["cached"] == starts[k]
            assert bool((call["times"] > 0).all()) and bool((call["times"] < 1).all())


@pytest.mark.parametrize("entity", ["cell", "scale", "token"])
@pytest.mark.parametrize("noise", [True, False])
def test_the_kv_cache_equals_a_full_recompute(entity, noise):
    model = scrambled(make(entity))
    sampler = FlowSampler(steps=3, cfg_scale=1.5, noise=noise)
    cached = model.generate(LABELS, sampler, seeded(7)).latents
    recomputed = model.generate(LABELS, sampler, seeded(7), use_cache=False).latents
    assert torch.allclose(cached, recomputed, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cached, model.generate(LABELS, sampler, seeded(8)).latents)


def test_the_cfg_ramp_starts_at_one():
    sampler = FlowSampler(cfg_scale=3.0)
    assert [sampler.entity_scale(k, 5) for k in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert sampler.entity_scale(0, 1) == 3.0  # a single entity (image) gets the whole scale
    # behaviour: the first entity is the conditional sample whatever the scale; the last one is not
    model = scrambled(make("cell"))
    guided = model.to_sequence(model.generate(LABELS, FlowSampler(steps=3, cfg_scale=4.0), seeded(1)).latents)
    plain = model.to_sequence(model.generate(LABELS, FlowSampler(steps=3, cfg_scale=1.0), seeded(1)).latents)
    first, last = slice(0, 4), slice(12, 16)
    assert torch.allclose(guided[:, first], plain[:, first], atol=1e-5)
    assert not torch.allclose(guided[:, last], plain[:, last], atol=1e-3)


def test_generation_is_seeded_and_leaves_the_global_rng_alone():
    model = scrambled(make("subsample"))
    sampler = FlowSampler(steps=2)
    first = model.generate(LABELS, sampler, seeded(3)).latents
    assert torch.equal(first, model.generate(LABELS, sampler, seeded(3)).latents)
    state = torch.get_rng_state()
    model.generate(LABELS, sampler)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_token_sampler_and_a_partial_length_are_refused_by_name():
    model = make()
    with pytest.raises(ValueError, match=r"flow generator over continuous latents.*Sampler with the logit processors.*"
                                         r"FlowSampler\(steps="):
        model.generate(LABELS, Sampler(top_k=5), seeded())
    with pytest.raises(ValueError, match="generates whole latents"):
        model.generate(LABELS, FlowSampler(steps=2), seeded(), num_tokens=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model.generate(torch.tensor([3]), FlowSampler(steps=2), seeded())


def test_flow_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        FlowSampler(steps=0)
    with pytest.raises(ValueError, match="needs steps >= 2"):
        FlowSampler(steps=1, noise=True)
    FlowSampler(steps=1, noise=False)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        FlowSampler(cfg_scale=float("nan"))
    with pytest.raises(ValueError, match=r"t_min must lie in \(0, 1\)"):
        FlowSampler(t_min=1.0)
    assert FlowSampler(steps=4).times().tolist() == pytest.approx([1.0, 0.68, 0.36, 0.04, 0.0])
    assert FlowSampler(steps=4, noise=False).times().tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


# -- the integrator on an exact velocity -------------------------------------------------------------------------------
MU, SIGMA = 1.5, 0.5  # data x_0 ~ N(MU, SIGMA^2); x_t = (1 - t) x_0 + t eps


def exact_velocity(x, t):
    """E[eps - x_0 | x_t] for the Gaussian data above."""
    mean = (1 - t) * MU
    variance = (1 - t) ** 2 * SIGMA**2 + t**2
    expected_x0 = MU + (1 - t) * SIGMA**2 / variance * (x - mean)
    expected_eps = t / variance * (x - mean)
    return expected_eps - expected_x0


def integrate(sampler, x, generator=None):
    times = sampler.times().tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) if sampler.noise and t_next > 0 else None
        x = sampler.step(x, exact_velocity(x, t), t, t_next, noise)
    return x


def test_euler_converges_to_the_exact_flow_as_steps_grow():
    # the exact probability-flow map of a Gaussian is x_1 -> MU + SIGMA x_1
    start = torch.linspace(-2, 2, 9, dtype=torch.float64)
    errors = [float((integrate(FlowSampler(steps=steps, noise=False), start) - (MU + SIGMA * start)).abs().max())
              for steps in (4, 16, 64, 256)]
    assert all(later < 0.5 * earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2


def test_euler_maruyama_samples_the_data_law():
    generator = seeded(0)
    start = torch.randn(20000, generator=generator, dtype=torch.float64)
    samples = integrate(FlowSampler(steps=200, noise=True), start, generator)
    assert abs(float(samples.mean()) - MU) < 0.03
    # the final mean step from t_min leaves a little of the noise's spread behind, as in xAR's sampler
    assert abs(float(samples.std()) - SIGMA) < 0.05
    assert math.isfinite(float(samples.abs().max()))


# -- persistence -------------------------------------------------------------------------------------------------------
def test_a_saved_xar_rebuilds_and_generates_the_same_latents(tmp_path):
    from flexar.hub import load_model

    model = scrambled(make("scale"))
    model.save_pretrained(tmp_path / "xar")
    loaded = load_model(tmp_path / "xar").eval()
    assert type(loaded) is XAR and loaded.entity == "scale"
    sampler = FlowSampler(steps=2, cfg_scale=2.0)
    assert torch.allclose(model.generate(LABELS, sampler, seeded(2)).latents,
                          loaded.generate(LABELS, sampler, seeded(2)).latents)


# -- the pipeline ------------------------------------------------------------------------------------------------------
def tiny_vae():
    from flexar.tokenizers import VAE

    torch.manual_seed(0)
    return VAE(image_size=16, channels=1, latent_channels=2, block_out_channels=[8, 8], layers_per_block=1,
               norm_num_groups=4, mid_block_attention=False).eval()


def tiny_xar(**overrides):
    torch.manual_seed(0)
    return XAR(**{**dict(latent_channels=2, latent_size=8, num_classes=3, entity="cell", cell_size=4, dim=32, depth=1,
                         decoder_depth=1, num_heads=2), **overrides}).eval()


def test_a_pipeline_generates_images_through_the_vae_and_round_trips(tmp_path):
    import warnings

    from flexar import Pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an in-memory generator records no tokenizer
        pipe = Pipeline(tiny_vae(), scrambled(tiny_xar()))
    sampler = FlowSampler(steps=2, cfg_scale=2.0)
    images, stats = pipe.generate([0, 1, 2], sampler=sampler, seed=3, return_stats=True)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert stats["forward_passes"] == 4 * 2 and stats["lengths"] == [64] * 3
    # the same seed gives the same images whatever the batch size
    assert torch.equal(images, pipe.generate([0, 1, 2], sampler=sampler, seed=3, batch_size=1))
    floats = pipe.generate([0], sampler=sampler, seed=3, output_type="pt")
    assert floats.dtype == torch.float32 and 0 <= float(floats.min()) and float(floats.max()) <= 1
    pipe.save_pretrained(tmp_path / "pipeline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = Pipeline.from_pretrained(tmp_path / "pipeline")
    assert torch.equal(loaded.generate([0, 1, 2], sampler=sampler, seed=3), images)
    with pytest.raises(ValueError, match=r"flow generator over continuous latents.*FlowSampler"):
        pipe.generate([0], sampler=Sampler(temperature=0.5))
    with pytest.raises(ValueError, match="num_tokens must be None for XAR"):
        pipe.generate([0], sampler=sampler, num_tokens=4)


def test_a_pipeline_refuses_a_flow_generator_with_the_wrong_tokenizer():
    from flexar import Pipeline
    from flexar.generators import RasterAR
    from flexar.tokenizers import TiTok

    with pytest.raises(ValueError, match=r"generator latent_channels 3 != tokenizer latent_channels 2"):
        Pipeline(tiny_vae(), tiny_xar(latent_channels=3), check_provenance=False)
    with pytest.raises(ValueError, match=r"generator latent_size 4 != tokenizer latent_size 8"):
        Pipeline(tiny_vae(), tiny_xar(latent_size=4), check_provenance=False)
    titok = TiTok(image_size=16, channels=1, patch_size=4, width=16, depth=1, num_heads=2, num_latent_tokens=4,
                  quantizer="fsq", fsq_levels=[4, 4])
    with pytest.raises(ValueError, match="TiTok has no decode_latents"):
        Pipeline(titok, tiny_xar(), check_provenance=False)
    raster = RasterAR(vocab_size=16, max_tokens=4, num_classes=3, dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="VAE has no codebook"):
        Pipeline(tiny_vae(), raster, check_provenance=False)


def test_flexar_sample_draws_a_flow_pipeline_with_the_flow_flags(tmp_path, capsys):
    import json
    import warnings

    from flexar import Pipeline
    from flexar.cli.sample import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Pipeline(tiny_vae(), scrambled(tiny_xar())).save_pretrained(tmp_path / "pipeline")
        main(["--pipeline", str(tmp_path / "pipeline"), "--labels", "0", "2", "--per-label", "2", "--flow-steps", "2",
              "--flow-noise", "false", "--output", str(tmp_path / "grid.png")])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / "grid.png").is_file() and record["images"] == 4
    assert record["sampler"] == {"steps": 2, "cfg_scale": 2.0, "noise": False, "t_min": 0.04}
    assert record["forward_passes"] == 4 * 2  # four entities, two steps each
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["--pipeline", str(tmp_path / "pipeline"), "--top-k", "5", "--output", str(tmp_path / "other.png")])
    assert "--top-k act on logits" in capsys.readouterr().err


def test_flexar_fid_scores_a_flow_pipeline_and_records_its_flow_sampler(tmp_path):
    import json
    import warnings

    from flexar import Pipeline
    from flexar.cli import fid as script
    from flexar.eval.classifier import DigitClassifier

    torch.manual_seed(0)
    DigitClassifier(in_channels=1, num_classes=10, image_size=16, width=8, feature_dim=16).save_pretrained(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Pipeline(tiny_vae(), scrambled(tiny_xar())).save_pretrained(tmp_path / "pipeline")
        argv = ["--pipeline", str(tmp_path / "pipeline"), "--num-samples", "20", "--reference-limit", "30",
                "--extractor", f"classifier:{tmp_path / 'c'}", "--flow-steps", "2", "--cfg-scale", "1.5",
                "--output", str(tmp_path / "fid.json")]
        assert script.main(argv) == 0
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["sampler"] == {"steps": 2, "cfg_scale": 1.5, "noise": True, "t_min": 0.04}
    assert result["forward_passes"] == 4 * 2 and result["fid"] >= 0
