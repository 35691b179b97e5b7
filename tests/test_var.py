import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from flexar import Pipeline
from flexar.generators import MVAR, VAR
from flexar.generators.var import CosineAttention
from flexar.hub import fingerprint
from flexar.sampling import BestOfN, Sampler
from flexar.tokenizers import MultiScaleVQ
from flexar.tokenizers.multiscale import VAR_SCALES

from common import GeneratorContract, random_ids, seeded

ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer(**overrides):
    torch.manual_seed(0)
    return MultiScaleVQ.from_preset("msvq-tiny", **overrides).eval()


def tiny_var(cls=VAR, tokenizer=None, **overrides):
    """A tiny generator (scales 1, 2, 3, 4: 30 tokens, 4 passes) bound to a tiny tokenizer's pyramid."""
    preset = "var-tiny" if cls is VAR else "mvar-tiny"
    model = cls.from_preset(preset, **overrides)
    model.load_tokenizer(tokenizer if tokenizer is not None else tiny_tokenizer())
    return model


def mixing(model, std=0.3):
    """Random non-zero AdaLN weights: with AdaLN-zero a fresh block is the identity and mixes nothing."""
    with torch.no_grad():
        for block in model.transformer.blocks:
            block.modulation[1].weight.normal_(std=std)
    return model


class TestVARContract(GeneratorContract):
    def make_generator(self):
        return tiny_var()


class RecordingSampler(Sampler):
    """Records, per pass, the step, the raw logits and the processed (guided) logits it draws from."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def sample(self, logits, state=None, generator=None):
        self.calls.append((state.step, state.num_steps, logits.clone(), self.process(logits, state)))
        return super().sample(logits, state, generator)


def pyramid_ids(tokenizer, count=3):
    from common import digits_batch

    return tokenizer.encode(digits_batch(count)[0]).ids


# ----------------------------------------------------------------------------------------------------------------------
# mask, inputs and causality


def test_mask_is_block_causal():
    model = tiny_var()
    allowed = model.mask.dense(30, 30)
    ends = {0: 1, 1: 5, 2: 14, 3: 30}
    levels = [0] + [1] * 4 + [2] * 9 + [3] * 16
    for query in range(30):
        # every token of its own and earlier scales, nothing later
        assert allowed[query].nonzero().flatten().tolist() == list(range(ends[levels[query]]))
    # incremental decoding sees the rows of the full mask
    assert torch.equal(model.mask.dense(9, 14, q_offset=5), allowed[5:14, :14])


def test_teacher_forcing_inputs_are_the_running_reconstruction_downsampled():
    tokenizer = tiny_tokenizer()
    model = tiny_var(tokenizer=tokenizer).eval()
    ids = pyramid_ids(tokenizer)
    maps = [m.flatten(1) for m in tokenizer.split_scales(ids)]
    class_embedding = model.class_embed(torch.tensor([0, 1, 2]))
    x = model.sequence_input(ids, class_embedding)
    running = torch.zeros(3, 8, 4, 4)
    for index in range(1, 4):
        running = running + tokenizer.quantizer.contribution(index - 1, maps[index - 1])
        side = tokenizer.grid[index]
        pyramid = F.interpolate(running, size=(side, side), mode="area").flatten(2).transpose(1, 2)
        piece = model.scale_range(index)
        expected = model.word_embed(pyramid) + model.pos_embed[piece] + model.level_embed.weight[index]
        torch.testing.assert_close(x[:, piece], expected, atol=1e-5, rtol=1e-5)
    start = class_embedding[:, None] + model.pos_start + model.pos_embed[:1] + model.level_embed.weight[0]
    torch.testing.assert_close(x[:, :1], start)
    # the input is continuous: no token-embedding table exists
    assert not any(isinstance(m, torch.nn.Embedding) and m.num_embeddings == model.vocab_size
                   for name, m in model.named_modules() if not name.startswith("quantizer"))


def test_a_scale_never_influences_the_logits_of_itself_or_earlier_scales():
    torch.manual_seed(0)
    model = mixing(tiny_var(init_std=0.3)).eval()
    ids, labels = random_ids(model, 2), torch.tensor([1, 2])
    with torch.no_grad():
        logits = model(ids, labels)
        for index in range(3):
            changed = ids.clone()
            piece = model.scale_range(index)
            changed[:, piece] = (changed[:, piece] + 1) % model.vocab_size
            other = model(changed, labels)
            # targets of scale s are predicted from scales < s only
            assert torch.equal(other[:, : piece.stop], logits[:, : piece.stop])
            assert not torch.allclose(other[:, piece.stop:], logits[:, piece.stop:])


def test_cosine_attention_with_a_learnable_per_head_scale():
    torch.manual_seed(0)
    layer = CosineAttention(16, 2)
    assert torch.allclose(layer.log_scale, torch.full((2,), math.log(4.0)))
    with torch.no_grad():
        layer.log_scale.copy_(torch.tensor([math.log(2.0), 10.0]))  # the second head is clamped at 100
    x = torch.randn(1, 5, 16)
    q, k, v = layer.qkv(x).view(1, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    cosines = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    scores = cosines * torch.tensor([2.0, 100.0]).view(1, 2, 1, 1)
    expected = layer.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert all(isinstance(block.attn, CosineAttention) for block in tiny_var().transformer.blocks)
    assert not any(isinstance(block.attn, CosineAttention) for block in tiny_var(attn_l2_norm=False).transformer.blocks)


# ----------------------------------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cached_generation_equals_a_full_recompute(cfg_scale):
    model = mixing(tiny_var(init_std=0.3)).eval()
    labels = torch.tensor([0, 3, 5])
    cached, recomputed = RecordingSampler(cfg_scale=cfg_scale, top_k=8), RecordingSampler(cfg_scale=cfg_scale, top_k=8)
    ids = model.generate(labels, cached, seeded(4)).ids
    assert torch.equal(model.generate(labels, recomputed, seeded(4), use_cache=False).ids, ids)
    for (_, _, a, _), (_, _, b, _) in zip(cached.calls, recomputed.calls):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cached_logits_equal_teacher_forcing():
    model = mixing(tiny_var(init_std=0.3)).eval()
    labels = torch.tensor([2, 7])
    sampler = RecordingSampler(top_k=8)
    ids = model.generate(labels, sampler, seeded(1)).ids
    with torch.no_grad():
        teacher = model(ids, labels)
    for index, (_, _, logits, _) in enumerate(sampler.calls):
        torch.testing.assert_close(logits, teacher[:, model.scale_range(index)], atol=1e-5, rtol=1e-5)


def test_one_forward_pass_per_scale():
    model = tiny_var().eval()
    lengths = []
    model.transformer.register_forward_hook(lambda module, args, output: lengths.append(args[0].shape[1]))
    out = model.generate(torch.tensor([0, 1]), Sampler(cfg_scale=2.0), seeded())
    assert out.stats["forward_passes"] == len(model.grid) == 4 and lengths == [1, 4, 9, 16]
    # a prefix of whole scales takes one pass per scale it holds
    lengths.clear()
    out = model.generate(torch.tensor([0, 1]), Sampler(), seeded(), num_tokens=14)
    assert out.ids.shape == (2, 14) and out.stats["forward_passes"] == 3 and lengths == [1, 4, 9]
    with pytest.raises(ValueError, match=r"num_tokens must be None or one of \[1, 5, 14, 30\]"):
        model.generate(torch.tensor([0]), Sampler(), seeded(), num_tokens=10)


def test_guidance_ramps_with_the_scale():
    model = mixing(tiny_var(init_std=0.3)).eval()
    cfg = 1.5  # VAR's cfg: t = cfg * s / (S - 1); flexar's guidance scale is 1 + cfg
    sampler = RecordingSampler(cfg_scale=1.0 + cfg)
    model.generate(torch.tensor([1, 4]), sampler, seeded())
    assert sampler.cfg_schedule == "constant"  # the caller's sampler is left as it was
    assert [call[:2] for call in sampler.calls] == [(s, 4) for s in range(4)]
    for step, _, logits, guided in sampler.calls:
        t = cfg * step / 3
        conditional, unconditional = logits.chunk(2)
        torch.testing.assert_close(guided, (1 + t) * conditional - t * unconditional, atol=1e-5, rtol=1e-5)
    # without the model's schedule, the sampler's own (constant) guidance applies at every scale
    constant = RecordingSampler(cfg_scale=1.0 + cfg)
    mixing(tiny_var(init_std=0.3, cfg_schedule=None)).eval().generate(torch.tensor([1, 4]), constant, seeded())
    for step, _, logits, guided in constant.calls:
        conditional, unconditional = logits.chunk(2)
        torch.testing.assert_close(guided, (1 + cfg) * conditional - cfg * unconditional, atol=1e-5, rtol=1e-5)


def test_decoding_strategies_refuse_var_by_name():
    tokenizer = tiny_tokenizer()
    pipe = Pipeline(tokenizer, tiny_var(tokenizer=tokenizer))
    with pytest.raises(ValueError, match="BestOfN cannot decode with VAR"):
        pipe.generate([0, 1], sampler=BestOfN(Sampler(), 2), seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# the tokenizer's pyramid, presets, pipeline, CLI


def test_training_needs_the_tokenizers_pyramid(tmp_path):
    tokenizer = tiny_tokenizer()
    ids, labels = pyramid_ids(tokenizer), torch.tensor([0, 1, 2])
    bare = VAR.from_preset("var-tiny").train()
    with pytest.raises(ValueError, match=r"tokenizer=FOLDER .* load_tokenizer"):
        bare.training_loss(ids, labels)
    with torch.no_grad():
        bare.eval().training_loss(ids, labels)  # evaluation is allowed
    with pytest.raises(ValueError, match=r"pyramid was never loaded"):  # generation is not: it decodes between scales
        bare.generate(labels, Sampler())
    # a folder: the pyramid is copied, the saved config names no folder, provenance names the tokenizer
    tokenizer.save_pretrained(tmp_path / "tok")
    model = VAR.from_preset("var-tiny", tokenizer=str(tmp_path / "tok"))
    assert torch.equal(model.quantizer.embedding.weight, tokenizer.quantizer.embedding.weight)
    assert model.config["tokenizer"] is None
    assert model.provenance == {"tokenizer_fingerprint": fingerprint(tmp_path / "tok")}
    model.train().training_loss(ids, labels)
    # ids from another tokenizer's token cache are refused
    model.provenance = {"tokenizer_fingerprint": "0" * 64}
    with pytest.raises(ValueError, match="copied the pyramid of tokenizer"):
        model.training_loss(ids, labels)
    with pytest.raises(ValueError, match="does not match"):
        VAR.from_preset("var-tiny", vocab_size=16).load_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="trains on whole pyramids"):
        model.training_loss(ids[:, :14], labels)


def test_presets_registry_and_config():
    assert {"var-d16", "var-d20", "var-d24", "var-d30", "var-tiny", "var-digits"} <= set(VAR.presets)
    for depth in (16, 20, 24, 30):
        preset = VAR.presets[f"var-d{depth}"]
        assert (preset["dim"], preset["num_heads"], preset["depth"]) == (64 * depth, depth, depth)
        assert preset["scales"] == VAR_SCALES and preset["vocab_size"] == 4096 and preset["code_dim"] == 32
    layout = VAR.from_preset("var-d16", depth=1, dim=64, num_heads=1)  # VAR's 256 px layout, one narrow block
    assert layout.max_tokens == 680 and layout.grid == VAR_SCALES and layout.boundaries[-1] == 680
    model = tiny_var()
    assert json.loads(json.dumps(model.config)) == model.config and VAR(**model.config).config == model.config


def test_pipeline_with_the_multiscale_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer()
    pipe = Pipeline(tokenizer, tiny_var(tokenizer=tokenizer))
    images, stats = pipe.generate([1, 2, 3], sampler=Sampler(cfg_scale=2.0, top_k=8), seed=0, return_stats=True)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8 and stats["forward_passes"] == 4
    coarse = pipe.generate([1, 2, 3], num_tokens=5, seed=0)
    assert coarse.shape == (3, 3, 16, 16)
    pipe.save_pretrained(tmp_path / "pipe")
    sampler = Sampler(cfg_scale=2.0, top_k=8)
    again = Pipeline.from_pretrained(tmp_path / "pipe").generate([1, 2, 3], sampler=sampler, seed=0)
    assert torch.equal(images, again)
    # the same vocabulary and length (1 + 4 + 25 = 30 tokens) in other scales is refused
    with pytest.raises(ValueError, match=r"generator grid \[1, 2, 5\] != tokenizer grid \[1, 2, 3, 4\]"):
        Pipeline(tokenizer, VAR.from_preset("var-tiny", scales=[1, 2, 5]), check_provenance=False)


def train_generator_through_the_cli(tmp_path, family: str):
    """Tokenizer folder + token caches of 64 digits, then `flexar-train fit` on configs/generators/{family}.yaml
    shrunk to tiny sizes; returns (tokenizer folder, export folder)."""
    from flexar.data import build_dataset, write_token_cache
    from flexar.train.cli import run

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    for split in ("train", "test"):
        dataset = torch.utils.data.Subset(build_dataset("digits", split, image_size=16, channels=1), range(64))
        write_token_cache(tokenizer, dataset, tmp_path / "tokens" / split, progress=False,
                          description={"num_classes": 10}, tokenizer_folder=tmp_path / "tokenizer")
    config = yaml.safe_load((ROOT / "configs" / "generators" / f"{family}.yaml").read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=3, limit_val_batches=1, enable_progress_bar=False,
                             log_every_n_steps=1)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_epochs=1, per_class=1)
    args = config["model"]["init_args"]["generator"]["init_args"]
    # vocab_size, scales, code_dim and the tokenizer folder come from the cache's meta.json
    assert not {"vocab_size", "scales", "code_dim", "tokenizer"} & set(args)
    args.update(dim=32, depth=1, num_heads=2)
    if family == "mvar":
        args.update(refine_step=3)
    config["model"]["init_args"]["export_dir"] = str(tmp_path / "generator")
    config["data"]["init_args"].update(train=str(tmp_path / "tokens" / "train"), val=str(tmp_path / "tokens" / "test"),
                                       batch_size=16)
    (tmp_path / f"{family}.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / f"{family}.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert list((tmp_path / "run").rglob("samples_epoch000.png"))
    return tmp_path / "tokenizer", tmp_path / "generator"


def test_training_through_the_cli(tmp_path):
    tokenizer_dir, generator_dir = train_generator_through_the_cli(tmp_path, "var")
    generator = VAR.from_pretrained(generator_dir)
    assert generator.provenance == {"tokenizer_fingerprint": fingerprint(tokenizer_dir)}
    assert json.loads((generator_dir / "config.json").read_text())["kwargs"]["tokenizer"] is None
    pipe = Pipeline(MultiScaleVQ.from_pretrained(tokenizer_dir), generator)
    assert pipe.generate([3, 4], seed=0).shape == (2, 3, 16, 16)
    assert generator.config["scales"] == [1, 2, 3, 4] and generator.config["vocab_size"] == 32  # from the token cache
