import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats

from flexar.generators import EagleDraftHead, RasterAR
from flexar.sampling import Sampler, SpeculativeDecoder, accept_drafts
from flexar.sampling.speculative import acceptance_probability

from common import perturbed, seeded

ROOT = Path(__file__).resolve().parents[1]
VOCAB, LENGTH = 3, 3


def tiny(dim=16, depth=1, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, max_tokens=LENGTH, num_classes=2, dim=dim, depth=depth, num_heads=2, init_std=0.5)
    return RasterAR(**{**kwargs, **overrides}).eval()


@torch.no_grad()
def exact_joint(model, label, sampler):
    """P(t_0, t_1, t_2) of plain decoding under `sampler`, by enumerating every sequence."""
    sequences = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))
    labels = torch.full((len(sequences),), label)
    conditions = model.guidance_labels(labels, sampler)
    logits = model(sequences[:, :-1].repeat(conditions.shape[0] // len(sequences), 1), conditions)
    probs = torch.stack([sampler.probs(logits[:, i]) for i in range(LENGTH)], dim=1)  # (27, L, V)
    joint = probs.gather(-1, sequences.unsqueeze(-1)).squeeze(-1).prod(-1).double()
    return sequences, joint


def joint_p_value(ids, sequences, joint):
    codes = (ids * torch.tensor([VOCAB**2, VOCAB, 1])).sum(-1)
    expected_codes = (sequences * torch.tensor([VOCAB**2, VOCAB, 1])).sum(-1)
    observed = torch.bincount(codes, minlength=VOCAB**LENGTH).double()[expected_codes]
    assert observed[joint == 0].sum() == 0
    expected = joint / joint.sum() * ids.shape[0]
    # cells expected fewer than 5 times are pooled into one, as the chi-square approximation needs
    rare = expected < 5
    observed = torch.cat([observed[~rare], observed[rare].sum().view(1)])
    expected = torch.cat([expected[~rare], expected[rare].sum().view(1)])
    return stats.chisquare(observed.numpy(), expected.numpy()).pvalue


# ----------------------------------------------------------------------------------------------------------------------
# the accept / reject rule alone


def test_one_round_output_law_is_the_target_and_acceptance_is_sum_min():
    generator = seeded(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])
    count = 40_000
    drafts = torch.multinomial(q.expand(count, -1), 1, generator=generator)
    uniforms = torch.rand(count, 1, generator=generator)
    accepted, next_probs = accept_drafts(
        p.expand(count, 1, -1), q.expand(count, 1, -1), drafts, uniforms, torch.full((count, 5), 0.2)
    )
    resampled = torch.multinomial(next_probs, 1, generator=generator).squeeze(1)
    first = torch.where(accepted == 1, drafts[:, 0], resampled)
    observed = torch.bincount(first, minlength=5).double()
    assert stats.chisquare(observed.numpy(), (p.double() * count).numpy()).pvalue > 1e-3
    rate = accepted.float().mean().item()
    assert abs(rate - acceptance_probability(p, q).item()) < 0.01
    # a draft equal to the target always passes
    always, _ = accept_drafts(p.expand(count, 1, -1), p.expand(count, 1, -1), drafts, uniforms, p.expand(count, -1))
    assert always.eq(1).all()


# ----------------------------------------------------------------------------------------------------------------------
# the decoder


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_joint_law_of_a_large_batch_equals_the_target(cfg_scale):
    target, draft = tiny(dim=16, seed=0), tiny(dim=8, seed=3)
    sampler = Sampler(cfg_scale=cfg_scale, temperature=1.3)
    decoder = SpeculativeDecoder(draft, sampler, draft_length=2)
    labels = torch.full((6000,), 1)
    out = target.generate_with(labels, decoder, seeded(7))
    sequences, joint = exact_joint(target, 1, sampler)
    assert joint_p_value(out.ids, sequences, joint) > 1e-3
    assert out.stats["drafted"] > 0 and out.stats["tokens"] == 6000 * LENGTH


def test_joint_law_with_multi_token_rounds_equals_the_target():
    target = tiny(dim=16, seed=0)
    draft = perturbed(target, noise=0.15)
    sampler = Sampler(cfg_scale=2.0)
    decoder = SpeculativeDecoder(draft, sampler, draft_length=2)
    generator = seeded(11)
    rows, rounds = [], 0
    for _ in range(700):  # two rows per call: rounds commit several tokens, and the rows drift apart
        out = target.generate_with(torch.tensor([0, 0]), decoder, generator)
        rows.append(out.ids)
        rounds += out.stats["rounds"]
    ids = torch.cat(rows)
    assert rounds < 700 * LENGTH  # many rounds committed more than one token
    sequences, joint = exact_joint(target, 0, sampler)
    assert joint_p_value(ids, sequences, joint) > 1e-3


def test_every_row_commits_its_own_accepted_drafts():
    """Rows of one batch advance by their own acceptance counts (per-row KV-cache lengths), none waits for the
    batch's slowest: every round commits accepted + 1 tokens in every row."""
    target = tiny(dim=16, seed=0, vocab_size=8, max_tokens=12)
    draft = perturbed(target, noise=0.1)
    decoder = SpeculativeDecoder(draft, Sampler(cfg_scale=2.0), draft_length=3)
    out = target.generate_with(torch.arange(8) % 2, decoder, seeded(4))
    stats = out.stats
    assert 0 < stats["acceptance_rate"] < 1
    assert stats["tokens"] == 8 * 12 == stats["accepted"] + stats["row_rounds"]
    # rows finished after different numbers of rounds, so the rounds were not shared
    assert stats["row_rounds"] < 8 * stats["rounds"]
    single = [target.generate_with(torch.tensor([label % 2]), decoder, seeded(label)).stats["tokens_per_target_pass"]
              for label in range(8)]
    # a batch of 8 commits about as many tokens per target pass as single rows (measured 1.45 against 1.39; cutting
    # every round to the batch's shortest acceptance gave 0.92)
    assert stats["tokens_per_target_pass"] > 0.9 * sum(single) / 8


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_draft_equal_to_target_accepts_everything(cfg_scale):
    target = tiny(dim=16, seed=0, vocab_size=8, max_tokens=10)
    decoder = SpeculativeDecoder(target, Sampler(cfg_scale=cfg_scale, top_k=6), draft_length=4)
    out = target.generate_with(torch.tensor([0, 1, 1]), decoder, seeded(2))
    assert out.stats["acceptance_rate"] == 1.0
    # 10 tokens in rounds of 4 drafts + 1 bonus: 5 + 5; one prefill + 2 verification passes
    assert out.stats["rounds"] == 2 and out.stats["forward_passes"] == 3
    assert out.stats["mean_accepted_length"] == 5.0


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_greedy_speculative_decoding_equals_greedy_decoding(cfg_scale):
    """Rollback check: with argmax sampling the output must be the target's greedy sequence, whatever the draft."""
    target = tiny(dim=16, seed=0, vocab_size=8, max_tokens=12)
    draft = perturbed(target, noise=0.05)
    sampler = Sampler(temperature=0.0, cfg_scale=cfg_scale)
    labels = torch.tensor([0, 1, 0, 1])
    plain = target.generate(labels, sampler, seeded())
    speculative = target.generate_with(labels, SpeculativeDecoder(draft, sampler, draft_length=3), seeded())
    assert torch.equal(plain.ids, speculative.ids)
    assert speculative.stats["accepted"] > 0


def test_mismatched_draft_and_bad_settings_are_refused():
    target = tiny()
    with pytest.raises(ValueError, match="vocab_size"):
        target.generate_with(torch.tensor([0]), SpeculativeDecoder(tiny(vocab_size=5)), seeded())
    with pytest.raises(ValueError, match="draft_length"):
        SpeculativeDecoder(target, draft_length=0)


# ----------------------------------------------------------------------------------------------------------------------
# EAGLE draft head


@pytest.fixture(scope="module")
def target_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    tiny(dim=16, seed=0).save_pretrained(folder)
    return folder


def test_eagle_head_trains_and_keeps_the_target_law(target_folder):
    torch.manual_seed(0)
    head = EagleDraftHead(target=str(target_folder), num_heads=2)
    assert (head.vocab_size, head.max_tokens, head.num_classes) == (VOCAB, LENGTH, 2)
    assert not any(parameter.requires_grad for parameter in head.target.parameters())
    ids = torch.randint(0, VOCAB, (32, LENGTH), generator=seeded(0))
    labels = torch.arange(32) % 2
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    head.train()
    for _ in range(30):
        loss, logs = head.training_loss(ids, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and {"feature_loss", "token_loss"} <= set(logs)
    head.eval()
    target = head.target
    sampler = Sampler(cfg_scale=2.0)
    out = target.generate_with(torch.full((6000,), 1), SpeculativeDecoder(head, sampler, draft_length=2), seeded(5))
    assert out.stats["draft_forward_passes"] > 0 and out.stats["drafted"] > 0
    sequences, joint = exact_joint(target, 1, sampler)
    assert joint_p_value(out.ids, sequences, joint) > 1e-3


def write_token_cache(folder, ids, labels, num_classes):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"ids": ids.int(), "lengths": torch.full((len(ids),), ids.shape[1]).int(), "labels": labels.long()},
              str(folder / "shard_00000.safetensors"))
    meta = {"vocab_size": VOCAB, "max_tokens": ids.shape[1], "grid": None, "num_items": len(ids),
            "num_classes": num_classes, "shards": [{"file": "shard_00000.safetensors", "count": len(ids)}]}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_eagle_head_trains_through_the_lightning_cli(target_folder, tmp_path):
    from flexar.train.cli import run

    ids = torch.randint(0, VOCAB, (64, LENGTH), generator=seeded(1))
    write_token_cache(tmp_path / "tokens", ids, torch.arange(64) % 2, num_classes=2)
    config = yaml.safe_load((ROOT / "configs" / "generators" / "eagle.yaml").read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                             log_every_n_steps=1, enable_checkpointing=False, logger=False)
    config["model"]["init_args"]["generator"]["init_args"].update(target=str(target_folder), num_heads=2)
    config["model"]["init_args"]["export_dir"] = str(tmp_path / "head")
    config["data"]["init_args"].update(train=str(tmp_path / "tokens"), val=str(tmp_path / "tokens"), batch_size=32)
    (tmp_path / "eagle.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "eagle.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    decoder = SpeculativeDecoder(EagleDraftHead.from_pretrained(tmp_path / "head"), Sampler(), draft_length=2)
    target = RasterAR.from_pretrained(target_folder).eval()
    out = target.generate_with(torch.tensor([0, 1]), decoder, seeded())
    assert isinstance(decoder.draft, EagleDraftHead) and out.ids.shape == (2, LENGTH)


def test_a_saved_eagle_head_loads_without_its_target_folder_from_any_directory(tmp_path, monkeypatch):
    import shutil

    (tmp_path / "project").mkdir()
    tiny(dim=16, seed=0).save_pretrained(tmp_path / "project" / "target")
    monkeypatch.chdir(tmp_path / "project")  # a relative target, as the configs give it
    torch.manual_seed(0)
    head = EagleDraftHead(target="target", num_heads=2).eval()
    head.save_pretrained(tmp_path / "project" / "head")
    saved = json.loads((tmp_path / "project" / "head" / "config.json").read_text())["kwargs"]
    assert saved["target"] is None and saved["target_config"]["kwargs"] == head.target.config
    target = head.target
    sampler = Sampler(cfg_scale=2.0)
    expected = target.generate_with(torch.tensor([0, 1, 1]), SpeculativeDecoder(head, sampler, draft_length=2), seeded(3))

    shutil.move(tmp_path / "project" / "head", tmp_path / "moved")
    shutil.rmtree(tmp_path / "project")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = EagleDraftHead.from_pretrained(tmp_path / "moved")
    assert not loaded.training and not loaded.target.training
    assert (loaded.vocab_size, loaded.max_tokens, loaded.num_classes) == (VOCAB, LENGTH, 2)
    assert not any(parameter.requires_grad for parameter in loaded.target.parameters())
    # drafting from the folder gives the same rounds and ids as the head it was saved from
    decoder = SpeculativeDecoder(loaded, sampler, draft_length=2)
    out = target.generate_with(torch.tensor([0, 1, 1]), decoder, seeded(3))
    assert torch.equal(out.ids, expected.ids) and out.stats["accepted"] == expected.stats["accepted"]
    with pytest.raises(ValueError, match="a target folder or a target_config, not both"):
        EagleDraftHead(target=str(tmp_path / "x"), target_config=saved["target_config"])


def test_the_draft_is_a_module_and_a_folder_loads_through_the_pipeline(tmp_path):
    from flexar import Pipeline
    from flexar.hub import load_model
    from flexar.tokenizers import TiTok

    torch.manual_seed(0)
    tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=LENGTH, width=16, depth=1,
                      num_heads=2, codebook_size=VOCAB, code_dim=4).eval()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    target, draft = tiny(dim=16, seed=0), tiny(dim=8, seed=3)
    draft.save_pretrained(tmp_path / "draft")
    # strategies take modules only: a folder is refused by type, naming the two ways to load it
    for folder in (str(tmp_path / "draft"), tmp_path / "draft"):
        with pytest.raises(TypeError, match=r"loaded module.*flexar.hub.load_model\(folder\).*draft=folder"):
            SpeculativeDecoder(folder, Sampler())
    with pytest.raises(ValueError, match="the draft is a TiTok, not a generator or an EagleDraftHead"):
        SpeculativeDecoder(tokenizer, Sampler())
    # the pipeline loads a draft folder on its device and checks it against the generator
    Pipeline(tokenizer, target, check_provenance=False).save_pretrained(tmp_path / "pipe")
    pipe = Pipeline.from_pretrained(tmp_path / "pipe", check_provenance=False, draft=tmp_path / "draft")
    assert isinstance(pipe.draft, RasterAR) and not pipe.draft.training
    assert pipe.draft.fingerprint == load_model(tmp_path / "draft").fingerprint
    sampler = Sampler(cfg_scale=2.0)
    from_folder = pipe.generate([0, 1, 1], sampler=SpeculativeDecoder(pipe.draft, sampler, 2), seed=3)
    in_memory = Pipeline(tokenizer, target, check_provenance=False, draft=draft)
    assert torch.equal(in_memory.generate([0, 1, 1], sampler=SpeculativeDecoder(draft, sampler, 2), seed=3), from_folder)
    assert SpeculativeDecoder(pipe.draft).to_dict()["draft_fingerprint"] == pipe.draft.fingerprint
    with pytest.raises(ValueError, match="holds a TiTok, not a generator or an EagleDraftHead"):
        Pipeline(tokenizer, target, check_provenance=False, draft=tmp_path / "tokenizer")
    tiny(vocab_size=5).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"draft folder .*other: draft vocab_size 5 != generator vocab_size 3"):
        Pipeline.from_pretrained(tmp_path / "pipe", check_provenance=False, draft=tmp_path / "other")
