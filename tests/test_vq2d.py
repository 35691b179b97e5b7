from pathlib import Path

import pytest
import torch
import yaml

from flexar.hub import registered
from flexar.tokenizers import VQGAN2D, Tokenizer

from common import TokenizerContract, digits_batch

ROOT = Path(__file__).resolve().parents[1]


def tiny_vq2d(**overrides):
    return VQGAN2D.from_preset("vq2d-tiny", image_size=16, channels=1, **overrides)


class TestVQGAN2DContract(TokenizerContract):
    def make_tokenizer(self):
        return tiny_vq2d()


@pytest.mark.parametrize("downsample, multipliers", [(4, [1, 2, 2]), (8, [1, 1, 2, 2])])
def test_grid_and_raster_order_of_ids(downsample, multipliers):
    torch.manual_seed(0)
    tokenizer = VQGAN2D(image_size=32, channels=1, downsample=downsample, width=8, channel_multipliers=multipliers,
                        codebook_size=16).eval()
    side = 32 // downsample
    assert tokenizer.grid == (side, side) and tokenizer.max_tokens == side * side
    images = digits_batch(2, image_size=32)[0]
    latents = tokenizer.encoder(images)
    assert latents.shape == (2, 8, side, side)
    ids = tokenizer.encode(images).ids
    # id k is the code of latent cell (k // w, k % w)
    expected = tokenizer.quantizer.codes_to_ids(latents.permute(0, 2, 3, 1)).flatten(1)
    assert torch.equal(ids, expected)


def test_partial_grids_are_refused():
    tokenizer = tiny_vq2d().eval()
    images = digits_batch(2)[0]
    with pytest.raises(ValueError, match="encodes the whole 4x4 grid"):
        tokenizer.encode(images, num_tokens=8)
    assert tokenizer.encode(images, num_tokens=16).ids.shape == (2, 16)
    with pytest.raises(ValueError, match="decodes whole 4x4 grids"):
        tokenizer.decode(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="downsample must be a power of two"):
        VQGAN2D(downsample=6)
    with pytest.raises(ValueError, match="needs 3 channel_multipliers"):
        VQGAN2D(downsample=4, channel_multipliers=[1, 2])


def test_adversarial_criterion_from_the_shared_losses():
    from flexar.tokenizers.losses import ReconstructionLoss

    torch.manual_seed(0)
    tokenizer = tiny_vq2d()
    criterion = ReconstructionLoss(channels=1, perceptual_weight=0.0, discriminator_start=0, discriminator_width=8,
                                   discriminator_layers=1)
    images = digits_batch(4)[0]
    loss, logs = tokenizer.training_loss(images, criterion=criterion, step=0)
    assert torch.isfinite(loss) and {"generator", "adaptive_weight", "reconstruction", "quantizer"} <= set(logs)
    loss.backward()
    assert tokenizer.decoder.head.weight.grad is not None
    plain, plain_logs = tokenizer.training_loss(images)
    assert "generator" not in plain_logs


def test_presets_registry_and_config():
    assert {"vq2d-f8", "vq2d-f16", "vq2d-tiny", "vq2d-digits"} <= set(VQGAN2D.presets)
    assert VQGAN2D.presets["vq2d-f16"]["channel_multipliers"] == [1, 1, 2, 2, 4]
    assert registered(Tokenizer)["VQGAN2D"] is VQGAN2D
    tokenizer = tiny_vq2d()
    assert VQGAN2D(**tokenizer.config).config == tokenizer.config
    with pytest.raises(ValueError, match="unknown VQGAN2D preset"):
        VQGAN2D.from_preset("vq2d-huge")


def test_training_through_the_cli(tmp_path):
    from flexar.train.cli import run

    config = yaml.safe_load((ROOT / "configs" / "tokenizers" / "vq2d.yaml").read_text())
    assert config["model"]["init_args"]["tokenizer"]["class_path"] == "flexar.tokenizers.VQGAN2D"
    config["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                             log_every_n_steps=1)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_epochs=1)
    config["model"]["init_args"]["tokenizer"]["init_args"].update(image_size=16, width=8)
    config["model"]["init_args"]["export_dir"] = str(tmp_path / "tokenizer")
    config["data"]["init_args"].update(image_size=16, batch_size=16)
    (tmp_path / "vq2d.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "vq2d.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    tokenizer = VQGAN2D.from_pretrained(tmp_path / "tokenizer")
    assert tokenizer.grid == (4, 4)
    assert list((tmp_path / "run").rglob("reconstructions_epoch000.png"))
    from test_configs import composed

    mnist = composed("tokenizers/vq2d.yaml", "data/mnist.yaml", "tokenizers/mnist/vq2d.yaml")
    assert mnist["data"]["init_args"]["dataset"] == "mnist"
