import pickle

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from flexar.tokenizers import OneDPiece, ReconstructionLoss, TiTok
from flexar.tokenizers.losses import (
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
    loss = PerceptualLoss(path, "vgg16-narrow")
    other = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.all(loss(images, images) < 1e-6) and torch.all(loss(other, images) > 0)


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
                perceptual_network="vgg16-narrow", adversarial_weight=0.5, discriminator_start=2,
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
