import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flexar import Pipeline
from flexar.data import TokenDataModule, TokenDataset, build_dataset, read_meta, write_token_cache
from flexar.eval.classifier import DigitClassifier
from flexar.generators import RasterAR
from flexar.hub import fingerprint
from flexar.sampling import BestOfN, Sampler
from flexar.tokenizers import TiTok
from flexar.train.cli import run

ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer(**overrides):
    kwargs = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                  codebook_size=32, code_dim=8)
    return TiTok(**{**kwargs, **overrides}).eval()


def tiny_generator(**overrides):
    kwargs = dict(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2)
    return RasterAR(**{**kwargs, **overrides}).eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipe")
    Pipeline(tiny_tokenizer(), tiny_generator()).save_pretrained(folder)
    return folder


def test_token_cache_round_trip_and_shards(tmp_path):
    tokenizer = tiny_tokenizer()
    dataset = build_dataset("digits", "test", image_size=16, channels=1)
    subset = torch.utils.data.Subset(dataset, range(40))
    write_token_cache(tokenizer, subset, tmp_path / "cache", shard_size=16, progress=False,
                      description={"num_classes": 10})
    meta = read_meta(tmp_path / "cache")
    assert meta["num_items"] == 40 and len(meta["shards"]) == 3 and meta["vocab_size"] == 32
    cached = TokenDataset(tmp_path / "cache")
    images = torch.stack([subset[i][0] for i in range(40)])
    ids, labels, lengths = cached[list(range(40))]
    assert len(cached) == 40 and torch.equal(ids, tokenizer.encode(images).ids)
    assert torch.equal(labels, torch.tensor([int(subset[i][1]) for i in range(40)])) and bool((lengths == 6).all())
    with pytest.raises(FileNotFoundError, match="not a token cache"):
        TokenDataset(tmp_path)


def test_flexar_tokenize_and_generator_training_through_the_cli(tmp_path, capsys):
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(tokenizer_dir)
    for split in ("train", "test"):
        subprocess.run([sys.executable, "-m", "flexar.data.token_cache", "--tokenizer", str(tokenizer_dir),
                        "--dataset", "digits", "--split", split, "--output", str(tmp_path / "tokens" / split)],
                       check=True, capture_output=True)
    config = yaml.safe_load((ROOT / "configs" / "generators" / "raster.yaml").read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=3, limit_val_batches=1, enable_progress_bar=False,
                             log_every_n_steps=1)
    config["trainer"]["callbacks"][0]["init_args"].update(tokenizer=str(tokenizer_dir), every_n_epochs=1, per_class=1)
    # vocab_size and max_tokens come from the cache's meta.json
    config["model"]["init_args"]["generator"]["init_args"].update(dim=32, depth=1, num_heads=2)
    config["model"]["init_args"]["export_dir"] = str(tmp_path / "generator")
    config["data"]["init_args"].update(train=str(tmp_path / "tokens" / "train"), val=str(tmp_path / "tokens" / "test"))
    (tmp_path / "raster.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "raster.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    generator = RasterAR.from_pretrained(tmp_path / "generator")
    assert list((tmp_path / "run").rglob("samples_epoch000.png"))
    # the export records the tokenizer of its token cache, and a pipeline holds the generator to it
    assert generator.provenance == {"tokenizer_fingerprint": fingerprint(tokenizer_dir)}
    pipe = Pipeline(TiTok.from_pretrained(tokenizer_dir), generator)
    assert pipe.generate([3, 4], seed=0).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="trained on the ids of tokenizer"):
        Pipeline(tiny_tokenizer(), generator)
    assert generator.config["vocab_size"] == 32 and generator.config["max_tokens"] == 6
    # a vocabulary given on the command line that does not match the cache is refused when the config is parsed
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(tmp_path / "raster.yaml"), "--trainer.default_root_dir", str(tmp_path / "run2"),
             "--trainer.callbacks=[]", "--model.init_args.generator.init_args.vocab_size", "64"])
    assert "vocab_size: generator 64 vs token cache 32" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_pipeline_round_trip_and_determinism(pipeline_dir):
    pipe = Pipeline.from_pretrained(pipeline_dir)
    sampler = Sampler(top_k=10, cfg_scale=2.0)
    images, stats = pipe.generate([0, 1, 2, 9], sampler=sampler, seed=3, return_stats=True)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16)
    assert stats["forward_passes"] == 6 and stats["tokens"] == 24
    again = Pipeline.from_pretrained(pipeline_dir).generate([0, 1, 2, 9], sampler=sampler, seed=3)
    assert torch.equal(images, again)
    # batching does not change the images: one generator drives every draw in order
    assert torch.equal(pipe.generate([0, 1, 2, 9], sampler=sampler, seed=3, batch_size=4),
                       pipe.generate([0, 1, 2, 9], sampler=sampler, seed=3, batch_size=4, use_cache=False))
    assert not torch.equal(images, pipe.generate([0, 1, 2, 9], sampler=sampler, seed=4))
    shorter = pipe.generate([0, 1], num_tokens=2, seed=0, return_stats=True)[1]
    assert shorter["tokens"] == 4
    # a strategy's own counts add up over batches too: best-of-3 consumes 3 trajectories of 6 tokens per label
    best = pipe.generate([0, 1, 2], sampler=BestOfN(Sampler(), 3), seed=0, batch_size=2, return_stats=True)[1]
    assert best["tokens_consumed"] == 3 * 3 * 6 and "rounds" not in best


def test_pipeline_refusals(pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="generator vocab_size 64 != tokenizer codebook_size 32"):
        Pipeline(tiny_tokenizer(), tiny_generator(vocab_size=64))
    with pytest.raises(ValueError, match="generator max_tokens 8 != tokenizer max_tokens 6"):
        Pipeline(tiny_tokenizer(), tiny_generator(max_tokens=8))
    pipe = Pipeline.from_pretrained(pipeline_dir)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        pipe.generate([10])
    with pytest.raises(ValueError, match=r"num_tokens must be an int in \[1, 6\]"):
        pipe.generate([1], num_tokens=7)
    with pytest.raises(FileNotFoundError, match="no pipeline.json"):
        Pipeline.from_pretrained(tmp_path)
    # a mismatched pair saved by hand is refused at load, naming the numbers
    Pipeline(tiny_tokenizer(), tiny_generator()).save_pretrained(tmp_path / "bad")
    tiny_generator(vocab_size=64).save_pretrained(tmp_path / "bad" / "generator")
    with pytest.raises(ValueError, match="vocab_size 64 != tokenizer codebook_size 32"):
        Pipeline.from_pretrained(tmp_path / "bad")


def test_sample_and_eval_fid_scripts(pipeline_dir, tmp_path):
    torch.manual_seed(0)
    DigitClassifier(in_channels=1, image_size=16, width=8, feature_dim=16).save_pretrained(tmp_path / "classifier")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_fid.py"), "--pipeline", str(pipeline_dir),
                          "--num-samples", "20", "--reference", "digits", "--reference-limit", "30",
                          "--extractor", f"classifier:{tmp_path / 'classifier'}", "--top-k", "5", "--cfg-scale", "1.5",
                          "--output", str(tmp_path / "fid.json"), "--save-grid", str(tmp_path / "grid.png")],
                         check=True, capture_output=True, text=True)
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["num_samples"] == 20 and result["num_reference"] == 30 and result["fid"] > 0
    assert result["sampler"]["top_k"] == 5 and result["sampler"]["cfg_scale"] == 1.5
    assert json.loads(out.stdout.strip().splitlines()[-1])["fid"] == pytest.approx(result["fid"])
    assert (tmp_path / "grid.png").is_file()
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--pipeline", str(pipeline_dir),
                          "--labels", "1", "2", "--per-label", "3", "--output", str(tmp_path / "s.png")],
                         check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["images"] == 6 and (tmp_path / "s.png").is_file()


# -- provenance: the generator names the tokenizer whose ids it learnt -------------------------------------------------
def paired(tmp_path, seed=0):
    """A tokenizer saved to tmp_path/tokenizer-<seed> and a generator that records it (as training on its cache does)."""
    torch.manual_seed(seed)
    folder = tmp_path / f"tokenizer-{seed}"
    tiny_tokenizer().save_pretrained(folder)
    generator = tiny_generator()
    generator.provenance = {"tokenizer_fingerprint": fingerprint(folder)}
    return folder, generator


def test_pipeline_refuses_a_tokenizer_other_than_the_generators(tmp_path):
    folder, generator = paired(tmp_path, seed=0)
    other, _ = paired(tmp_path, seed=1)  # same vocabulary, length and grid: only the fingerprint tells them apart
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recorded and matching tokenizer pairs without a word
        Pipeline(TiTok.from_pretrained(folder), generator)
        tokenizer = TiTok.from_pretrained(folder)
        del tokenizer.fingerprint  # an in-memory tokenizer is hashed as it would be saved
        Pipeline(tokenizer, generator)
    with pytest.raises(ValueError, match="trained on the ids of tokenizer .* check_provenance=False"):
        Pipeline(TiTok.from_pretrained(other), generator)
    Pipeline(TiTok.from_pretrained(other), generator, check_provenance=False)
    # save_pretrained keeps the provenance, and from_pretrained checks it
    Pipeline(TiTok.from_pretrained(folder), generator).save_pretrained(tmp_path / "pipe")
    loaded = Pipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.generator.provenance == generator.provenance
    shutil.rmtree(tmp_path / "pipe" / "tokenizer")
    shutil.copytree(other, tmp_path / "pipe" / "tokenizer")
    with pytest.raises(ValueError, match="trained on the ids of tokenizer"):
        Pipeline.from_pretrained(tmp_path / "pipe")
    assert Pipeline.from_pretrained(tmp_path / "pipe", check_provenance=False).generator.provenance == generator.provenance


def test_a_generator_without_provenance_is_paired_with_a_warning(tmp_path):
    tiny_generator().save_pretrained(tmp_path / "old")  # as folders saved before provenance was recorded
    with pytest.warns(UserWarning, match="records no tokenizer fingerprint"):
        Pipeline(tiny_tokenizer(), RasterAR.from_pretrained(tmp_path / "old"))


# -- inputs refused by name, never reinterpreted -------------------------------------------------------------------------
def test_generate_labels_must_be_integers(pipeline_dir):
    pipe = Pipeline.from_pretrained(pipeline_dir)
    reference = pipe.generate([1, 0, 3], seed=0)
    for same in ([np.int64(1), np.int32(0), 3], (1, 0, 3), np.array([1, 0, 3]), torch.tensor([1, 0, 3], dtype=torch.int32),
                 [torch.tensor(1), 0, 3]):
        assert torch.equal(pipe.generate(same, seed=0), reference), same
    for bad, message in (
        ([1.7], r"labels\[0\] must be an int, got 1.7"),
        ([-0.5], r"labels\[0\] must be an int, got -0.5"),
        ([1, 2.0], r"labels\[1\] must be an int, got 2.0"),
        ([True, 1], r"labels\[0\] must be an int, got the bool True"),
        ([[0, 1], [2, 3]], r"labels\[0\] must be an int, got \[0, 1\]"),
        (torch.tensor([[0, 1], [2, 3]]), r"one-dimensional \(B,\), got shape \(2, 2\)"),
        (torch.tensor([1.7]), "labels must be integers, got a tensor of dtype torch.float32"),
        (torch.tensor([True]), "labels must be integers, got a tensor of dtype torch.bool"),
        (np.array([0.5]), "labels must be integers, got a numpy array of dtype float64"),
        ("12", "labels must be a sequence of ints"),
        (3, "labels must be a sequence of ints"),
    ):
        with pytest.raises(ValueError, match=message):
            pipe.generate(bad)


def test_generate_batch_size_seed_and_num_tokens_take_ints_and_numpy_ints(pipeline_dir):
    pipe = Pipeline.from_pretrained(pipeline_dir)
    reference = pipe.generate([1, 2, 3], seed=5, batch_size=2, num_tokens=4)
    assert torch.equal(pipe.generate([1, 2, 3], seed=np.int64(5), batch_size=np.int64(2), num_tokens=np.int32(4)),
                       reference)
    for bad, message in ((0, "batch_size must be a positive int, got 0"), (-1, "batch_size must be a positive int"),
                         (2.5, "batch_size must be an int, got 2.5"), ("4", "batch_size must be an int"),
                         (True, "batch_size must be an int, got the bool True")):
        with pytest.raises(ValueError, match=message):
            pipe.generate([1], batch_size=bad)
    with pytest.raises(ValueError, match="seed must be an int, got 1.5"):
        pipe.generate([1], seed=1.5)
    with pytest.raises(ValueError, match="num_tokens must be an int, got 2.0"):
        pipe.generate([1], num_tokens=2.0)


def test_an_invalid_or_incomplete_pipeline_json_names_the_file_and_the_field(pipeline_dir, tmp_path):
    for index, (content, message) in enumerate((
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold an object with fields 'tokenizer' and 'generator', got list"),
        ('{"tokenizer": "tokenizer"}', "lacks the field 'generator'"),
        ('{"tokenizer": "tokenizer", "generator": 5}', "field 'generator' must name a sub-folder"),
        ('{"tokenizer": "../elsewhere", "generator": "generator"}', "field 'tokenizer' must name a sub-folder"),
        ('{"tokenizer": "tokenizer", "generator": "gen"}', "field 'generator' names 'gen', but .* does not exist"),
    )):
        folder = tmp_path / f"pipe{index}"
        shutil.copytree(pipeline_dir, folder)
        (folder / "pipeline.json").write_text(content)
        with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
            Pipeline.from_pretrained(folder)
        assert str(folder / "pipeline.json") in str(error.value)


@pytest.mark.parametrize("strategy", ["sampler", "scalingar", "best_of_n", "flextok"])
def test_images_do_not_depend_on_the_batch_size(pipeline_dir, strategy):
    from flexar.sampling import ScalingAR
    from flexar.tokenizers import FlexTok

    pipe = Pipeline.from_pretrained(pipeline_dir)
    sampler = Sampler(top_k=10, cfg_scale=2.0)
    if strategy == "scalingar":
        sampler = ScalingAR(Sampler(cfg_scale=2.0), num_trajectories=3, checkpoints=[0.5])
    elif strategy == "best_of_n":
        sampler = BestOfN(Sampler(), 3)
    elif strategy == "flextok":  # a sampling decoder: its noise must follow the image, not the batch, too
        torch.manual_seed(0)
        tokenizer = FlexTok(image_size=16, channels=1, patch_size=4, num_registers=4, width=32, depth=1,
                            num_heads=2, decoder_width=32, decoder_depth=1, fsq_levels=[8, 4], num_steps=3)
        generator = RasterAR(vocab_size=tokenizer.codebook_size, max_tokens=4, num_classes=10, dim=32, depth=1,
                             num_heads=2)
        pipe = Pipeline(tokenizer, generator, check_provenance=False)
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    whole = pipe.generate(labels, sampler=sampler, seed=7, batch_size=10)
    for batch_size in (1, 3, 4):
        assert torch.equal(pipe.generate(labels, sampler=sampler, seed=7, batch_size=batch_size), whole), batch_size
    # the first images of a longer call are the images of a shorter one with the same seed
    assert torch.equal(pipe.generate(labels[:4], sampler=sampler, seed=7), whole[:4])
    assert not torch.equal(pipe.generate(labels, sampler=sampler, seed=8, batch_size=10), whole)


# -- output_type: uint8 (default), float tensors and arrays in [0, 1], PIL images ---------------------------------------
def test_generate_output_types_hold_the_same_images(pipeline_dir, tmp_path):
    from PIL import Image
    from torchvision.utils import save_image

    pipe = Pipeline.from_pretrained(pipeline_dir)
    labels, sampler = [0, 3, 7], Sampler(top_k=10, cfg_scale=2.0)
    default = pipe.generate(labels, sampler=sampler, seed=5)
    as_uint8 = pipe.generate(labels, sampler=sampler, seed=5, output_type="uint8")
    assert default.dtype == torch.uint8 and torch.equal(default, as_uint8)
    floats, stats = pipe.generate(labels, sampler=sampler, seed=5, output_type="pt", return_stats=True)
    assert floats.dtype == torch.float32 and floats.shape == (3, 3, 16, 16) and stats["tokens"] == 18
    assert 0.0 <= floats.min() and floats.max() <= 1.0
    # unrounded: the uint8 images are the float ones scaled to 255 and rounded
    assert floats.unique().numel() > default.unique().numel()
    assert torch.equal((floats * 255).round().to(torch.uint8), default)
    # torchvision's save_image takes the float output as it is and writes the uint8 images
    save_image(floats[1], tmp_path / "one.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png").convert("RGB")), default[1].permute(1, 2, 0).numpy())
    arrays = pipe.generate(labels, sampler=sampler, seed=5, output_type="np")
    assert isinstance(arrays, np.ndarray) and arrays.dtype == np.float32 and arrays.shape == (3, 16, 16, 3)
    assert np.array_equal(arrays, floats.permute(0, 2, 3, 1).numpy())
    images = pipe.generate(labels, sampler=sampler, seed=5, output_type="pil")
    assert isinstance(images, list) and len(images) == 3
    for image, expected in zip(images, default):
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (16, 16)
        assert np.array_equal(np.asarray(image), expected.permute(1, 2, 0).numpy())


def test_generate_refuses_an_unknown_output_type_before_sampling(pipeline_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(pipeline_dir)

    def never(*args, **kwargs):
        raise AssertionError("sampled before output_type was checked")

    monkeypatch.setattr(pipe.generator, "generate_with", never)
    for bad in ("float", "PT", "latent", None, 1):
        with pytest.raises(ValueError, match=r'output_type must be one of "uint8".*"pt".*"np".*"pil".*got ' + repr(bad)):
            pipe.generate([0, 1], output_type=bad)
