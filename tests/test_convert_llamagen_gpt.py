"""flexar-convert llamagen-gpt: LlamaGen's class-conditional GPT (FoundationVision/LlamaGen
autoregressive/models/gpt.py) into RasterAR, checked against a reference forward written here from the official
equations."""
import argparse
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from flexar.cli.convert import main as convert_main
from flexar.convert import Weights, convert, llamagen_gpt
from flexar.generators import RasterAR
from flexar.hub import load_model
from flexar.sampling import Sampler, SamplingState

from common import seeded

# the tiny official model: GPT_models' layout at width 32, 2 layers, 2 heads (head_dim 16), a 4 x 4 grid (a 64 px image
# through VQ-16), 24 codes, 5 classes
TINY = dict(dim=32, n_layer=2, n_head=2, vocab_size=24, num_classes=5, grid_size=4)
TINY_OVERRIDES = dict(dim=32, depth=2, num_heads=2, vocab_size=24, num_classes=5, image_size=64)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_width(dim: int) -> int:
    """gpt.py FeedForward: int(2 * 4 dim / 3) rounded up to ModelArgs.multiple_of = 256."""
    return find_multiple(int(2 * (4 * dim) / 3), 256)


def official_shapes(dim: int, n_layer: int, vocab_size: int = 16384, num_classes: int = 1000, **_) -> dict:
    """The state dict of gpt.py's class-conditional Transformer, in its module order: {key: shape}."""
    hidden = ffn_width(dim)
    shapes = {"cls_embedding.embedding_table.weight": (num_classes + 1, dim),
              "tok_embeddings.weight": (vocab_size, dim)}
    for index in range(n_layer):
        shapes.update({
            f"layers.{index}.attention.wqkv.weight": (3 * dim, dim),
            f"layers.{index}.attention.wo.weight": (dim, dim),
            f"layers.{index}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{index}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{index}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{index}.attention_norm.weight": (dim,),
            f"layers.{index}.ffn_norm.weight": (dim,),
        })
    shapes.update({"norm.weight": (dim,), "output.weight": (vocab_size, dim)})
    return shapes


def official_state_dict(seed: int = 0, **sizes) -> dict:
    """Random weights with the official names and shapes: matrices of scale 0.3 (attention far from uniform), norm
    gains around 1."""
    generator = seeded(seed)
    state = {}
    for key, shape in official_shapes(**sizes).items():
        if len(shape) == 1:
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=generator)
        else:
            state[key] = 0.3 * torch.randn(shape, generator=generator)
    return state


# -- the reference: gpt.py's equations in plain torch ------------------------------------------------------------------
def official_rotary_table(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1):
    """precompute_freqs_cis_2d: (cls_token_num + grid_size ** 2, head_dim / 2, 2) = (cos, sin); the class token's rows
    are zeros (cos 0 and sin 0, not the identity)."""
    half = head_dim // 2
    frequencies = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size), frequencies)  # (grid, head_dim / 4)
    rows = angles[:, None, :].expand(-1, grid_size, -1)
    cols = angles[None, :, :].expand(grid_size, -1, -1)
    grid = torch.cat([rows, cols], dim=-1)  # (grid, grid, head_dim / 2): row angles first, then column angles
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def rotate_pairs(x, table):
    """apply_rotary_emb: x (B, L, H, D) as D / 2 complex pairs (x[2j], x[2j + 1]) times table (L, D / 2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imaginary = pairs[..., 1] * cos + pairs[..., 0] * sin
    return torch.stack([real, imaginary], dim=-1).flatten(3)


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def official_forward(state, ids, labels, n_head, grid_size):
    """Logits (B, 1 + n, V) of gpt.py Transformer.forward(ids, labels) in eval mode (no dropout): the class token
    then ids (B, n); row j predicts the token after input j."""
    h = torch.cat([state["cls_embedding.embedding_table.weight"][labels][:, None], state["tok_embeddings.weight"][ids]],
                  dim=1)
    batch, length, dim = h.shape
    head_dim = dim // n_head
    table = official_rotary_table(grid_size, head_dim)[:length]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    layers = len({key.split(".")[1] for key in state if key.startswith("layers.")})
    for index in range(layers):
        def weight(name, index=index):
            return state[f"layers.{index}.{name}.weight"]

        x = rms_norm(h, weight("attention_norm"))
        q, k, v = (x @ weight("attention.wqkv").T).split([dim, dim, dim], dim=-1)
        q = rotate_pairs(q.view(batch, length, n_head, head_dim), table).transpose(1, 2)
        k = rotate_pairs(k.view(batch, length, n_head, head_dim), table).transpose(1, 2)
        v = v.view(batch, length, n_head, head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        attended = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = h + attended.transpose(1, 2).reshape(batch, length, dim) @ weight("attention.wo").T
        x = rms_norm(h, weight("ffn_norm"))
        gated = F.silu(x @ weight("feed_forward.w1").T) * (x @ weight("feed_forward.w3").T)
        h = h + gated @ weight("feed_forward.w2").T
    return rms_norm(h, state["norm.weight"]) @ state["output.weight"].T


def llamagen_generate(state, labels, sampler, generator, cfg_scale, cfg_interval, n_head, grid_size):
    """generate.py's loop (prefill, then decode_n_tokens with its cfg_flag), recomputed over the whole prefix each
    step with the reference forward; each token is drawn by `sampler` (no guidance of its own) from the chosen
    logits."""
    steps = grid_size * grid_size
    null = torch.full_like(labels, TINY["num_classes"])
    both = torch.cat([labels, null])
    tokens = torch.empty(labels.shape[0], 0, dtype=torch.long)
    cfg_flag = True
    for index in range(steps):
        if index > 0 and cfg_interval > -1 and index - 1 > cfg_interval:  # decode_n_tokens' i = index - 1
            cfg_flag = False
        logits = official_forward(state, tokens.repeat(2, 1), both, n_head, grid_size)[:, -1]
        conditional, unconditional = logits.chunk(2)
        chosen = unconditional + (conditional - unconditional) * cfg_scale if cfg_flag else conditional
        drawn = sampler.sample(chosen, SamplingState(step=index, num_steps=steps), generator)
        tokens = torch.cat([tokens, drawn[:, None]], dim=1)
    return tokens


@pytest.fixture(scope="module")
def official():
    return official_state_dict(**TINY)


def convert_tiny(source, **overrides):
    return convert("llamagen-gpt", source, "gpt-b", **{**TINY_OVERRIDES, **overrides})


# -- exactness ---------------------------------------------------------------------------------------------------------
def test_converted_gpt_matches_the_official_forward_with_and_without_the_kv_cache(tmp_path, official):
    # the released c2i_*.pt layout: {"model": state_dict}; train_c2i.py's optimizer and steps entries beside it
    torch.save({"model": official, "optimizer": {"state": {}, "param_groups": []}, "steps": 5000}, tmp_path / "c2i.pt")
    model = convert_tiny(tmp_path / "c2i.pt")
    assert isinstance(model, RasterAR) and not model.training and model.null_class == TINY["num_classes"]
    assert model.grid == (4, 4) and model.max_tokens == 16 and model.transformer.final_norm.eps == 1e-5
    ids = torch.randint(0, TINY["vocab_size"], (3, 15), generator=seeded(1))
    labels = torch.tensor([0, 4, TINY["num_classes"]])  # the last row is the null class of guidance
    with torch.no_grad():
        for length in (9, 15):  # a prefix, and every input position of the 4 x 4 grid
            expected = official_forward(official, ids[:, :length], labels, TINY["n_head"], TINY["grid_size"])
            full = model(ids[:, :length], labels)
            torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
            cache = model.new_cache(3)
            pieces = [model.prefill(labels, cache)[:, None]]
            for start, stop in [(0, 1), (1, 4), (4, length)]:  # one token, then chunks through the cache
                pieces.append(model.step(ids[:, start:stop], cache))
            torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-5)
        # the class token's zero rotary rows matter: flexar's identity rows give other logits on the same weights
        identity = RasterAR(**{**model.config, "class_token_rotary": "identity"}).eval()
        identity.load_state_dict(model.state_dict())
        assert (identity(ids, labels) - official_forward(official, ids, labels, 2, 4)).abs().max() > 1e-2


def test_fsdp_checkpoints_are_the_state_dict_itself(tmp_path, official):
    torch.save(official, tmp_path / "consolidated.pt")  # XXL and 3B: sample_c2i.py --from-fsdp
    model = convert_tiny(tmp_path / "consolidated.pt")
    ids, labels = torch.randint(0, 24, (2, 6), generator=seeded(2)), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels), official_forward(official, ids, labels, 2, 4),
                                   atol=1e-5, rtol=1e-5)


# -- key coverage ------------------------------------------------------------------------------------------------------
def test_every_official_key_is_consumed_and_inference_buffers_are_ignored_with_a_reason(official):
    buffers = {"freqs_cis": torch.zeros(17, 8, 2), "layers.0.attention.kv_cache.k_cache": torch.zeros(2, 2, 24, 16),
               "layers.1.attention.kv_cache.v_cache": torch.zeros(2, 2, 24, 16)}
    weights = Weights({**official, **buffers})
    model = llamagen_gpt.build("gpt-b", **TINY_OVERRIDES)
    llamagen_gpt.load(model, weights)
    weights.finish()
    assert weights.taken == set(official) and set(weights.ignored) == set(buffers)
    assert all(reason for reason in weights.ignored.values())
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in official.values())


def test_renamed_extra_missing_and_mis_sized_keys_are_refused_by_name(official):
    renamed = {("layers.1.feed_forward.w3.weights" if key == "layers.1.feed_forward.w3.weight" else key): value
               for key, value in official.items()}
    with pytest.raises(KeyError, match=r"no key 'layers.1.feed_forward.w3.weight' \(missing key\)"):
        convert_tiny(renamed)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) the converter does not know: 'layers.0.attention.bias'"):
        convert_tiny({**official, "layers.0.attention.bias": torch.zeros(96)})
    with pytest.raises(KeyError, match="no key 'norm.weight'"):
        convert_tiny({key: value for key, value in official.items() if key != "norm.weight"})
    with pytest.raises(ValueError, match=r"has 2 layers, the model 3; choose a preset of that depth"):
        convert_tiny(official, depth=3)
    with pytest.raises(ValueError, match=r"'tok_embeddings.weight' .* shape \(24, 32\), the model expects \(24, 64\)"):
        convert_tiny(official, dim=64)
    # a CFG table without the null row (class_dropout_prob 0 in LlamaGen) has num_classes rows only
    short = {**official, "cls_embedding.embedding_table.weight": official["cls_embedding.embedding_table.weight"][:5]}
    with pytest.raises(ValueError, match=r"embedding_table.weight' .* \(5, 32\), the model expects \(6, 32\)"):
        convert_tiny(short)
    with pytest.raises(ValueError, match="class_token_rotary='zero'"):
        convert_tiny(official, class_token_rotary="identity")


class Payload:
    """Unpickling this calls print: what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return print, ("this ran while unpickling",)


def test_pickles_that_need_more_than_tensors_are_refused_unrun(tmp_path, capsys, official):
    with open(tmp_path / "evil.pt", "wb") as file:
        pickle.dump({"model": official, "hook": Payload()}, file, protocol=2)
    with pytest.raises(ValueError, match=r"does not load with torch.load\(weights_only=True\)"):
        convert_tiny(tmp_path / "evil.pt")
    assert "this ran" not in capsys.readouterr().out
    # train_c2i.py's own checkpoints pickle their argparse.Namespace: refused too (the converter's docstring says why
    # and what to do)
    torch.save({"model": official, "steps": 10, "args": argparse.Namespace(gpt_model="GPT-B")}, tmp_path / "train.pt")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        convert_tiny(tmp_path / "train.pt")


# -- the official sizes ------------------------------------------------------------------------------------------------
# LlamaGen (Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation", Table 1, and
# the comments of gpt.py's GPT_models): GPT-B 111M, L 343M, XL 775M, XXL 1.4B, 3B 3.1B parameters
PAPER = {"gpt-b": 111e6, "gpt-l": 343e6, "gpt-xl": 775e6, "gpt-xxl": 1.4e9, "gpt-3b": 3.1e9}
# (dim, n_layer, n_head) of GPT_models
OFFICIAL_SIZES = {"gpt-b": (768, 12, 12), "gpt-l": (1024, 24, 16), "gpt-xl": (1280, 36, 20), "gpt-xxl": (1536, 48, 24),
                  "gpt-3b": (3200, 24, 32)}


@pytest.mark.parametrize("preset", list(llamagen_gpt.PRESETS))
def test_every_official_size_converts_on_the_meta_device_with_the_papers_parameter_count(preset):
    size = preset.removesuffix("-384")
    dim, n_layer, n_head = OFFICIAL_SIZES[size]
    with torch.device("meta"):
        state = {key: torch.empty(shape) for key, shape in official_shapes(dim, n_layer).items()}
        model = convert("llamagen-gpt", state, preset)
    assert (model.dim, model.transformer.depth, model.transformer.num_heads) == (dim, n_layer, n_head)
    assert model.grid == ((24, 24) if preset.endswith("-384") else (16, 16))
    assert (model.vocab_size, model.num_classes, model.class_embed.num_embeddings) == (16384, 1000, 1001)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(t.numel() for t in state.values())
    reported = PAPER[size]
    # the paper prints three figures (111M) or two (1.4B): the count rounds to them
    figures = 2 if reported >= 1e9 else 3
    assert float(f"{count:.{figures}g}") == reported, f"{preset}: {count:,} vs the paper's {reported:,.0f}"


def test_image_size_overrides_set_the_grid():
    model = llamagen_gpt.build("gpt-b", **{**TINY_OVERRIDES, "image_size": 96})
    assert model.grid == (6, 6) and model.max_tokens == 36
    assert llamagen_gpt.build("gpt-b", **{**TINY_OVERRIDES, "image_size": 64, "downsample_size": 8}).grid == (8, 8)
    with pytest.raises(ValueError, match="image_size 100 is not a multiple of downsample_size 16"):
        llamagen_gpt.build("gpt-b", **{**TINY_OVERRIDES, "image_size": 100})
    with pytest.raises(ValueError, match="unknown llamagen-gpt preset 'gpt-s'"):
        llamagen_gpt.build("gpt-s")


# -- cfg_interval ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interval", [-1, 0, 5])
def test_cfg_interval_guides_the_first_tokens_as_llamagen_generate_does(official, interval):
    model = convert_tiny(official, cfg_interval=interval)
    labels = torch.tensor([1, 3, 0])
    sampler = Sampler(cfg_scale=4.0, top_k=12)
    processors = list(sampler.processors)
    ids = model.generate(labels, sampler, seeded(7)).ids
    assert sampler.processors == processors  # the caller's sampler is left as it was
    expected = llamagen_generate(official, labels, Sampler(top_k=12), seeded(7), 4.0, interval, 2, 4)
    assert torch.equal(ids, expected)
    if interval >= 0:  # the interval changes the draws against guiding every token
        always = convert_tiny(official).generate(labels, sampler, seeded(7)).ids
        assert not torch.equal(ids, always)


def test_cfg_interval_is_off_by_default_and_checked(official):
    model = convert_tiny(official)
    assert model.cfg_interval == -1 and model.config["cfg_interval"] == -1
    guided = Sampler(cfg_scale=2.0)
    assert model.interval_sampler(guided) is guided
    model.cfg_interval = 2
    assert model.interval_sampler(guided) is not guided
    plain = Sampler()
    assert model.interval_sampler(plain) is plain  # nothing to limit without guidance

    class Unguided(Sampler):
        def build_processors(self):
            return []

    with pytest.raises(ValueError, match="cfg_interval=2 needs a sampler whose chain holds"):
        model.interval_sampler(Unguided(cfg_scale=2.0))
    for bad in (-2, True, 1.5):
        with pytest.raises(ValueError, match="cfg_interval must be an int >= -1"):
            RasterAR(vocab_size=8, max_tokens=4, cfg_interval=bad)


# -- the command -------------------------------------------------------------------------------------------------------
def test_flexar_convert_writes_a_folder_that_loads_back_to_the_same_logits(tmp_path, capsys, monkeypatch, official):
    # the command converts official sizes only; a tiny preset stands in for one so the checkpoint stays small
    tiny = llamagen_gpt.build("gpt-b", **TINY_OVERRIDES).config
    monkeypatch.setitem(llamagen_gpt.PRESETS, "gpt-tiny", tiny)
    torch.save({"model": official}, tmp_path / "c2i_tiny_64.pt")
    code = convert_main(["llamagen-gpt", str(tmp_path / "c2i_tiny_64.pt"), str(tmp_path / "out"), "--preset",
                         "gpt-tiny"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["class"] == "RasterAR" and printed["preset"] == "gpt-tiny"
    assert printed["parameters"] == sum(t.numel() for t in official.values())
    loaded = load_model(tmp_path / "out")
    assert loaded.config["class_token_rotary"] == "zero" and loaded.config["mlp_multiple_of"] == 256
    ids, labels = torch.randint(0, 24, (2, 15), generator=seeded(3)), torch.tensor([2, 5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, labels), official_forward(official, ids, labels, 2, 4),
                                   atol=1e-5, rtol=1e-5)
