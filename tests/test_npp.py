from pathlib import Path

import pytest
import torch
import yaml

from flexar.generators import NPP, RasterAR
from flexar.generators.npp import stage_boundaries
from flexar.nn import causal_mask
from flexar.sampling import Sampler
from flexar.train import GeneratorModule

from common import GeneratorContract, random_ids, seeded

ROOT = Path(__file__).resolve().parents[1]


def tiny_kwargs(**overrides):
    kwargs = dict(vocab_size=16, max_tokens=16, grid=[4, 4], num_classes=4, dim=32, depth=2, num_heads=2, init_std=0.2)
    return {**kwargs, **overrides}


def tiny_npp(**overrides):
    return NPP(**tiny_kwargs(**overrides))


def raster_twin(model: NPP) -> RasterAR:
    """A RasterAR with the same sizes and weights as `model`."""
    config = {k: v for k, v in model.config.items() if k not in ("patch_sizes", "epoch_rate", "patch_size")}
    raster = RasterAR(**config)
    raster.load_state_dict(model.state_dict())
    return raster.train(model.training)


class TestNPPContract(GeneratorContract):
    # the first stage (2x2 patches): every interface check runs on the patch objective. A patch holds 4 distinct
    # tokens of the contract's sequences, so its loss cannot fall below log 4: a vocabulary of 64 leaves room for
    # the required 60% drop
    def make_generator(self):
        return tiny_npp(vocab_size=64)


def test_patch_size_one_gives_exactly_the_raster_loss():
    torch.manual_seed(0)
    model = tiny_npp().eval()
    raster = raster_twin(model)
    ids, labels, lengths = random_ids(model, 3), torch.tensor([0, 2, 3]), torch.tensor([16, 9, 4])
    with torch.no_grad():
        # the general patch path at p = 1 ...
        torch.testing.assert_close(model.patch_loss(ids, labels, 1)[0], raster.training_loss(ids, labels)[0],
                                   atol=1e-6, rtol=1e-6)
        # ... and the final stage, which is RasterAR's objective itself (lengths included)
        model.on_epoch_start(9, 10)
        assert model.patch_size == 1
        for extra in ((), (lengths,)):
            loss, logs = model.training_loss(ids, labels, *extra)
            assert torch.equal(loss, raster.training_loss(ids, labels, *extra)[0]) and logs["patch_size"] == 1


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_sequence_length_and_mean_patch_embedding(patch_size):
    torch.manual_seed(0)
    model = tiny_npp(patch_sizes=[4, 2, 1]).eval()
    ids, labels = random_ids(model, 2), torch.tensor([1, 3])
    num_patches = model.max_tokens // patch_size**2
    sequence = model.patch_embeddings(ids, labels, patch_size)
    assert sequence.shape == (2, num_patches + 1, model.dim)
    torch.testing.assert_close(sequence[:, 0], model.class_embed(labels))
    grid = ids.view(2, 4, 4)
    cols = 4 // patch_size
    for patch in range(num_patches):
        r, c = divmod(patch, cols)
        members = grid[:, r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size].reshape(2, -1)
        torch.testing.assert_close(sequence[:, 1 + patch], model.token_embed(members).mean(dim=1))
        assert torch.equal(model.patch_targets(ids, patch_size)[:, patch], members)
    # the transformer reads N / p^2 positions: the class token and every patch but the last
    lengths = []
    model.transformer.register_forward_hook(lambda module, inputs, output: lengths.append(inputs[0].shape[1]))
    model.patch_size = patch_size
    model.training_loss(ids, labels)
    assert lengths == [num_patches]


def test_patch_loss_averages_over_every_member_of_the_patch():
    torch.manual_seed(0)
    model = tiny_npp().eval()
    ids, labels = random_ids(model, 2), torch.tensor([0, 1])
    with torch.no_grad():
        loss, logs = model.training_loss(ids, labels)
        assert model.patch_size == 2 and logs["patch_size"] == 2
        # by hand: 2D rotary positions of the coarse 2x2 grid, the class token unrotated, causal mask
        inputs = model.patch_embeddings(ids, labels, 2)[:, :-1]
        rope = model.rope(torch.tensor([[-1, -1], [0, 0], [0, 1], [1, 0]]))
        logits = model.head(model.transformer(inputs, mask=causal_mask(), rope=rope))
        targets = model.patch_targets(ids, 2)
        expected = torch.stack([
            torch.nn.functional.cross_entropy(logits[:, i].repeat_interleave(4, dim=0), targets[:, i].flatten(),
                                              reduction="none")
            for i in range(4)
        ]).mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


def test_stage_boundaries_follow_the_paper():
    assert stage_boundaries(2, 300) == [150, 300]
    assert stage_boundaries(3, 300) == [75, 150, 300]
    assert stage_boundaries(4, 300) == [37, 75, 150, 300]
    model = tiny_npp(patch_sizes=[4, 2, 1])
    assert model.stage_boundaries(10) == [2, 5, 10]
    assert [model.patch_size_at(epoch, 10) for epoch in range(11)] == [4, 4, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert tiny_npp(epoch_rate=0.25).stage_boundaries(16) == [4, 16]
    assert model.on_epoch_start(3, 10) == 2 and model.patch_size == 2
    with pytest.raises(ValueError, match="needs the number of training epochs"):
        model.on_epoch_start(0, -1)
    for bad, message in (([2], "end with 1"), ([1, 2], "decrease strictly"), ([3, 1], "does not divide")):
        with pytest.raises(ValueError, match=message):
            tiny_npp(patch_sizes=bad)


def test_parameters_are_raster_parameters_at_every_stage():
    model = tiny_npp(patch_sizes=[4, 2, 1])
    counts, keys = set(), set()
    for epoch in range(10):
        model.on_epoch_start(epoch, 10)
        counts.add(sum(p.numel() for p in model.parameters()))
        keys.add(tuple(model.state_dict()))
    raster = RasterAR(**{k: v for k, v in model.config.items() if k not in ("patch_sizes", "epoch_rate", "patch_size")})
    assert counts == {sum(p.numel() for p in raster.parameters())} and keys == {tuple(raster.state_dict())}


def test_trained_model_decodes_exactly_like_raster():
    torch.manual_seed(0)
    model = tiny_npp().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, labels = random_ids(model, 8), torch.arange(8) % 4
    for epoch in range(4):
        model.on_epoch_start(epoch, 4)
        for _ in range(3):
            loss, _ = model.training_loss(ids, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    raster = raster_twin(model).eval()
    calls = []
    model.transformer.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[1]))
    for sampler in (Sampler(top_k=5), Sampler(cfg_scale=2.5)):
        calls.clear()
        out = model.generate(labels, sampler, seeded(4))
        assert torch.equal(out.ids, raster.generate(labels, sampler, seeded(4)).ids)
        # plain raster decoding: one pass per token, one new token per pass
        assert out.stats["forward_passes"] == model.max_tokens and calls == [1] * model.max_tokens


def test_generator_module_runs_the_schedule():
    model = tiny_npp(patch_sizes=[4, 2, 1])
    module = GeneratorModule(model, ema_decay=0.9)

    class Trainer:  # what the hook reads of a Lightning Trainer
        max_epochs = 10
        current_epoch = 0

    module._trainer = Trainer()
    seen = []
    for epoch in range(10):
        module.trainer.current_epoch = epoch
        module.on_train_epoch_start()
        seen.append((model.patch_size, module.ema.module.patch_size))
    assert seen == [(p, p) for p in (4, 4, 2, 2, 2, 1, 1, 1, 1, 1)]


def test_reloaded_model_keeps_the_stage_it_was_saved_in(tmp_path):
    torch.manual_seed(0)
    model = tiny_npp(patch_sizes=[4, 2, 1]).eval()
    ids, labels = random_ids(model, 2), torch.tensor([0, 3])
    for epoch, expected in ((0, 4), (3, 2), (9, 1)):
        assert model.on_epoch_start(epoch, 10) == expected
        model.save_pretrained(tmp_path / str(epoch))
        loaded = NPP.from_pretrained(tmp_path / str(epoch)).eval()
        assert loaded.patch_size == expected and loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded.training_loss(ids, labels)[0], model.training_loss(ids, labels)[0])
    assert tiny_npp(patch_sizes=[4, 2, 1], patch_size=2).patch_size == 2
    for bad in (3, 2.0, True):
        with pytest.raises(ValueError, match=r"patch_size must be one of patch_sizes \[4, 2, 1\]"):
            tiny_npp(patch_sizes=[4, 2, 1], patch_size=bad)


def test_presets_and_configs():
    assert {"npp-b", "npp-l", "npp-xl", "npp-xxl", "npp-tiny", "npp-digits"} <= set(NPP.presets)
    assert NPP.presets["npp-xl"].items() >= dict(dim=1280, depth=36, num_heads=20, patch_sizes=[2, 1]).items()
    model = NPP.from_preset("npp-tiny", vocab_size=32, max_tokens=64, grid=[8, 8], patch_sizes=[4, 2, 1])
    assert NPP(**model.config).config == model.config
    with pytest.raises(ValueError, match="NPP needs a token grid"):
        NPP(vocab_size=16, max_tokens=16, grid=None)
    config = yaml.safe_load((ROOT / "configs" / "generators" / "npp.yaml").read_text())
    args = config["model"]["init_args"]["generator"]["init_args"]
    built = NPP(**args, vocab_size=256, max_tokens=64, grid=[8, 8])  # the sizes come from the token cache
    epochs = config["trainer"]["max_epochs"]
    assert built.patch_sizes == [2, 1] and built.stage_boundaries(epochs) == [epochs // 2, epochs]


def test_schedule_runs_under_flexar_train(tmp_path):
    from flexar.data import build_dataset, write_token_cache
    from flexar.tokenizers import VQGAN2D
    from flexar.train.cli import run

    torch.manual_seed(0)
    tokenizer = VQGAN2D.from_preset("vq2d-tiny", image_size=16, channels=1)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    for split in ("train", "test"):
        subset = torch.utils.data.Subset(build_dataset("digits", split, image_size=16, channels=1), range(48))
        write_token_cache(tokenizer, subset, tmp_path / "tokens" / split, progress=False, description={"num_classes": 10})
    config = yaml.safe_load((ROOT / "configs" / "generators" / "npp.yaml").read_text())
    config["trainer"].update(max_epochs=2, limit_val_batches=1, enable_progress_bar=False, log_every_n_steps=1,
                             callbacks=None)
    config["model"]["init_args"]["generator"]["init_args"].update(vocab_size=32, max_tokens=16, grid=[4, 4], dim=32,
                                                                  depth=1, num_heads=2)
    config["model"]["init_args"]["export_dir"] = str(tmp_path / "generator")
    config["data"]["init_args"].update(train=str(tmp_path / "tokens" / "train"), val=str(tmp_path / "tokens" / "test"),
                                       batch_size=16)
    (tmp_path / "npp.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "npp.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    stages = [(int(row["epoch"]), float(row["train/patch_size"])) for row in rows if row.get("train/patch_size")]
    # boundaries for 2 epochs: [1, 2] -> epoch 0 trains on 2x2 patches, epoch 1 on tokens
    assert sorted(set(stages)) == [(0, 2.0), (1, 1.0)]
    exported = NPP.from_pretrained(tmp_path / "generator")
    assert exported.patch_sizes == [2, 1] and exported.patch_size == 1
