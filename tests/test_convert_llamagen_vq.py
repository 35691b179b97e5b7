"""``llamagen-vq``: LlamaGen's VQ-16 / VQ-8 tokenizers into LlamaGenVQ (flexar/convert/llamagen_vq.py,
flexar/tokenizers/llamagen_vq.py).

The reference below is LlamaGen's forward (FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py) written
again as plain torch functions over the official state dict: GroupNorm(32, eps 1e-6), swish, ResnetBlock with its
1x1 ``nin_shortcut``, AttnBlock (1x1 q / k / v / proj_out, bmm softmax over positions), Downsample (pad (0, 1, 0, 1),
stride-2 conv), Upsample (nearest 2x, conv), and the l2-normalised nearest-code lookup.
"""
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from flexar.cli.convert import main as convert_main
from flexar.convert import Weights, convert, format_module
from flexar.convert import llamagen_vq
from flexar.hub import load_model
from flexar.tokenizers import LlamaGenVQ

from common import TokenizerContract

# a small VQModel of the official layout: ch 32, ch_mult (1, 2, 2) (f4, a width change at level 1), 2 res blocks,
# z_channels 64, 64 codes of 8 dims, at 32 px RGB
TINY = dict(image_size=32, channels=3, width=32, channel_multipliers=[1, 2, 2], num_res_blocks=2, z_channels=64,
            codebook_size=64, code_dim=8)

# LlamaGen README, "VQ-VAE models" tables: vq_ds16_c2i 72M, vq_ds8_c2i 70M. The exact counts are those of the
# official VQ_16() / VQ_8() (parameters only; the 65536-entry codebook_used buffer is no parameter):
# 71,883,403 and 70,109,835.
OFFICIAL_PARAMETERS = {"vq-16": (71_883_403, 72e6), "vq-8": (70_109_835, 70e6)}


# -- the official layout -----------------------------------------------------------------------------------------------
def official_shapes(channels=3, width=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                    codebook_size=16384, code_dim=8, **_):
    """{key: shape} of ``VQModel(ModelArgs(...)).state_dict()``, in the official module order."""
    shapes = {}

    def conv(key, out_channels, in_channels, kernel):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (out_channels, in_channels, kernel, kernel), (out_channels,)

    def norm(key, channels):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (channels,), (channels,)

    def resnet(key, in_channels, out_channels):
        norm(f"{key}.norm1", in_channels)
        conv(f"{key}.conv1", out_channels, in_channels, 3)
        norm(f"{key}.norm2", out_channels)
        conv(f"{key}.conv2", out_channels, out_channels, 3)
        if in_channels != out_channels:
            conv(f"{key}.nin_shortcut", out_channels, in_channels, 1)

    def attention(key, channels):
        norm(f"{key}.norm", channels)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{key}.{name}", channels, channels, 1)

    levels = len(channel_multipliers)
    conv("encoder.conv_in", width, channels, 3)
    block_in = width
    for i, multiplier in enumerate(channel_multipliers):
        block_out = width * multiplier
        for j in range(num_res_blocks):
            resnet(f"encoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
        if i == levels - 1:
            for j in range(num_res_blocks):
                attention(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        else:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    resnet("encoder.mid.0", block_in, block_in)
    attention("encoder.mid.1", block_in)
    resnet("encoder.mid.2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", z_channels, block_in, 3)

    block_in = width * channel_multipliers[-1]
    conv("decoder.conv_in", block_in, z_channels, 3)
    resnet("decoder.mid.0", block_in, block_in)
    attention("decoder.mid.1", block_in)
    resnet("decoder.mid.2", block_in, block_in)
    for i, level in enumerate(reversed(range(levels))):
        block_out = width * channel_multipliers[level]
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
        if level == levels - 1:
            for j in range(num_res_blocks + 1):
                attention(f"decoder.conv_blocks.{i}.attn.{j}", block_in)
        if level != 0:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", channels, block_in, 3)

    shapes["quantize.codebook_used"] = (65536,)
    shapes["quantize.embedding.weight"] = (codebook_size, code_dim)
    conv("quant_conv", code_dim, z_channels, 1)
    conv("post_quant_conv", z_channels, code_dim, 1)
    return shapes


def official_state_dict(seed=0, **config):
    """Random weights of the official layout, scaled so that every layer changes its input visibly."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(**config).items():
        if key == "quantize.codebook_used":
            state[key] = torch.randint(0, config["codebook_size"], shape, generator=generator).float()
        elif key == "quantize.embedding.weight":
            state[key] = torch.randn(shape, generator=generator) * 0.3  # raw rows, normalised by every lookup
        elif key.endswith(".bias"):
            state[key] = torch.randn(shape, generator=generator) * 0.1
        elif len(shape) == 1:  # a GroupNorm scale
            state[key] = 1 + torch.randn(shape, generator=generator) * 0.2
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) / fan_in ** 0.5
    return state


def save_like_vq_train(state, path, ema=None):
    """The checkpoint vq_train.py writes (without its pickled ``args`` Namespace, see the refusal test)."""
    checkpoint = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                  "discriminator": {"conv.weight": torch.zeros(2, 3, 4, 4)}, "optimizer_disc": {"state": {}},
                  "steps": 1000}
    if ema is not None:
        checkpoint["ema"] = ema
    torch.save(checkpoint, path)
    return path


# -- the reference forward -------------------------------------------------------------------------------------------
def swish(x):
    return x * torch.sigmoid(x)


def ref_norm(sd, key, x):
    return F.group_norm(x, 32, sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)


def ref_conv(sd, key, x, stride=1, padding=None):
    weight = sd[f"{key}.weight"]
    return F.conv2d(x, weight, sd[f"{key}.bias"], stride=stride,
                    padding=weight.shape[-1] // 2 if padding is None else padding)


def ref_resnet(sd, key, x):
    h = ref_conv(sd, f"{key}.conv1", swish(ref_norm(sd, f"{key}.norm1", x)))
    h = ref_conv(sd, f"{key}.conv2", swish(ref_norm(sd, f"{key}.norm2", h)))
    if f"{key}.nin_shortcut.weight" in sd:
        x = ref_conv(sd, f"{key}.nin_shortcut", x)
    return x + h


def ref_attention(sd, key, x):
    h = ref_norm(sd, f"{key}.norm", x)
    q, k, v = (ref_conv(sd, f"{key}.{name}", h) for name in ("q", "k", "v"))
    b, c, height, width = q.shape
    q = q.reshape(b, c, height * width).permute(0, 2, 1)
    k = k.reshape(b, c, height * width)
    weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # (b, query, key)
    out = torch.bmm(v.reshape(b, c, height * width), weights.permute(0, 2, 1)).reshape(b, c, height, width)
    return x + ref_conv(sd, f"{key}.proj_out", out)


def ref_encoder(sd, x, levels, num_res_blocks):
    h = ref_conv(sd, "encoder.conv_in", x)
    for i in range(levels):
        for j in range(num_res_blocks):
            h = ref_resnet(sd, f"encoder.conv_blocks.{i}.res.{j}", h)
            if f"encoder.conv_blocks.{i}.attn.{j}.q.weight" in sd:
                h = ref_attention(sd, f"encoder.conv_blocks.{i}.attn.{j}", h)
        if i != levels - 1:
            h = ref_conv(sd, f"encoder.conv_blocks.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = ref_resnet(sd, "encoder.mid.2", ref_attention(sd, "encoder.mid.1", ref_resnet(sd, "encoder.mid.0", h)))
    return ref_conv(sd, "encoder.conv_out", swish(ref_norm(sd, "encoder.norm_out", h)))


def ref_decoder(sd, z, levels, num_res_blocks):
    h = ref_conv(sd, "decoder.conv_in", z)
    h = ref_resnet(sd, "decoder.mid.2", ref_attention(sd, "decoder.mid.1", ref_resnet(sd, "decoder.mid.0", h)))
    for i in range(levels):
        for j in range(num_res_blocks + 1):
            h = ref_resnet(sd, f"decoder.conv_blocks.{i}.res.{j}", h)
            if f"decoder.conv_blocks.{i}.attn.{j}.q.weight" in sd:
                h = ref_attention(sd, f"decoder.conv_blocks.{i}.attn.{j}", h)
        if i != levels - 1:
            h = ref_conv(sd, f"decoder.conv_blocks.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0,
                                                                                     mode="nearest"))
    return ref_conv(sd, "decoder.conv_out", swish(ref_norm(sd, "decoder.norm_out", h)))


def ref_quantize(sd, z):
    """VectorQuantizer.forward in eval mode: (B, D, h, w) -> ids (B, h * w) raster, codes (B, D, h, w), and the
    gap between the two nearest codes (to tell a tie from a disagreement)."""
    b, d, height, width = z.shape
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), p=2, dim=-1)
    embedding = F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)
    distances = (flat ** 2).sum(1, keepdim=True) + (embedding ** 2).sum(1) - 2 * flat @ embedding.t()
    ids = distances.argmin(dim=1)
    nearest_two = distances.topk(2, dim=1, largest=False).values
    codes = embedding[ids].reshape(b, height, width, d).permute(0, 3, 1, 2)
    return ids.reshape(b, height * width), codes, (nearest_two[:, 1] - nearest_two[:, 0]).min()


def reference(sd, images, channel_multipliers, num_res_blocks, **_):
    """VQModel.encode -> ids, then VQModel.decode_code(ids): ids (B, h * w) and images (B, 3, H, W) unclamped."""
    levels = len(channel_multipliers)
    z = ref_conv(sd, "quant_conv", ref_encoder(sd, images, levels, num_res_blocks))
    ids, codes, gap = ref_quantize(sd, z)
    return ids, ref_decoder(sd, ref_conv(sd, "post_quant_conv", codes), levels, num_res_blocks), gap


def sample_images():
    generator = torch.Generator().manual_seed(1)
    # smooth images with edges, in the official [-1, 1] range
    base = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    return F.interpolate(base, size=32, mode="bilinear", align_corners=False).clamp(-1, 1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    state = official_state_dict(**TINY)
    return state, save_like_vq_train(state, tmp_path_factory.mktemp("official") / "vq_tiny.pt")


@pytest.fixture
def tiny_preset(monkeypatch):
    """TINY as a preset of the format, so that convert() and flexar-convert build it by name."""
    monkeypatch.setitem(llamagen_vq.PRESETS, "vq-test", TINY)
    return "vq-test"


# -- exactness ---------------------------------------------------------------------------------------------------------
def test_the_converted_model_equals_the_official_forward(tiny_checkpoint, tiny_preset):
    state, path = tiny_checkpoint
    model = convert("llamagen-vq", path, tiny_preset)
    assert isinstance(model, LlamaGenVQ) and not model.training
    images = sample_images()
    with torch.no_grad():
        ids, reconstruction, gap = reference(state, images, **TINY)
        assert gap > 1e-4  # no near tie among the nearest codes: the ids are decided, not rounded
        encoded = model.encode(images)
        assert torch.equal(encoded.ids, ids)
        assert encoded.ids.shape == (2, 64) and model.grid == (8, 8)
        assert torch.equal(encoded.lengths, torch.full((2,), 64))
        unclamped = model.decode_codes(model.quantizer.ids_to_codes(ids))
        decoded = model.decode(encoded.ids, encoded.lengths)
    # the decoder visibly changes its input (not a near-constant output) and overshoots [-1, 1] somewhere
    assert reconstruction.std() > 0.1
    torch.testing.assert_close(unclamped, reconstruction, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, reconstruction.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    # the quantiser's latents before the lookup and the codes the samplers see
    z = ref_conv(state, "quant_conv", ref_encoder(state, images, 3, 2))
    torch.testing.assert_close(model.encode_latents(images), z.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.code_vectors(), F.normalize(state["quantize.embedding.weight"], dim=-1))


def test_the_converted_networks_equal_the_official_equations_in_float64(tiny_preset):
    """In float64 the float32 tolerance above is rounding only: the encoder and decoder agree to 1e-12 (a wrong
    epsilon, scale or padding would show at 1e-6 or more)."""
    state = official_state_dict(**TINY)
    model = convert("llamagen-vq", state, tiny_preset).double()
    state = {key: value.double() for key, value in state.items()}
    images = sample_images().double()
    with torch.no_grad():
        z = ref_conv(state, "quant_conv", ref_encoder(state, images, 3, 2))
        torch.testing.assert_close(model.quant_conv(model.encoder(images)), z, atol=1e-12, rtol=1e-12)
        _, codes, _ = ref_quantize(state, z)
        reconstruction = ref_decoder(state, ref_conv(state, "post_quant_conv", codes), 3, 2)
        torch.testing.assert_close(model.decoder(model.post_quant_conv(codes)), reconstruction, atol=1e-12,
                                   rtol=1e-12)


def test_the_ema_weights_are_read_first(tmp_path, tiny_preset):
    """vq_demo.py and reconstruction_vq_ddp.py load "ema" when the checkpoint has it, else "model"."""
    model_weights, ema_weights = official_state_dict(seed=0, **TINY), official_state_dict(seed=5, **TINY)
    path = save_like_vq_train(model_weights, tmp_path / "with_ema.pt", ema=ema_weights)
    model = convert("llamagen-vq", path, tiny_preset)
    assert torch.equal(model.quant_conv.weight, ema_weights["quant_conv.weight"])
    assert llamagen_vq.CHECKPOINT_KEYS == ("ema", "model", "state_dict")


# -- key coverage and refusals -----------------------------------------------------------------------------------------
def test_every_official_key_is_consumed_and_every_parameter_written():
    state = official_state_dict(**TINY)
    model = llamagen_vq.build("vq-16", **TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    weights = Weights(state)
    llamagen_vq.load(model, weights)
    weights.finish()
    assert weights.taken | set(weights.ignored) == set(state)
    assert set(weights.ignored) == {"quantize.codebook_used"} and "usage" in weights.ignored["quantize.codebook_used"]
    assert all(not parameter.isnan().any() for parameter in model.parameters())
    # one official tensor per flexar parameter, element for element
    assert sum(state[key].numel() for key in weights.taken) == sum(p.numel() for p in model.parameters())


def test_extra_renamed_missing_and_mis_shaped_keys_are_refused_by_name(tiny_preset):
    state = official_state_dict(**TINY)
    with pytest.raises(ValueError, match=r"unexpected key\(s\).*'encoder\.conv_blocks\.0\.res\.0\.extra\.weight'"):
        convert("llamagen-vq", {**state, "encoder.conv_blocks.0.res.0.extra.weight": torch.zeros(1)}, tiny_preset)
    renamed = {("quantize.embed.weight" if key == "quantize.embedding.weight" else key): value
               for key, value in state.items()}
    with pytest.raises(KeyError, match=r"no key 'quantize\.embedding\.weight' \(missing key\)"):
        convert("llamagen-vq", renamed, tiny_preset)
    missing = {key: value for key, value in state.items() if key != "decoder.conv_blocks.1.upsample.conv.bias"}
    with pytest.raises(KeyError, match=r"no key 'decoder\.conv_blocks\.1\.upsample\.conv\.bias'"):
        convert("llamagen-vq", missing, tiny_preset)
    # the other official size's weights (a VQ-8-style f8 layout against this f4 model) are refused by shape
    other = official_state_dict(**dict(TINY, channel_multipliers=[1, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"'encoder\.conv_blocks\.1\.res\.0\.conv1\.weight' of the state dict has "
                                         r"shape \(32, 32, 3, 3\), the model expects \(64, 32, 3, 3\)"):
        convert("llamagen-vq", other, tiny_preset)
    with pytest.raises(ValueError, match="unknown llamagen-vq preset 'vq-32'; known: vq-16, vq-8"):
        llamagen_vq.build("vq-32")


class Payload:
    """Unpickling this calls print: what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return print, ("this ran while unpickling",)


def test_a_checkpoint_that_pickles_objects_is_refused_unrun(tmp_path, capsys, tiny_preset):
    """vq_train.py also pickles its argparse Namespace; an object in the pickle is refused, never constructed."""
    path = tmp_path / "0001000.pt"
    with open(path, "wb") as file:
        pickle.dump({"model": official_state_dict(**TINY), "args": Payload()}, file, protocol=2)
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\)"):
        convert("llamagen-vq", path, tiny_preset)
    assert "this ran" not in capsys.readouterr().out


# -- the official sizes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vq-16", "vq-8"])
def test_the_official_sizes_on_the_meta_device(name):
    with torch.device("meta"):
        model = llamagen_vq.build(name)
    count, reported = OFFICIAL_PARAMETERS[name]
    assert sum(p.numel() for p in model.parameters()) == count
    assert round(count / 1e6) == reported / 1e6  # the README's 72M / 70M
    side = 16 if name == "vq-16" else 32
    assert (model.grid, model.max_tokens, model.codebook_size, model.code_dim) == ((side, side), side ** 2, 16384, 8)
    assert model.code_vectors().shape == (16384, 8)
    # the official layout of that size (every key and shape) loads into it with nothing left over
    shapes = official_shapes(**llamagen_vq.PRESETS[name])
    with torch.device("meta"):
        weights = Weights({key: torch.empty(shape) for key, shape in shapes.items()})
    llamagen_vq.load(model, weights)
    weights.finish()
    assert sum(weights.state_dict[key].numel() for key in weights.taken) == count
    # LlamaGen's 384 px generators read VQ-16 at 24 x 24
    if name == "vq-16":
        with torch.device("meta"):
            assert llamagen_vq.build(name, image_size=384).grid == (24, 24)


# -- the command and the saved folder ----------------------------------------------------------------------------------
def test_flexar_convert_writes_a_folder_that_loads_to_the_same_outputs(tiny_checkpoint, tiny_preset, tmp_path,
                                                                        capsys):
    state, path = tiny_checkpoint
    assert format_module("llamagen-vq") is llamagen_vq
    assert convert_main(["llamagen-vq", str(path), str(tmp_path / "vq"), "--preset", tiny_preset]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["class"] == "LlamaGenVQ" and printed["preset"] == tiny_preset
    loaded = load_model(tmp_path / "vq").eval()
    assert isinstance(loaded, LlamaGenVQ) and printed["parameters"] == sum(p.numel() for p in loaded.parameters())
    images = sample_images()
    ids, reconstruction, _ = reference(state, images, **TINY)
    assert torch.equal(loaded.encode(images).ids, ids)
    torch.testing.assert_close(loaded.decode(ids), reconstruction.clamp(-1, 1), atol=1e-5, rtol=1e-5)


# -- the tokenizer interface -------------------------------------------------------------------------------------------
class TestLlamaGenVQContract(TokenizerContract):
    def make_tokenizer(self):
        return LlamaGenVQ.from_preset("vq-tiny")


def test_training_updates_the_encoder_codebook_and_decoder():
    torch.manual_seed(0)
    tokenizer = LlamaGenVQ.from_preset("vq-tiny").train()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    loss, logs = tokenizer.training_loss(images)
    loss.backward()
    assert torch.isfinite(loss) and {"reconstruction", "quantizer", "psnr", "codebook_usage"} <= set(logs)
    for parameter in (tokenizer.encoder.conv_in.weight, tokenizer.quant_conv.weight,
                      tokenizer.quantizer.embedding.weight, tokenizer.decoder.conv_out.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_bad_layouts_are_refused_by_name():
    with pytest.raises(ValueError, match=r"channel_multipliers must start with 1"):
        LlamaGenVQ(channel_multipliers=[2, 2, 4])
    with pytest.raises(ValueError, match=r"divisible by norm_groups=32"):
        LlamaGenVQ(width=16, channel_multipliers=[1, 2])
    with pytest.raises(ValueError, match=r"image_size 100 must be divisible by the downsampling factor 16"):
        LlamaGenVQ(image_size=100)
