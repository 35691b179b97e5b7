import json

import pytest
import torch

from flexar import Pipeline
from flexar.generators import MVAR
from flexar.generators.mvar import neighbourhood_mask
from flexar.hub import fingerprint
from flexar.sampling import Sampler
from flexar.tokenizers import MultiScaleVQ
from flexar.tokenizers.multiscale import VAR_SCALES

from common import GeneratorContract, seeded
from test_var import RecordingSampler, mixing, pyramid_ids, tiny_tokenizer, tiny_var, train_generator_through_the_cli


def tiny_mvar(**overrides):
    """Scales 1, 2, 3, 4 (30 tokens); 3 x 3 neighbourhoods on the 4 x 4 map (refine_step 3)."""
    return tiny_var(MVAR, **overrides)


class TestMVARContract(GeneratorContract):
    def make_generator(self):
        return tiny_mvar()


def natten_window(index: int, side: int, kernel: int) -> range:
    """NATTEN's neighbourhood along one axis (dilation 1): centred, shifted inward at the borders."""
    radius = kernel // 2
    if index < radius:
        start = 0
    elif index + radius >= side:
        start = side - kernel
    else:
        start = index - radius
    return range(start, start + kernel)


# ----------------------------------------------------------------------------------------------------------------------
# masks


def test_mask_is_block_diagonal():
    model = tiny_mvar(refine_step=4)  # no neighbourhood attention: plain block-diagonal
    allowed = model.mask.dense(30, 30)
    for query in range(30):
        scale = next(i for i, end in enumerate(model.boundaries) if query < end)
        assert allowed[query].nonzero().flatten().tolist() == list(range(*model.scale_range(scale).indices(30)))


@pytest.mark.parametrize("side, kernel", [(4, 3), (6, 3), (7, 5), (5, 5)])
def test_neighbourhoods_are_nattens_windows_of_exactly_k_squared_keys(side, kernel):
    scales = [1, 2, side]
    allowed = neighbourhood_mask(scales, kernel, refine_step=2).dense(5 + side * side, 5 + side * side)
    assert torch.equal(allowed[:5, :5], torch.block_diag(torch.ones(1, 1), torch.ones(4, 4)).bool())
    for row in range(side):
        for col in range(side):
            query = 5 + row * side + col
            rows, cols = natten_window(row, side, kernel), natten_window(col, side, kernel)
            keys = {5 + r * side + c for r in rows for c in cols}
            assert set(allowed[query].nonzero().flatten().tolist()) == keys and len(keys) == kernel * kernel


def test_per_scale_forward_equals_the_full_sequence_forward():
    tokenizer = tiny_tokenizer()
    model = mixing(tiny_mvar(tokenizer=tokenizer, init_std=0.3)).eval()
    ids, labels = pyramid_ids(tokenizer), torch.tensor([0, 4, 9])
    with torch.no_grad():
        full = model(ids, labels)
        class_embedding = model.class_embed(labels)
        inputs = model.sequence_input(ids, class_embedding)
        for index in range(len(model.grid)):
            piece = model.scale_range(index)
            alone = model.forward_scale(index, inputs[:, piece], class_embedding)
            torch.testing.assert_close(alone, full[:, piece], atol=1e-5, rtol=1e-5)
            # the per-scale input is the map built from the earlier scales alone
            part = model.sequence_input(ids, class_embedding, piece.start, piece.stop)
            torch.testing.assert_close(part, inputs[:, piece])


def test_a_token_outside_a_querys_window_never_changes_its_output():
    torch.manual_seed(0)
    model = mixing(tiny_mvar(init_std=0.3, depth=1)).eval()  # one block: the receptive field is one window
    side, kernel, scale = 4, 3, 3
    class_embedding = model.class_embed(torch.tensor([2]))
    x = torch.randn(1, side * side, model.dim, generator=seeded(0))
    with torch.no_grad():
        reference = model.forward_scale(scale, x, class_embedding)
        for key in range(side * side):
            perturbed = x.clone()
            perturbed[:, key] += torch.randn(model.dim, generator=seeded(key + 1))
            out = model.forward_scale(scale, perturbed, class_embedding)
            for query in range(side * side):
                row, col = divmod(query, side)
                inside = key // side in natten_window(row, side, kernel)
                inside = inside and key % side in natten_window(col, side, kernel)
                unchanged = torch.equal(out[:, query], reference[:, query])
                assert unchanged != inside, (query, key)


def test_flex_backend_equals_math():
    tokenizer = tiny_tokenizer()
    ids, labels = pyramid_ids(tokenizer, 2), torch.tensor([1, 2])
    outputs = {}
    for backend in ("math", "flex"):
        torch.manual_seed(0)
        model = mixing(tiny_mvar(tokenizer=tokenizer, attention_backend=backend, init_std=0.3)).eval()
        with torch.no_grad():
            outputs[backend] = model(ids, labels)
    torch.testing.assert_close(outputs["flex"], outputs["math"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# decoding


def test_one_pass_per_scale_on_its_own_map_and_no_kv_cache(monkeypatch):
    import flexar.nn.kv_cache

    model = tiny_mvar().eval()
    calls = []
    model.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args[0].shape[1], kwargs.get("kv_cache"))), with_kwargs=True)

    def refuse(*args, **kwargs):
        raise AssertionError("MVAR decoding must not build a KV cache")

    monkeypatch.setattr(flexar.nn.kv_cache.KVCache, "__init__", refuse)
    labels, sampler = torch.tensor([0, 1]), Sampler(cfg_scale=2.0, top_k=8)
    out = model.generate(labels, sampler, seeded(3))
    assert out.stats["forward_passes"] == 4 and calls == [(1, None), (4, None), (9, None), (16, None)]
    assert torch.equal(model.generate(labels, sampler, seeded(3), use_cache=False).ids, out.ids)
    calls.clear()
    assert model.generate(labels, sampler, seeded(3), num_tokens=14).ids.shape == (2, 14) and len(calls) == 3


def test_generated_logits_equal_teacher_forcing_and_guidance_ramps():
    model = mixing(tiny_mvar(init_std=0.3)).eval()
    labels = torch.tensor([3, 5])
    sampler = RecordingSampler(top_k=8)
    ids = model.generate(labels, sampler, seeded(2)).ids
    with torch.no_grad():
        teacher = model(ids, labels)
    for index, (_, _, logits, _) in enumerate(sampler.calls):
        torch.testing.assert_close(logits, teacher[:, model.scale_range(index)], atol=1e-5, rtol=1e-5)
    guided = RecordingSampler(cfg_scale=2.4)  # MVAR's cfg 1.4
    model.generate(labels, guided, seeded(2))
    for step, _, logits, processed in guided.calls:
        t = 1.4 * step / 3
        conditional, unconditional = logits.chunk(2)
        torch.testing.assert_close(processed, (1 + t) * conditional - t * unconditional, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# training cycle


def test_training_cycle_and_fixed_per_token_weight():
    tokenizer = tiny_tokenizer()
    model = mixing(tiny_mvar(tokenizer=tokenizer, class_dropout=0.0, init_std=0.3))
    ids, labels = pyramid_ids(tokenizer), torch.tensor([0, 4, 9])
    with torch.no_grad():
        per_token = torch.nn.functional.cross_entropy(model.eval()(ids, labels).transpose(1, 2), ids, reduction="none")
    model.train()
    period = model.joint_steps + len(model.grid) - model.refine_step  # 8 joint steps, then scale 3 alone
    assert period == 9
    for step in range(2 * period):
        loss, logs = model.training_loss(ids, labels)
        joint = step % period < 8
        trained = slice(0, 14) if joint else slice(14, 30)
        assert (int(logs["first_scale"]), int(logs["trained_tokens"])) == ((0, 14) if joint else (3, 16))
        # each token keeps the weight 1 / L = 1 / 30 whatever the step trains (no renormalisation)
        torch.testing.assert_close(loss, per_token[:, trained].sum(1).mean() / 30, atol=1e-5, rtol=1e-5)
    assert int(model.train_steps) == 2 * period
    # evaluation and cycle=False train every scale at once
    with torch.no_grad():
        full = model.eval().training_loss(ids, labels)[0]
    torch.testing.assert_close(full, per_token.mean(), atol=1e-5, rtol=1e-5)
    assert int(model.train_steps) == 2 * period
    # every trainable parameter is in every step's graph (DistributedDataParallel reduces a fixed set)
    model.train()
    for _ in range(period):
        model.zero_grad(set_to_none=True)
        model.training_loss(ids, labels)[0].backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    whole = mixing(tiny_mvar(tokenizer=tokenizer, class_dropout=0.0, init_std=0.3, cycle=False)).train()
    assert int(whole.training_loss(ids, labels)[1]["trained_tokens"]) == 30 and int(whole.train_steps) == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        tiny_mvar(kernel_size=4)
    with pytest.raises(ValueError, match=r"maps of side >= kernel_size 5.*include \[3, 4\]"):
        tiny_mvar(kernel_size=5, refine_step=2)
    with pytest.raises(ValueError, match=r"refine_step must lie in \[1, 4\]"):
        tiny_mvar(refine_step=0)
    with pytest.raises(ValueError, match="joint_steps must be >= 1"):
        tiny_mvar(joint_steps=0)


# ----------------------------------------------------------------------------------------------------------------------
# presets, pipeline, CLI


def test_presets_registry_and_config():
    assert {"mvar-d16", "mvar-d20", "mvar-d24", "mvar-tiny", "mvar-digits"} <= set(MVAR.presets)
    preset = MVAR.presets["mvar-d16"]
    assert (preset["dim"], preset["depth"], preset["kernel_size"], preset["refine_step"]) == (1024, 16, 7, 8)
    layout = MVAR.from_preset("mvar-d16", depth=1, dim=64, num_heads=1)  # MVAR's 256 px layout, one narrow block
    assert layout.max_tokens == 680 and layout.grid == VAR_SCALES
    # neighbourhood attention on the 13 x 13 and 16 x 16 maps only
    assert [layout.scale_mask(i) is None for i in range(10)] == [True] * 8 + [False] * 2
    model = tiny_mvar()
    assert json.loads(json.dumps(model.config)) == model.config and MVAR(**model.config).config == model.config


def test_pipeline_with_the_multiscale_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer()
    pipe = Pipeline(tokenizer, tiny_mvar(tokenizer=tokenizer))
    images, stats = pipe.generate([1, 2], sampler=Sampler(cfg_scale=2.0), seed=0, return_stats=True)
    assert images.shape == (2, 3, 16, 16) and stats["forward_passes"] == 4
    pipe.save_pretrained(tmp_path / "pipe")
    again = Pipeline.from_pretrained(tmp_path / "pipe").generate([1, 2], sampler=Sampler(cfg_scale=2.0), seed=0)
    assert torch.equal(again, images)


def test_training_through_the_cli(tmp_path):
    tokenizer_dir, generator_dir = train_generator_through_the_cli(tmp_path, "mvar")
    generator = MVAR.from_pretrained(generator_dir)
    assert generator.provenance == {"tokenizer_fingerprint": fingerprint(tokenizer_dir)}
    # the cycle counter travels with the weights (3 training steps)
    assert int(generator.train_steps) == 3
    pipe = Pipeline(MultiScaleVQ.from_pretrained(tokenizer_dir), generator)
    assert pipe.generate([3, 4], seed=0).shape == (2, 3, 16, 16)
