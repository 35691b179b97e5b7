import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from flexar import Pipeline
from flexar.generators import NAR, RasterAR
from flexar.generators.nar import decode_order, neighbour_logits, neighbour_sources, proximity_mask
from flexar.nn import Block, make_norm
from flexar.sampling import BestOfN, LanternDecoder, Sampler, ScalingAR, SpeculativeDecoder
from flexar.tokenizers import VQGAN2D

from common import GeneratorContract, random_ids, seeded

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"square": [4, 4], "wide": [3, 5]}


def tiny_nar(grid=(4, 4), **overrides):
    kwargs = dict(vocab_size=16, max_tokens=grid[0] * grid[1], grid=list(grid), num_classes=4, dim=32, depth=2,
                  num_heads=2, init_std=0.2)
    return NAR(**{**kwargs, **overrides})


class TestNARContract(GeneratorContract):
    def make_generator(self):
        return tiny_nar()


class TestNARWideGridContract(GeneratorContract):
    def make_generator(self):
        return tiny_nar(grid=(2, 3))


class StepSampler(Sampler):
    """Greedy-shaped sampler that writes the pass index into every token it draws, and records logits per pass."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shapes = []

    def sample(self, logits, state=None, generator=None):
        self.shapes.append((state.step, state.num_steps, tuple(logits.shape)))
        guided = self.process(logits, state)  # CFG halves the doubled batch
        return torch.full(guided.shape[:-1], state.step, dtype=torch.long, device=logits.device)


# ----------------------------------------------------------------------------------------------------------------------
# mask, order and logit combination


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_proximity_mask_predicate(shape):
    height, width = SHAPES[shape]
    model = tiny_nar(grid=(height, width))
    allowed = model.mask("raster").dense(model.max_tokens + 1, model.max_tokens + 1)
    for i in range(model.max_tokens + 1):
        for j in range(model.max_tokens + 1):
            if i == 0 or j == 0:
                expected = j == 0  # the class token sees itself only, and every token sees it
            else:
                (ri, ci), (rj, cj) = divmod(i - 1, width), divmod(j - 1, width)
                expected = rj + cj <= ri + ci
            assert bool(allowed[i, j]) == expected, (i, j)
    # the decode-order mask is the same relation on the same cells, permuted
    order = torch.cat([torch.tensor([0]), model.order + 1])
    decode = model.mask("decode").dense(model.max_tokens + 1, model.max_tokens + 1)
    assert torch.equal(decode, allowed[order][:, order])
    # rows of the incremental mask are rows of the full one
    assert torch.equal(model.mask("decode").dense(3, 8, q_offset=5), decode[5:8, :8])


def test_decode_order_and_sources():
    assert decode_order(3, 3).tolist() == [0, 1, 3, 2, 4, 6, 5, 7, 8]
    horizontal, vertical = neighbour_sources(torch.arange(6), 2, 3)
    # raster sequence: cell k sits at index k + 1; (0, 0) reads the class token with both heads
    assert horizontal.tolist() == [0, 1, 2, -1, 4, 5]
    assert vertical.tolist() == [0, -1, -1, 1, 2, 3]


def test_logit_combination_rule():
    torch.manual_seed(0)
    model = tiny_nar(grid=(3, 4)).eval()
    ids, labels = random_ids(model, 2), torch.tensor([1, 3])
    with torch.no_grad():
        horizontal, vertical = model(ids, labels)
        logits = model.grid_logits(ids, labels)
    assert horizontal.shape == vertical.shape == (2, 13, 16) and logits.shape == (2, 12, 16)
    height, width = model.grid
    for cell in range(model.max_tokens):
        r, c = divmod(cell, width)
        if r == 0 and c == 0:
            expected = (horizontal[:, 0] + vertical[:, 0]) / 2
        elif r == 0:
            expected = horizontal[:, cell]  # sequence index of the left neighbour (cell - 1) is cell
        elif c == 0:
            expected = vertical[:, cell + 1 - width]
        else:
            expected = (horizontal[:, cell] + vertical[:, cell + 1 - width]) / 2
        torch.testing.assert_close(logits[:, cell], expected)
    # the loss is one cross-entropy over every cell
    loss, logs = model.training_loss(ids, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), ids.flatten()))
    # an absent source never contributes, even when its logits are not finite
    identity = torch.nn.Linear(3, 3, bias=False)
    torch.nn.init.eye_(identity.weight)
    inf = torch.full((1, 2, 3), float("inf"))
    combined = neighbour_logits(torch.ones(1, 2, 3), inf, identity, identity, torch.tensor([1]), torch.tensor([-1]))
    assert torch.equal(combined, torch.ones(1, 1, 3))


def test_vertical_head_is_one_extra_block_norm_and_linear():
    kwargs = dict(vocab_size=16, max_tokens=16, grid=[4, 4], num_classes=4, dim=32, depth=2, num_heads=2)
    base = sum(p.numel() for p in RasterAR(**kwargs).parameters())
    extra = sum(p.numel() for p in Block(32, 2).parameters()) + 32 + 32 * 16
    assert extra == sum(p.numel() for p in make_norm("rms", 32).parameters()) + 32 * 16 + sum(
        p.numel() for p in Block(32, 2).parameters()
    )
    nar = NAR(**kwargs)
    assert sum(p.numel() for p in nar.parameters()) == base + extra
    # the shared modules carry RasterAR's names: a raster state dict fills everything but the vertical head
    missing, unexpected = nar.load_state_dict(RasterAR(**kwargs).state_dict(), strict=False)
    assert not unexpected and {key.split(".")[0] for key in missing} == {"vertical_block", "vertical_norm", "vertical_head"}


# ----------------------------------------------------------------------------------------------------------------------
# decoding schedule


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_passes_and_decoded_set_per_pass(shape):
    height, width = SHAPES[shape]
    model = tiny_nar(grid=(height, width), vocab_size=16).eval()
    calls = []
    model.transformer.blocks[0].register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[:2]))
    sampler = StepSampler(cfg_scale=2.0)
    out = model.generate(torch.tensor([0, 1, 2]), sampler, seeded())
    passes = height + width - 1
    assert out.stats["forward_passes"] == passes == len(calls) == len(sampler.shapes)
    # every cell holds the index of the pass that decoded it: pass t decoded exactly the cells with r + c == t,
    # so after pass t the decoded set is {r + c <= t}
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    assert torch.equal(out.ids.view(3, height, width), (rows + cols).expand(3, -1, -1))
    for step, (recorded_step, num_steps, shape_) in enumerate(sampler.shapes):
        size = int(((rows + cols) == step).sum())
        assert (recorded_step, num_steps) == (step, passes) and shape_ == (6, size, 16)  # CFG-doubled rows
    # with the KV cache each pass feeds only the previous diagonal (the class token at pass 0)
    assert [length for _, length in calls] == [1] + [int(((rows + cols) == t).sum()) for t in range(passes - 1)]
    assert all(batch == 6 for batch, _ in calls)


def test_cached_logits_equal_teacher_forcing():
    torch.manual_seed(0)
    model = tiny_nar(grid=(3, 5)).eval()
    ids, labels = random_ids(model, 2), torch.tensor([1, 3])
    with torch.no_grad():
        teacher = model.grid_logits(ids, labels)
        decoded = ids[:, model.order]
        for use_cache in (True, False):
            cache = model.new_cache(2) if use_cache else None
            cached = torch.empty_like(teacher)
            for step in range(model.num_passes):
                cells = model.order[model.bounds[step + 1] - 1 : model.bounds[step + 2] - 1]
                cached[:, cells] = model.pass_logits(step, decoded, labels, cache)
            torch.testing.assert_close(cached, teacher, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="needs a KV cache holding"):
            model.pass_logits(2, decoded, labels, model.new_cache(2))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_generation_equals_recompute(cfg_scale):
    torch.manual_seed(0)
    model = tiny_nar(grid=(3, 4)).eval()
    labels, sampler = torch.tensor([0, 2, 3]), Sampler(top_p=0.9, cfg_scale=cfg_scale)
    cached = model.generate(labels, sampler, seeded(3), use_cache=True)
    recomputed = model.generate(labels, sampler, seeded(3), use_cache=False)
    assert torch.equal(cached.ids, recomputed.ids)
    assert cached.stats["forward_passes"] == recomputed.stats["forward_passes"] == 6


def test_a_token_never_influences_targets_at_its_distance_or_closer():
    torch.manual_seed(0)
    model = tiny_nar(grid=(4, 4)).eval()
    ids, labels = random_ids(model, 2), torch.tensor([0, 2])
    distance = model.raster_distance[1:]
    with torch.no_grad():
        reference = model.grid_logits(ids, labels)
        for cell in range(model.max_tokens):
            changed = ids.clone()
            changed[:, cell] = (changed[:, cell] + 1 + torch.arange(2)) % model.vocab_size
            logits = model.grid_logits(changed, labels)
            same = distance <= distance[cell]
            assert torch.equal(logits[:, same], reference[:, same]), cell
            # and it does reach its two neighbours one step further
            moved = (logits - reference).abs().amax(dim=(0, 2)) > 0
            r, c = divmod(cell, 4)
            if c < 3:
                assert moved[cell + 1]
            if r < 3:
                assert moved[cell + 4]


def test_flex_backend_equals_math_for_the_proximity_mask():
    torch.manual_seed(0)
    reference = tiny_nar(grid=(3, 4), attention_backend="math").eval()
    flex = tiny_nar(grid=(3, 4), attention_backend="flex").eval()
    flex.load_state_dict(reference.state_dict())
    ids, labels = random_ids(reference, 2), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(flex.grid_logits(ids, labels), reference.grid_logits(ids, labels),
                                   atol=1e-5, rtol=1e-5)
        # decoding passes, recomputed (decode-order mask) and cached (a whole diagonal per pass, unmasked)
        decoded = ids[:, reference.order]
        caches = reference.new_cache(2), flex.new_cache(2)
        for step in range(3):
            for cache, other in ((None, None), caches):
                torch.testing.assert_close(flex.pass_logits(step, decoded, labels, other),
                                           reference.pass_logits(step, decoded, labels, cache), atol=1e-5, rtol=1e-5)
    # the mask handed to FlexAttention is a flexar Mask with the proximity predicate
    distance = torch.tensor([-1, 0, 1, 1, 2])
    mask = proximity_mask(distance)
    assert mask.name == "proximity" and mask.dense(5, 5).tolist()[2] == [True, True, True, True, False]


def test_misuse_is_refused():
    model = tiny_nar().eval()
    with pytest.raises(ValueError, match="NAR generates whole 4x4 grids"):
        model.generate(torch.tensor([0]), Sampler(), seeded(), num_tokens=5)
    with pytest.raises(ValueError, match="NAR trains on whole 4x4 grids"):
        model.training_loss(random_ids(model, 2, length=5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NAR trains on whole 4x4 grids"):
        model.training_loss(random_ids(model, 2), torch.tensor([0, 1]), torch.tensor([16, 5]))
    with pytest.raises(ValueError, match=r"h \* w == max_tokens"):
        tiny_nar(max_tokens=15)


def test_decoding_strategies_refuse_nar_by_name_before_any_work():
    model = tiny_nar().eval()
    calls = []
    model.transformer.blocks[0].register_forward_hook(lambda module, inputs, output: calls.append(1))
    raster = RasterAR(vocab_size=16, max_tokens=16, num_classes=4, dim=16, depth=1, num_heads=2).eval()
    sampler = Sampler(cfg_scale=2.0)

    def strategies():
        return [SpeculativeDecoder(raster, sampler, 2), LanternDecoder(raster, sampler, 2, k=3), ScalingAR(sampler, 2),
                BestOfN(sampler, 2)]

    for strategy in strategies():
        with pytest.raises(ValueError, match=rf"{type(strategy).__name__} cannot decode with NAR: the NAR family has"):
            model.generate_with(torch.tensor([0, 1]), strategy, seeded())
    # through a pipeline the refusal comes before the strategy prepares anything (LANTERN's neighbour table)
    torch.manual_seed(0)
    pipe = Pipeline(VQGAN2D.from_preset("vq2d-tiny", image_size=16, channels=1, codebook_size=16), model)
    for strategy in strategies():
        with pytest.raises(ValueError, match=rf"{type(strategy).__name__} cannot decode with NAR"):
            pipe.generate([0, 1], sampler=strategy, seed=0)
        assert getattr(strategy, "neighbours", None) is None
    assert calls == []
    # a NAR draft for a raster target is refused by name too
    with pytest.raises(ValueError, match="cannot decode with NAR"):
        raster.generate_with(torch.tensor([0]), SpeculativeDecoder(model, sampler, 2), seeded())


def test_presets_config_and_pipeline(tmp_path):
    assert {"nar-b", "nar-m", "nar-l", "nar-xl", "nar-xxl", "nar-tiny", "nar-digits"} <= set(NAR.presets)
    assert NAR.presets["nar-l"].items() >= dict(dim=1024, depth=24, num_heads=16).items()
    model = NAR.from_preset("nar-tiny", vocab_size=32, max_tokens=16, grid=[4, 4]).eval()
    assert json.loads(json.dumps(model.config)) == model.config and NAR(**model.config).config == model.config
    torch.manual_seed(0)
    tokenizer = VQGAN2D.from_preset("vq2d-tiny", image_size=16, channels=1)
    pipe = Pipeline(tokenizer, model)
    images, stats = pipe.generate([1, 2], sampler=Sampler(cfg_scale=2.0), seed=0, return_stats=True)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8 and stats["forward_passes"] == 7
    pipe.save_pretrained(tmp_path / "pipe")
    again = Pipeline.from_pretrained(tmp_path / "pipe").generate([1, 2], sampler=Sampler(cfg_scale=2.0), seed=0)
    assert torch.equal(images, again)
    with pytest.raises(ValueError, match="generator grid"):
        Pipeline(tokenizer, NAR.from_preset("nar-tiny", vocab_size=32, max_tokens=16, grid=[2, 8]))
