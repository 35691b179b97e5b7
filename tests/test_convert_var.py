"""flexar-convert's ``var`` format: VAR's VQVAE and VAR / MVAR transformers against the official equations.

The official checkpoints are state dicts with the key names and shapes of FoundationVision/VAR (models/vqvae.py,
basic_vae.py, quant.py, var.py, basic_var.py) and CVL-UESTC/MVAR (models/mvar.py, basic_mvar.py); the tests build
small ones with those names, and the reference forwards below compute the official equations from the state dicts
with plain torch operations.
"""
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from flexar import Pipeline
from flexar.cli.convert import main as convert_main
from flexar.convert import Weights, convert
from flexar.convert import var as var_format
from flexar.hub import load_model, save_model
from flexar.sampling import Sampler
from flexar.tokenizers.multiscale import VAR_SCALES

# a small VQVAE of the official class (VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4)): its
# ddconfig is fixed, ch_mult (1, 1, 2, 2, 4) and 2 residual blocks, so 64 px images make 4 x 4 latents)
SCALES = (1, 2, 3, 4)
VQVAE_CONFIG = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z=8, V=64, patch_nums=SCALES, share=4)
TINY_VQVAE = dict(image_size=64, width=32, codebook_size=64, code_dim=8, scales=list(SCALES))
# a small VAR (depth 2, width 128, 2 heads of 64, 10 classes) on that VQVAE, and an MVAR with 3 x 3 neighbourhoods on
# the scales of index >= 2 (the 3 x 3 and 4 x 4 maps)
VAR_CONFIG = dict(depth=2, C=128, heads=2, V=64, Cvae=8, num_classes=10, patch_nums=SCALES)
TINY_VAR = dict(depth=2, dim=128, num_heads=2, num_classes=10, vocab_size=64, code_dim=8, scales=list(SCALES))
TINY_MVAR = dict(TINY_VAR, kernel_size=3, refine_step=2)


# ----------------------------------------------------------------------------------------------------------------------
# official layouts


def resnet_shapes(prefix, cin, cout):
    shapes = {f"{prefix}norm1.weight": (cin,), f"{prefix}norm1.bias": (cin,),
              f"{prefix}conv1.weight": (cout, cin, 3, 3), f"{prefix}conv1.bias": (cout,),
              f"{prefix}norm2.weight": (cout,), f"{prefix}norm2.bias": (cout,),
              f"{prefix}conv2.weight": (cout, cout, 3, 3), f"{prefix}conv2.bias": (cout,)}
    if cin != cout:
        shapes.update({f"{prefix}nin_shortcut.weight": (cout, cin, 1, 1), f"{prefix}nin_shortcut.bias": (cout,)})
    return shapes


def attention_shapes(prefix, c):
    return {f"{prefix}norm.weight": (c,), f"{prefix}norm.bias": (c,), f"{prefix}qkv.weight": (3 * c, c, 1, 1),
            f"{prefix}qkv.bias": (3 * c,), f"{prefix}proj_out.weight": (c, c, 1, 1), f"{prefix}proj_out.bias": (c,)}


def conv_shapes(prefix, cout, cin, kernel):
    return {f"{prefix}weight": (cout, cin, kernel, kernel), f"{prefix}bias": (cout,)}


def middle_shapes(prefix, c):
    return {**resnet_shapes(f"{prefix}block_1.", c, c), **attention_shapes(f"{prefix}attn_1.", c),
            **resnet_shapes(f"{prefix}block_2.", c, c)}


def official_vqvae_shapes(ch, ch_mult, num_res_blocks, z, V, patch_nums, share):
    """{key: shape} of VAR's VQVAE state dict (parameters and the ``ema_vocab_hit_SV`` buffer)."""
    shapes = conv_shapes("encoder.conv_in.", ch, 3, 3)
    widths, last = [ch * m for m in ch_mult], len(ch_mult) - 1
    current = ch
    for i, width in enumerate(widths):
        for j in range(num_res_blocks):
            shapes.update(resnet_shapes(f"encoder.down.{i}.block.{j}.", current, width))
            current = width
            if i == last:
                shapes.update(attention_shapes(f"encoder.down.{i}.attn.{j}.", current))
        if i != last:
            shapes.update(conv_shapes(f"encoder.down.{i}.downsample.conv.", current, current, 3))
    shapes.update(middle_shapes("encoder.mid.", current))
    shapes.update({"encoder.norm_out.weight": (current,), "encoder.norm_out.bias": (current,)})
    shapes.update(conv_shapes("encoder.conv_out.", z, current, 3))
    current = widths[-1]
    shapes.update(conv_shapes("decoder.conv_in.", current, z, 3))
    shapes.update(middle_shapes("decoder.mid.", current))
    for i in reversed(range(len(widths))):
        for j in range(num_res_blocks + 1):
            shapes.update(resnet_shapes(f"decoder.up.{i}.block.{j}.", current, widths[i]))
            current = widths[i]
            if i == last:
                shapes.update(attention_shapes(f"decoder.up.{i}.attn.{j}.", current))
        if i != 0:
            shapes.update(conv_shapes(f"decoder.up.{i}.upsample.conv.", current, current, 3))
    shapes.update({"decoder.norm_out.weight": (current,), "decoder.norm_out.bias": (current,)})
    shapes.update(conv_shapes("decoder.conv_out.", 3, current, 3))
    for k in range(share):
        shapes.update(conv_shapes(f"quantize.quant_resi.qresi_ls.{k}.", z, z, 3))
    shapes["quantize.ema_vocab_hit_SV"] = (len(patch_nums), V)
    shapes["quantize.embedding.weight"] = (V, z)
    shapes.update(conv_shapes("quant_conv.", z, z, 3))
    shapes.update(conv_shapes("post_quant_conv.", z, z, 3))
    return shapes


def official_var_shapes(depth, C, heads, V, Cvae, num_classes, patch_nums):
    """{key: shape} of VAR's (and MVAR's) transformer state dict, buffers included (``shared_aln=False``,
    ``attn_l2_norm=True``)."""
    L = sum(pn * pn for pn in patch_nums)
    shapes = {"pos_start": (1, patch_nums[0] ** 2, C), "pos_1LC": (1, L, C), "lvl_embed.weight": (len(patch_nums), C),
              "class_emb.weight": (num_classes + 1, C), "word_embed.weight": (C, Cvae), "word_embed.bias": (C,),
              "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({p + "attn.scale_mul_1H11": (1, heads, 1, 1), p + "attn.q_bias": (C,), p + "attn.v_bias": (C,),
                       p + "attn.zero_k_bias": (C,), p + "attn.mat_qkv.weight": (3 * C, C),
                       p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
                       p + "ffn.fc1.weight": (4 * C, C), p + "ffn.fc1.bias": (4 * C,),
                       p + "ffn.fc2.weight": (C, 4 * C), p + "ffn.fc2.bias": (C,),
                       p + "ada_lin.1.weight": (6 * C, C), p + "ada_lin.1.bias": (6 * C,)})
    shapes.update({"head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
                   "head.weight": (V, C), "head.bias": (V,)})
    return shapes


def levels_of(patch_nums):
    return torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)])


def training_mask(patch_nums, family):
    """``attn_bias_for_masking``: 0 where a query may see a key, -inf elsewhere (VAR block-causal, MVAR
    block-diagonal)."""
    levels = levels_of(patch_nums)
    allowed = levels[None, :] <= levels[:, None] if family == "var" else levels[None, :] == levels[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]


def random_tensor(key, shape, generator):
    """Weights whose activations stay of order one: normal / sqrt(fan in) for matrices and kernels, 1 + noise for
    norm gains, small noise for biases."""
    if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("norm.weight") \
            or key.endswith("norm_out.weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return 0.1 * torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def official_vqvae_state(seed=0, **config):
    config = {**VQVAE_CONFIG, **config}
    generator = torch.Generator().manual_seed(seed)
    state = {key: random_tensor(key, shape, generator) for key, shape in official_vqvae_shapes(**config).items()}
    state["quantize.embedding.weight"] = torch.randn(config["V"], config["z"], generator=generator)
    state["quantize.ema_vocab_hit_SV"] = torch.rand(len(config["patch_nums"]), config["V"], generator=generator)
    return state


def official_var_state(seed=1, family="var", **config):
    config = {**VAR_CONFIG, **config}
    generator = torch.Generator().manual_seed(seed)
    state = {key: random_tensor(key, shape, generator) for key, shape in official_var_shapes(**config).items()}
    for key in state:
        if key.endswith("scale_mul_1H11"):
            # log scales around log 4, one beyond VAR's clamp at log 100
            state[key] = math.log(4.0) + torch.randn(state[key].shape, generator=generator)
            state[key].view(-1)[0] = math.log(300.0)
        if key.endswith("zero_k_bias"):
            state[key] = torch.zeros(config["C"])
        if key in ("pos_start", "pos_1LC", "lvl_embed.weight", "class_emb.weight"):
            state[key] = 0.5 * torch.randn(state[key].shape, generator=generator)
    state["lvl_1L"] = levels_of(config["patch_nums"])[None]
    state["attn_bias_for_masking"] = training_mask(config["patch_nums"], family)
    return state


# ----------------------------------------------------------------------------------------------------------------------
# reference forwards: the official equations over the official state dicts


def group_norm(sd, key, x):
    return F.group_norm(x, 32, sd[key + "weight"], sd[key + "bias"], eps=1e-6)


def conv(sd, key, x, stride=1, padding=None):
    weight = sd[key + "weight"]
    return F.conv2d(x, weight, sd[key + "bias"], stride=stride,
                    padding=weight.shape[-1] // 2 if padding is None else padding)


def resnet(sd, key, x):
    h = conv(sd, key + "conv1.", F.silu(group_norm(sd, key + "norm1.", x)))
    h = conv(sd, key + "conv2.", F.silu(group_norm(sd, key + "norm2.", h)))
    return (conv(sd, key + "nin_shortcut.", x) if key + "nin_shortcut.weight" in sd else x) + h


def pixel_attention(sd, key, x):
    batch, channels, height, width = x.shape
    q, k, v = conv(sd, key + "qkv.", group_norm(sd, key + "norm.", x)).reshape(batch, 3, channels, -1).unbind(1)
    weights = torch.einsum("bci,bcj->bij", q, k).div(math.sqrt(channels)).softmax(dim=-1)
    out = torch.einsum("bij,bcj->bci", weights, v).reshape(batch, channels, height, width)
    return x + conv(sd, key + "proj_out.", out)


def middle(sd, key, x):
    return resnet(sd, key + "block_2.", pixel_attention(sd, key + "attn_1.", resnet(sd, key + "block_1.", x)))


def ref_encoder(sd, images, levels=5, num_res_blocks=2):
    h = conv(sd, "encoder.conv_in.", images)
    for i in range(levels):
        for j in range(num_res_blocks):
            h = resnet(sd, f"encoder.down.{i}.block.{j}.", h)
            if f"encoder.down.{i}.attn.{j}.qkv.weight" in sd:
                h = pixel_attention(sd, f"encoder.down.{i}.attn.{j}.", h)
        if f"encoder.down.{i}.downsample.conv.weight" in sd:
            # zero padding on the right and bottom only, then a stride-2 conv
            h = conv(sd, f"encoder.down.{i}.downsample.conv.", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = middle(sd, "encoder.mid.", h)
    return conv(sd, "encoder.conv_out.", F.silu(group_norm(sd, "encoder.norm_out.", h)))


def ref_decoder(sd, z, levels=5, num_res_blocks=2):
    h = middle(sd, "decoder.mid.", conv(sd, "decoder.conv_in.", z))
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            h = resnet(sd, f"decoder.up.{i}.block.{j}.", h)
            if f"decoder.up.{i}.attn.{j}.qkv.weight" in sd:
                h = pixel_attention(sd, f"decoder.up.{i}.attn.{j}.", h)
        if i != 0:
            h = conv(sd, f"decoder.up.{i}.upsample.conv.", F.interpolate(h, scale_factor=2, mode="nearest"))
    return conv(sd, "decoder.conv_out.", F.silu(group_norm(sd, "decoder.norm_out.", h)))


def phi(sd, scale_index, num_scales, h, count=4, ratio=0.5):
    """VAR's partially shared phi: the convolution whose tick is nearest to s / (S - 1)."""
    margin = 1 / 3 / count if count == 4 else 1 / 2 / count
    ticks = torch.linspace(margin, 1 - margin, count, dtype=torch.float64)
    k = int((ticks - scale_index / (num_scales - 1)).abs().argmin())
    return h * (1 - ratio) + conv(sd, f"quantize.quant_resi.qresi_ls.{k}.", h) * ratio


def scale_term(sd, index, ids, patch_nums):
    """phi_s(upsample(codebook[ids])) (B, Cvae, h, w) of scale `index` (no resampling at the last scale)."""
    codebook = sd["quantize.embedding.weight"]
    side, full = patch_nums[index], patch_nums[-1]
    h = codebook[ids].reshape(ids.shape[0], side, side, -1).permute(0, 3, 1, 2)
    if side != full:
        h = F.interpolate(h, size=(full, full), mode="bicubic")
    return phi(sd, index, len(patch_nums), h)


def ref_quantize(sd, f, patch_nums=SCALES):
    """VAR Algorithm 1: ids of every scale and f_hat, over latents f (B, Cvae, h, w)."""
    codebook = sd["quantize.embedding.weight"]
    rest, f_hat, ids_per_scale = f.clone(), torch.zeros_like(f), []
    for index, side in enumerate(patch_nums):
        small = F.interpolate(rest, size=(side, side), mode="area") if index < len(patch_nums) - 1 else rest
        vectors = small.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        distances = vectors.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * vectors @ codebook.T
        ids = distances.argmin(dim=1).view(f.shape[0], side * side)
        h = scale_term(sd, index, ids, patch_nums)
        f_hat, rest = f_hat + h, rest - h
        ids_per_scale.append(ids)
    return ids_per_scale, f_hat


def ref_vqvae(sd, images):
    """(latents f, ids per scale, unclamped reconstruction) of VAR's VQVAE."""
    f = conv(sd, "quant_conv.", ref_encoder(sd, images))
    ids, f_hat = ref_quantize(sd, f)
    return f, ids, ref_decoder(sd, conv(sd, "post_quant_conv.", f_hat))


def ref_teacher_inputs(vae, ids_per_scale, patch_nums=SCALES):
    """VAR's idxBl_to_var_input: the running f_hat of the scales before s, area-downsampled to side_s, for the
    scales after those of `ids_per_scale` (all of them for a whole pyramid): (B, n, Cvae)."""
    f_hat, inputs = 0, []
    for index, ids in enumerate(ids_per_scale[:len(patch_nums) - 1]):
        f_hat = f_hat + scale_term(vae, index, ids, patch_nums)
        side = patch_nums[index + 1]
        inputs.append(F.interpolate(f_hat, size=(side, side), mode="area").flatten(2).transpose(1, 2))
    return torch.cat(inputs, dim=1)


def ref_blocks(sd, x, cond, bias, heads):
    """VAR's AdaLNSelfAttn blocks and AdaLNBeforeHead + head: x (B, n, C), cond (B, C), bias (n, n) -> logits."""
    batch, length, width = x.shape
    head_dim = width // heads
    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        ada = F.linear(F.silu(cond), sd[p + "ada_lin.1.weight"], sd[p + "ada_lin.1.bias"]).view(batch, 1, 6, width)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        h = F.layer_norm(x, (width,), eps=1e-6) * (1 + scale1) + shift1
        qkv_bias = torch.cat([sd[p + "attn.q_bias"], sd[p + "attn.zero_k_bias"], sd[p + "attn.v_bias"]])
        qkv = F.linear(h, sd[p + "attn.mat_qkv.weight"], qkv_bias).view(batch, length, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        multiplier = sd[p + "attn.scale_mul_1H11"].clamp(max=math.log(100)).exp()
        q, k = F.normalize(q, dim=-1) * multiplier, F.normalize(k, dim=-1)
        attended = ((q @ k.transpose(-1, -2)) + bias).softmax(dim=-1) @ v
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        x = x + F.linear(attended, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) * gamma1
        h = F.layer_norm(x, (width,), eps=1e-6) * (1 + scale2) + shift2
        hidden = F.gelu(F.linear(h, sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"]), approximate="tanh")
        x = x + F.linear(hidden, sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"]) * gamma2
    scale, shift = F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"]) \
        .view(batch, 1, 2, width).unbind(2)
    h = F.layer_norm(x, (width,), eps=1e-6) * (1 + scale) + shift
    return F.linear(h, sd["head.weight"], sd["head.bias"])


def ref_inputs(sd, labels, teacher, start, end, first_length=1):
    """VAR's input sequence over positions [start, end): class embedding + pos_start for the first scale, the word
    embedding of the teacher inputs after it, plus level and position embeddings."""
    cond = sd["class_emb.weight"][labels]
    sos = cond[:, None] + sd["pos_start"]
    words = F.linear(teacher, sd["word_embed.weight"], sd["word_embed.bias"])
    x = torch.cat([sos, words], dim=1)[:, start:end]
    levels = sd["lvl_1L"][0, start:end]
    return x + sd["lvl_embed.weight"][levels] + sd["pos_1LC"][0, start:end], cond


def neighbourhood_bias(side, kernel):
    """NATTEN's k x k windows (dilation 1) over a side x side map, as an additive bias (side ** 2, side ** 2)."""
    positions = torch.arange(side)
    start = (positions - kernel // 2).clamp(min=0).clamp(max=side - kernel)
    inside = (positions[None, :] >= start[:, None]) & (positions[None, :] < start[:, None] + kernel)
    allowed = (inside[:, None, :, None] & inside[None, :, None, :]).reshape(side * side, side * side)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def ref_var_logits(sd, vae, labels, ids_per_scale, heads=VAR_CONFIG["heads"], patch_nums=SCALES):
    """VAR.forward (teacher forcing) under its block-causal mask: logits (B, L, V)."""
    teacher = ref_teacher_inputs(vae, ids_per_scale, patch_nums)
    length = sum(pn * pn for pn in patch_nums)
    x, cond = ref_inputs(sd, labels, teacher, 0, length)
    return ref_blocks(sd, x, cond, sd["attn_bias_for_masking"][0, 0], heads)


def ref_mvar_logits(sd, vae, labels, ids_per_scale, kernel, refine_step, heads=VAR_CONFIG["heads"],
                    patch_nums=SCALES):
    """MVAR's training forwards: the scales below ``refine_step`` together under the block-diagonal mask, then
    every refined scale alone with neighbourhood attention; logits (B, L, V)."""
    teacher = ref_teacher_inputs(vae, ids_per_scale, patch_nums)
    ends = torch.tensor([pn * pn for pn in patch_nums]).cumsum(0).tolist()
    joint_end = ends[refine_step - 1]
    x, cond = ref_inputs(sd, labels, teacher, 0, joint_end)
    parts = [ref_blocks(sd, x, cond, sd["attn_bias_for_masking"][0, 0, :joint_end, :joint_end], heads)]
    for index in range(refine_step, len(patch_nums)):
        x, cond = ref_inputs(sd, labels, teacher, ends[index - 1], ends[index])
        parts.append(ref_blocks(sd, x, cond, neighbourhood_bias(patch_nums[index], kernel), heads))
    return torch.cat(parts, dim=1)


def ref_greedy(sd, vae, labels, cfg, family="var", kernel=3, refine_step=2, heads=VAR_CONFIG["heads"],
               patch_nums=SCALES, num_classes=VAR_CONFIG["num_classes"]):
    """VAR's autoregressive_infer_cfg (and MVAR's autoregressive_infer) with top-k 1: the guided argmax of every
    scale, t = cfg * s / (S - 1), logits (1 + t) cond - t uncond, recomputing the whole prefix (VAR) or the new
    map alone (MVAR). Returns the ids of every scale."""
    rows = torch.cat([labels, torch.full_like(labels, num_classes)])
    ends = torch.tensor([pn * pn for pn in patch_nums]).cumsum(0).tolist()
    ids_per_scale = []
    for index, side in enumerate(patch_nums):
        teacher = ref_teacher_inputs(vae, [ids.repeat(2, 1) for ids in ids_per_scale], patch_nums) \
            if index else torch.zeros(rows.shape[0], 0, vae["quantize.embedding.weight"].shape[1])
        start = ends[index - 1] if index else 0
        if family == "var":
            x, cond = ref_inputs(sd, rows, teacher, 0, ends[index])
            logits = ref_blocks(sd, x, cond, sd["attn_bias_for_masking"][0, 0, :ends[index], :ends[index]],
                                heads)[:, start:]
        else:
            x, cond = ref_inputs(sd, rows, teacher, start, ends[index])
            bias = neighbourhood_bias(side, kernel) if index >= refine_step else torch.zeros(side * side, side * side)
            logits = ref_blocks(sd, x, cond, bias, heads)
        t = cfg * index / (len(patch_nums) - 1)
        guided = (1 + t) * logits[:labels.shape[0]] - t * logits[labels.shape[0]:]
        ids_per_scale.append(guided.argmax(dim=-1))
    return ids_per_scale


# ----------------------------------------------------------------------------------------------------------------------
# fixtures


def sample_images(count=2):
    generator = torch.Generator().manual_seed(5)
    smooth = F.interpolate(torch.rand(count, 3, 8, 8, generator=generator), size=(64, 64), mode="bilinear")
    return (smooth * 2 - 1).clamp(-1, 1)


def scale_maps(tokenizer, ids):
    """(B, L) ids -> each scale's ids [(B, side ** 2)]."""
    return [piece.flatten(1) for piece in tokenizer.split_scales(ids)]


@pytest.fixture
def tiny_presets(monkeypatch):
    """The format's presets at test size: ``vqvae-test``, ``var-test``, ``mvar-test``."""
    monkeypatch.setitem(var_format.PRESETS, "vqvae-test", {**var_format.PRESETS["vqvae"], **TINY_VQVAE})
    monkeypatch.setitem(var_format.PRESETS, "var-test", {**var_format.PRESETS["var-d16"], **TINY_VAR})
    monkeypatch.setitem(var_format.PRESETS, "mvar-test", {**var_format.PRESETS["mvar-d16"], **TINY_MVAR})


@pytest.fixture
def converted_vqvae(tmp_path, tiny_presets):
    """The official state dict, its file (a raw state dict, as vae_ch160v4096z32.pth) and the saved conversion."""
    state = official_vqvae_state()
    torch.save(state, tmp_path / "vae.pth")
    tokenizer = convert("var", tmp_path / "vae.pth", "vqvae-test")
    return state, tokenizer, save_model(tokenizer, tmp_path / "vqvae")


# ----------------------------------------------------------------------------------------------------------------------
# exactness


def test_vqvae_latents_ids_and_reconstructions_equal_the_official_equations(converted_vqvae):
    state, tokenizer, _ = converted_vqvae
    images = sample_images()
    with torch.no_grad():
        f, ids, reconstruction = ref_vqvae(state, images)
        encoded = tokenizer.encode(images)
        torch.testing.assert_close(tokenizer.encode_latents(images), f, atol=1e-5, rtol=1e-5)
        assert torch.equal(encoded.ids, torch.cat(ids, dim=1))
        # a non-trivial pyramid: many codes, reconstructions of order one
        assert encoded.ids.unique().numel() > 10 and reconstruction.abs().max() > 1
        ours = tokenizer.decode_codes(tokenizer.quantizer.reconstruct(scale_maps(tokenizer, encoded.ids)))
        difference = (ours - reconstruction).abs().max().item()
        torch.testing.assert_close(ours, reconstruction, atol=1e-5, rtol=1e-5)
        # decode clamps to [-1, 1], as VAR's fhat_to_img
        torch.testing.assert_close(tokenizer.decode(encoded.ids), reconstruction.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    print(f"VQVAE: largest pixel difference {difference:.2e} (reconstructions up to {reconstruction.abs().max():.2f})")


def test_var_logits_equal_the_official_equations(tmp_path, converted_vqvae):
    vae, tokenizer, folder = converted_vqvae
    state = official_var_state()
    torch.save(state, tmp_path / "var_d2.pth")  # VAR's files are the raw state dict
    generator = convert("var", tmp_path / "var_d2.pth", "var-test", tokenizer=str(folder))
    assert generator.provenance == {"tokenizer_fingerprint": load_model(folder).fingerprint}
    with torch.no_grad():
        ids = tokenizer.encode(sample_images()).ids
        labels = torch.tensor([3, 10])  # a class and the null class of guidance
        reference = ref_var_logits(state, vae, labels, scale_maps(tokenizer, ids))
        logits = generator(ids, labels)
        difference = (logits - reference).abs().max().item()
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        # the saved folder (the pyramid inside its weights) gives the same logits
        reloaded = load_model(save_model(generator, tmp_path / "var"))
        torch.testing.assert_close(reloaded(ids, labels), reference, atol=1e-5, rtol=1e-5)
    print(f"VAR: largest logit difference {difference:.2e} (logits up to {reference.abs().max():.2f})")


def test_mvar_logits_equal_the_official_equations(tmp_path, converted_vqvae):
    vae, tokenizer, folder = converted_vqvae
    state = official_var_state(seed=2, family="mvar")
    torch.save({"mvar_wo_ddp": state}, tmp_path / "mvar-d2.pth")  # the layout run_mvar_evaluate.py reads
    generator = convert("var", tmp_path / "mvar-d2.pth", "mvar-test", tokenizer=str(folder))
    with torch.no_grad():
        ids = tokenizer.encode(sample_images()).ids
        labels = torch.tensor([7, 1])
        maps = scale_maps(tokenizer, ids)
        reference = ref_mvar_logits(state, vae, labels, maps, kernel=3, refine_step=2)
        logits = generator(ids, labels)
        difference = (logits - reference).abs().max().item()
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    print(f"MVAR: largest logit difference {difference:.2e} (logits up to {reference.abs().max():.2f})")


def test_the_converted_networks_equal_the_official_equations_in_float64(tiny_presets):
    """The float32 differences above are rounding: in float64 the equations agree to 1e-10."""
    vae, var = official_vqvae_state(), official_var_state()
    tokenizer = convert("var", vae, "vqvae-test").double()
    generator = convert("var", var, "var-test").double()
    generator.load_tokenizer(tokenizer)
    vae, var = ({key: value.double() if value.is_floating_point() else value for key, value in sd.items()}
                for sd in (vae, var))
    images = sample_images().double()
    with torch.no_grad():
        _, ids, reconstruction = ref_vqvae(vae, images)
        encoded = tokenizer.encode(images).ids
        assert torch.equal(encoded, torch.cat(ids, dim=1))
        ours = tokenizer.decode_codes(tokenizer.quantizer.reconstruct(scale_maps(tokenizer, encoded)))
        torch.testing.assert_close(ours, reconstruction, atol=1e-10, rtol=0)
        labels = torch.tensor([0, 6])
        torch.testing.assert_close(generator(encoded, labels), ref_var_logits(var, vae, labels, ids), atol=1e-10,
                                   rtol=0)


@pytest.mark.parametrize("family", ["var", "mvar"])
def test_greedy_guided_generation_follows_the_official_loop(tmp_path, converted_vqvae, family):
    vae, tokenizer, folder = converted_vqvae
    state = official_var_state(seed=3, family=family)
    generator = convert("var", state, f"{family}-test", tokenizer=str(folder))
    labels = torch.tensor([2, 5])
    with torch.no_grad():
        expected = torch.cat(ref_greedy(state, vae, labels, cfg=1.5, family=family), dim=1)
        # VAR's cfg 1.5 is flexar's guidance scale 2.5 on the linear ramp; top-k 1 is the argmax
        out = generator.generate(labels, Sampler(cfg_scale=2.5, top_k=1))
    assert torch.equal(out.ids, expected)


# ----------------------------------------------------------------------------------------------------------------------
# key coverage and refusals


def test_every_official_key_is_consumed_or_ignored_with_a_reason(tiny_presets):
    for preset, state, ignored in (("vqvae-test", official_vqvae_state(), {"quantize.ema_vocab_hit_SV"}),
                                   ("var-test", official_var_state(), set()),
                                   ("mvar-test", official_var_state(family="mvar"), set())):
        model = var_format.build(preset)
        weights = Weights(state)
        var_format.load(model, weights)
        weights.finish()
        assert weights.taken | set(weights.ignored) == set(state) and set(weights.ignored) == ignored
        assert all(weights.ignored.values())
        # every parameter written: none keeps its initial value (the pyramid copy of a generator comes from the
        # tokenizer, not from this file)
        fresh = var_format.build(preset)
        unchanged = [name for name, parameter in model.named_parameters() if not name.startswith("quantizer.")
                     and torch.equal(parameter, dict(fresh.named_parameters())[name])]
        assert unchanged == [], (preset, unchanged)


def test_extra_renamed_missing_and_mis_shaped_keys_are_refused_by_name(tiny_presets):
    vae, var = official_vqvae_state(), official_var_state()
    with pytest.raises(ValueError, match=r"unexpected key\(s\).*'quantize.extra'"):
        convert("var", {**vae, "quantize.extra": torch.zeros(1)}, "vqvae-test")
    renamed = dict(var)
    renamed["blocks.1.attn.proj.weights"] = renamed.pop("blocks.1.attn.proj.weight")
    with pytest.raises(KeyError, match=r"no key 'blocks.1.attn.proj.weight' \(missing key\)"):
        convert("var", renamed, "var-test")
    missing = {key: value for key, value in vae.items() if key != "decoder.up.0.block.2.conv1.bias"}
    with pytest.raises(KeyError, match=r"no key 'decoder.up.0.block.2.conv1.bias'"):
        convert("var", missing, "vqvae-test")
    with pytest.raises(ValueError, match=r"'class_emb.weight' .* has shape \(11, 128\), the model expects \(1001, 128\)"):
        convert("var", var, "var-test", num_classes=1000)
    with pytest.raises(ValueError, match=r"has 2 blocks and the VAR built here has 3: choose a var-d\* preset with "
                                         r"the overrides depth=2, dim=128, num_heads=2"):
        convert("var", var, "var-test", depth=3)


def test_the_wrong_kind_of_file_is_refused_with_the_preset_to_use(tiny_presets):
    vae, var, mvar = official_vqvae_state(), official_var_state(), official_var_state(family="mvar")
    with pytest.raises(ValueError, match="is VAR's VQVAE checkpoint, not a transformer: choose the preset 'vqvae'"):
        convert("var", vae, "var-test")
    with pytest.raises(ValueError, match="is a VAR / MVAR transformer checkpoint, not the VQVAE"):
        convert("var", var, "vqvae-test")
    with pytest.raises(ValueError, match="block-causal, VAR's: choose a var-d\\* preset"):
        convert("var", var, "mvar-test")
    with pytest.raises(ValueError, match="block-diagonal, MVAR's: choose a mvar-d\\* preset"):
        convert("var", mvar, "var-test")
    with pytest.raises(ValueError, match="zero_k_bias is not zero"):
        convert("var", {**var, "blocks.0.attn.zero_k_bias": torch.ones(128)}, "var-test")
    with pytest.raises(ValueError, match="shared-AdaLN VAR"):
        convert("var", {**var, "blocks.0.ada_gss": torch.zeros(1, 1, 6, 128)}, "var-test")


class Payload:
    """Unpickling this calls print: what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return print, ("this ran while unpickling",)


def test_a_checkpoint_that_pickles_objects_is_refused_unrun(tmp_path, capsys, tiny_presets):
    with open(tmp_path / "var_d16.pth", "wb") as file:
        pickle.dump({**official_var_state(), "args": Payload()}, file, protocol=2)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        convert("var", tmp_path / "var_d16.pth", "var-test")
    assert "this ran" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# the official sizes

# parameter counts of the official models, counted from FoundationVision/VAR's code at the released configurations
# (VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4) and build_vae_var's VAR(depth=d, embed_dim=64 d,
# num_heads=d, attn_l2_norm=True), buffers excluded); the VAR paper (Tian et al. 2024, Table 1 / the README's model
# zoo) rounds them to 310M, 600M, 1.0B and 2.0B, and MVAR's README gives the same for MVAR-d16 / d20 / d24, which
# add no parameters to VAR's network. The VQVAE's count (109.0M) is not stated in the paper.
OFFICIAL_COUNTS = {"vqvae": 108_948_355, "var-d16": 310_283_520, "var-d20": 600_917_136, "var-d24": 1_033_399_360,
                   "var-d30": 2_010_020_356}
PAPER_COUNTS = {"var-d16": 310e6, "var-d20": 600e6, "var-d24": 1.0e9, "var-d30": 2.0e9}


@pytest.mark.parametrize("preset", list(var_format.PRESETS))
def test_the_official_sizes_on_the_meta_device(preset):
    with torch.device("meta"):
        model = var_format.build(preset)
    depth = int(preset.split("-d")[1]) if "-d" in preset else None
    if preset == "vqvae":
        shapes = official_vqvae_shapes(ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z=32, V=4096,
                                       patch_nums=VAR_SCALES, share=4)
        official = OFFICIAL_COUNTS["vqvae"]
        counted = sum(p.numel() for p in model.parameters())
    else:
        shapes = official_var_shapes(depth=depth, C=64 * depth, heads=depth, V=4096, Cvae=32, num_classes=1000,
                                     patch_nums=VAR_SCALES)
        official = OFFICIAL_COUNTS[f"var-d{depth}"]
        # flexar's generator also holds a frozen copy of the VQVAE's codebook and phi layers (VAR keeps a reference)
        counted = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("quantizer."))
        assert abs(counted - PAPER_COUNTS[f"var-d{depth}"]) / PAPER_COUNTS[f"var-d{depth}"] < 0.04
    assert counted == official
    assert sum(math.prod(shape) for key, shape in shapes.items() if key not in
               ("quantize.ema_vocab_hit_SV", "lvl_1L", "attn_bias_for_masking") and not key.endswith("zero_k_bias")) \
        == official
    # every official key at its official shape loads (meta tensors for the weights, the checked buffers real)
    family = "mvar" if preset.startswith("mvar") else "var"
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    if preset != "vqvae":
        state["lvl_1L"] = levels_of(VAR_SCALES)[None]
        state["attn_bias_for_masking"] = training_mask(VAR_SCALES, family)
        state.update({key: torch.zeros(shape) for key, shape in shapes.items() if key.endswith("zero_k_bias")})
    weights = Weights(state)
    var_format.load(model, weights)
    weights.finish()


# ----------------------------------------------------------------------------------------------------------------------
# the command and pipelines from the converted folders


def test_flexar_convert_writes_folders_that_load_back_and_make_a_pipeline(tmp_path, capsys, tiny_presets):
    vae, var = official_vqvae_state(), official_var_state()
    torch.save(vae, tmp_path / "vae.pth")
    torch.save(var, tmp_path / "var_d2.pth")
    assert convert_main(["var", str(tmp_path / "vae.pth"), str(tmp_path / "vqvae"), "--preset", "vqvae-test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["class"] == "MultiScaleVQ" and printed["preset"] == "vqvae-test"
    assert convert_main(["var", str(tmp_path / "var_d2.pth"), str(tmp_path / "var"), "--preset", "var-test"]) == 0
    assert json.loads(capsys.readouterr().out)["class"] == "VAR"
    tokenizer, generator = load_model(tmp_path / "vqvae"), load_model(tmp_path / "var")
    images = sample_images()
    with torch.no_grad():
        _, ids, reconstruction = ref_vqvae(vae, images)
        torch.testing.assert_close(tokenizer.decode(tokenizer.encode(images).ids), reconstruction.clamp(-1, 1),
                                   atol=1e-5, rtol=1e-5)
        # the transformer file holds no VQVAE: the generator reads the tokenizer's pyramid from its folder
        generator.load_tokenizer(tmp_path / "vqvae")
        labels = torch.tensor([4, 9])
        torch.testing.assert_close(generator(torch.cat(ids, dim=1), labels), ref_var_logits(var, vae, labels, ids),
                                   atol=1e-5, rtol=1e-5)
        pipeline = Pipeline(tokenizer, generator)
        images_out = pipeline.generate(labels, sampler=Sampler(cfg_scale=2.5, top_k=1), seed=0)
        expected = ref_greedy(var, vae, labels, cfg=1.5)
        f_hat = sum(scale_term(vae, index, ids, SCALES) for index, ids in enumerate(expected))
        pixels = ref_decoder(vae, conv(vae, "post_quant_conv.", f_hat)).clamp(-1, 1)
    assert images_out.dtype == torch.uint8 and images_out.shape == (2, 3, 64, 64)
    assert (images_out.float() - ((pixels + 1) * 127.5)).abs().max() <= 1.0


def test_the_switches_train_and_are_refused_when_inconsistent(tiny_presets):
    from flexar.generators import VAR
    from flexar.tokenizers import MultiScaleVQ

    tokenizer = var_format.build("vqvae-test")
    loss, _ = tokenizer.training_loss(sample_images())
    loss.backward()
    encoder_attention = tokenizer.encoder.levels[-1].attentions[0]
    assert encoder_attention.qkv.weight.grad.abs().sum() > 0
    assert tokenizer.decoder.middle.attention.proj.weight.grad.abs().sum() > 0
    generator = convert("var", official_var_state(), "var-test")
    generator.load_tokenizer(tokenizer)
    generator.train()
    ids = tokenizer.encode(sample_images()).ids
    loss, _ = generator.training_loss(ids, torch.tensor([1, 2]))
    loss.backward()
    attention = generator.transformer.blocks[0].attn
    assert all(p.grad.abs().sum() > 0 for p in (attention.q_bias, attention.v_bias, attention.proj.bias))
    with pytest.raises(ValueError, match="architecture must be one of 'flexar', 'var', got 'taming'"):
        MultiScaleVQ(architecture="taming")
    with pytest.raises(ValueError, match="attention_bias=True .* needs attn_l2_norm=True"):
        VAR.from_preset("var-tiny", attention_bias=True, attn_l2_norm=False)
