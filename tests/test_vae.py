from pathlib import Path

import pytest
import torch
import yaml

from flexar.tokenizers import VAE, FlexTok, TiTok
from flexar.train.cli import run

from common import digits_batch

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(image_size=16, channels=1, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
                norm_num_groups=4, mid_block_attention=False)


def tiny_vae(**overrides):
    return VAE(**{**TINY_VAE, **overrides})


@pytest.fixture(scope="module")
def images():
    return digits_batch(8, 16, 1)[0]


@pytest.fixture(scope="module")
def trained_vae_folder(tmp_path_factory):
    """A tiny VAE trained by ``flexar-train fit`` through TokenizerModule, exported to a folder."""
    root = tmp_path_factory.mktemp("vae_run")
    config = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 1, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
            "callbacks": [{"class_path": "flexar.train.ReconstructionGrid", "init_args": {"num_images": 4}}],
        },
        "model": {
            "class_path": "flexar.train.TokenizerModule",
            "init_args": {"tokenizer": {"class_path": "flexar.tokenizers.VAE", "init_args": TINY_VAE},
                          "warmup_steps": 1, "export_dir": str(root / "export")},
        },
        "data": {"class_path": "flexar.data.ImageDataModule",
                 "init_args": {"dataset": "digits", "image_size": 16, "channels": 1, "batch_size": 8}},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(root / "config.yaml")])
    return root


def test_shapes(images):
    vae = tiny_vae().eval()
    assert vae.downsample == 2 and vae.latent_size == 8
    with torch.no_grad():
        latents = vae.encode_latents(images)
        assert latents.shape == (8, 4, 8, 8)
        assert vae.decode_latents(latents).shape == images.shape
        assert vae.reconstruct(images, num_tokens=3).shape == images.shape
    with pytest.raises(ValueError, match="VAE expects images"):
        vae.encode_latents(images.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="divisible by the downsampling"):
        tiny_vae(image_size=15)
    with pytest.raises(ValueError, match="norm_num_groups"):
        tiny_vae(norm_num_groups=3)


def test_training_lowers_the_loss(images):
    torch.manual_seed(0)
    vae = tiny_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, logs = vae.training_loss(images)
        assert set(logs) >= {"loss", "reconstruction", "kl", "psnr", "latent_std"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses
    assert vae.stats_updates.item() == 30


def test_latent_statistics_normalise_the_latents(images):
    torch.manual_seed(0)
    vae = tiny_vae().train()
    with torch.no_grad():
        vae.training_loss(images)  # the first update takes the batch statistics as they are
        latents = vae.eval().encode_latents(images)
        raw = vae.posterior(images).mean
    assert abs(latents.mean().item()) < 1e-4 and abs(latents.std().item() - 1) < 1e-4
    torch.testing.assert_close(vae.model.decode(raw).sample, vae.decode_latents(latents), atol=1e-4, rtol=1e-4)
    # later updates are running averages: the same batch again leaves them where they are
    scale = vae.latent_scale.clone()
    with torch.no_grad():
        vae.train().training_loss(images)
    torch.testing.assert_close(vae.latent_scale, scale)
    assert vae.stats_updates.item() == 2


def test_save_load_round_trip(images, tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae()
    vae.training_loss(images)  # moves the latent statistics off their defaults
    vae.eval().save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VAE.from_pretrained(tmp_path / "vae").eval()
    assert loaded.latent_scale.item() == vae.latent_scale.item() != 1.0
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_latents(images), vae.encode_latents(images))
        torch.testing.assert_close(loaded.reconstruct(images), vae.reconstruct(images))


def test_flexar_train_fit_exports_a_vae(trained_vae_folder):
    vae = VAE.from_pretrained(trained_vae_folder / "export")
    assert vae.config == {**vae.config, **TINY_VAE}
    assert vae.stats_updates.item() > 0
    assert list(trained_vae_folder.rglob("reconstructions_epoch000.png"))
    metrics = next(trained_vae_folder.rglob("metrics.csv")).read_text()
    assert "train/kl" in metrics and "val/psnr" in metrics


def test_flextok_on_frozen_vae_latents(trained_vae_folder, images, tmp_path):
    folder = str(trained_vae_folder / "export")
    torch.manual_seed(0)
    tokenizer = FlexTok(image_size=16, channels=1, patch_size=2, num_registers=4, width=32, depth=1, num_heads=2,
                        fsq_levels=[5, 4, 4], target="vae", vae_path=folder, num_steps=3)
    assert tokenizer.num_patches == 16 and tokenizer.target_channels == 4
    assert not any(p.requires_grad for p in tokenizer.vae.parameters())
    vae_before = {k: v.clone() for k, v in tokenizer.vae.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in tokenizer.parameters() if p.requires_grad], lr=1e-3)
    tokenizer.train()
    assert not tokenizer.vae.training
    for _ in range(2):
        loss, logs = tokenizer.training_loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, tokenizer.vae.state_dict()[k]) for k, v in vae_before.items()), "the VAE is frozen"
    tokenizer.eval()
    encoded = tokenizer.encode(images, num_tokens=2)
    assert encoded.ids.shape == (8, 2)
    decoded = tokenizer.decode(encoded.ids, generator=torch.Generator().manual_seed(0))
    assert decoded.shape == images.shape
    tokenizer.save_pretrained(tmp_path / "flextok")
    loaded = FlexTok.from_pretrained(tmp_path / "flextok").eval()
    torch.testing.assert_close(loaded.decode(encoded.ids, generator=torch.Generator().manual_seed(0)), decoded)


def test_flextok_refuses_a_folder_that_is_not_a_vae(tmp_path):
    TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=4, width=16, depth=1, num_heads=2,
          codebook_size=16, code_dim=4).save_pretrained(tmp_path / "titok")
    arguments = dict(image_size=16, channels=1, patch_size=2, num_registers=4, width=16, depth=1, num_heads=2,
                     target="vae")
    with pytest.raises(ValueError, match="not a registered flexar VAE"):
        FlexTok(**arguments, vae_path=str(tmp_path / "titok"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        FlexTok(**arguments, vae_path=str(tmp_path / "missing"))
    tiny_vae(channels=3).save_pretrained(tmp_path / "rgb")
    with pytest.raises(ValueError, match="3-channel images"):
        FlexTok(**arguments, vae_path=str(tmp_path / "rgb"))


def test_digits_configs_build(tmp_path):
    """vae.yaml and flextok_vae.yaml map onto the constructors (the VAE untrained here)."""
    vae_config = yaml.safe_load((ROOT / "configs" / "tokenizers" / "vae.yaml").read_text())
    vae = VAE(**vae_config["model"]["init_args"]["tokenizer"]["init_args"])
    vae.save_pretrained(tmp_path / "vae")
    flextok_config = yaml.safe_load((ROOT / "configs" / "tokenizers" / "flextok_vae.yaml").read_text())
    arguments = flextok_config["model"]["init_args"]["tokenizer"]["init_args"]
    assert arguments["vae_path"] == vae_config["model"]["init_args"]["export_dir"]
    tokenizer = FlexTok(**{**arguments, "vae_path": str(tmp_path / "vae")})
    assert tokenizer.target_size == 8 and tokenizer.num_patches == 16
