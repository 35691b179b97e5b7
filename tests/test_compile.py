"""Compiled decoding steps (torch.compile on the CPU): the same tokens as eager decoding, bounded recompilation."""
import pytest
import torch

from flexar import Pipeline
from flexar.generators import MVAR, NAR, VAR, EagleDraftHead, RasterAR, TokenShuffleAR
from flexar.sampling import Sampler, SpeculativeDecoder
from flexar.tokenizers import MultiScaleVQ, TiTok

from common import seeded


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs compiled by earlier tests in this process are not counted
    yield
    torch._dynamo.reset()


def compiled_frames() -> int:
    """Frames dynamo has compiled so far (each new graph of the step, recompilations included)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def raster(**overrides):
    torch.manual_seed(0)
    kwargs = dict(vocab_size=16, max_tokens=10, num_classes=3, dim=32, depth=2, num_heads=2, init_std=0.3)
    return RasterAR(**{**kwargs, **overrides}).eval()


def test_compiled_raster_decoding_gives_eager_tokens_and_compiles_once():
    model = raster()
    labels = torch.tensor([0, 1, 2])
    samplers = [Sampler(temperature=0.0, cfg_scale=2.0), Sampler(temperature=1.0, top_k=8, cfg_scale=2.0)]
    eager = [model.generate(labels, sampler, seeded(3)).ids for sampler in samplers]
    model.compile_decoding()
    assert model.decoding_compiled
    compiled = [model.generate(labels, sampler, seeded(3)).ids for sampler in samplers]
    for expected, got in zip(eager, compiled):
        assert torch.equal(expected, got)
    # one graph serves every step of both runs: the step reads the cache's device lengths, never a host-side count
    assert compiled_frames() == 1
    model.compile_decoding(False)
    assert not model.decoding_compiled and torch.equal(model.generate(labels, samplers[1], seeded(3)).ids, eager[1])


def test_compiled_token_shuffle_decoding_gives_eager_tokens():
    torch.manual_seed(0)
    model = TokenShuffleAR(vocab_size=16, max_tokens=16, grid=(4, 4), num_classes=3, dim=32, depth=1,
                           num_heads=2).eval()
    labels = torch.tensor([2, 0])
    sampler = Sampler(temperature=1.0, cfg_scale=1.5)
    eager = model.generate(labels, sampler, seeded(1)).ids
    assert torch.equal(model.compile_decoding().generate(labels, sampler, seeded(1)).ids, eager)


def assert_compiled_gives_eager_tokens(model, labels, seed: int, forward_passes: int) -> None:
    """Greedy and sampled generation with CFG: the same ids (and pass count) after ``compile_decoding()``."""
    samplers = [Sampler(temperature=0.0, cfg_scale=2.0), Sampler(temperature=1.0, top_k=8, cfg_scale=2.0)]
    eager = [model.generate(labels, sampler, seeded(seed)).ids for sampler in samplers]
    model.compile_decoding()
    assert model.decoding_compiled
    for sampler, expected in zip(samplers, eager):
        output = model.generate(labels, sampler, seeded(seed))
        assert torch.equal(output.ids, expected) and output.stats["forward_passes"] == forward_passes


def test_compiled_nar_passes_give_eager_tokens_with_one_graph_for_every_diagonal():
    torch.manual_seed(0)
    model = NAR(vocab_size=16, max_tokens=20, grid=[4, 5], num_classes=3, dim=32, depth=2, num_heads=2).eval()
    assert_compiled_gives_eager_tokens(model, torch.tensor([0, 1, 2]), seed=3, forward_passes=8)
    # diagonals of 1 to 4 cells, padded to 4: one graph for all 7 cached passes of both runs
    assert compiled_frames() == 1
    # the last pass (one cell, padded to 4) needs 3 positions more than eager decoding's cache holds
    short = model.new_cache(6)
    short.advance(model.bounds[7])
    with pytest.raises(ValueError, match="room for the padded diagonal"):
        model.compiled_pass_logits(7, torch.zeros(6, 20, dtype=torch.long), short)


def test_compiled_var_scales_give_eager_tokens_with_two_graphs_for_every_scale():
    torch.manual_seed(0)
    pyramid = MultiScaleVQ.from_preset("msvq-tiny").eval()
    model = VAR.from_preset("var-tiny")
    model.load_tokenizer(pyramid)
    with torch.no_grad():  # AdaLN-zero blocks start as the identity: give them weights that mix the scales
        for block in model.transformer.blocks:
            block.modulation[1].weight.normal_(std=0.3)
    model.eval()
    assert_compiled_gives_eager_tokens(model, torch.tensor([0, 3, 7]), seed=2, forward_passes=4)
    # scales of 1, 4, 9 and 16 tokens: one graph for the first, one with a dynamic length for all the others
    assert compiled_frames() <= 2
    model.compile_decoding(False)
    assert not model.decoding_compiled


def test_compiled_speculative_decoding_with_an_eagle_head_keeps_greedy_decoding(tmp_path):
    target = raster(max_tokens=12)
    target.save_pretrained(tmp_path / "target")
    head = EagleDraftHead(target=str(tmp_path / "target"), num_heads=2).eval()
    sampler = Sampler(temperature=0.0)
    labels = torch.tensor([0, 1, 2, 1])
    plain = target.generate(labels, sampler, seeded()).ids
    eager = target.generate_with(labels, SpeculativeDecoder(head, sampler, 3), seeded())
    target.compile_decoding()
    head.compile_decoding()
    compiled = target.generate_with(labels, SpeculativeDecoder(head, sampler, 3), seeded())
    assert torch.equal(compiled.ids, plain) and torch.equal(eager.ids, plain)
    assert compiled.stats["forward_passes"] == eager.stats["forward_passes"]
    # feeds of a few widths (the verification pass, the drafter's one or two tokens): recompilation is bounded
    assert compiled_frames() <= 8


def test_pipeline_compile_and_refusal_by_name(tmp_path):
    tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                      codebook_size=32, code_dim=8).eval()
    generator = raster(vocab_size=32, max_tokens=6)
    pipe = Pipeline(tokenizer, generator, check_provenance=False)
    eager = pipe.generate([0, 1], sampler=Sampler(top_k=5), seed=4)
    assert torch.equal(pipe.generate([0, 1], sampler=Sampler(top_k=5), seed=4, compile=True), eager)
    assert pipe.generator.decoding_compiled
    pyramid = MultiScaleVQ.from_preset("msvq-tiny").eval()
    mvar = MVAR.from_preset("mvar-tiny")
    mvar.load_tokenizer(pyramid)
    with pytest.raises(NotImplementedError, match="MVAR has no compiled decoding step"):
        Pipeline(pyramid, mvar, check_provenance=False).compile()


def test_the_eager_backend_captures_the_same_single_graph_and_takes_no_inductor_mode():
    model = raster()
    labels = torch.tensor([0, 2])
    sampler = Sampler(temperature=1.0, top_k=8, cfg_scale=2.0)
    eager = model.generate(labels, sampler, seeded(5)).ids
    assert torch.equal(model.compile_decoding(backend="eager").generate(labels, sampler, seeded(5)).ids, eager)
    assert compiled_frames() == 1
    with pytest.raises(ValueError, match="mode='reduce-overhead' is an inductor option"):
        model.compile_decoding(mode="reduce-overhead", backend="eager")
