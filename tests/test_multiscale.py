from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from flexar.hub import registered
from flexar.tokenizers import MultiScaleResidualVQ, MultiScaleVQ, Tokenizer
from flexar.tokenizers.multiscale import VAR_SCALES, scale_boundaries, scale_slices

from common import TokenizerContract, digits_batch, seeded

ROOT = Path(__file__).resolve().parents[1]


def tiny_multiscale(**overrides):
    return MultiScaleVQ.from_preset("msvq-tiny", **overrides)


class TestMultiScaleVQContract(TokenizerContract):
    def make_tokenizer(self):
        return tiny_multiscale()


class TestMultiScaleVQCosineContract(TokenizerContract):
    def make_tokenizer(self):
        return tiny_multiscale(l2_norm=True, shared_phi=0)


def test_reconstruction_is_the_sum_of_the_scales_contributions():
    torch.manual_seed(0)
    tokenizer = tiny_multiscale().eval()
    quantizer = tokenizer.quantizer
    latents = tokenizer.encode_latents(digits_batch(4)[0])
    f_hat, ids_per_scale, _, _ = quantizer(latents)
    # each contribution rebuilt by hand: codebook rows -> bicubic to the latent side (not at the last scale) -> phi
    total = torch.zeros_like(latents)
    for index, (side, ids) in enumerate(zip(tokenizer.grid, ids_per_scale)):
        codes = quantizer.embedding.weight[ids].transpose(1, 2).reshape(4, tokenizer.code_dim, side, side)
        if side != tokenizer.grid[-1]:
            codes = F.interpolate(codes, size=latents.shape[-2:], mode="bicubic")
        total = total + quantizer.phis[quantizer.phi_of_scale[index]](codes)
    torch.testing.assert_close(f_hat, total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quantizer.reconstruct(ids_per_scale), total, atol=1e-5, rtol=1e-5)
    # decode reads exactly that sum
    ids = torch.cat(ids_per_scale, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.decode(ids), tokenizer.decode_codes(total).clamp(-1, 1))


@pytest.mark.parametrize("l2_norm", [False, True])
def test_identity_phi_and_a_codebook_holding_the_residuals_reconstruct_exactly(l2_norm):
    scales, dim = [1, 2, 4], 3
    latents = torch.randn(2, dim, 4, 4, generator=seeded(0))
    # the residual of every scale, computed as VAR's algorithm does, is put into the codebook
    rest, rows = latents.clone(), []
    for side in scales:
        residual = F.interpolate(rest, size=(side, side), mode="area") if side != 4 else rest
        rows.append(residual.permute(0, 2, 3, 1).reshape(-1, dim))
        upsampled = F.interpolate(residual, size=(4, 4), mode="bicubic") if side != 4 else residual
        rest = rest - upsampled
    codebook = torch.cat(rows)
    quantizer = MultiScaleResidualVQ(codebook.shape[0], dim, scales, phi_ratio=0.0, l2_norm=l2_norm)
    assert all(isinstance(phi, torch.nn.Identity) for phi in quantizer.phis)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(codebook)
    f_hat, ids_per_scale, _, _ = quantizer(latents)
    torch.testing.assert_close(f_hat, latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(quantizer.reconstruct(ids_per_scale), latents, atol=1e-5, rtol=0)
    # each scale picked the row holding its own residual
    assert [ids.flatten().tolist() for ids in ids_per_scale] == [[0, 1], list(range(2, 10)), list(range(10, 42))]
    # a codebook without the residuals does not reconstruct exactly (the check above is not vacuous)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randn(codebook.shape, generator=seeded(1)))
    assert (quantizer(latents)[0] - latents).abs().max() > 0.1


def test_ids_per_scale_shapes_and_slices():
    torch.manual_seed(0)
    tokenizer = tiny_multiscale().eval()
    images = digits_batch(3)[0]
    ids = tokenizer.encode(images).ids
    assert tokenizer.grid == [1, 2, 3, 4] and tokenizer.max_tokens == 30 and ids.shape == (3, 30)
    assert scale_slices(tokenizer.grid) == [slice(0, 1), slice(1, 5), slice(5, 14), slice(14, 30)]
    assert tokenizer.scale_slices() == scale_slices(tokenizer.grid) and scale_boundaries([1, 2, 3, 4]) == [1, 5, 14, 30]
    maps = tokenizer.split_scales(ids)
    assert [tuple(m.shape) for m in maps] == [(3, 1, 1), (3, 2, 2), (3, 3, 3), (3, 4, 4)]
    per_scale = tokenizer.quantizer.encode(tokenizer.encode_latents(images))
    for piece, scale_map, scale_ids in zip(tokenizer.scale_slices(), maps, per_scale):
        assert torch.equal(ids[:, piece], scale_ids) and torch.equal(scale_map.flatten(1), scale_ids)
    # scale s's map is the nearest code of the area-downsampled residual, in raster order
    latents = tokenizer.encode_latents(images)
    coarse = F.interpolate(latents, size=(2, 2), mode="area") - F.interpolate(
        tokenizer.quantizer.contribution(0, per_scale[0]), size=(2, 2), mode="area")
    expected = tokenizer.quantizer.lookup(coarse.permute(0, 2, 3, 1).reshape(-1, tokenizer.code_dim)).view(3, 4)
    assert torch.equal(maps[1].flatten(1), expected)


def test_a_prefix_of_whole_scales_is_a_coarser_image():
    torch.manual_seed(0)
    tokenizer = tiny_multiscale().eval()
    images = digits_batch(3)[0]
    ids = tokenizer.encode(images).ids
    prefix = tokenizer.encode(images, num_tokens=14)
    assert torch.equal(prefix.ids, ids[:, :14]) and prefix.lengths.tolist() == [14, 14, 14]
    with torch.no_grad():
        coarse = tokenizer.decode_codes(tokenizer.quantizer.reconstruct(tokenizer.quantizer.encode(
            tokenizer.encode_latents(images))[:3])).clamp(-1, 1)
        torch.testing.assert_close(tokenizer.decode(prefix.ids), coarse)
        # per-row lengths: each row decodes the scales inside its length
        mixed = tokenizer.decode(ids, torch.tensor([30, 14, 30]))
        torch.testing.assert_close(mixed[1], coarse[1])
        torch.testing.assert_close(mixed[0], tokenizer.decode(ids)[0])
    with pytest.raises(ValueError, match=r"num_tokens must be None or one of \[1, 5, 14, 30\]"):
        tokenizer.encode(images, num_tokens=7)
    with pytest.raises(ValueError, match=r"decodes whole scales.*got \[7\]"):
        tokenizer.decode(ids[:, :7])
    with pytest.raises(ValueError, match=r"decodes whole scales.*got \[20\]"):
        tokenizer.decode(ids, torch.tensor([30, 20, 30]))


def test_codebook_usage_is_logged_per_scale():
    torch.manual_seed(0)
    tokenizer = tiny_multiscale()
    images = digits_batch(8)[0]
    _, logs = tokenizer.training_loss(images)
    with torch.no_grad():
        ids = tokenizer.encode(images).ids
    usage = tokenizer.codebook_usage(ids)
    assert len(usage) == 4
    for index, piece in enumerate(tokenizer.scale_slices()):
        assert float(logs[f"codebook_usage_scale{index}"]) == pytest.approx(usage[index])
        assert float(logs[f"codebook_usage_scale{index}"]) == pytest.approx(ids[:, piece].unique().numel() / 32)
        assert 1.0 <= float(logs[f"codebook_perplexity_scale{index}"]) <= 32
    assert float(logs["codebook_usage"]) == pytest.approx(ids.unique().numel() / 32)


def test_quantizer_loss_and_straight_through_gradient():
    torch.manual_seed(0)
    quantizer = MultiScaleResidualVQ(16, 4, [1, 2, 4], beta=0.25)
    latents = torch.randn(2, 4, 4, 4, requires_grad=True)
    f_hat, ids_per_scale, loss, logs = quantizer(latents)
    # VAR's loss: sum over the running reconstructions of beta * mse(sg f_hat_s, f) + mse(f_hat_s, sg f), over S
    running, expected = torch.zeros_like(latents), 0.0
    for z in quantizer.contributions(ids_per_scale):
        running = running + z
        expected = expected + 0.25 * F.mse_loss(running.detach(), latents) + F.mse_loss(running, latents.detach())
    torch.testing.assert_close(loss, expected / 3)
    (f_hat * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
    # straight through: d f_hat / d f is the identity
    torch.testing.assert_close(latents.grad, torch.arange(4.0).view(1, 4, 1, 1).expand_as(latents))


def test_phi_sharing_follows_vars_ticks():
    assert MultiScaleResidualVQ(8, 4, VAR_SCALES, shared_phi=1).phi_of_scale == [0] * 10
    assert MultiScaleResidualVQ(8, 4, VAR_SCALES, shared_phi=0).phi_of_scale == list(range(10))
    shared = MultiScaleResidualVQ(8, 4, VAR_SCALES, shared_phi=4)
    assert len(shared.phis) == 4 and shared.phi_of_scale[0] == 0 and shared.phi_of_scale[-1] == 3
    assert shared.phi_of_scale == sorted(shared.phi_of_scale) and set(shared.phi_of_scale) == {0, 1, 2, 3}
    phi = shared.phis[0]
    z = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(phi(z), 0.5 * z + 0.5 * phi.conv(z))
    assert not list(MultiScaleResidualVQ(8, 4, [1, 2], phi_ratio=0.0).phis.parameters())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="last scale must be the latent side 4"):
        MultiScaleVQ(image_size=16, downsample=4, scales=[1, 2, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiScaleVQ(image_size=16, downsample=4, scales=[1, 3, 2, 4])
    with pytest.raises(ValueError, match="no default scale schedule"):
        MultiScaleVQ(image_size=24, downsample=4)
    with pytest.raises(ValueError, match="shared_phi must be an int >= 0"):
        MultiScaleResidualVQ(8, 4, [1, 2], shared_phi=-1)
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, 2, 2\)"):
        MultiScaleResidualVQ(8, 4, [1, 2])(torch.zeros(1, 4, 3, 3))


def test_presets_registry_and_config():
    assert {"msvq-f16", "msvq-tiny", "msvq-digits"} <= set(MultiScaleVQ.presets)
    assert registered(Tokenizer)["MultiScaleVQ"] is MultiScaleVQ
    assert MultiScaleVQ.presets["msvq-f16"]["scales"] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    var_layout = MultiScaleVQ.from_preset("msvq-f16", width=4)  # VAR's layout, narrow enough to build here
    assert var_layout.grid == VAR_SCALES and var_layout.max_tokens == 680 and var_layout.codebook_size == 4096
    digits = MultiScaleVQ.from_preset("msvq-digits")
    assert digits.grid == [1, 2, 3, 4, 6, 8] and digits.max_tokens == 130
    tokenizer = tiny_multiscale()
    assert MultiScaleVQ(**tokenizer.config).config == tokenizer.config
    with pytest.raises(ValueError, match="unknown MultiScaleVQ preset"):
        MultiScaleVQ.from_preset("msvq-huge")


def test_adversarial_criterion_from_the_shared_losses():
    from flexar.tokenizers.losses import ReconstructionLoss

    torch.manual_seed(0)
    tokenizer = tiny_multiscale()
    criterion = ReconstructionLoss(channels=1, perceptual_weight=0.0, discriminator_start=0, discriminator_width=8,
                                   discriminator_layers=1)
    loss, logs = tokenizer.training_loss(digits_batch(4)[0], criterion=criterion, step=0)
    assert torch.isfinite(loss) and {"generator", "adaptive_weight", "quantizer", "codebook_usage_scale0"} <= set(logs)
    loss.backward()
    assert tokenizer.decoder.head.weight.grad is not None and tokenizer.quantizer.embedding.weight.grad is not None


def test_training_through_the_cli(tmp_path):
    from flexar.train.cli import run

    config = yaml.safe_load((ROOT / "configs" / "tokenizers" / "multiscale.yaml").read_text())
    assert config["model"]["init_args"]["tokenizer"]["class_path"] == "flexar.tokenizers.MultiScaleVQ"
    config["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                             log_every_n_steps=1, logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                          "init_args": {"save_dir": str(tmp_path / "logs")}})
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_epochs=1, num_tokens=[1, 14, 30])
    config["model"]["init_args"]["tokenizer"]["init_args"].update(image_size=16, width=8, scales=[1, 2, 3, 4])
    config["model"]["init_args"]["export_dir"] = str(tmp_path / "tokenizer")
    config["data"]["init_args"].update(image_size=16, batch_size=16)
    (tmp_path / "multiscale.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "multiscale.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    tokenizer = MultiScaleVQ.from_pretrained(tmp_path / "tokenizer")
    assert tokenizer.grid == [1, 2, 3, 4]
    assert list(tmp_path.rglob("reconstructions_epoch000.png"))
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert all(f"train/codebook_usage_scale{index}" in metrics for index in range(4))
    from test_configs import composed

    mnist = composed("tokenizers/multiscale.yaml", "data/mnist.yaml", "tokenizers/mnist/multiscale.yaml")
    config = composed("tokenizers/multiscale.yaml")
    assert mnist["data"]["init_args"]["dataset"] == "mnist"
    assert mnist["model"]["init_args"]["tokenizer"] == config["model"]["init_args"]["tokenizer"]
