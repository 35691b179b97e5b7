import pickle

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from flexar.tokenizers import OneDPiece, ReconstructionLoss, TiTok
from flexar.tokenizers.losses import (
    LPIPS_HEADS_FILE,
    VGG_LAYOUTS,
    PatchDiscriminator,
    PerceptualLoss,
    VGGFeatures,
    adaptive_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    vgg_features,
)
from flexar.train import TokenizerModule
from flexar.train.cli import run


def narrow_vgg_file(path, seed=0, prefix="features."):
    torch.manual_seed(seed)
    state = {f"{prefix}{k}": v for k, v in vgg_features(VGG_LAYOUTS["vgg16-narrow"]).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a whole-VGG file: the classifier keys are ignored
    save_file(state, str(path))
    return path


def test_hinge_losses_on_known_inputs():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x): 0, 1, 2 -> mean 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_generator_loss(fake).item() == pytest.approx(1 / 3)
    # a confident discriminator has zero loss
    assert hinge_discriminator_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    out = decoder(x)
    reconstruction = (out**2).mean()
    generator = -(3 * out).sum()
    last = decoder[2].weight
    g_rec = torch.autograd.grad(reconstruction, last, retain_graph=True)[0]
    g_gen = torch.autograd.grad(generator, last, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gen.norm() + 1e-4)
    weight = adaptive_weight(reconstruction, generator, last)
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad
    # scaling the generator loss by s scales the weight by 1/s; the clamp bounds it
    torch.testing.assert_close(adaptive_weight(reconstruction, 10 * generator, last), expected / 10, rtol=1e-3, atol=0)
    assert adaptive_weight(reconstruction, 1e-9 * generator, last, maximum=7.0).item() == 7.0


def test_perceptual_loader_round_trip(tmp_path):
    path = narrow_vgg_file(tmp_path / "vgg.safetensors")
    features = VGGFeatures(path, "vgg16-narrow")
    torch.manual_seed(0)
    reference = vgg_features(VGG_LAYOUTS["vgg16-narrow"])
    for key, value in reference.state_dict().items():
        assert torch.equal(features.layers.state_dict()[key], value)
    assert not any(p.requires_grad for p in features.parameters())
    # bare keys load too, and the taps have the documented channels
    bare = VGGFeatures(narrow_vgg_file(tmp_path / "bare.safetensors", prefix=""), "vgg16-narrow")
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    taps = bare(images)
    assert [t.shape[1] for t in taps] == bare.channels == [8, 16, 32, 64, 64]
    assert [t.shape[-1] for t in taps] == [32, 16, 8, 4, 2]
    loss = PerceptualLoss(path, "vgg16-narrow", heads="baseline")
    other = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.all(loss(images, images) < 1e-6) and torch.all(loss(other, images) > 0)


@pytest.fixture(scope="module")
def random_vgg16_file(tmp_path_factory):
    """A randomly initialised full-width VGG16 feature stack in torchvision's layout (features.N.weight ...)."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    features = vgg16(weights=None).features
    path = tmp_path_factory.mktemp("vgg16") / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    return path, features.eval()


def lpips_reference(features: nn.Sequential, heads: list[torch.Tensor], x: torch.Tensor, x0: torch.Tensor):
    """LPIPS v0.1 written out from the lpips package's equations: ScalingLayer, the five VGG16 slices (relu1_2 ...
    relu5_3), normalize_tensor, squared difference, NetLinLayer (a 1x1 conv without bias), spatial_average, sum."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    slices = [range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)]

    def taps(images):
        h = (images.expand(-1, 3, -1, -1) - shift) / scale
        out = []
        for indices in slices:
            for index in indices:
                h = features[index](h)
            out.append(h)
        return out

    total = 0
    for head, a, b in zip(heads, taps(x), taps(x0)):
        a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        total = total + F.conv2d((a - b) ** 2, head.view(1, -1, 1, 1)).mean(dim=[2, 3], keepdim=True)
    return total.view(-1)


def test_lpips_heads_are_shipped_and_calibrated(random_vgg16_file):
    from safetensors import safe_open

    with safe_open(str(LPIPS_HEADS_FILE), "pt") as handle:
        assert "lpips" in handle.metadata()["source"] and handle.metadata()["version"] == "0.1"
        shipped = [handle.get_tensor(f"head{layer}") for layer in range(5)]
    loss = PerceptualLoss(random_vgg16_file[0])
    assert loss.heads == "lpips" and not any(name.startswith("head") for name in loss.state_dict())
    for layer, (head, width) in enumerate(zip(shipped, (64, 128, 256, 512, 512))):
        assert head.shape == (width,) and torch.all(head >= 0)
        assert torch.equal(getattr(loss, f"head{layer}").flatten(), head)
    # LPIPS v0.1's VGG heads (lpips 0.1.4): their sums are what makes LPIPS about a tenth of the equal-weight distance
    assert [round(float(head.sum()), 2) for head in shipped] == [6.93, 8.86, 17.52, 51.52, 47.03]


def test_lpips_equals_reference_equations(random_vgg16_file):
    path, features = random_vgg16_file
    loss = PerceptualLoss(path)
    # the shipped heads, read with safetensors' own loader rather than flexar's
    heads = [load_file(str(LPIPS_HEADS_FILE))[f"head{layer}"] for layer in range(5)]
    torch.manual_seed(1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    x0 = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        ours, expected = loss(x, x0), lpips_reference(features, heads, x, x0)
        ours_grey, expected_grey = loss(grey, grey.flip(-1)), lpips_reference(features, heads, grey, grey.flip(-1))
    assert torch.all(expected > 0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grey, expected_grey, rtol=1e-5, atol=1e-6)
    # the uncalibrated baseline (every channel weight 1) is the plain sum over channels, several times larger
    baseline = PerceptualLoss(path, heads="baseline")
    with torch.no_grad():
        assert torch.all(baseline(x, x0) > 3 * ours)


def test_lpips_equals_the_lpips_package(random_vgg16_file):
    lpips = pytest.importorskip("lpips")
    path, features = random_vgg16_file
    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {}
    for key, value in features.state_dict().items():
        index = int(key.split(".")[0])
        part = 1 + sum(index >= start for start in (4, 9, 16, 23))
        trunk[f"net.slice{part}.{key}"] = value
    missing, unexpected = reference.load_state_dict(trunk, strict=False)
    assert not unexpected and all(key.startswith(("lin", "scaling_layer")) for key in missing)
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(PerceptualLoss(path)(x, x0), reference(x, x0).view(-1), rtol=1e-5, atol=1e-6)


def test_narrow_trunk_has_no_calibrated_heads(tmp_path):
    path = narrow_vgg_file(tmp_path / "vgg.safetensors")
    with pytest.raises(ValueError, match="vgg16 trunk only.*heads='baseline'"):
        PerceptualLoss(path, "vgg16-narrow")
    with pytest.raises(ValueError, match="perceptual_heads must be one of"):
        ReconstructionLoss(channels=1, perceptual_weight=0.0, perceptual_heads="calibrated")
    loss = ReconstructionLoss(channels=1, perceptual_weights=str(path), perceptual_network="vgg16-narrow",
                              perceptual_heads="baseline", adversarial_weight=0.0)
    assert torch.equal(loss.perceptual.head2, torch.ones(1, 32, 1, 1))


def test_vgg16_layout_matches_torchvision():
    from torchvision.models.vgg import cfgs, make_layers

    ours = vgg_features(VGG_LAYOUTS["vgg16"]).state_dict()
    theirs = make_layers(cfgs["D"]).state_dict()
    # torchvision's features end with a max-pool after relu5_3, which holds no weights
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_perceptual_loader_refuses_other_files(tmp_path):
    pickled = tmp_path / "vgg.pth"
    pickled.write_bytes(pickle.dumps({"0.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="not a safetensors file|not a valid safetensors"):
        VGGFeatures(pickled, "vgg16-narrow")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"0.weight": torch.zeros(3, 3, 3, 3)}, str(wrong))
    with pytest.raises(ValueError, match="does not hold vgg16-narrow features"):
        VGGFeatures(wrong, "vgg16-narrow")
    with pytest.raises(ValueError, match="needs perceptual_weights"):
        ReconstructionLoss(channels=1, perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError):
        VGGFeatures(tmp_path / "missing.safetensors")


def test_patch_discriminator_shapes():
    for norm in ("batch", "group", "none"):
        logits = PatchDiscriminator(channels=1, width=8, layers=2, norm=norm)(torch.randn(2, 1, 16, 16))
        assert logits.shape == (2, 1, 2, 2)
    assert PatchDiscriminator(channels=3, width=8, layers=3)(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_discriminator_start_step_is_respected(tmp_path):
    torch.manual_seed(0)
    criterion = ReconstructionLoss(channels=1, perceptual_weight=0.0, adversarial_weight=0.5, discriminator_start=10,
                                   discriminator_width=8, discriminator_layers=2)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    recon = (images + 0.3 * torch.randn_like(images)).requires_grad_()
    before, logs = criterion(images, recon, step=9)
    assert set(logs) == {"reconstruction"}
    torch.testing.assert_close(before, torch.mean((recon - images) ** 2))
    d_loss, _ = criterion.discriminator_loss(images, recon, step=9)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad
    after, logs = criterion(images, recon, step=10)
    assert {"generator", "adaptive_weight"} <= set(logs)
    # without a last layer the adversarial weight is the plain one
    assert after.item() == pytest.approx(before.item() + 0.5 * logs["generator"].item(), rel=1e-5)
    d_loss, d_logs = criterion.discriminator_loss(images, recon, step=10)
    assert d_loss.requires_grad and d_logs["discriminator"] > 0


def test_criterion_plugs_into_titok():
    torch.manual_seed(0)
    tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=4, width=32, depth=1, num_heads=2,
                      codebook_size=32, code_dim=4)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    plain, _ = tokenizer.eval().training_loss(images)
    criterion = ReconstructionLoss(channels=1, perceptual_weight=0.0, adversarial_weight=0.0)
    same, _ = tokenizer.training_loss(images, criterion=criterion)
    torch.testing.assert_close(plain, same)
    criterion = ReconstructionLoss(channels=1, perceptual_weight=0.0, adversarial_weight=1.0, discriminator_start=0,
                                   discriminator_width=8, discriminator_layers=2)
    loss, logs = tokenizer.training_loss(images, criterion=criterion)
    assert 0 < logs["adaptive_weight"] < 1e4
    assert torch.equal(criterion.last_reconstruction, tokenizer.decode_codes(tokenizer.quantizer(tokenizer.encode_latents(images)).codes))


def test_module_refuses_mismatched_loss():
    tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=4, width=32, depth=1, num_heads=2,
                      codebook_size=32, code_dim=4)
    with pytest.raises(ValueError, match="channels"):
        TokenizerModule(tokenizer, loss=ReconstructionLoss(channels=3, perceptual_weight=0.0))
    module = TokenizerModule(tokenizer, loss=ReconstructionLoss(channels=1, perceptual_weight=0.0, adversarial_weight=0.0))
    assert module.automatic_optimization and not module.adversarial
    module = TokenizerModule(tokenizer, loss=ReconstructionLoss(channels=1, perceptual_weight=0.0, discriminator_layers=2))
    assert module.adversarial and not module.automatic_optimization


def gan_config(tmp_path, perceptual_file):
    tokenizer = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=32, depth=1, num_heads=2,
                     codebook_size=64, code_dim=8)
    loss = dict(channels=1, perceptual_weight=0.5, perceptual_weights=str(perceptual_file),
                perceptual_network="vgg16-narrow", perceptual_heads="baseline", adversarial_weight=0.5, discriminator_start=2,
                discriminator_width=8, discriminator_layers=2)
    config = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 1, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "flexar.train.TokenizerModule",
            "init_args": {
                "tokenizer": {"class_path": "flexar.tokenizers.OneDPiece", "init_args": tokenizer},
                "loss": {"class_path": "flexar.tokenizers.ReconstructionLoss", "init_args": loss},
                "warmup_steps": 1, "ema_decay": 0.9, "export_dir": str(tmp_path / "export"),
            },
        },
        "data": {"class_path": "flexar.data.ImageDataModule",
                 "init_args": {"dataset": "digits", "image_size": 16, "channels": 1, "batch_size": 8}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_gan_training_through_flexar_train_fit(tmp_path):
    perceptual = narrow_vgg_file(tmp_path / "vgg.safetensors")
    cli = run(["fit", "--config", str(gan_config(tmp_path, perceptual))])
    module = cli.model
    assert module.adversarial and not module.automatic_optimization
    assert int(module.tokenizer_steps) == 4
    discriminator = module.loss.discriminator
    assert all(p.requires_grad for p in discriminator.parameters()), "untoggled after training"
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    header = metrics.splitlines()[0]
    for key in ("train/perceptual", "train/generator", "train/adaptive_weight", "train/discriminator", "val/psnr"):
        assert key in header, key
    rows = [dict(zip(header.split(","), line.split(","))) for line in metrics.splitlines()[1:]]
    generator_steps = [r for r in rows if r.get("train/reconstruction")]
    # discriminator_start = 2: the first two tokenizer steps have no adversarial term
    assert [bool(r["train/generator"]) for r in generator_steps] == [False, False, True, True]
    loaded = OneDPiece.from_pretrained(tmp_path / "export")
    assert loaded.max_tokens == 8
