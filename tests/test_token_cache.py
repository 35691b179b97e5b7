"""Token caches and the split of a dataset across ranks: every row once per epoch, equal steps on every rank, the
same global batches as one process; caches written atomically and checked when read."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from common import FailingImages
from probes import write_index_cache
from safetensors.torch import save_file
from torch.utils.data import Dataset, DistributedSampler, Subset

from flexar.data import GlobalBatchSampler, TokenDataModule, TokenDataset, build_dataset, read_meta, write_token_cache
from flexar.hub import fingerprint, model_fingerprint
from flexar.tokenizers import TiTok


def tiny_tokenizer(seed=0):
    torch.manual_seed(seed)
    return TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                 codebook_size=32, code_dim=8).eval()


@pytest.fixture(scope="module")
def images():
    return Subset(build_dataset("digits", "test", image_size=16, channels=1), range(40))


# ---------------------------------------------------------------- one global batch per step, split across ranks


def epoch_batches(num_rows, batch_size, world, epoch=0, seed=0):
    """[rank][step] -> row indices."""
    ranks = []
    for rank in range(world):
        sampler = GlobalBatchSampler(num_rows, batch_size, world, rank, seed=seed)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
        assert len(sampler) == len(ranks[-1])
    return ranks


@pytest.mark.parametrize("num_rows", [1500, 1501, 1000, 129, 130, 3, 2])
def test_every_row_once_and_the_same_steps_on_every_rank(num_rows):
    for world in (1, 2, 3):
        if num_rows < world:
            continue
        ranks = epoch_batches(num_rows, 64, world, epoch=1)
        assert len({len(steps) for steps in ranks}) == 1, "every rank runs the same number of steps"
        rows = [row for steps in ranks for batch in steps for row in batch]
        assert sorted(rows) == list(range(num_rows))
        # no rank ever gets an empty batch, and a step's sizes differ by at most one row
        for step in zip(*ranks):
            sizes = [len(batch) for batch in step]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_ranks_together_take_the_single_process_batch():
    single = epoch_batches(1500, 128, 1, epoch=2)[0]
    ranks = epoch_batches(1500, 64, 2, epoch=2)
    assert len(single) == len(ranks[0]) == 12
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    assert epoch_batches(1500, 128, 1, epoch=3)[0] != single, "each epoch draws a fresh order"
    assert epoch_batches(1500, 128, 1, epoch=2)[0] == single


def test_a_tail_smaller_than_the_ranks_joins_the_step_before_it():
    # 129 rows at a global batch of 128 on 2 ranks: one step of 64 + 65 rows, not a step with an empty rank
    ranks = epoch_batches(129, 64, 2)
    assert [[len(batch) for batch in steps] for steps in ranks] == [[64], [65]]
    with pytest.raises(ValueError, match="cannot split 1 rows across 2 data-parallel ranks"):
        GlobalBatchSampler(1, 64, 2, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        GlobalBatchSampler(10, 0)


def test_sampler_is_the_only_split_and_resumes_mid_epoch():
    sampler = GlobalBatchSampler(100, 8, 2, 1, seed=3)
    # Lightning adds its own DistributedSampler to a loader only when the loader's sampler is not one
    assert isinstance(sampler, DistributedSampler)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.resume_at(4, 3)
    assert list(sampler) == full[3:] and sampler.consumed == 3
    assert list(sampler) == full, "the resume point applies to one pass only"
    sampler.resume_at(2, 3)
    assert list(sampler) == full, "a resume point of another epoch is ignored"


def test_a_mid_epoch_resume_with_other_batches_is_refused(tmp_path):
    write_index_cache(tmp_path / "cache", [40, 40, 20], vocab_size=16, length=3, num_classes=4)
    module = TokenDataModule(str(tmp_path / "cache"), batch_size=16)
    state = module.train_dataloader().state_dict()
    assert state == {"epoch": 0, "batches": 0, "num_rows": 100, "batch_size": 16, "num_replicas": 1,
                     "shuffle": True, "seed": 0}
    resumed = TokenDataModule(str(tmp_path / "cache"), batch_size=16)
    resumed.load_state_dict({**state, "batches": 2})
    assert len(list(resumed.train_dataloader())) == 5, "the epoch continues after its first 2 batches"
    other = TokenDataModule(str(tmp_path / "cache"), batch_size=8)
    other.load_state_dict({**state, "batches": 2})
    with pytest.raises(ValueError, match=r"cannot resume in the middle of epoch 0 .*batch_size 16 -> 8"):
        other.train_dataloader()


# ---------------------------------------------------------------- memory-mapped reading


def test_reading_gathers_rows_from_memory_mapped_shards(tmp_path):
    ids = write_index_cache(tmp_path / "cache", [5, 7, 3], vocab_size=16, length=3, num_classes=4)
    dataset = TokenDataset(tmp_path / "cache")
    assert len(dataset) == 15
    rows = [14, 0, 6, 5, 13, 2]  # across all three shards, out of order
    batch_ids, labels, lengths = dataset[rows]
    assert torch.equal(batch_ids, ids[rows]) and batch_ids.dtype == torch.long
    assert torch.equal(labels, torch.tensor(rows) % 4) and torch.equal(lengths, torch.full((6,), 3))
    one = dataset[-1]
    assert torch.equal(one[0], ids[14]) and one[1].shape == () and int(one[1]) == 14 % 4
    assert torch.equal(dataset.ids, ids)
    assert all(isinstance(column, np.memmap) for shard in dataset._columns() for column in shard.values())
    assert dataset.__getstate__()["_maps"] is None, "worker processes map the shards themselves"
    with pytest.raises(IndexError, match=r"row indices must lie in \[0, 15\)"):
        dataset[[15]]


def test_token_datamodule_covers_the_cache_each_epoch(tmp_path):
    ids = write_index_cache(tmp_path / "cache", [40, 40, 20], vocab_size=16, length=3, num_classes=4)
    module = TokenDataModule(str(tmp_path / "cache"), batch_size=16, seed=5)
    loader = module.train_dataloader()
    orders = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        seen = torch.cat([batch[0] for batch in loader])
        assert sorted(seen[:, 0].mul(16).add(seen[:, 1]).tolist()) == list(range(100))
        orders.append(seen)
    assert len(loader) == 7 and not torch.equal(orders[0], orders[1])
    assert torch.equal(torch.sort(orders[0][:, 0] * 16 + orders[0][:, 1]).values, ids[:, 0] * 16 + ids[:, 1])


# ---------------------------------------------------------------- writing


def test_meta_records_counts_and_the_tokenizer_fingerprint(tmp_path, images):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    write_token_cache(tokenizer, images, tmp_path / "from_folder", shard_size=16, progress=False,
                      tokenizer_folder=tmp_path / "tokenizer", description={"num_classes": 10})
    meta = read_meta(tmp_path / "from_folder")
    assert [shard["count"] for shard in meta["shards"]] == [16, 16, 8] and meta["num_items"] == 40
    assert meta["tokenizer"]["fingerprint"] == fingerprint(tmp_path / "tokenizer")
    assert meta["tokenizer"]["path"] == str((tmp_path / "tokenizer").resolve())
    assert meta["tokenizer"]["class"] == "TiTok" and meta["num_classes"] == 10
    write_token_cache(tokenizer, images, tmp_path / "in_memory", progress=False)
    meta = read_meta(tmp_path / "in_memory")
    assert meta["tokenizer"]["fingerprint"] == model_fingerprint(tokenizer) and meta["tokenizer"]["path"] is None
    cached = TokenDataset(tmp_path / "in_memory")
    expected = tokenizer.encode(torch.stack([images[i][0] for i in range(40)])).ids
    assert torch.equal(cached.ids, expected)
    assert not list(tmp_path.glob(".*")), "no staging folder is left behind"


def test_an_interrupted_rewrite_leaves_the_old_cache_intact(tmp_path, images):
    old_tokenizer, new_tokenizer = tiny_tokenizer(0), tiny_tokenizer(1)
    write_token_cache(old_tokenizer, images, tmp_path / "cache", shard_size=8, batch_size=8, progress=False)
    before = {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        # shards 0 and 1 of the new cache are written before item 20 fails
        write_token_cache(new_tokenizer, FailingImages(images, 20), tmp_path / "cache", shard_size=8, batch_size=8,
                          progress=False)
    assert {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]
    assert read_meta(tmp_path / "cache")["tokenizer"]["fingerprint"] == model_fingerprint(old_tokenizer)
    # a complete rewrite replaces it
    write_token_cache(new_tokenizer, images, tmp_path / "cache", shard_size=8, batch_size=8, progress=False)
    assert TokenDataset(tmp_path / "cache").meta["tokenizer"]["fingerprint"] == model_fingerprint(new_tokenizer)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]


def test_bad_shard_sizes_and_foreign_folders_are_refused(tmp_path, images):
    tokenizer = tiny_tokenizer()
    for bad in (0, -3):
        with pytest.raises(ValueError, match="shard_size must be a positive int"):
            write_token_cache(tokenizer, images, tmp_path / "cache", shard_size=bad, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a token cache"):
        write_token_cache(tokenizer, images, tmp_path / "notes", progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    done = subprocess.run([sys.executable, "-m", "flexar.data.token_cache", "--tokenizer", str(tmp_path),
                           "--output", str(tmp_path / "x"), "--shard-size", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "--shard-size: must be a positive integer, got 0" in done.stderr


# ---------------------------------------------------------------- checks when reading


@pytest.fixture
def cache(tmp_path, images):
    write_token_cache(tiny_tokenizer(), images, tmp_path / "cache", shard_size=16, progress=False,
                      description={"num_classes": 10})
    return tmp_path / "cache"


def edit_meta(cache, change):
    meta = json.loads((cache / "meta.json").read_text())
    change(meta)
    (cache / "meta.json").write_text(json.dumps(meta))


def test_a_truncated_or_incomplete_meta_is_refused_by_name(cache):
    text = (cache / "meta.json").read_text()
    (cache / "meta.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"meta.json is not valid JSON \(truncated\?\)"):
        read_meta(cache)
    (cache / "meta.json").write_text(text)
    edit_meta(cache, lambda meta: meta.pop("vocab_size"))
    with pytest.raises(ValueError, match=r"meta.json: field 'vocab_size' is missing"):
        TokenDataset(cache)
    (cache / "meta.json").write_text(text)
    edit_meta(cache, lambda meta: meta["shards"][1].update(count="16"))
    with pytest.raises(ValueError, match=r"field 'shards\[1\].count' must be a positive int"):
        TokenDataset(cache)
    (cache / "meta.json").write_text(text)
    edit_meta(cache, lambda meta: meta.update(num_items=41))
    with pytest.raises(ValueError, match="field 'num_items' is 41, but the shards' counts add up to 40"):
        TokenDataset(cache)
    (cache / "meta.json").write_text(text)
    edit_meta(cache, lambda meta: meta["shards"][0].update(file="../elsewhere.safetensors"))
    with pytest.raises(ValueError, match=r"field 'shards\[0\].file' must be the name of a file"):
        TokenDataset(cache)


def test_every_shard_is_checked_against_meta(cache, images, tmp_path):
    text = (cache / "meta.json").read_text()
    # counts per shard: the meta says 16 and 8 rows where the shards hold 16 + 16 and 8
    edit_meta(cache, lambda meta: meta["shards"][1].update(count=8) or meta["shards"][2].update(count=16))
    with pytest.raises(ValueError, match=r"shard_00001.safetensors holds 16 rows, but .*'shards\[1\].count' is 8"):
        TokenDataset(cache)
    (cache / "meta.json").write_text(text)
    edit_meta(cache, lambda meta: meta.update(max_tokens=8))
    with pytest.raises(ValueError, match=r"tensor 'ids' has shape \[16, 6\], but .*'max_tokens' is 8"):
        TokenDataset(cache)
    (cache / "meta.json").write_text(text)
    # a shard without labels, and one whose labels do not match its ids
    shard = cache / "shard_00001.safetensors"
    original = shard.read_bytes()
    ids = torch.zeros(16, 6, dtype=torch.int32)
    fingerprint_meta = {"tokenizer_fingerprint": read_meta(cache)["tokenizer"]["fingerprint"]}
    save_file({"ids": ids, "lengths": torch.full((16,), 6, dtype=torch.int32)}, str(shard), metadata=fingerprint_meta)
    with pytest.raises(ValueError, match=r"shard_00001.safetensors holds no 'labels' tensor"):
        TokenDataset(cache)
    save_file({"ids": ids, "lengths": torch.full((16,), 6, dtype=torch.int32), "labels": torch.zeros(15, dtype=torch.long)},
              str(shard), metadata=fingerprint_meta)
    with pytest.raises(ValueError, match=r"tensor 'labels' has shape \[15\] for 16 rows of ids"):
        TokenDataset(cache)
    # a truncated shard, and a shard of another tokenizer's cache
    shard.write_bytes(original[:-10])
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: tensor '\w+' does not fit in the file"):
        TokenDataset(cache)
    write_token_cache(tiny_tokenizer(1), images, tmp_path / "other", shard_size=16, progress=False)
    shard.write_bytes((tmp_path / "other" / "shard_00001.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"shard_00001.safetensors was written by tokenizer \w+, but .*"
                                         r"'tokenizer.fingerprint' is \w+: the folder mixes shards"):
        TokenDataset(cache)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"field 'shards\[1\].file' names shard_00001.safetensors"):
        TokenDataset(cache)


def test_a_validation_cache_of_another_tokenizer_is_refused(cache, images, tmp_path):
    write_token_cache(tiny_tokenizer(1), images, tmp_path / "val", progress=False)
    module = TokenDataModule(str(cache), val=str(tmp_path / "val"))
    with pytest.raises(ValueError, match=r"come from different tokenizers: tokenizer.fingerprint"):
        module.setup("fit")


# ---------------------------------------------------------------- through trainer.predict


def test_flexar_tokenize_runs_trainer_predict_and_writes_the_same_cache(tmp_path):
    """flexar-tokenize (TokenizerModule.predict_step + TokenCacheWriter) and write_token_cache give identical files."""
    from flexar.data.token_cache import main

    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    main(["--tokenizer", str(tmp_path / "tokenizer"), "--split", "test", "--output", str(tmp_path / "predicted"),
          "--batch-size", "64", "--shard-size", "100", "--num-tokens", "4"])
    tokenizer = TiTok.from_pretrained(tmp_path / "tokenizer")
    write_token_cache(tokenizer, build_dataset("digits", "test", image_size=16, channels=1), tmp_path / "direct",
                      num_tokens=4, batch_size=64, shard_size=100, progress=False, tokenizer_folder=tmp_path / "tokenizer",
                      description={"dataset": "digits", "split": "test", "num_classes": 10})
    files = sorted(path.name for path in (tmp_path / "direct").iterdir())
    assert files == ["meta.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    assert sorted(path.name for path in (tmp_path / "predicted").iterdir()) == files
    for name in files:
        assert (tmp_path / "predicted" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    assert int(TokenDataset(tmp_path / "predicted").lengths.max()) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["direct", "predicted", "tokenizer"], "no staging left"


def test_the_prediction_writer_refuses_a_foreign_folder_and_cleans_up_after_a_failure(tmp_path):
    import lightning as L

    from flexar.data import ImageDataModule, TokenCacheWriter
    from flexar.train import TokenizerModule

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")

    def predict(output, data):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[TokenCacheWriter(str(output))])
        trainer.predict(TokenizerModule(tiny_tokenizer()), datamodule=data, return_predictions=False)

    data = ImageDataModule("digits", image_size=16, channels=1, batch_size=64, predict_split="test")
    with pytest.raises(RuntimeError, match="notes exists and is not a token cache"):
        predict(tmp_path / "notes", data)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"

    class Broken(Dataset):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            if index == 100:  # the second batch: the first one is written by then
                raise RuntimeError("interrupted while tokenizing")
            return self.images[index]

    class Failing(ImageDataModule):
        def predict_dataloader(self):
            loader = super().predict_dataloader()
            loader.dataset.dataset = Broken(loader.dataset.dataset)
            return loader

    with pytest.raises(RuntimeError, match="interrupted while tokenizing"):
        predict(tmp_path / "cache", Failing("digits", image_size=16, channels=1, batch_size=64, predict_split="test"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes"], "nothing written, no staging left"
