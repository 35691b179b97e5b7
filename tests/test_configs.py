"""Shipped generator configs compose (family base + token-cache overlay) and take their sizes from the cache."""
from pathlib import Path

import pytest
import torch

from flexar.data import build_dataset, write_token_cache
from flexar.hub import load_model
from flexar.tokenizers import VAE, TiTok, VQGAN2D, MultiScaleVQ
from flexar.train.cli import FlexarCLI, run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# every documented generator run: (family base, token-cache overlay)
PAIRS = [("raster", "titok_digits"), ("raster", "titok_mnist"), ("raster", "vq2d_digits"), ("raster", "vq2d_mnist"),
         ("nar", "vq2d_digits"), ("nar", "vq2d_mnist"), ("npp", "vq2d_digits"), ("npp", "vq2d_mnist"),
         ("token_shuffle", "vq2d_digits"), ("var", "multiscale_digits"), ("var", "multiscale_mnist"),
         ("mvar", "multiscale_digits"), ("mvar", "multiscale_mnist")]
TOKENIZERS = {"titok": lambda: TiTok.from_preset("titok-tiny", image_size=16, channels=1, patch_size=4,
                                                  num_latent_tokens=8, codebook_size=48, code_dim=8),
              "vq2d": lambda: VQGAN2D.from_preset("vq2d-tiny", image_size=16, channels=1, codebook_size=40),
              "multiscale": lambda: MultiScaleVQ.from_preset("msvq-tiny"),
              # a continuous tokenizer: its cache holds latents (16 px -> 8 x 8 x 2)
              "vae": lambda: VAE(image_size=16, channels=1, latent_channels=2, block_out_channels=[8, 8],
                                 layers_per_block=1, norm_num_groups=4, mid_block_attention=False)}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Token caches of 8 digits from untrained tiny tokenizers: {kind: folder with tokenizer/ and tokens/}."""
    root = tmp_path_factory.mktemp("caches")
    data = torch.utils.data.Subset(build_dataset("digits", "train", image_size=16, channels=1), range(8))
    folders = {}
    for kind, make in TOKENIZERS.items():
        torch.manual_seed(0)
        folder = root / kind
        make().save_pretrained(folder / "tokenizer")
        tokenizer = load_model(folder / "tokenizer")
        for split in ("train", "test"):
            write_token_cache(tokenizer, data, folder / "tokens" / split, progress=False,
                              description={"num_classes": 10}, tokenizer_folder=folder / "tokenizer")
        folders[kind] = folder
    return folders


def parsed(arguments: list[str]) -> FlexarCLI:
    """flexar-train's CLI after parsing and building model and data (LightningCLI(run=False): nothing trains)."""
    build = FlexarCLI.__init__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlexarCLI, "__init__", lambda self, *args, **kwargs: build(self, *args, **kwargs, run=False))
        return run(arguments + ["--trainer.logger", "false"])


def pair_arguments(family: str, overlay: str, cache: Path) -> list[str]:
    return ["--config", str(CONFIGS / "generators" / f"{family}.yaml"),
            "--config", str(CONFIGS / "data" / "tokens" / f"{overlay}.yaml"),
            "--data.init_args.train", str(cache / "tokens" / "train"), "--data.init_args.val", str(cache / "tokens" / "test")]


@pytest.mark.parametrize("family,overlay", PAIRS)
def test_each_documented_pair_builds_its_generator_at_the_cache_sizes(caches, family, overlay):
    from flexar.data import read_meta

    cache = caches[overlay.split("_")[0]]
    cli = parsed(pair_arguments(family, overlay, cache))
    meta = read_meta(cache / "tokens" / "train")
    generator = cli.model.generator
    assert generator.vocab_size == meta["vocab_size"] and generator.max_tokens == meta["max_tokens"]
    assert list(generator.grid or []) == list(meta["grid"] or [])
    batch = 128 if overlay.endswith("mnist") else 64
    assert cli.datamodule.batch_size == batch


@pytest.mark.parametrize("overlay", ["vae_digits", "vae_mnist"])
def test_the_flow_generator_config_takes_its_latent_sizes_from_the_latent_cache(caches, overlay):
    cache = caches["vae"]
    cli = parsed(["--config", str(CONFIGS / "generators" / "xar.yaml"),
                  "--config", str(CONFIGS / "data" / "latents" / f"{overlay}.yaml"),
                  "--data.init_args.train", str(cache / "tokens" / "train"),
                  "--data.init_args.val", str(cache / "tokens" / "test")])
    generator = cli.model.generator
    assert type(generator).__name__ == "XAR" and generator.continuous
    assert (generator.latent_channels, generator.latent_size, generator.entity) == (2, 8, "cell")
    assert generator.num_entities == 4  # 4 x 4 cells on the 8 x 8 latents
    assert cli.datamodule.batch_size == (128 if overlay.endswith("mnist") else 64)


def test_a_size_that_disagrees_with_the_cache_is_refused_by_name(caches, capsys):
    arguments = pair_arguments("raster", "vq2d_digits", caches["vq2d"])
    cli = parsed(arguments + ["--model.init_args.generator.init_args.vocab_size", "40"])  # the cache's: accepted
    assert cli.model.generator.vocab_size == 40
    with pytest.raises(SystemExit):
        parsed(arguments + ["--model.init_args.generator.init_args.grid", "[2, 8]"])
    error = capsys.readouterr().err
    assert "model.init_args.generator.init_args.grid: generator [2, 8] vs token cache [4, 4]" in error


def test_base_and_overlay_train_through_flexar_train_fit(caches, tmp_path):
    cache = caches["vq2d"]
    run(["fit", *pair_arguments("nar", "vq2d_mnist", cache),
         "--model.init_args.generator.init_args.dim", "32", "--model.init_args.generator.init_args.depth", "1",
         "--model.init_args.generator.init_args.num_heads", "2", "--model.init_args.export_dir", str(tmp_path / "generator"),
         "--data.init_args.batch_size", "4", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
         "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path / "run")])
    from flexar.generators import NAR

    generator = NAR.from_pretrained(tmp_path / "generator")
    assert generator.vocab_size == 40 and list(generator.grid) == [4, 4]
    # the overlay's preview cadence (every 2 epochs on MNIST) drew the epoch-2 grid through the cache's tokenizer
    assert list((tmp_path / "run").rglob("samples_epoch001.png"))


# -- tokenizer and classifier runs: family config + dataset overlay (+ the family's own delta for that dataset) -----
def composed(*files: str) -> dict:
    """The configuration ``flexar-train fit`` reads from `files` (paths under configs/, merged in order, interpolations
    resolved), as the dict a single YAML file would give: seed_everything, trainer, model, data."""
    import contextlib
    import io

    import yaml

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as stop:
        run(["fit", *[part for name in files for part in ("--config", str(CONFIGS / name))], "--print_config"])
    assert stop.value.code in (0, None)
    config = yaml.safe_load(printed.getvalue())
    return {key: config[key] for key in ("seed_everything", "trainer", "model", "data")}


# every documented tokenizer / classifier run: the files, in order, and its dataset
RUNS = {"titok_digits": ["tokenizers/titok.yaml"],
        "titok_mnist": ["tokenizers/titok.yaml", "data/mnist.yaml"],
        **{f"{family}_digits": [f"tokenizers/{family}.yaml"]
           for family in ("onedpiece", "retok", "flextok", "vq2d", "multiscale", "vae")},
        **{f"{family}_mnist": [f"tokenizers/{family}.yaml", "data/mnist.yaml", f"tokenizers/mnist/{family}.yaml"]
           for family in ("onedpiece", "retok", "flextok", "vq2d", "multiscale", "karl", "alit")},
        "karl_photos": ["tokenizers/karl.yaml"], "alit_photos": ["tokenizers/alit.yaml"],
        "vq2d_photos": ["tokenizers/vq2d.yaml", "data/photos.yaml"],
        "karl_digits": ["tokenizers/karl.yaml", "data/digits.yaml"],
        "classifier_digits": ["eval/classifier.yaml"],
        "classifier_mnist": ["eval/classifier.yaml", "eval/mnist/classifier.yaml"]}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_each_documented_run_composes_and_builds_on_the_meta_device(name):
    import importlib

    config = composed(*RUNS[name])
    dataset = name.rsplit("_", 1)[1]
    assert config["data"]["init_args"]["dataset"] == dataset
    model = config["model"]["init_args"]
    spec = model.get("tokenizer") or {"class_path": "flexar.eval.classifier.DigitClassifier", "init_args": {}}
    arguments = dict(spec["init_args"])
    if "base" in arguments:  # KARL / ALIT: the frozen 2D VQ trained on the same dataset
        assert arguments.pop("base") == f"runs/vq2d_{dataset}/tokenizer"
        return
    if spec["init_args"].get("target") == "vae":
        return  # reads a trained VAE folder: built in tests/test_vae.py
    if "tokenizer" not in model:
        assert model["export_dir"] == f"runs/classifier_{dataset}/classifier"
        return
    module, _, cls = spec["class_path"].rpartition(".")
    with torch.device("meta"):
        tokenizer = getattr(importlib.import_module(module), cls)(**arguments)
    assert tokenizer.image_size == config["data"]["init_args"]["image_size"]


def test_the_demo_tokenizer_is_the_digits_titok_run():
    config = composed("tokenizers/titok.yaml")
    assert config == composed("tokenizers/titok.yaml", "data/digits.yaml")
    tokenizer = config["model"]["init_args"]["tokenizer"]
    assert tokenizer["class_path"] == "flexar.tokenizers.TiTok" and config["trainer"]["max_epochs"] == 30
    assert config["data"]["init_args"]["batch_size"] == 64 and config["trainer"]["callbacks"][0]["init_args"] == {
        "num_images": 16, "num_tokens": None, "every_n_epochs": 10}
