"""Generation over adaptive lengths: a RasterAR with an end-of-sequence token, trained on a token cache whose lengths
depend on the label, chooses each image's length, and every sampler, decoding strategy and the pipeline honour it."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from flexar import Pipeline
from flexar.data.token_cache import TokenDataset, write_token_cache
from flexar.generators import EagleDraftHead, RasterAR
from flexar.nn import KVCache
from flexar.sampling import (BestOfN, EntropySampler, LanternDecoder, Sampler, SamplingState, ScalingAR,
                             SpeculativeDecoder, neighbour_table)
from flexar.sampling.streams import ImageStreams
from flexar.sampling.strategy import forbid_empty
from flexar.utils import IGNORE_INDEX, to_uint8

from common import perturbed, seeded

VOCAB, MAX_TOKENS = 64, 8  # the tiny ALIT's codebook and budget
RULE = {0: 3, 1: 7}  # label 2: 2 or 5 tokens, at random
# a nucleus that keeps the end-of-sequence token alone where the model is sure of it, and drops it elsewhere: the
# lengths of labels 0 and 1 are then the rule's, while the tokens stay random
NUCLEUS = 0.5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_rows(count=96, seed=0):
    """ids (N, 8) random in [0, 64) and zero past lengths (N,): 3 tokens for label 0, 7 for label 1, 2 or 5 for 2."""
    generator = seeded(seed)
    labels = torch.arange(count) % 3
    two_or_five = torch.where(torch.rand(count, generator=generator) < 0.5, 2, 5)
    lengths = torch.where(labels == 0, RULE[0], torch.where(labels == 1, RULE[1], two_or_five))
    ids = torch.randint(0, VOCAB, (count, MAX_TOKENS), generator=generator)
    ids = ids.masked_fill(torch.arange(MAX_TOKENS)[None, :] >= lengths[:, None], 0)
    return ids, labels, lengths


def write_rows(folder, ids, labels, lengths):
    """A token cache of the given rows, in the layout flexar-tokenize writes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"ids": ids.int(), "lengths": lengths.int(), "labels": labels.long()},
              str(folder / "shard_00000.safetensors"))
    meta = {"vocab_size": VOCAB, "max_tokens": MAX_TOKENS, "grid": None, "num_items": len(ids), "num_classes": 3,
            "shards": [{"file": "shard_00000.safetensors", "count": len(ids)}]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, max_tokens=MAX_TOKENS, num_classes=3, dim=32, depth=1, num_heads=2,
                  class_dropout=0.1, eos_token=True)
    return RasterAR(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("adaptive") / "tokens", *toy_rows())


@pytest.fixture(scope="module")
def trained(cache):
    """The toy model after 200 full-batch steps on the cache's batches (about 5 s on one CPU thread)."""
    dataset = TokenDataset(cache)
    model = tiny().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, labels, lengths = dataset[list(range(len(dataset)))]
    for _ in range(200):
        loss, _ = model.training_loss(ids, labels, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def expected_lengths(labels):
    return torch.tensor([RULE[int(label)] for label in labels])


def check_output(out, model, count=MAX_TOKENS):
    """ids (B, count) in the vocabulary (never the end-of-sequence id), zero past lengths, tokens = lengths.sum()."""
    assert out.ids.shape == (out.lengths.shape[0], count)
    assert int(out.ids.min()) >= 0 and int(out.ids.max()) < model.vocab_size
    past = torch.arange(count)[None, :] >= out.lengths[:, None]
    assert bool((out.ids[past] == 0).all())
    assert 1 <= int(out.lengths.min()) and int(out.lengths.max()) <= count
    assert out.stats["tokens"] == int(out.lengths.sum())


# ----------------------------------------------------------------------------------------------------------------------
# the cache and the objective


def test_the_token_cache_stores_the_lengths_an_adaptive_tokenizer_chose(tmp_path):
    from torch.utils.data import TensorDataset

    from test_alit import sample_images, tiny_alit

    tokenizer = tiny_alit().eval()
    images = sample_images()
    encoded = tokenizer.encode(images)
    assert len(set(encoded.lengths.tolist())) > 1  # the tiny ALIT stops flat and noisy images at different lengths
    write_token_cache(tokenizer, TensorDataset(images, torch.arange(8) % 2), tmp_path / "tokens", progress=False)
    dataset = TokenDataset(tmp_path / "tokens")
    ids, labels, lengths = dataset[list(range(8))]
    assert torch.equal(lengths, encoded.lengths) and torch.equal(labels, torch.arange(8) % 2)
    assert ids.shape == (8, MAX_TOKENS)  # the cache keeps the whole budget; encode trims to the longest row
    chosen = F.pad(encoded.ids, (0, MAX_TOKENS - encoded.ids.shape[1]))
    past = torch.arange(MAX_TOKENS)[None, :] >= lengths[:, None]
    assert torch.equal(ids[~past], chosen[~past]) and bool((ids[past] == 0).all())


def test_the_loss_targets_the_end_right_after_the_last_token_and_ignores_what_follows():
    model = tiny(class_dropout=0.0).eval()
    ids, labels = torch.randint(0, VOCAB, (3, MAX_TOKENS), generator=seeded(3)), torch.tensor([0, 1, 2])
    lengths = torch.tensor([3, 8, 1])
    with torch.no_grad():
        loss, logs = model.training_loss(ids, labels, lengths)
        logits = model(ids[:, :-1], labels)
    assert logits.shape[-1] == VOCAB + 1  # one output more: the end-of-sequence token
    targets = torch.full((3, MAX_TOKENS), IGNORE_INDEX)
    targets[0, :3], targets[0, 3] = ids[0, :3], VOCAB
    targets[1] = ids[1]  # a full row ends at the cap: no end-of-sequence target
    targets[2, 0], targets[2, 1] = ids[2, 0], VOCAB
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)
    # whatever lies past a row's end changes nothing
    changed = ids.clone()
    changed[0, 4:], changed[2, 2:] = 5, 9
    with torch.no_grad():
        assert torch.equal(model.training_loss(changed, labels, lengths)[0], loss)
    # ids shorter than the budget: the row ends right after its last id, one position past the ids
    with torch.no_grad():
        short, _ = model.training_loss(ids[:, :4], labels, lengths.clamp(max=4))
        logits = model(ids[:, :4], labels)
    targets = torch.full((3, 5), IGNORE_INDEX)
    targets[0, :3], targets[0, 3] = ids[0, :3], VOCAB
    targets[1, :4], targets[1, 4] = ids[1, :4], VOCAB
    targets[2, 0], targets[2, 1] = ids[2, 0], VOCAB
    torch.testing.assert_close(short, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX))


def test_eos_token_must_be_a_bool():
    with pytest.raises(ValueError, match="eos_token must be a bool"):
        tiny(eos_token=1)


# ----------------------------------------------------------------------------------------------------------------------
# generation


def length_histograms(lengths, labels):
    return {label: torch.bincount(lengths[labels == label], minlength=MAX_TOKENS + 1).double() for label in range(3)}


def test_generated_lengths_follow_the_label_as_in_the_data(trained, cache):
    labels = torch.arange(600) % 3
    out = trained.generate(labels, Sampler(), seeded(0))
    check_output(out, trained)
    data = TokenDataset(cache)
    generated, reference = length_histograms(out.lengths, labels), length_histograms(data.lengths, data.labels)
    for label in range(3):
        distance = 0.5 * (generated[label] / generated[label].sum() - reference[label] / reference[label].sum()).abs().sum()
        assert distance <= 0.12, (label, generated[label].tolist(), reference[label].tolist())
    assert generated[0][3] >= 0.9 * 200 and generated[1][7] >= 0.9 * 200
    assert generated[2][[2, 5]].sum() >= 0.9 * 200 and 60 <= generated[2][2] <= 140


class RowsPerCall:
    """Rows of every network call of a model (a forward pre-hook on its transformer, which every pass runs)."""

    def __init__(self, model):
        self.rows = []
        self.handle = model.register_forward_pre_hook(lambda module, args: self.rows.append(args[0].shape[0]))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_finished_row_costs_no_further_pass(trained, cfg_scale, use_cache):
    sampler = Sampler(top_p=NUCLEUS, cfg_scale=cfg_scale)
    copies = 2 if cfg_scale != 1.0 else 1
    calls = RowsPerCall(trained.transformer)
    out = trained.generate(torch.tensor([0, 1]), sampler, seeded(1), use_cache=use_cache)
    calls.close()
    assert out.lengths.tolist() == [3, 7]
    # the prefill and steps 1-3 feed both rows; label 0 draws the end at step 3, label 1 at step 7
    assert calls.rows == [2 * copies] * 4 + [copies] * 4
    assert out.stats["forward_passes"] == 8 and out.stats["row_passes"] == 4 * 2 + 4
    # a batch whose rows all end stops
    out = trained.generate(torch.tensor([0, 0, 0]), sampler, seeded(2), use_cache=use_cache)
    assert out.lengths.tolist() == [3, 3, 3] and out.stats["forward_passes"] == 4
    # num_tokens caps a row; the cap ends it without a further pass
    out = trained.generate(torch.tensor([0, 1]), sampler, seeded(1), num_tokens=5, use_cache=use_cache)
    assert out.lengths.tolist() == [3, 5] and out.ids.shape == (2, 5) and out.stats["forward_passes"] == 5


def test_sampled_rows_pay_one_pass_per_token_and_one_for_the_end(trained):
    out = trained.generate(torch.arange(60) % 3, Sampler(temperature=1.5), seeded(3))
    check_output(out, trained)
    # each row is fed the class token and every token but the last; one more step draws its end unless it is capped
    assert out.stats["row_passes"] == int((out.lengths + 1).clamp(max=MAX_TOKENS).sum())


def strategies(model):
    """Every sampler and decoding strategy, each with the nucleus that reproduces the label's length."""
    sampler = Sampler(top_p=NUCLEUS)
    codes = torch.randn(VOCAB, 4, generator=seeded(5))
    without_end = RasterAR(**{**model.config, "eos_token": False}).eval()
    head = EagleDraftHead(target_config={"class": "RasterAR", "kwargs": model.config}, num_heads=2).eval()
    return {
        "sampler": sampler,
        "sampler_cfg": Sampler(top_p=NUCLEUS, cfg_scale=2.0),
        "entropy": EntropySampler(top_p=NUCLEUS),
        "speculative": SpeculativeDecoder(perturbed(model, noise=0.05), sampler, draft_length=3),
        "speculative_cfg": SpeculativeDecoder(perturbed(model, noise=0.05), Sampler(top_p=NUCLEUS, cfg_scale=2.0), draft_length=3),
        "speculative_draft_without_end": SpeculativeDecoder(without_end, sampler, draft_length=2),
        "speculative_eagle": SpeculativeDecoder(head, sampler, draft_length=2),
        "lantern": LanternDecoder(perturbed(model, noise=0.05), sampler, draft_length=3, neighbours=neighbour_table(codes, 8), k=8,
                                  delta=0.2),
        "scalingar": ScalingAR(sampler, num_trajectories=3),
        "scalingar_cfg": ScalingAR(Sampler(top_p=NUCLEUS, cfg_scale=2.0), num_trajectories=3, threshold=0.99),
        "best_of_n": BestOfN(sampler, num_trajectories=3),
    }


@pytest.mark.parametrize("name", ["sampler", "sampler_cfg", "entropy", "speculative", "speculative_cfg",
                                  "speculative_draft_without_end", "speculative_eagle", "lantern", "scalingar",
                                  "scalingar_cfg", "best_of_n"])
def test_every_strategy_returns_the_lengths_the_model_chose(trained, name):
    strategy = strategies(trained)[name]
    labels = torch.tensor([0, 1, 1, 0, 0, 1])
    out = trained.generate_with(labels, strategy, ImageStreams(4, torch.arange(6)))
    check_output(out, trained)
    assert torch.equal(out.lengths, expected_lengths(labels))
    if "row_passes" in out.stats and "trajectory_lengths" not in out.stats and name != "best_of_n":
        # the target's passes stop for each row at its end: plain decoding feeds a row once per token and once for
        # its end; a speculative round commits at least one token, and the first one verifies the first token
        extra = 2 if name.startswith(("speculative", "lantern")) else 1
        assert out.stats["row_passes"] <= int((out.lengths + extra).sum())
        assert out.stats["row_passes"] < out.stats["forward_passes"] * len(labels)  # the short rows left early
    if name.startswith("scalingar"):
        assert out.stats["tokens_consumed"] == sum(map(sum, out.stats["trajectory_lengths"]))
        assert out.stats["tokens_consumed"] < 6 * 3 * MAX_TOKENS
    if name == "best_of_n":
        assert out.stats["tokens_consumed"] == 3 * int(out.lengths.sum())


def test_scalingar_without_termination_is_best_of_n_over_adaptive_lengths(trained):
    labels = torch.tensor([0, 1, 2, 2])
    scaling = ScalingAR(Sampler(), num_trajectories=4, terminate=False, guidance_gain=0.0)
    baseline = BestOfN(Sampler(), num_trajectories=4)
    first = trained.generate_with(labels, scaling, seeded(6))
    second = trained.generate_with(labels, baseline, seeded(6))
    assert torch.equal(first.ids, second.ids) and torch.equal(first.lengths, second.lengths)
    assert first.stats["selected"] == second.stats["selected"]
    torch.testing.assert_close(torch.tensor(first.stats["scores"]), torch.tensor(second.stats["scores"]), atol=1e-5,
                               rtol=0)
    assert first.stats["tokens_consumed"] == second.stats["tokens_consumed"]


# ----------------------------------------------------------------------------------------------------------------------
# the law of variable-length sequences


SMALL_VOCAB, SMALL_LENGTH = 2, 3


@torch.no_grad()
def exact_law(model, label, sampler):
    """Every (tokens, length) outcome of plain decoding and its probability: a row draws the end-of-sequence token
    after 1 or 2 tokens, or is capped at 3."""
    outcomes, probabilities = [], []
    for length in range(1, SMALL_LENGTH + 1):
        for tokens in itertools.product(range(SMALL_VOCAB), repeat=length):
            ids = torch.tensor([tokens])
            logits = model(ids, torch.tensor([label]))
            if sampler.uses_cfg:
                logits = torch.cat([logits[:1], model(ids, torch.tensor([model.null_class]))])
            probability = 1.0
            for index in range(min(length + 1, SMALL_LENGTH)):
                probs = sampler.probs(forbid_empty(logits[:, index], index, SMALL_VOCAB), SamplingState(index, 3))[0]
                probability *= float(probs[tokens[index]] if index < length else probs[SMALL_VOCAB])
            outcomes.append(tokens + (0,) * (SMALL_LENGTH - length) + (length,))
            probabilities.append(probability)
    return torch.tensor(outcomes), torch.tensor(probabilities, dtype=torch.float64)


def law_p_value(out, outcomes, probabilities):
    observed_rows = torch.cat([out.ids, out.lengths[:, None]], dim=1)
    observed = torch.stack([(observed_rows == row).all(dim=1).sum() for row in outcomes]).double()
    assert observed.sum() == len(observed_rows)  # nothing outside the enumerated outcomes
    expected = probabilities / probabilities.sum() * len(observed_rows)
    return stats.chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["plain", "speculative"])
def test_decoding_keeps_the_law_of_tokens_and_lengths(kind, cfg_scale):
    torch.manual_seed(0)
    kwargs = dict(vocab_size=SMALL_VOCAB, max_tokens=SMALL_LENGTH, num_classes=2, dim=16, depth=1, num_heads=2,
                  init_std=0.5, eos_token=True)
    target = RasterAR(**kwargs).eval()
    sampler = Sampler(cfg_scale=cfg_scale, temperature=1.3)
    strategy = sampler if kind == "plain" else SpeculativeDecoder(perturbed(target, noise=0.3), sampler, draft_length=2)
    out = target.generate_with(torch.full((6000,), 1), strategy, seeded(7))
    outcomes, probabilities = exact_law(target, 1, sampler)
    assert 0.05 < float(probabilities[outcomes[:, -1] < SMALL_LENGTH].sum()) < 0.95  # rows do end early
    assert law_p_value(out, outcomes, probabilities) > 1e-3
    if kind == "speculative":
        assert out.stats["accepted"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# the pipeline


@pytest.fixture(scope="module")
def pipeline(trained):
    from test_alit import tiny_alit

    return Pipeline(tiny_alit().eval(), trained, check_provenance=False)


def test_the_pipeline_decodes_the_lengths_the_generator_chose(pipeline):
    labels = [0, 1, 1, 0, 1, 0]
    sampler = Sampler(top_p=NUCLEUS)
    images, stats = pipeline.generate(labels, sampler=sampler, seed=3, return_stats=True)
    assert stats["lengths"] == [RULE[label] for label in labels] and stats["tokens"] == sum(stats["lengths"])
    out = pipeline.generator.generate_with(torch.tensor(labels), sampler, ImageStreams(3, torch.arange(6)))
    tokenizer = pipeline.tokenizer
    assert torch.equal(images, to_uint8(tokenizer.decode(out.ids, out.lengths)).repeat(1, 3, 1, 1))
    # the lengths matter: decoding every id as a token gives other images
    assert not torch.equal(images, to_uint8(tokenizer.decode(out.ids)).repeat(1, 3, 1, 1))
    # the same images whatever the batch size: a row that ends draws no further number from its stream
    assert torch.equal(pipeline.generate(labels, sampler=sampler, seed=3, batch_size=4), images)
    # num_tokens caps the chosen lengths
    _, capped = pipeline.generate(labels, num_tokens=4, sampler=sampler, seed=3, return_stats=True)
    assert capped["lengths"] == [min(RULE[label], 4) for label in labels]


# ----------------------------------------------------------------------------------------------------------------------
# fixed-length models are unchanged


def test_a_fixed_length_model_is_unchanged(tmp_path):
    model = tiny(eos_token=False, init_std=0.2).eval()
    assert model.head.weight.shape == (VOCAB, 32) and model.eos_id is None
    labels = torch.tensor([0, 1, 2, 1])
    sampler = Sampler(cfg_scale=2.0, top_k=20)
    out = model.generate(labels, sampler, seeded(9))
    # the loop as it always ran: prefill, then one step per token for every row, drawing from one stream
    generator, conditions = seeded(9), model.guidance_labels(labels, sampler)
    cache: KVCache = model.new_cache(conditions.shape[0])
    ids = torch.empty(4, MAX_TOKENS, dtype=torch.long)
    with torch.no_grad():
        for index in range(MAX_TOKENS):
            logits = model.prefill(conditions, cache) if index == 0 else model.step(ids[:, index - 1 :index].repeat(2, 1), cache)[:, -1]
            ids[:, index] = sampler.sample(logits, SamplingState(index, MAX_TOKENS), generator)
    assert torch.equal(out.ids, ids) and out.lengths.tolist() == [MAX_TOKENS] * 4
    assert out.stats["tokens"] == 4 * MAX_TOKENS and out.stats["forward_passes"] == MAX_TOKENS
    # a config saved before the switch existed loads as a fixed-length model
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["kwargs"]["eos_token"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = RasterAR.from_pretrained(tmp_path / "old").eval()
    assert loaded.eos_token is False and torch.equal(loaded.generate(labels, sampler, seeded(9)).ids, out.ids)
