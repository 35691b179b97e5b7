import json

import pytest
import torch
import torch.nn.functional as F

from flexar.generators import GenerationOutput, Generator, RasterAR
from flexar.hub import load_model
from flexar.nn import causal_mask
from flexar.sampling import Sampler

from common import GeneratorContract, random_ids, seeded


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # tiny models on shared CPU cores: thread hand-offs cost more than the arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_raster(**overrides):
    kwargs = dict(vocab_size=16, max_tokens=8, num_classes=4, dim=32, depth=2, num_heads=2, init_std=0.2)
    return RasterAR(**{**kwargs, **overrides})



class RecordingSampler(Sampler):
    """A Sampler that keeps the raw logits it was given and the probabilities it drew from at every step."""

    def __init__(self, *args, force_cfg=False, **kwargs):
        self.force_cfg = force_cfg
        super().__init__(*args, **kwargs)
        self.raw, self.drawn = [], []

    @property
    def uses_cfg(self):
        return self.force_cfg or self.cfg_scale != 1.0

    def sample(self, logits, state=None, generator=None):
        self.raw.append(logits.clone())
        self.drawn.append(self.probs(logits, state))
        return super().sample(logits, state, generator)



class TestRasterContract(GeneratorContract):
    def make_generator(self):
        return tiny_raster()


class TestRasterGridContract(GeneratorContract):
    def make_generator(self):
        return tiny_raster(max_tokens=16, grid=[4, 4])


# ----------------------------------------------------------------------------------------------------------------------
# raster-specific behaviour

MODELS = {"1d": dict(), "grid": dict(max_tokens=16, grid=[4, 4])}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_incremental_logits_equal_teacher_forcing(kind):
    torch.manual_seed(0)
    model = tiny_raster(**MODELS[kind]).eval()
    ids, labels = random_ids(model, 2), torch.tensor([1, 3])
    with torch.no_grad():
        full = model(ids, labels)  # (B, 1 + L, V): row j predicts t_j
        assert full.shape == (2, model.max_tokens + 1, model.vocab_size)
        cache = model.new_cache(2)
        torch.testing.assert_close(model.prefill(labels, cache), full[:, 0], atol=1e-5, rtol=1e-5)
        for index in range(model.max_tokens):
            logits = model.step(ids[:, index : index + 1], cache)
            torch.testing.assert_close(logits[:, 0], full[:, index + 1], atol=1e-5, rtol=1e-5)

        # several draft tokens in one pass, roll back, feed others: what speculative decoding does
        cache = model.new_cache(2)
        model.prefill(labels, cache)
        model.step(ids[:, :2], cache)
        drafts = (ids[:, 2:5] + 1) % model.vocab_size
        model.step(drafts, cache)
        cache.truncate(3)
        logits, hidden = model.step(ids[:, 2:5], cache, return_hidden=True)
        torch.testing.assert_close(logits, full[:, 3:6], atol=1e-5, rtol=1e-5)
        assert hidden.shape == (2, 3, model.dim) and cache.length == 6
        torch.testing.assert_close(model.head(hidden), logits)
        full_logits, full_hidden = model(ids, labels, return_hidden=True)
        torch.testing.assert_close(hidden, full_hidden[:, 3:6], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_generation_equals_recompute(kind, cfg_scale):
    torch.manual_seed(0)
    model = tiny_raster(**MODELS[kind]).eval()
    labels, sampler = torch.tensor([0, 2, 3]), Sampler(top_p=0.9, cfg_scale=cfg_scale)
    cached = model.generate(labels, sampler, seeded(3), use_cache=True)
    recomputed = model.generate(labels, sampler, seeded(3), use_cache=False)
    assert torch.equal(cached.ids, recomputed.ids)


def test_forward_passes_are_counted_honestly():
    torch.manual_seed(0)
    model = tiny_raster().eval()
    calls = []
    model.transformer.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[:2]))
    labels = torch.tensor([0, 1])
    for use_cache in (True, False):
        for cfg_scale in (1.0, 4.0):
            calls.clear()
            out = model.generate(labels, Sampler(cfg_scale=cfg_scale), seeded(), num_tokens=5, use_cache=use_cache)
            assert out.ids.shape == (2, 5)
            assert out.stats["forward_passes"] == len(calls) == 5
            assert out.stats["tokens"] == 10 and out.stats["batch_size"] == 2
            rows = 4 if cfg_scale != 1.0 else 2  # CFG: one pass per step over the doubled batch
            assert all(batch == rows for batch, _ in calls)
            lengths = [length for _, length in calls]
            assert lengths == ([1] * 5 if use_cache else [1, 2, 3, 4, 5])


def test_cfg_scale_one_equals_the_conditional_model():
    torch.manual_seed(0)
    model = tiny_raster().eval()
    labels = torch.tensor([0, 1, 2, 3])
    plain = RecordingSampler(top_k=8)
    doubled = RecordingSampler(top_k=8, force_cfg=True)  # runs the [labels; null] batch with guidance scale 1
    first = model.generate(labels, plain, seeded(7))
    second = model.generate(labels, doubled, seeded(7))
    assert doubled.raw[0].shape[0] == 8 and plain.raw[0].shape[0] == 4
    assert torch.equal(first.ids, second.ids)
    for p, q in zip(plain.drawn, doubled.drawn):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_unconditional_rows_use_the_null_class():
    torch.manual_seed(0)
    model = tiny_raster().eval()
    labels = torch.tensor([0, 1, 2, 3])
    sampler = RecordingSampler(cfg_scale=3.0)
    model.generate(labels, sampler, seeded())
    with torch.no_grad():
        null_logits = model.prefill(torch.full((4,), model.null_class), model.new_cache(4))
    torch.testing.assert_close(sampler.raw[0][4:], null_logits, atol=1e-6, rtol=1e-5)

    # guidance scale 0 is the unconditional model alone: the labels no longer matter
    unconditional = [model.generate(other, Sampler(cfg_scale=0.0), seeded(2)).ids for other in (labels, labels.flip(0))]
    assert torch.equal(*unconditional)
    conditional = [RecordingSampler(), RecordingSampler()]
    for other, recorder in zip((labels, labels.flip(0)), conditional):
        model.generate(other, recorder, seeded(2), num_tokens=1)
    assert not torch.allclose(conditional[0].drawn[0], conditional[1].drawn[0])

    # changing the null embedding moves guided sampling, and nothing at scale 1
    altered = tiny_raster().eval()
    altered.load_state_dict(model.state_dict())
    with torch.no_grad():
        altered.class_embed.weight[altered.null_class] = torch.randn(altered.dim, generator=seeded(9))
    for cfg_scale, changes in ((1.0, False), (3.0, True)):
        before, after = RecordingSampler(cfg_scale=cfg_scale), RecordingSampler(cfg_scale=cfg_scale)
        model.generate(labels, before, seeded(), num_tokens=1)
        altered.generate(labels, after, seeded(), num_tokens=1)
        assert torch.equal(before.drawn[0], after.drawn[0]) != changes


def test_loss_matches_hand_computed_cross_entropy():
    torch.manual_seed(0)
    model = tiny_raster().eval()
    ids, labels = random_ids(model, 3), torch.tensor([2, 0, 3])
    loss, logs = model.training_loss(ids, labels)
    with torch.no_grad():
        # the sequence the paper feeds: [class token, t_0 .. t_{L-2}], 1D rotary positions -1 (none), 0 .. L-2
        inputs = torch.cat([model.class_embed(labels)[:, None], model.token_embed(ids[:, :-1])], dim=1)
        rope = model.rope(torch.arange(-1, model.max_tokens - 1))
        logits = model.transformer(inputs, mask=causal_mask(), rope=rope) @ model.head.weight.T
        log_probs = logits.log_softmax(dim=-1).gather(-1, ids[..., None]).squeeze(-1)
        expected = -log_probs.mean()
        accuracy = (logits.argmax(-1) == ids).float().mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logs["accuracy"], accuracy)
    torch.testing.assert_close(logs["perplexity"], expected.exp())


def test_class_dropout_replaces_labels_by_the_null_class_in_training_only():
    torch.manual_seed(0)
    model = tiny_raster(class_dropout=1.0)
    ids, labels = random_ids(model, 3), torch.tensor([2, 0, 3])
    with torch.no_grad():
        null = torch.full_like(labels, model.null_class)
        targets_loss = F.cross_entropy(model(ids[:, :-1], null).flatten(0, 1), ids.flatten())
        conditional_loss = F.cross_entropy(model(ids[:, :-1], labels).flatten(0, 1), ids.flatten())
        torch.testing.assert_close(model.train().training_loss(ids, labels)[0], targets_loss)
        torch.testing.assert_close(model.eval().training_loss(ids, labels)[0], conditional_loss)
        model.class_dropout = 0.5
        dropped = model.train().drop_labels(torch.zeros(4000, dtype=torch.long), seeded())
        assert set(dropped.tolist()) == {0, model.null_class}
        assert abs((dropped == model.null_class).float().mean().item() - 0.5) < 0.05


def test_targets_past_lengths_are_ignored():
    torch.manual_seed(0)
    model = tiny_raster().eval()
    ids, labels, lengths = random_ids(model, 3), torch.tensor([1, 2, 3]), torch.tensor([3, 8, 1])
    loss, logs = model.training_loss(ids, labels, lengths)
    changed = ids.clone()
    changed[0, 3:] = (changed[0, 3:] + 5) % model.vocab_size
    changed[2, 1:] = (changed[2, 1:] + 7) % model.vocab_size
    assert torch.equal(model.training_loss(changed, labels, lengths)[0], loss)
    assert not torch.equal(model.training_loss(changed, labels)[0], model.training_loss(ids, labels)[0])
    with torch.no_grad():
        logits = model(ids[:, :-1], labels)
        valid = torch.arange(8)[None] < lengths[:, None]
        expected = F.cross_entropy(logits[valid], ids[valid])
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 8\]"):
        model.training_loss(ids, labels, torch.tensor([0, 8, 8]))
    with pytest.raises(ValueError, match=r"lengths must be a \(3,\) integer tensor"):
        model.training_loss(ids, labels, torch.tensor([3, 8]))


def test_grid_mode_uses_2d_rotary_positions():
    torch.manual_seed(0)
    grid_model = tiny_raster(max_tokens=16, grid=[4, 4]).eval()
    assert grid_model.rope.axes == 2 and grid_model.grid == (4, 4)
    assert grid_model.positions[0].tolist() == [-1, -1] and grid_model.positions[6].tolist() == [1, 1]
    flat_model = tiny_raster(max_tokens=16).eval()
    flat_model.load_state_dict(grid_model.state_dict())
    ids, labels = random_ids(grid_model, 2), torch.tensor([0, 1])
    with torch.no_grad():
        grid_logits, flat_logits = grid_model(ids, labels), flat_model(ids, labels)
    # the first row of the grid has rotations of its own; both agree only on the class token (no rotation)
    torch.testing.assert_close(grid_logits[:, :2], flat_logits[:, :2])
    assert not torch.allclose(grid_logits[:, 3:], flat_logits[:, 3:], atol=1e-4)
    with pytest.raises(ValueError, match=r"h \* w == max_tokens \(16\)"):
        tiny_raster(max_tokens=16, grid=[4, 5])


def test_decoding_hooks_refuse_misuse():
    model = tiny_raster().eval()
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="prefilled KV cache"):
        model.step(torch.zeros(2, 1, dtype=torch.long), cache)
    model.prefill(torch.tensor([0, 1]), cache)
    with pytest.raises(ValueError, match="empty KV cache"):
        model.prefill(torch.tensor([0, 1]), cache)
    with pytest.raises(ValueError, match="past the class token"):
        model.step(torch.zeros(2, model.max_tokens + 1, dtype=torch.long), cache)


def test_presets_config_and_progress_bar(capsys):
    assert {"raster-b", "raster-l", "raster-xl", "raster-xxl", "raster-3b", "raster-tiny", "raster-digits"} <= set(
        RasterAR.presets)
    model = RasterAR.from_preset("raster-tiny", vocab_size=16, max_tokens=4)
    assert model.transformer.depth == 2 and model.dim == 64
    assert json.loads(json.dumps(model.config)) == model.config
    assert RasterAR(**model.config).config == model.config
    with pytest.raises(ValueError, match="unknown RasterAR preset"):
        RasterAR.from_preset("raster-huge", vocab_size=16, max_tokens=4)
    out = model.generate(torch.tensor([1]), Sampler(temperature=0.0), progress=True)
    assert out.ids.shape == (1, 4)


def test_llamagen_switches_class_token_rotary_norm_eps_and_mlp_rounding():
    torch.manual_seed(0)
    kwargs = dict(vocab_size=32, max_tokens=16, num_classes=3, grid=[4, 4], dim=32, depth=2, num_heads=2)
    identity = RasterAR(**kwargs).eval()
    llamagen = RasterAR(**kwargs, class_token_rotary="zero", norm_eps=1e-5, mlp_multiple_of=256).eval()
    cos, sin = llamagen.rotary(0, 3)
    assert torch.equal(cos[0], torch.zeros_like(cos[0])) and torch.equal(sin[0], torch.zeros_like(sin[0]))
    assert torch.equal(identity.rotary(0, 3)[0][0], torch.ones_like(cos[0]))
    assert torch.equal(llamagen.rotary(1, 2)[0], identity.rotary(1, 2)[0])  # only the class token differs
    assert llamagen.transformer.final_norm.eps == 1e-5
    assert llamagen.transformer.blocks[0].mlp.down.in_features == 256  # 2/3 * 128 rounded up to 256
    # with the same weights the class token's zero query/key change the outputs, and the KV cache stays exact
    switched = RasterAR(**kwargs, class_token_rotary="zero").eval()
    switched.load_state_dict(identity.state_dict())
    ids, labels = torch.randint(0, 32, (2, 16)), torch.tensor([0, 2])
    assert not torch.allclose(switched(ids[:, :-1], labels), identity(ids[:, :-1], labels))
    cache = switched.new_cache(2)
    incremental = [switched.prefill(labels, cache)] + [switched.step(ids[:, i : i + 1], cache)[:, 0] for i in range(15)]
    torch.testing.assert_close(torch.stack(incremental, 1), switched(ids[:, :-1], labels), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="class_token_rotary"):
        RasterAR(**kwargs, class_token_rotary="none")


def test_strategies_read_the_declared_capability_not_the_methods():
    from flexar.sampling import BestOfN, LanternDecoder, ScalingAR, SpeculativeDecoder

    class Declined(RasterAR):
        """Keeps every decoding hook of RasterAR but declares no token-by-token decoding."""

        supports_step_decoding = False

    torch.manual_seed(0)
    model = Declined(vocab_size=16, max_tokens=8, num_classes=4, dim=16, depth=1, num_heads=2).eval()
    draft = tiny_raster().eval()
    sampler = Sampler(cfg_scale=2.0)
    message = r"cannot decode with Declined: the Declined family has no token-by-token decoding \(Declined.supports_step_decoding is False\)"
    for strategy in (SpeculativeDecoder(draft, sampler, 2), LanternDecoder(draft, sampler, 2, k=3), ScalingAR(sampler, 2),
                     BestOfN(sampler, 2)):
        with pytest.raises(ValueError, match=rf"{type(strategy).__name__} {message}"):
            model.generate_with(torch.tensor([0, 1]), strategy, seeded())
    # as a draft too, and its own hooks refuse to run
    with pytest.raises(ValueError, match=rf"SpeculativeDecoder's draft {message}"):
        draft.generate_with(torch.tensor([0]), SpeculativeDecoder(model, sampler, 2), seeded())
    with pytest.raises(NotImplementedError, match="Declined has no token-by-token decoding"):
        model.start_decoding(torch.tensor([0]), 1, 8)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_a_decoding_run_without_a_cache_equals_the_cached_run(cfg_scale):
    """StepDecoding recomputes the fed prefix when it has no cache; feed, roll back and row selection agree."""
    model = tiny_raster().eval()
    labels = torch.tensor([0, 1, 2, 3])
    conditions = model.guidance_labels(labels, Sampler(cfg_scale=cfg_scale))
    copies = conditions.shape[0] // labels.shape[0]
    ids = random_ids(model, 4)
    cached, recomputed = (model.start_decoding(conditions, copies, model.max_tokens, use_cache) for use_cache in (True, False))
    with torch.no_grad():
        torch.testing.assert_close(cached.start(), recomputed.start())
        torch.testing.assert_close(cached.feed(ids[:, :3]), recomputed.feed(ids[:, :3]))
        for run in (cached, recomputed):
            run.truncate(2)  # keep the class token and t_0
            run.select(torch.tensor([3, 1]))
        assert cached.length == recomputed.length == 2
        kept = ids[[3, 1]]
        logits, hidden = cached.feed(kept[:, 1:4], return_hidden=True)
        logits_again, hidden_again = recomputed.feed(kept[:, 1:4], return_hidden=True)
        torch.testing.assert_close(logits, logits_again, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, hidden_again, atol=1e-5, rtol=1e-5)
        # both equal teacher forcing of the kept rows
        full = model(kept[:, :4].repeat(copies, 1), conditions.view(copies, -1)[:, [3, 1]].flatten())
        torch.testing.assert_close(logits, full[:, 2:5], atol=1e-5, rtol=1e-5)
    assert cached.forward_passes == recomputed.forward_passes == 3
