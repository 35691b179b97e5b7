"""The ``titok`` format: released TiTok tokenizers (bytedance/1d-tokenizer) into flexar's TiTok.

The checkpoints are built here with the official key names and shapes (``modeling/titok.py`` TiTok with
``finetune_decoder: True``, ``modeling/modules/blocks.py`` TiTokEncoder / TiTokDecoder, ``modeling/quantizer/
quantizer.py`` VectorQuantizer, ``modeling/modules/maskgit_vqgan.py`` Decoder / VectorQuantizer), saved as the
repository saves them (the state dict itself, ``torch.save`` or safetensors), and the converted model is compared
with a reference forward written below from the official equations in plain torch.
"""
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common import TokenizerContract
from flexar.cli.convert import main as convert_main
from flexar.convert import Weights, convert
from flexar.convert import titok as titok_format
from flexar.hub import load_model
from flexar.tokenizers import TiTok
from flexar.tokenizers.titok_official import ViT

# a tiny model of the released layout: 16 px RGB, 4 x 4 patches (a 4 x 4 grid), 6 latent tokens (not the width, so
# the legacy reshape really mixes tokens), 64 codes of 8 dims, 48 proxy codes of 32 dims and a 3-level pixel
# decoder (2 ** 2 = patch size) whose middle level changes the channel count (the official shortcut quirk)
TINY = dict(image_size=16, patch_size=4, num_latent_tokens=6, width=32, depth=2, num_heads=2, codebook_size=64,
            code_dim=8, proxy_codebook_size=48, proxy_code_dim=32, pixel_decoder_channels=32,
            pixel_decoder_channel_mult=[1, 1, 2], pixel_decoder_res_blocks=2)

# Parameters of the released tokenizers, counted from the official model (bytedance/1d-tokenizer modeling/titok.py
# TiTok built with configs/infer/TiTok/titok_{l32,b64,s128}.yaml: encoder, latent tokens, 4096 x 12 codebook,
# decoder with its proxy-code head, MaskGIT-VQGAN codebook and pixel decoder). The TiTok paper's tables give the
# generators' sizes, not the tokenizers'; these are the 641.05M / 204.81M / 83.67M of tests/test_tokenizer_presets.py.
OFFICIAL_PARAMETERS = {"titok-l-32": 641_054_735, "titok-b-64": 204_814_095, "titok-s-128": 83_674_639}


def tiny_kwargs(**overrides):
    return {**TINY, **overrides}


# -- the official checkpoint layout ------------------------------------------------------------------------------------
def residual_block_shapes(prefix, in_channels, out_channels):
    shapes = {f"{prefix}.norm1.weight": (in_channels,), f"{prefix}.norm1.bias": (in_channels,),
              f"{prefix}.conv1.weight": (out_channels, in_channels, 3, 3),
              f"{prefix}.norm2.weight": (out_channels,), f"{prefix}.norm2.bias": (out_channels,),
              f"{prefix}.conv2.weight": (out_channels, out_channels, 3, 3)}
    if in_channels != out_channels:
        shapes[f"{prefix}.nin_shortcut.weight"] = (out_channels, out_channels, 1, 1)
    return shapes


def vit_shapes(prefix, width, depth):
    shapes = {f"{prefix}.ln_pre.weight": (width,), f"{prefix}.ln_pre.bias": (width,)}
    for index in range(depth):
        name = f"{prefix}.transformer.{index}"
        shapes.update({f"{name}.ln_1.weight": (width,), f"{name}.ln_1.bias": (width,),
                       f"{name}.attn.in_proj_weight": (3 * width, width), f"{name}.attn.in_proj_bias": (3 * width,),
                       f"{name}.attn.out_proj.weight": (width, width), f"{name}.attn.out_proj.bias": (width,),
                       f"{name}.ln_2.weight": (width,), f"{name}.ln_2.bias": (width,),
                       f"{name}.mlp.c_fc.weight": (4 * width, width), f"{name}.mlp.c_fc.bias": (4 * width,),
                       f"{name}.mlp.c_proj.weight": (width, 4 * width), f"{name}.mlp.c_proj.bias": (width,)})
    shapes.update({f"{prefix}.ln_post.weight": (width,), f"{prefix}.ln_post.bias": (width,)})
    return shapes


def official_shapes(image_size, patch_size, num_latent_tokens, width, depth, codebook_size, code_dim,
                    proxy_codebook_size, proxy_code_dim, pixel_decoder_channels, pixel_decoder_channel_mult,
                    pixel_decoder_res_blocks, **_):
    """{official key: shape} of a released (stage-2, legacy) TiTok state dict."""
    patches, tokens = (image_size // patch_size) ** 2, num_latent_tokens
    shapes = {"latent_tokens": (tokens, width),
              "encoder.class_embedding": (1, width), "encoder.positional_embedding": (patches + 1, width),
              "encoder.latent_token_positional_embedding": (tokens, width),
              "encoder.patch_embed.weight": (width, 3, patch_size, patch_size), "encoder.patch_embed.bias": (width,)}
    shapes.update(vit_shapes("encoder", width, depth))
    shapes.update({"encoder.conv_out.weight": (code_dim, width, 1, 1), "encoder.conv_out.bias": (code_dim,),
                   "decoder.class_embedding": (1, width), "decoder.positional_embedding": (patches + 1, width),
                   "decoder.mask_token": (1, 1, width), "decoder.latent_token_positional_embedding": (tokens, width),
                   "decoder.decoder_embed.weight": (width, code_dim), "decoder.decoder_embed.bias": (width,)})
    shapes.update(vit_shapes("decoder", width, depth))
    shapes.update({"decoder.ffn.0.weight": (2 * width, width, 1, 1), "decoder.ffn.0.bias": (2 * width,),
                   "decoder.ffn.2.weight": (proxy_codebook_size, 2 * width, 1, 1),
                   "decoder.ffn.2.bias": (proxy_codebook_size,),
                   "quantize.embedding.weight": (codebook_size, code_dim),
                   "pixel_quantize.embedding.weight": (proxy_codebook_size, proxy_code_dim)})
    widths = [pixel_decoder_channels * multiplier for multiplier in pixel_decoder_channel_mult]
    shapes.update({"pixel_decoder.conv_in.weight": (widths[-1], proxy_code_dim, 3, 3),
                   "pixel_decoder.conv_in.bias": (widths[-1],)})
    for index in range(pixel_decoder_res_blocks):
        shapes.update(residual_block_shapes(f"pixel_decoder.mid.{index}", widths[-1], widths[-1]))
    for level, out_channels in enumerate(widths):
        in_channels = widths[min(level + 1, len(widths) - 1)]
        for index in range(pixel_decoder_res_blocks):
            shapes.update(residual_block_shapes(f"pixel_decoder.up.{level}.block.{index}",
                                                in_channels if index == 0 else out_channels, out_channels))
        if level > 0:
            shapes.update({f"pixel_decoder.up.{level}.upsample_conv.weight": (out_channels, out_channels, 3, 3),
                           f"pixel_decoder.up.{level}.upsample_conv.bias": (out_channels,)})
    shapes.update({"pixel_decoder.norm_out.weight": (widths[0],), "pixel_decoder.norm_out.bias": (widths[0],),
                   "pixel_decoder.conv_out.weight": (3, widths[0], 3, 3), "pixel_decoder.conv_out.bias": (3,)})
    return shapes


def official_state_dict(seed=0, **kwargs):
    """Random weights of the official shapes: norm scales near 1, small biases, fan-in scaled matrices, and a last
    convolution that puts the images around [0, 1] as a trained pixel decoder does."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(**tiny_kwargs(**kwargs)).items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) > 1:
            state[key] = noise / torch.tensor(shape[1:]).prod().float().sqrt()
        elif key.endswith(".weight"):  # LayerNorm / GroupNorm scales
            state[key] = 1 + 0.1 * noise
        else:
            state[key] = 0.1 * noise
    state["pixel_decoder.conv_out.weight"] *= 0.25
    state["pixel_decoder.conv_out.bias"] += 0.5
    return state


# -- the reference forward, from the official equations ----------------------------------------------------------------
def layer_norm(state, prefix, x):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)


def residual_attention_block(state, prefix, x, heads):
    """open_clip's ResidualAttentionBlock on (B, L, W): nn.MultiheadAttention with in_proj rows [q; k; v]."""
    batch, length, width = x.shape
    h = layer_norm(state, f"{prefix}.ln_1", x)
    qkv = h @ state[f"{prefix}.attn.in_proj_weight"].t() + state[f"{prefix}.attn.in_proj_bias"]
    q, k, v = (part.reshape(batch, length, heads, -1).transpose(1, 2) for part in qkv.chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + attended @ state[f"{prefix}.attn.out_proj.weight"].t() + state[f"{prefix}.attn.out_proj.bias"]
    h = layer_norm(state, f"{prefix}.ln_2", x)
    h = F.gelu(h @ state[f"{prefix}.mlp.c_fc.weight"].t() + state[f"{prefix}.mlp.c_fc.bias"])
    return x + h @ state[f"{prefix}.mlp.c_proj.weight"].t() + state[f"{prefix}.mlp.c_proj.bias"]


def run_transformer(state, prefix, x, depth, heads):
    x = layer_norm(state, f"{prefix}.ln_pre", x)
    for index in range(depth):
        x = residual_attention_block(state, f"{prefix}.transformer.{index}", x, heads)
    return x


def reference_encode(state, pixels, depth, heads):
    """TiTokEncoder + VectorQuantizer(use_l2_norm=True): pixels (B, 3, H, W) in [0, 1] -> latents (B, K, D) (before
    normalisation) and ids (B, K)."""
    batch = pixels.shape[0]
    patch = state["encoder.patch_embed.weight"].shape[-1]
    x = F.conv2d(pixels, state["encoder.patch_embed.weight"], state["encoder.patch_embed.bias"], stride=patch)
    width = x.shape[1]
    x = x.reshape(batch, width, -1).permute(0, 2, 1)
    x = torch.cat([state["encoder.class_embedding"].expand(batch, -1, -1), x], dim=1)
    x = x + state["encoder.positional_embedding"]
    latents = state["latent_tokens"] + state["encoder.latent_token_positional_embedding"]
    tokens = latents.shape[0]
    x = torch.cat([x, latents.expand(batch, -1, -1)], dim=1)
    x = run_transformer(state, "encoder", x, depth, heads)
    latents = layer_norm(state, "encoder.ln_post", x[:, x.shape[1] - tokens :])
    # is_legacy: the (B, K, W) latents are reshaped (not transposed) to (B, W, K, 1) before the 1x1 conv_out
    z = F.conv2d(latents.reshape(batch, width, tokens, 1), state["encoder.conv_out.weight"],
                 state["encoder.conv_out.bias"])
    z = z.reshape(batch, -1, 1, tokens).permute(0, 2, 3, 1).reshape(batch, tokens, -1)  # b c h w -> b (h w) c
    flat = F.normalize(z.reshape(batch * tokens, -1), dim=-1)
    codebook = F.normalize(state["quantize.embedding.weight"], dim=-1)
    distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    return z, distances.argmin(dim=1).reshape(batch, tokens)


def reference_residual_block(state, prefix, x):
    h = F.conv2d(F.silu(F.group_norm(x, 32, state[f"{prefix}.norm1.weight"], state[f"{prefix}.norm1.bias"], 1e-6)),
                 state[f"{prefix}.conv1.weight"], padding=1)
    h = F.conv2d(F.silu(F.group_norm(h, 32, state[f"{prefix}.norm2.weight"], state[f"{prefix}.norm2.bias"], 1e-6)),
                 state[f"{prefix}.conv2.weight"], padding=1)
    if f"{prefix}.nin_shortcut.weight" in state:  # the official block: the shortcut of its own output
        return h + F.conv2d(h, state[f"{prefix}.nin_shortcut.weight"])
    return h + x


def reference_pixel_decoder(state, codes, levels, res_blocks):
    """MaskGIT-VQGAN Decoder: codes (B, 256, h, w) -> images (B, 3, H, W) in [0, 1] (unclamped)."""
    x = F.conv2d(codes, state["pixel_decoder.conv_in.weight"], state["pixel_decoder.conv_in.bias"], padding=1)
    for index in range(res_blocks):
        x = reference_residual_block(state, f"pixel_decoder.mid.{index}", x)
    for level in reversed(range(levels)):
        for index in range(res_blocks):
            x = reference_residual_block(state, f"pixel_decoder.up.{level}.block.{index}", x)
        if level > 0:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = F.conv2d(x, state[f"pixel_decoder.up.{level}.upsample_conv.weight"],
                         state[f"pixel_decoder.up.{level}.upsample_conv.bias"], padding=1)
    x = F.silu(F.group_norm(x, 32, state["pixel_decoder.norm_out.weight"], state["pixel_decoder.norm_out.bias"], 1e-6))
    return F.conv2d(x, state["pixel_decoder.conv_out.weight"], state["pixel_decoder.conv_out.bias"], padding=1)


def reference_decode(state, ids, depth, heads, levels, res_blocks):
    """TiTok.decode_tokens: ids (B, K) -> images (B, 3, H, W) in [0, 1] (unclamped)."""
    batch, tokens = ids.shape
    codes = F.normalize(state["quantize.embedding.weight"][ids], dim=-1)
    x = codes @ state["decoder.decoder_embed.weight"].t() + state["decoder.decoder_embed.bias"]
    patches = state["decoder.positional_embedding"].shape[0] - 1
    masks = state["decoder.mask_token"].repeat(batch, patches, 1)
    masks = torch.cat([state["decoder.class_embedding"].expand(batch, -1, -1), masks], dim=1)
    masks = masks + state["decoder.positional_embedding"]
    x = x + state["decoder.latent_token_positional_embedding"][:tokens]
    x = run_transformer(state, "decoder", torch.cat([masks, x], dim=1), depth, heads)
    x = layer_norm(state, "decoder.ln_post", x[:, 1 : 1 + patches])
    grid = int(patches ** 0.5)
    x = x.permute(0, 2, 1).reshape(batch, -1, grid, grid)
    x = torch.tanh(F.conv2d(x, state["decoder.ffn.0.weight"], state["decoder.ffn.0.bias"]))
    logits = F.conv2d(x, state["decoder.ffn.2.weight"], state["decoder.ffn.2.bias"])
    soft = torch.einsum("nchw,cd->ndhw", logits.softmax(1), state["pixel_quantize.embedding.weight"])
    return reference_pixel_decoder(state, soft, levels, res_blocks)


def reference(state, pixels):
    z, ids = reference_encode(state, pixels, TINY["depth"], TINY["num_heads"])
    images = reference_decode(state, ids, TINY["depth"], TINY["num_heads"], len(TINY["pixel_decoder_channel_mult"]),
                              TINY["pixel_decoder_res_blocks"])
    return z, ids, images


def official_pixels(seed=3, batch=3):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def check_against_reference(model, state, pixels):
    """The converted model's latents, ids and images (flexar's [-1, 1]) against the reference (in [0, 1]); returns
    the largest image difference."""
    z, ids, images = reference(state, pixels)
    images = 2 * images - 1
    x = 2 * pixels - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latents(x), z, atol=1e-5, rtol=1e-5)
        encoded = model.encode(x)
        assert torch.equal(encoded.ids, ids)
        decoded = model.decode_codes(model.quantizer.ids_to_codes(ids))
        torch.testing.assert_close(decoded, images, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(ids), images.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    return float((decoded - images).abs().max())


# -- exactness ---------------------------------------------------------------------------------------------------------
def test_a_converted_checkpoint_gives_the_official_ids_and_images(tmp_path):
    state = official_state_dict()
    # fun-research/TiTok's tokenizer_titok_*.bin is the torch.save of the state dict; the Hugging Face repositories
    # hold the same tensors as model.safetensors (PyTorchModelHubMixin)
    torch.save(state, tmp_path / "tokenizer_titok_tiny.bin")
    save_file(state, str(tmp_path / "model.safetensors"))
    pixels = official_pixels()
    for source in (tmp_path / "tokenizer_titok_tiny.bin", tmp_path / "model.safetensors"):
        model = convert("titok", source, "titok-s-128", **TINY)
        assert type(model) is TiTok and isinstance(model.encoder, ViT) and not model.training
        difference = check_against_reference(model, state, pixels)
        assert difference < 1e-5
    # the images really depend on the pixel decoder and on every token (no part of the check is vacuous)
    z, ids, _ = reference(state, pixels)
    assert ids.unique().numel() > 3
    with torch.no_grad():
        other = ids.clone()
        other[:, -1] = (other[:, -1] + 1) % TINY["codebook_size"]
        assert not torch.allclose(model.decode(other), model.decode(ids), atol=1e-4)


def test_in_float64_the_converted_model_is_the_official_forward_up_to_rounding():
    """float32 leaves ~1e-6 of rounding that the random pixel decoder amplifies (the attention sums run in another
    order); in float64 the same comparison closes to 1e-10, so the remaining float32 difference is rounding."""
    wide = {key: value.double() for key, value in official_state_dict().items()}
    model = titok_format.build("titok-s-128", **TINY).double()
    titok_format.load(model, Weights(wide))  # the folds of the pixel range are computed in float64 too
    model.eval()
    pixels = official_pixels().double()
    z, ids = reference_encode(wide, pixels, TINY["depth"], TINY["num_heads"])
    images = reference_decode(wide, ids, TINY["depth"], TINY["num_heads"], len(TINY["pixel_decoder_channel_mult"]),
                              TINY["pixel_decoder_res_blocks"])
    codes = F.normalize(wide["quantize.embedding.weight"][ids], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latents(2 * pixels - 1), z, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(model.decode_codes(codes), 2 * images - 1, atol=1e-10, rtol=1e-10)


def test_the_conversion_does_not_depend_on_the_global_rng():
    state = official_state_dict()
    torch.manual_seed(1)
    first = convert("titok", state, "titok-s-128", **TINY).state_dict()
    torch.manual_seed(2)
    second = convert("titok", state, "titok-s-128", **TINY).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert not first["pad_token"].any()


# -- key coverage and refusals -----------------------------------------------------------------------------------------
def test_every_official_key_is_consumed():
    state = official_state_dict()
    model = titok_format.build("titok-s-128", **TINY)
    weights = Weights(state, "tiny")
    titok_format.load(model, weights)
    weights.finish()
    assert weights.taken == set(state) and not weights.ignored
    # every parameter of the flexar model but its own padding embedding comes from the checkpoint
    names = {name for name, _ in model.named_parameters()}
    # one fewer (the encoder's latent position table is summed into the latent tokens), one more (pad_token)
    assert "pad_token" in names and len(names) == len(state)


def test_renamed_extra_missing_and_mis_shaped_keys_are_refused():
    state = official_state_dict()
    renamed = dict(state)
    renamed["decoder.ffn.2.weights"] = renamed.pop("decoder.ffn.2.weight")
    with pytest.raises(KeyError, match="no key 'decoder.ffn.2.weight' \\(missing key\\)"):
        convert("titok", renamed, "titok-s-128", **TINY)
    with pytest.raises(ValueError, match="unexpected key\\(s\\) the converter does not know: 'pixel_encoder.conv_in'"):
        convert("titok", {**state, "pixel_encoder.conv_in": torch.zeros(1)}, "titok-s-128", **TINY)
    missing = {key: value for key, value in state.items() if key != "pixel_decoder.up.1.block.0.nin_shortcut.weight"}
    with pytest.raises(KeyError, match="'pixel_decoder.up.1.block.0.nin_shortcut.weight' \\(missing key\\)"):
        convert("titok", missing, "titok-s-128", **TINY)
    with pytest.raises(ValueError, match="'latent_tokens' of the state dict has shape \\(6, 32\\), the model expects "
                                         "\\(8, 32\\)"):
        convert("titok", state, "titok-s-128", **tiny_kwargs(num_latent_tokens=8))
    deeper = official_state_dict(depth=3)
    with pytest.raises(ValueError, match="more encoder blocks than the preset's 2"):
        convert("titok", deeper, "titok-s-128", **TINY)


def test_unsupported_variants_are_refused_by_name(tmp_path):
    state = official_state_dict()
    stage1 = {key: value for key, value in state.items() if not key.startswith(("pixel_", "decoder.ffn"))}
    with pytest.raises(ValueError, match="stage-1 TiTok \\(finetune_decoder: False\\)"):
        convert("titok", stage1, "titok-s-128", **TINY)
    with pytest.raises(ValueError, match="non-legacy TiTok \\(is_legacy: False"):
        convert("titok", {**state, "decoder.conv_out.weight": torch.zeros(3, 3, 3, 3)}, "titok-s-128", **TINY)
    vae = {key: value for key, value in state.items() if key != "quantize.embedding.weight"}
    with pytest.raises(ValueError, match="VAE TiTok"):
        convert("titok", vae, "titok-s-128", **TINY)
    with pytest.raises(ValueError, match="overrides must keep class_token, official_blocks"):
        convert("titok", state, "titok-s-128", **tiny_kwargs(official_blocks=False))


class Payload:
    """Unpickling this calls print: what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return print, ("this ran while unpickling",)


def test_a_malicious_pickle_is_refused_and_never_run(tmp_path, capsys):
    path = tmp_path / "tokenizer_titok_l32.bin"
    with open(path, "wb") as file:
        pickle.dump({"latent_tokens": Payload()}, file, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert("titok", path, "titok-l-32")
    assert "this ran" not in capsys.readouterr().out


# -- the official sizes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(titok_format.PRESETS))
def test_official_sizes_on_the_meta_device(preset):
    arguments = titok_format.PRESETS[preset]
    shapes = official_shapes(**arguments)
    # the shape table written here counts exactly the official model's parameters
    assert sum(torch.Size(shape).numel() for shape in shapes.values()) == OFFICIAL_PARAMETERS[preset]
    with torch.device("meta"):
        model = titok_format.build(preset)
        state = {key: torch.empty(shape) for key, shape in shapes.items()}
    weights = Weights(state, preset)
    titok_format.load(model, weights)
    weights.finish()
    assert weights.taken == set(state)
    # flexar sums the encoder's latent position table into its latent tokens (K x W fewer) and each class token's
    # position into the class token (2 W fewer), and has its own padding embedding (W more)
    tokens, width = arguments["num_latent_tokens"], arguments["width"]
    count = sum(parameter.numel() for parameter in model.parameters())
    assert count == OFFICIAL_PARAMETERS[preset] - tokens * width - width
    assert (model.max_tokens, model.codebook_size, model.image_size) == (tokens, 4096, 256)


# -- the command, and the folder it writes -----------------------------------------------------------------------------
def test_flexar_convert_writes_a_folder_that_loads_back_to_the_same_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(titok_format.PRESETS, "titok-tiny", dict(titok_format.PRESETS["titok-s-128"], **TINY))
    state = official_state_dict()
    torch.save(state, tmp_path / "tokenizer_titok_tiny.bin")
    assert convert_main(["titok", str(tmp_path / "tokenizer_titok_tiny.bin"), str(tmp_path / "out"),
                         "--preset", "titok-tiny"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["class"] == "TiTok" and printed["preset"] == "titok-tiny"
    loaded = load_model(tmp_path / "out")
    assert isinstance(loaded, TiTok) and printed["parameters"] == sum(p.numel() for p in loaded.parameters())
    check_against_reference(loaded, state, official_pixels())


# -- the switches on TiTok ---------------------------------------------------------------------------------------------
class TestTiTokReleasedLayout(TokenizerContract):
    """The released layout, at the contract's 16 px grayscale size."""

    def make_tokenizer(self):
        return titok_format.build("titok-s-128", **tiny_kwargs(channels=1, codebook_size=32))


def test_switches_default_to_the_previous_behaviour(tmp_path):
    plain = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=32, depth=1, num_heads=2)
    assert type(plain.to_code) is torch.nn.Linear and plain.proxy_decoder is None and plain.to_pixels is not None
    assert plain.encoder.final_norm.eps == 1e-6 and type(plain.encoder).__name__ == "Transformer"
    assert plain.last_layer() is plain.to_pixels.weight
    released = titok_format.build("titok-s-128", **TINY)
    # the adaptive GAN weight of a criterion is taken at the layer that writes the image: the pixel decoder's last
    assert released.last_layer() is released.proxy_decoder.pixel_decoder.conv_out.weight and released.to_pixels is None
    # a folder saved before the switches existed (no such keys in its config) loads unchanged
    plain.eval().save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    switches = ("norm_eps", "official_blocks", "legacy_latent_reshape", "decoder_head", "proxy_codebook_size",
                "proxy_code_dim", "pixel_decoder_channels", "pixel_decoder_channel_mult", "pixel_decoder_res_blocks")
    arguments = config["kwargs"]
    for name in switches:
        assert name in arguments, (name, sorted(arguments))
        arguments.pop(name)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path / "old")
    ids = torch.randint(0, plain.codebook_size, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(ids), plain.decode(ids))


def test_switches_refuse_inconsistent_arguments():
    with pytest.raises(ValueError, match="decoder_head must be one of \\('patches', 'proxy-codes'\\), got 'pixels'"):
        TiTok(decoder_head="pixels")
    with pytest.raises(ValueError, match="official_blocks=True are LayerNorm \\+ GELU blocks"):
        TiTok(official_blocks=True, mlp="swiglu")
    with pytest.raises(ValueError, match="= 4, which must equal patch_size 8"):
        TiTok(**tiny_kwargs(patch_size=8, decoder_head="proxy-codes"))
    with pytest.raises(ValueError, match="multiples of 32"):
        TiTok(**tiny_kwargs(decoder_head="proxy-codes", pixel_decoder_channels=16))
