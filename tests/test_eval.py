"""FID/KID through torch-fidelity and the classifier feature extractor, offline and on CPU."""

import json
import math
import pathlib
import pickle
import re
import warnings
from urllib.error import URLError

import lightning
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flexar.eval import (
    CLASSIFIER_EXTRACTOR,
    ClassifierModule,
    DigitClassifier,
    SmallSetWarning,
    compute_metrics,
    extract_features,
    load_extractor,
)
from flexar.eval.fid import frechet_distance, gaussian_statistics, reference_images

# Small enough that 200 images give full-rank covariances, so FID is well conditioned.
TINY = dict(in_channels=1, num_classes=10, image_size=32, width=8, feature_dim=16)


def pattern_set(count: int, seed: int, noise: float = 20.0, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit-like uint8 images (count, 1, 32, 32), a class-dependent cross of bars plus noise, and labels (count,)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.full((count, 1, 32, 32), 30.0)
    for index, label in enumerate(labels.tolist()):
        row, column = 2 + 3 * label + shift, 2 + 3 * ((7 * label) % 10)
        images[index, 0, row : row + 3, :] = 220.0
        images[index, 0, :, column : column + 2] = 180.0
    images += noise * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 255).round().to(torch.uint8), labels


def pattern_images(count: int, seed: int, noise: float = 20.0, shift: int = 0) -> torch.Tensor:
    return pattern_set(count, seed, noise, shift)[0]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


class Hostile:
    """Unpickling this creates ``marker``: proof that a loader executed the file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These tensors are tiny and CPUs in CI are shared: extra torch and BLAS threads mostly wait on each other
    # (the Inception test ran 8x slower with two threads on a busy two-core machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> pathlib.Path:
    # A briefly trained classifier, so that features separate the patterns as they would separate digits.
    torch.manual_seed(0)
    model = DigitClassifier(**TINY)
    images, labels = pattern_set(512, seed=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = torch.randint(0, 512, (64,))
        loss = torch.nn.functional.cross_entropy(model(to_unit_range(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_sets() -> tuple[torch.Tensor, torch.Tensor]:
    return pattern_images(200, seed=1), pattern_images(200, seed=2, noise=35.0, shift=1)


# --- classifier ----------------------------------------------------------------------------------------------------


def test_classifier_shapes():
    model = DigitClassifier(**TINY)
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    assert model.features(images).shape == (5, 16)
    assert model(images).shape == (5, 10)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(5, 3, 32, 32))


def test_save_load_round_trip(classifier_folder):
    config = json.loads((classifier_folder / "config.json").read_text())
    assert config == {"class": "DigitClassifier", "kwargs": TINY}
    first = DigitClassifier.from_pretrained(classifier_folder)
    second = DigitClassifier.from_pretrained(classifier_folder)
    images = to_unit_range(pattern_images(8, seed=3))
    with torch.no_grad():
        assert torch.equal(first.features(images), second.features(images))
    original = DigitClassifier(**TINY)
    original.save_pretrained(classifier_folder.parent / "again")
    reloaded = DigitClassifier.from_pretrained(classifier_folder.parent / "again")
    with torch.no_grad():
        assert torch.equal(original.eval().features(images), reloaded.features(images))


def test_load_model_reads_a_classifier_folder(classifier_folder):
    from flexar.hub import fingerprint, load_model, registered
    from flexar.tokenizers import Tokenizer

    assert registered(DigitClassifier) == {"DigitClassifier": DigitClassifier}
    model = load_model(classifier_folder)
    assert type(model) is DigitClassifier and not model.training and model.config == TINY
    assert model.fingerprint == fingerprint(classifier_folder) and model.provenance == {}
    images = to_unit_range(pattern_images(8, seed=3))
    with torch.no_grad():
        assert torch.equal(model.features(images), DigitClassifier.from_pretrained(classifier_folder).features(images))
    with pytest.raises(ValueError, match="'DigitClassifier', which is not a registered flexar Tokenizer"):
        load_model(classifier_folder, kind=Tokenizer)


def test_earlier_classifier_folders_still_load(tmp_path, classifier_folder):
    # the layout flexar wrote before classifiers were saved like every model: arguments beside "class"
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "model.safetensors").write_bytes((classifier_folder / "model.safetensors").read_bytes())
    (flat / "config.json").write_text(json.dumps({"class": "DigitClassifier", **TINY}))
    with pytest.warns(FutureWarning, match="earlier flexar versions.*re-save it"):
        model = DigitClassifier.from_pretrained(flat)
    images = to_unit_range(pattern_images(8, seed=3))
    with torch.no_grad():
        assert torch.equal(model.features(images), DigitClassifier.from_pretrained(classifier_folder).features(images))
    model.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["kwargs"] == TINY
    # load_model never builds a default classifier from the older layout: it names the missing field instead
    from flexar.hub import load_model

    with pytest.raises(ValueError, match=r"field 'kwargs'.*missing.*DigitClassifier\.from_pretrained"):
        load_model(flat)
    # the earlier layout gets the same checks: argument types by field, and weights that fit
    (flat / "config.json").write_text(json.dumps({"class": "DigitClassifier", **TINY, "width": "8"}))
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"kwargs\.width' of DigitClassifier must be int"):
        DigitClassifier.from_pretrained(flat)
    (flat / "config.json").write_text(json.dumps({"class": "DigitClassifier", **TINY, "feature_dim": 32}))
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="do not match the network"):
        DigitClassifier.from_pretrained(flat)


def test_classifier_arguments_must_be_positive_ints():
    for name, bad in (("width", 0), ("feature_dim", -3), ("image_size", 2.5), ("in_channels", True)):
        with pytest.raises(ValueError, match=f"DigitClassifier: {name} must be a positive int, got {bad!r}"):
            DigitClassifier(**{**TINY, name: bad})


def test_refuses_wrong_class(tmp_path, classifier_folder):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((classifier_folder / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "class": "ResNet50"}))
    with pytest.raises(ValueError, match="ResNet50"):
        DigitClassifier.from_pretrained(tmp_path)


def test_refuses_torch_weights(tmp_path, classifier_folder):
    (tmp_path / "config.json").write_bytes((classifier_folder / "config.json").read_bytes())
    torch.save(DigitClassifier(**TINY).state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        DigitClassifier.from_pretrained(tmp_path)


def test_hostile_pickle_is_never_executed(tmp_path, classifier_folder):
    marker = tmp_path / "executed"
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "config.json").write_bytes((classifier_folder / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(pickle.dumps(Hostile(marker)))
    with pytest.raises(ValueError, match="safetensors"):
        DigitClassifier.from_pretrained(folder)
    images = pattern_images(4, seed=0)
    with pytest.raises(ValueError, match="safetensors"):
        compute_metrics(images, images, extractor=f"classifier:{folder}")
    # torch-fidelity itself would unpickle Inception weights without restriction; compute_metrics checks them first.
    torch.save(Hostile(marker), tmp_path / "inception.pth")
    with pytest.raises(ValueError, match="state dict"):
        compute_metrics(images, images, extractor="inception", inception_weights=str(tmp_path / "inception.pth"))
    assert not marker.exists()


def test_refuses_bad_extractors(tmp_path):
    images = pattern_images(4, seed=0)
    with pytest.raises(ValueError, match="unknown extractor"):
        compute_metrics(images, images, extractor="vgg")
    with pytest.raises(FileNotFoundError, match="Inception weights"):
        compute_metrics(images, images, extractor="inception", inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError):
        compute_metrics(images, images, extractor=f"classifier:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="not a flexar classifier"):
        compute_metrics(images, images, extractor=f"classifier:{tmp_path}")


def test_classifier_learns_and_exports(tmp_path):
    # Two trivially separable classes: the bright half is the top or the bottom.
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (128,), generator=generator)
    images = 0.3 * torch.randn(128, 1, 16, 16, generator=generator) - 0.5
    images[labels == 0, :, :8] += 1.0
    images[labels == 1, :, 8:] += 1.0
    dataset = TensorDataset(images.clamp(-1, 1), labels)
    train_loader, val_loader = DataLoader(dataset, batch_size=32, shuffle=True), DataLoader(dataset, batch_size=128)
    module = ClassifierModule(in_channels=1, num_classes=2, image_size=16, width=8, feature_dim=16, lr=3e-3)
    trainer = lightning.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    assert trainer.callback_metrics["val/accuracy"] > 0.9
    exported = DigitClassifier.from_pretrained(tmp_path / "classifier")
    with torch.no_grad():
        assert torch.equal(exported(images[:4]), module.classifier.eval()(images[:4]))


# --- metrics -------------------------------------------------------------------------------------------------------


def test_frechet_distance_closed_form():
    # For 1-D Gaussians the distance is (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s.
    assert math.isclose(frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4.0 + 1.0, rel_tol=1e-9)
    rng = np.random.default_rng(0)
    root = rng.normal(size=(6, 6))
    sigma = root @ root.T + np.eye(6)
    assert abs(frechet_distance(np.ones(6), sigma, np.ones(6), sigma)) < 1e-8


def test_fid_self_is_zero(classifier_folder, image_sets):
    samples, other = image_sets
    extractor = f"classifier:{classifier_folder}"
    metrics = compute_metrics(samples, samples.clone(), extractor=extractor)
    assert abs(metrics["fid"]) < 1e-3
    assert metrics["num_samples"] == metrics["num_reference"] == 200
    assert metrics["extractor"] == extractor
    # The unbiased MMD estimate leaves out self-pairs within a set but not across sets, so a set scored against
    # itself lands slightly below zero; a different set must score clearly above it.
    different = compute_metrics(samples, other, extractor=extractor)
    assert metrics["kid_mean"] <= 1e-6
    assert different["kid_mean"] > metrics["kid_mean"] + 0.1
    assert different["fid"] > 1.0


def test_fid_is_symmetric(classifier_folder, image_sets):
    first, second = image_sets
    extractor = f"classifier:{classifier_folder}"
    forward = compute_metrics(first, second, extractor=extractor, kid=False)
    backward = compute_metrics(second, first, extractor=extractor, kid=False)
    assert forward["kid_mean"] is None
    assert math.isclose(forward["fid"], backward["fid"], rel_tol=1e-6)


def test_fid_matches_independent_computation(classifier_folder, image_sets):
    first, second = image_sets
    extractor = f"classifier:{classifier_folder}"
    metrics = compute_metrics(first, second, extractor=extractor, kid=False)
    classifier = DigitClassifier.from_pretrained(classifier_folder)
    with torch.no_grad():
        features = [classifier.features(to_unit_range(images)).double().numpy() for images in image_sets]
    statistics = [(array.mean(axis=0), np.cov(array, rowvar=False)) for array in features]
    expected = frechet_distance(*statistics[0], *statistics[1])
    assert math.isclose(metrics["fid"], expected, rel_tol=1e-3)
    # and a direct check of the same closed form with the eigenvalue route, on the same features
    (mu1, sigma1), (mu2, sigma2) = statistics
    trace_root = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(complex)).real.sum()
    by_eigenvalues = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root
    assert math.isclose(expected, by_eigenvalues, rel_tol=1e-6)
    extracted = extract_features(first, extractor=extractor).double().numpy()
    np.testing.assert_allclose(extracted, features[0], atol=1e-4)
    np.testing.assert_allclose(gaussian_statistics(extracted)[1], statistics[0][1], atol=1e-4)


class LabelledImages(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], index % 10


def test_input_forms_agree(classifier_folder, image_sets):
    first, second = image_sets
    first, second = first[:40], second[:30]
    extractor = f"classifier:{classifier_folder}"
    reference = compute_metrics(first, second, extractor=extractor)
    assert reference["num_samples"] == 40 and reference["num_reference"] == 30
    as_dataset = compute_metrics(LabelledImages(first), LabelledImages(second), extractor=extractor)
    as_rgb = compute_metrics(first.expand(-1, 3, -1, -1), second.expand(-1, 3, -1, -1), extractor=extractor)
    as_float = compute_metrics(to_unit_range(first), to_unit_range(second), extractor=extractor)
    for other in (as_dataset, as_rgb, as_float):
        assert math.isclose(other["fid"], reference["fid"], rel_tol=1e-4)
        assert math.isclose(other["kid_mean"], reference["kid_mean"], rel_tol=1e-3, abs_tol=1e-6)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        compute_metrics(to_unit_range(first) * 3, second, extractor=extractor)


def test_kid_subset_is_clamped(classifier_folder, image_sets):
    first, second = image_sets
    metrics = compute_metrics(first[:12], second[:9], extractor=f"classifier:{classifier_folder}", kid_subset_size=500)
    assert all(math.isfinite(metrics[key]) for key in ("fid", "kid_mean", "kid_std"))


def test_inception_runs_offline(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    # Build the architecture without its download, then save random weights in the format torch-fidelity loads
    # (a plain state dict read by torch.load).
    with monkeypatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(network.state_dict(), weights)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(inception, "load_state_dict_from_url", no_download)
    # Two images per set, the fewest FID and KID accept: Inception runs at 299x299 and FID takes the eigenvalues of
    # a 2048x2048 matrix, both slow on a CPU.
    samples = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    reference = pattern_images(2, seed=4)
    metrics = compute_metrics(samples, reference, extractor="inception", inception_weights=str(weights))
    assert all(math.isfinite(metrics[key]) for key in ("fid", "kid_mean", "kid_std"))
    assert metrics["extractor"] == "inception"


def test_extractor_is_registered():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert CLASSIFIER_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY


# --- extractors loaded once, and checked before sampling ---------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights_file(tmp_path_factory) -> pathlib.Path:
    """Random weights in the format torch-fidelity loads (a plain state dict read by torch.load)."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(network.state_dict(), path)
    return path


def test_inception_weights_are_read_once(tmp_path, monkeypatch, inception_weights_file):
    import torch_fidelity

    # A copy swapped for a hostile pickle after flexar's check, just before torch-fidelity builds its network: the
    # swapped file must never be read (torch-fidelity would unpickle it without restriction).
    weights = tmp_path / "inception.pth"
    weights.write_bytes(inception_weights_file.read_bytes())
    marker = tmp_path / "executed"
    original = torch_fidelity.calculate_metrics

    def swap_then_score(**kwargs):
        torch.save(Hostile(marker), weights)
        return original(**kwargs)

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", swap_then_score)
    samples, reference = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), pattern_images(2, seed=4)
    with pytest.warns(SmallSetWarning, match="2048-dimensional inception"):
        metrics = compute_metrics(samples, reference, extractor="inception", inception_weights=str(weights), kid=False)
    assert not marker.exists() and math.isfinite(metrics["fid"]) and metrics["feature_dim"] == 2048
    # a loaded extractor keeps its tensors in memory: the file can go
    weights.write_bytes(inception_weights_file.read_bytes())
    loaded = load_extractor("inception", str(weights))
    weights.unlink()
    assert loaded.source == str(weights) and loaded.feature_dim == 2048
    with pytest.warns(SmallSetWarning):
        again = compute_metrics(samples, reference, extractor=loaded, kid=False)
    assert again["fid"] == pytest.approx(metrics["fid"], rel=1e-6) and again["extractor"] == "inception"


def test_inception_weights_that_do_not_fit_are_refused(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="does not hold torch-fidelity's inception-v3-compat weights"):
        load_extractor("inception", str(wrong))


def offline_download(*args, **kwargs):
    raise URLError("no network")


def test_offline_default_inception_says_what_to_do(tmp_path, monkeypatch):
    # an empty torch-hub cache and no network: the message names both ways out
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    with pytest.raises(RuntimeError, match=r"not cached.*no network.*--inception-weights PATH.*classifier:PATH"):
        load_extractor("inception")


def test_small_sets_warn(classifier_folder, image_sets):
    first, second = image_sets
    extractor = load_extractor(f"classifier:{classifier_folder}")
    assert extractor.feature_dim == TINY["feature_dim"] and extractor.name == CLASSIFIER_EXTRACTOR
    with pytest.warns(SmallSetWarning, match=r"16 samples for 16-dimensional"):
        compute_metrics(first[:16], second[:40], extractor=extractor, kid=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallSetWarning)
        compute_metrics(first[:17], second[:40], extractor=extractor, kid=False)


def test_reference_limit_must_be_at_least_two():
    for bad in (0, 1, -5, 2.5, True):
        with pytest.raises(ValueError, match="reference limit must be an int >= 2"):
            reference_images("digits", limit=bad)
    assert reference_images("digits", image_size=16, limit=np.int64(3)).shape == (3, 3, 16, 16)


# --- flexar-fid (flexar.cli.fid, also scripts/eval_fid.py) --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> pathlib.Path:
    from flexar import Pipeline
    from flexar.generators import RasterAR
    from flexar.tokenizers import TiTok

    torch.manual_seed(0)
    tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=4, width=32, depth=1, num_heads=2,
                      codebook_size=32, code_dim=8)
    generator = RasterAR(vocab_size=32, max_tokens=4, num_classes=10, dim=32, depth=1, num_heads=2)
    folder = tmp_path_factory.mktemp("pipeline")
    Pipeline(tokenizer.eval(), generator.eval()).save_pretrained(folder)
    return folder


def test_eval_fid_checks_everything_before_sampling(tmp_path, monkeypatch, capsys, tiny_pipeline, classifier_folder):
    from flexar import Pipeline

    def never(*args, **kwargs):
        raise AssertionError("sampled before the inputs were checked")

    monkeypatch.setattr(Pipeline, "generate", never)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    from flexar.cli import fid as script

    base = ["--pipeline", str(tiny_pipeline), "--num-samples", "20"]
    classifier = ["--extractor", f"classifier:{classifier_folder}"]
    cases = [
        (["--extractor", "vgg"], "unknown extractor 'vgg'"),
        (["--extractor", f"classifier:{tmp_path / 'missing'}"], "classifier folder .* does not exist"),
        (["--extractor", f"classifier:{tmp_path}"], "not a flexar classifier"),
        # the default, a classifier in the pipeline folder, which this one lacks: the flags to pass instead
        ([], r"--extractor classifier: .*classifier does not exist: pass --extractor classifier:PATH .*"
             r"--extractor inception .*--inception-weights PATH"),
        (["--extractor", "inception"], r"not cached.*--inception-weights PATH.*classifier:PATH"),  # offline
        (["--extractor", "inception", "--inception-weights", str(tmp_path / "none.pth")], "does not exist"),
        (["--inception-weights", str(tmp_path / "none.pth")], "--inception-weights applies to --extractor inception"),
        (classifier + ["--reference", "nosuchset"], "--reference nosuchset"),
        (classifier + ["--reference-limit", "0"], r"--reference-limit: must be an integer >= 2, got 0"),
        (classifier + ["--num-samples", "-5"], r"--num-samples: must be an integer >= 2, got -5"),
        (classifier + ["--batch-size", "0"], r"--batch-size: must be an integer >= 1, got 0"),
        (classifier + ["--num-tokens", "9"], r"--num-tokens 9: the pipeline's tokenizer holds at most 4"),
        (classifier + ["--decoding", "speculative"], "needs --draft"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            script.main(base + extra)
        assert exit_info.value.code == 2, extra
        assert re.search(message, capsys.readouterr().err, re.S), (extra, message)


def test_eval_fid_records_its_settings(tmp_path, tiny_pipeline, classifier_folder):
    from flexar.cli import fid as script

    output = tmp_path / "fid.json"
    argv = ["--pipeline", str(tiny_pipeline), "--num-samples", "12", "--batch-size", "5", "--reference-limit", "30",
            "--extractor", f"classifier:{classifier_folder}", "--top-k", "5", "--temperature", "0.9",
            "--output", str(output)]
    # 12 samples for 16 feature dimensions: flagged before sampling
    with pytest.warns(SmallSetWarning, match="12 samples for 16-dimensional"):
        assert script.main(argv) == 0
    result = json.loads(output.read_text())
    assert result["batch_size"] == 5 and result["num_samples"] == 12 and result["reference_limit"] == 30
    assert result["feature_dim"] == 16 and result["extractor_weights"] == str(classifier_folder)
    assert result["sampler"]["top_k"] == 5 and result["sampler"]["temperature"] == 0.9
    arguments = result["sampler_arguments"]
    assert set(arguments) == set(script.build_parser().sampling.names())
    expected = {"temperature", "top_k", "top_p", "cfg_scale", "cfg_schedule", "decoding", "draft", "k"}
    assert expected <= set(arguments)
    assert arguments["top_k"] == 5 and arguments["decoding"] == "sample" and arguments["draft"] is None


def test_eval_fid_defaults_to_the_pipelines_classifier_and_writes_under_runs(tmp_path, monkeypatch, tiny_pipeline,
                                                                            classifier_folder):
    import shutil

    from flexar.cli import fid as script

    pipeline = tmp_path / "models" / "digits"
    shutil.copytree(tiny_pipeline, pipeline)
    shutil.copytree(classifier_folder, pipeline / "classifier")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.warns(SmallSetWarning):
        assert script.main(["--pipeline", str(pipeline), "--num-samples", "12", "--reference-limit", "20"]) == 0
    written = sorted(path.relative_to(work).as_posix() for path in work.rglob("*"))
    assert written == ["runs", "runs/fid", "runs/fid/models-digits.json"]
    result = json.loads((work / "runs" / "fid" / "models-digits.json").read_text())
    assert result["extractor"] == f"classifier:{pipeline / 'classifier'}" and result["feature_dim"] == 16
    assert result["sampler"]["cfg_scale"] == 2.0 and result["sampler_arguments"]["cfg_scale"] == 2.0
