"""Behaviour of the quantizers: FSQ grid arithmetic and VQ lookup, loss, gradients and dead-code restarts."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexar.quantizers import FSQ, VQ, QuantizerOutput


# ---------------------------------------------------------------- FSQ


@pytest.mark.parametrize("levels", [[8, 8, 8, 5, 5, 5], [2, 3], [4, 2, 7]])
def test_fsq_codebook_size_and_round_trip(levels):
    fsq = FSQ(levels=levels)
    assert fsq.dim == len(levels)
    assert fsq.codebook_size == math.prod(levels)
    ids = torch.arange(fsq.codebook_size)
    codes = fsq.ids_to_codes(ids)
    assert codes.shape == (fsq.codebook_size, len(levels))
    assert torch.equal(fsq.codes_to_ids(codes), ids)
    assert torch.equal(fsq.code_vectors(), codes)
    # Distinct ids must be distinct grid points.
    assert codes.unique(dim=0).shape[0] == fsq.codebook_size


def test_fsq_codes_in_range_and_every_level_reached():
    levels = [8, 5, 2, 3]
    fsq = FSQ(levels=levels)
    z = torch.linspace(-6, 6, 2001).unsqueeze(-1).expand(-1, len(levels))
    out = fsq(z)
    assert isinstance(out, QuantizerOutput)
    assert out.codes.shape == z.shape and out.ids.shape == z.shape[:-1] and out.ids.dtype == torch.long
    assert out.codes.min() >= -1 and out.codes.max() <= 1
    for channel, level in enumerate(levels):
        assert out.codes[:, channel].unique().numel() == level, f"channel with {level} levels"
    assert float(out.loss) == 0.0
    # ids agree with the codes and with the grid.
    assert torch.equal(out.ids, fsq.codes_to_ids(out.codes))
    assert torch.equal(fsq.ids_to_codes(out.ids), out.codes)


def test_fsq_zero_maps_to_zero_code_and_logs():
    fsq = FSQ(levels=[8, 5])
    out = fsq(torch.zeros(3, 2))
    assert torch.equal(out.codes, torch.zeros(3, 2))
    assert float(out.logs["usage"]) == pytest.approx(1 / 40)
    assert float(out.logs["perplexity"]) == pytest.approx(1.0)
    spread = fsq(torch.randn(256, 2, requires_grad=True))
    assert 1.0 < float(spread.logs["perplexity"]) <= 40.0
    assert 0.0 < float(spread.logs["usage"]) <= 1.0
    assert all(not value.requires_grad and value.dim() == 0 for value in spread.logs.values())


def test_fsq_straight_through_gradient():
    torch.manual_seed(0)
    fsq = FSQ(levels=[8, 5, 5])
    z = torch.randn(16, 3, requires_grad=True)
    upstream = torch.randn(16, 3)
    (fsq(z).codes * upstream).sum().backward()
    # Rounding passes the gradient unchanged: it must equal the gradient of the unrounded path.
    reference_z = z.detach().clone().requires_grad_(True)
    half_width = torch.tensor([4.0, 2.0, 2.0])  # levels // 2: the divisor that maps the grid into [-1, 1]
    (fsq.bound(reference_z) / half_width * upstream).sum().backward()
    assert z.grad.abs().min() > 0
    torch.testing.assert_close(z.grad, reference_z.grad)


def test_fsq_bad_levels_and_shapes_raise():
    with pytest.raises(ValueError, match=">= 2"):
        FSQ(levels=[8, 1, 5])
    with pytest.raises(ValueError, match="non-empty"):
        FSQ(levels=[])
    with pytest.raises(ValueError, match="ints"):
        FSQ(levels=[8, 4.5])
    assert FSQ(levels=list(np.array([8, 5]))).levels == [8, 5]  # numpy ints, e.g. from a saved config
    fsq = FSQ(levels=[8, 5, 5])
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        fsq(torch.randn(2, 4))


def test_fsq_under_autocast():
    fsq = FSQ(levels=[8, 5])
    z = torch.randn(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsq(z.bfloat16())
    assert out.codes.dtype == torch.bfloat16
    assert torch.equal(out.ids, fsq(z.bfloat16().float()).ids)


# ---------------------------------------------------------------- VQ


def test_vq_codes_unit_norm_and_nearest_matches_brute_force():
    torch.manual_seed(0)
    vq = VQ(codebook_size=32, dim=8, l2_norm=True)
    z = torch.randn(5, 7, 8) * 3
    out = vq(z)
    assert out.codes.shape == z.shape and out.ids.shape == (5, 7)
    torch.testing.assert_close(out.codes.norm(dim=-1), torch.ones(5, 7))
    assert torch.allclose(vq.code_vectors().norm(dim=-1), torch.ones(32))
    cosine = F.normalize(z, dim=-1) @ F.normalize(vq.embedding.weight, dim=-1).t()
    assert torch.equal(out.ids, cosine.argmax(dim=-1))
    torch.testing.assert_close(out.codes, vq.ids_to_codes(out.ids))
    assert torch.equal(vq.codes_to_ids(z), out.ids)


def test_vq_nearest_without_l2_norm():
    torch.manual_seed(1)
    vq = VQ(codebook_size=20, dim=4, l2_norm=False)
    vq.embedding.weight.data.normal_()
    z = torch.randn(50, 4)
    brute = torch.stack([((vq.embedding.weight - row) ** 2).sum(-1).argmin() for row in z])
    out = vq(z)
    assert torch.equal(out.ids, brute)
    torch.testing.assert_close(out.codes, vq.embedding.weight[brute])


def test_vq_commitment_scales_with_beta():
    torch.manual_seed(0)
    vq_quarter = VQ(codebook_size=16, dim=4, beta=0.25, l2_norm=False)
    vq_half = VQ(codebook_size=16, dim=4, beta=0.5, l2_norm=False)
    vq_half.load_state_dict(vq_quarter.state_dict())
    z = torch.randn(10, 4)
    out_quarter, out_half = vq_quarter(z), vq_half(z)
    commitment = out_quarter.logs["commitment_loss"]
    torch.testing.assert_close(commitment, out_half.logs["commitment_loss"])
    torch.testing.assert_close(out_half.loss - out_quarter.loss, 0.25 * commitment)
    # The codebook term trains only the codebook, the commitment term only the encoder.
    z_quarter = z.clone().requires_grad_(True)
    vq_quarter(z_quarter).loss.backward()
    z_half = z.clone().requires_grad_(True)
    vq_half(z_half).loss.backward()
    torch.testing.assert_close(z_half.grad, 2 * z_quarter.grad)
    torch.testing.assert_close(vq_half.embedding.weight.grad, vq_quarter.embedding.weight.grad)


@pytest.mark.parametrize("l2_norm", [False, True])
def test_vq_straight_through_gradient(l2_norm):
    torch.manual_seed(0)
    vq = VQ(codebook_size=16, dim=4, l2_norm=l2_norm)
    z = torch.randn(6, 4, requires_grad=True)
    upstream = torch.randn(6, 4)
    (vq(z).codes * upstream).sum().backward()
    # Codes pass the upstream gradient to the (normalised) latent unchanged.
    reference_z = z.detach().clone().requires_grad_(True)
    latents = F.normalize(reference_z, dim=-1) if l2_norm else reference_z
    (latents * upstream).sum().backward()
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, reference_z.grad)
    if not l2_norm:
        torch.testing.assert_close(z.grad, upstream)
    assert vq.embedding.weight.grad is None  # the codes' value path does not train the codebook


def test_vq_under_autocast_matches_fp32_ids():
    torch.manual_seed(0)
    vq = VQ(codebook_size=64, dim=8)
    z = torch.randn(32, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.codes.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.ids, vq(z.float()).ids)


def test_vq_dead_code_restart_replaces_unused_codes():
    torch.manual_seed(0)
    vq = VQ(codebook_size=8, dim=3, l2_norm=False, dead_code_threshold=2)
    live = torch.eye(3)
    far = torch.full((5, 3), 100.0)
    vq.embedding.weight.data = torch.cat([live, far])
    z = live.repeat(4, 1) + 0.01 * torch.randn(12, 3)

    vq.eval()
    vq(z)
    vq(z)
    assert torch.equal(vq.embedding.weight[3:], far), "no restart outside training"

    vq.train()
    out = vq(z)
    assert torch.equal(vq.embedding.weight[3:], far), "one unused step is below the threshold"
    assert set(out.ids.unique().tolist()) == {0, 1, 2}
    vq(z)
    restarted = vq.embedding.weight[3:]
    assert not torch.isclose(restarted, far).any()
    # Every restarted code is one of this batch's latents, and live codes are untouched.
    assert all((row == z).all(dim=-1).any() for row in restarted)
    torch.testing.assert_close(vq.embedding.weight[:3], live)
    assert vq.unused_steps.tolist() == [0] * 8


def test_vq_restarts_codes_only_in_a_training_step_never_in_encode(tmp_path):
    from flexar.tokenizers import TiTok

    torch.manual_seed(0)
    TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
          codebook_size=64, code_dim=8, dead_code_threshold=1).save_pretrained(tmp_path / "tok")
    tokenizer = TiTok.from_pretrained(tmp_path / "tok")
    codebook = tokenizer.quantizer.embedding.weight.detach().clone()
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    for _ in range(4):  # the quick start: encode right after loading
        tokenizer.encode(images)
    assert torch.equal(tokenizer.quantizer.embedding.weight, codebook)
    # nor in training mode, with or without gradients recorded (tokenizing, previews): encode never restarts
    tokenizer.train()
    tokenizer.encode(images)
    with torch.no_grad():
        tokenizer.encode(images)
    with torch.inference_mode():
        tokenizer.quantizer(torch.randn(48, 8))
    assert torch.equal(tokenizer.quantizer.embedding.weight, codebook)
    assert int(tokenizer.quantizer.steps) == 0
    # a training step does restart the codes this batch leaves unused
    used = tokenizer.training_loss(images)[1]["codebook_usage"]
    assert used < 1 and int(tokenizer.quantizer.steps) == 1
    changed = (tokenizer.quantizer.embedding.weight != codebook).any(-1)
    assert 0 < int(changed.sum()) <= 64


def test_vq_dead_code_restart_ignores_global_rng():
    def run(global_seed):
        torch.manual_seed(3)
        vq = VQ(codebook_size=32, dim=4, dead_code_threshold=1)
        vq.train()
        z = torch.randn(64, 4)
        torch.manual_seed(global_seed)
        vq(z)
        return vq.embedding.weight.detach().clone(), torch.rand(())

    first, first_draw = run(123)
    second, second_draw = run(456)
    assert torch.equal(first, second)
    # The restart consumed nothing from the global generator.
    torch.manual_seed(123)
    assert torch.equal(first_draw, torch.rand(()))


def test_vq_dead_code_restart_with_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        vq = VQ(codebook_size=8, dim=3, l2_norm=False, dead_code_threshold=1).train()
        vq(torch.randn(10, 3))
        assert vq.unused_steps.tolist() == [0] * 8
    finally:
        dist.destroy_process_group()


def test_vq_wrong_dim_raises():
    vq = VQ(codebook_size=8, dim=4)
    with pytest.raises(ValueError, match=r"dim=4 expects inputs of shape \(\.\.\., 4\)"):
        vq(torch.randn(2, 3))
    with pytest.raises(ValueError, match="dead_code_threshold"):
        VQ(codebook_size=8, dim=4, dead_code_threshold=-1)
