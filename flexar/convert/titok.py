"""``titok``: the released TiTok tokenizers (bytedance/1d-tokenizer, "An Image is Worth 32 Tokens for
Reconstruction and Generation", Yu et al., NeurIPS 2024) into :class:`flexar.tokenizers.TiTok`.

    flexar-convert titok tokenizer_titok_l32.bin runs/released/titok-l-32 --preset titok-l-32
    flexar-convert titok model.safetensors runs/released/titok-s-128 --preset titok-s-128

Sources: the Hugging Face repositories ``yucornetto/tokenizer_titok_{l32,b64,s128}_imagenet`` (``model.safetensors``,
written by ``PyTorchModelHubMixin``) or ``fun-research/TiTok`` (``tokenizer_titok_{l32,b64,s128}.bin``, the
``torch.save`` of the same state dict); both hold the state dict itself (``CHECKPOINT_KEYS = ()``). These are the
stage-2 models (``finetune_decoder: True`` in ``configs/infer/TiTok/titok_*.yaml``): besides the 1D encoder, the
4096 x 12 codebook and the token decoder, they hold the MaskGIT-VQGAN codebook (``pixel_quantize``, 1024 x 256)
and pixel decoder (``pixel_decoder``) that turn the decoder's proxy-code logits into pixels; every one of those
tensors is converted (``decoder_head="proxy-codes"``; :mod:`flexar.tokenizers.titok_official`).

The official forward (``modeling/titok.py`` TiTok.encode / decode_tokens, ``modeling/modules/blocks.py``
TiTokEncoder / TiTokDecoder, ``modeling/quantizer/quantizer.py`` VectorQuantizer with ``use_l2_norm``,
``modeling/modules/maskgit_vqgan.py`` Decoder) is reproduced up to float rounding; the differences of layout:

- images: the official model reads images in [0, 1] and decodes to [0, 1] (its demo clamps there); flexar's
  tokenizers use [-1, 1]. The conversion is folded into the weights: the patch embedding takes ``x = 2 u - 1``
  (weight / 2, bias + sum(weight) / 2) and the pixel decoder's last convolution writes ``2 y - 1`` (weight x 2,
  bias x 2 - 1), so ``encode`` / ``decode`` keep flexar's range and give the official ids and images.
- the encoder's patch convolution (kernel = stride = patch size) is the linear layer on flattened patches it equals
  (``F.unfold`` orders a patch's values as the convolution's weight does: channel, row, column).
- positions: the official class token and its position (row 0 of ``positional_embedding``) are summed into flexar's
  class token, which flexar places last in the sequence rather than first (full attention with learned positions:
  the order does not matter); the encoder's latent tokens and their ``latent_token_positional_embedding`` are summed
  into flexar's ``latent_tokens``; the decoder's mask token keeps its own table (rows 1.. of
  ``positional_embedding``).
- the encoder's 1x1 ``conv_out`` over the reshaped latents is ``TiTok(legacy_latent_reshape=True).to_code``; the
  decoder's proxy-code head ``ffn`` (1x1 convolutions) and the pixel decoder keep their convolutions.
- flexar's extras that the official model does not have: ``pad_token`` (the fill of ``decode(ids, lengths)`` for
  dropped positions) is set to zero, and the VQ's dead-code counters start at zero. The official decoder decodes
  full sequences of K tokens only; decoding fewer (``decode(ids, lengths, fill)``) is flexar's extension.

Not converted, with a message: the non-legacy TiTok layout (``is_legacy: False``, a decoder that predicts pixels
through its own ``conv_out``), stage-1 checkpoints (no pixel decoder: their decoder outputs proxy-code logits, not
images), and the VAE / TA-TiTok / MaskGen variants of the same repository.
"""
from __future__ import annotations

import torch
from torch import nn

from ..tokenizers import TiTok
from ..tokenizers.titok import PAPER_LAYOUT, VIT_SIZES
from ..tokenizers.titok_official import MASKGIT_VQGAN, LegacyLatentProjection, ViT
from . import Weights

# the switches that reproduce the released models' forward (flexar.tokenizers.titok and titok_official docstrings)
RELEASED_LAYOUT = dict(PAPER_LAYOUT, norm_eps=1e-5, official_blocks=True, legacy_latent_reshape=True,
                       decoder_head="proxy-codes", **MASKGIT_VQGAN)
PRESETS = {
    # configs/infer/TiTok/titok_{l32,b64,s128}.yaml: the encoder and the decoder are the same ViT size
    "titok-l-32": dict(RELEASED_LAYOUT, num_latent_tokens=32, **VIT_SIZES["large"]),
    "titok-b-64": dict(RELEASED_LAYOUT, num_latent_tokens=64, **VIT_SIZES["base"]),
    "titok-s-128": dict(RELEASED_LAYOUT, num_latent_tokens=128, **VIT_SIZES["small"]),
}
CHECKPOINT_KEYS: tuple[str, ...] = ()


def build(preset: str, **overrides) -> TiTok:
    """The flexar TiTok of the released size `preset` (its constructor arguments, each override replacing one)."""
    return TiTok(**{**PRESETS[preset], **overrides})


def load(model: TiTok, weights: Weights) -> None:
    """Copy every tensor of a released TiTok state dict into `model` (module docstring)."""
    refuse_other_layouts(model, weights)
    with torch.no_grad():
        load_encoder(model, weights)
        weights.copy("quantize.embedding.weight", model.quantizer.embedding.weight)
        load_decoder(model, weights)
        model.pad_token.zero_()


def refuse_other_layouts(model: TiTok, weights: Weights) -> None:
    """A ValueError naming the variant for the layouts this format does not convert."""
    released = (isinstance(model.to_code, LegacyLatentProjection) and isinstance(model.encoder, ViT)
                and model.proxy_decoder is not None and model.encoder_class_token is not None)
    if not released:
        raise ValueError("the titok format converts into TiTok with the released layout (its presets: "
                         f"{', '.join(PRESETS)}); overrides must keep class_token, official_blocks, "
                         "legacy_latent_reshape and decoder_head='proxy-codes'")
    if "decoder.conv_out.weight" in weights:
        raise ValueError(f"{weights.source} is a non-legacy TiTok (is_legacy: False; its decoder predicts pixels "
                         "through 'decoder.conv_out'): not supported, the titok format converts the released "
                         "legacy checkpoints (proxy codes + MaskGIT-VQGAN pixel decoder)")
    if "encoder.patch_embed.weight" in weights and "pixel_quantize.embedding.weight" not in weights:
        raise ValueError(f"{weights.source} has no 'pixel_quantize' / 'pixel_decoder' weights: a stage-1 TiTok "
                         "(finetune_decoder: False) decodes to proxy-code logits, not pixels, and is not supported; "
                         "convert the released stage-2 tokenizer")
    if "quantize.embedding.weight" not in weights:
        raise ValueError(f"{weights.source} has no 'quantize.embedding.weight': a VAE TiTok (quantize_mode: vae) is "
                         "not supported, the titok format converts the VQ tokenizers")


def load_encoder(model: TiTok, weights: Weights) -> None:
    width, patches = model.width, model.num_patches
    weight = weights.take("encoder.patch_embed.weight",
                          (width, model.channels, model.patch_size, model.patch_size)).flatten(1).double()
    bias = weights.take("encoder.patch_embed.bias", (width,)).double()
    # official pixels u in [0, 1] are flexar's x in [-1, 1] as u = (x + 1) / 2: W u + b = (W / 2) x + b + W 1 / 2
    model.patch_embed.weight.copy_(weight / 2)
    model.patch_embed.bias.copy_(bias + weight.sum(dim=1) / 2)
    class_token = weights.take("encoder.class_embedding", (1, width))
    positions = weights.take("encoder.positional_embedding", (patches + 1, width))
    model.encoder_class_token.copy_(class_token[0] + positions[0])
    model.patch_pos.copy_(positions[1:])
    latents = weights.take("latent_tokens", model.latent_tokens.shape)
    model.latent_tokens.copy_(latents + weights.take("encoder.latent_token_positional_embedding", latents.shape))
    weights.copy_module("encoder.ln_pre.", model.encoder_ln_pre)
    load_transformer(weights, "encoder", model.encoder)
    weights.copy("encoder.conv_out.weight", model.to_code.weight[..., None, None])
    weights.copy("encoder.conv_out.bias", model.to_code.bias)


def load_decoder(model: TiTok, weights: Weights) -> None:
    width, patches = model.decoder_width, model.num_patches
    weights.copy("decoder.decoder_embed.weight", model.from_code.weight)
    weights.copy("decoder.decoder_embed.bias", model.from_code.bias)
    class_token = weights.take("decoder.class_embedding", (1, width))
    positions = weights.take("decoder.positional_embedding", (patches + 1, width))
    model.decoder_class_token.copy_(class_token[0] + positions[0])
    model.mask_pos.copy_(positions[1:])
    model.mask_token.copy_(weights.take("decoder.mask_token", (1, 1, width))[0, 0])
    weights.copy("decoder.latent_token_positional_embedding", model.latent_pos)
    weights.copy_module("decoder.ln_pre.", model.decoder_ln_pre)
    load_transformer(weights, "decoder", model.decoder)
    head = model.proxy_decoder
    weights.copy_module("decoder.ffn.0.", head.head_in)
    weights.copy_module("decoder.ffn.2.", head.head_out)
    weights.copy("pixel_quantize.embedding.weight", head.codebook.weight)
    load_pixel_decoder(weights, "pixel_decoder", head.pixel_decoder)


def load_transformer(weights: Weights, prefix: str, transformer: nn.Module) -> None:
    """``{prefix}.transformer.{i}`` ResidualAttentionBlocks and ``{prefix}.ln_post`` into a titok_official.ViT."""
    for index, block in enumerate(transformer.blocks):
        name = f"{prefix}.transformer.{index}"
        weights.copy_module(f"{name}.ln_1.", block.norm1)
        weights.copy(f"{name}.attn.in_proj_weight", block.qkv.weight)
        weights.copy(f"{name}.attn.in_proj_bias", block.qkv.bias)
        weights.copy_module(f"{name}.attn.out_proj.", block.proj)
        weights.copy_module(f"{name}.ln_2.", block.norm2)
        weights.copy_module(f"{name}.mlp.c_fc.", block.mlp_up)
        weights.copy_module(f"{name}.mlp.c_proj.", block.mlp_down)
    extra = f"{prefix}.transformer.{len(transformer.blocks)}."
    if weights.keys(extra):
        raise ValueError(f"{weights.source} has more {prefix} blocks than the preset's {len(transformer.blocks)} "
                         f"(e.g. {weights.keys(extra)[0]!r}): another size, choose the matching preset")
    weights.copy_module(f"{prefix}.ln_post.", transformer.final_norm)


def load_pixel_decoder(weights: Weights, prefix: str, decoder: nn.Module) -> None:
    """The MaskGIT-VQGAN Decoder (``conv_in``, ``mid.{j}``, ``up.{i}.block.{j}`` / ``up.{i}.upsample_conv``,
    ``norm_out``, ``conv_out``) into a titok_official.MaskGITDecoder; its output is mapped from [0, 1] to [-1, 1]."""
    weights.copy_module(f"{prefix}.conv_in.", decoder.conv_in)
    for index, block in enumerate(decoder.mid):
        copy_residual_block(weights, f"{prefix}.mid.{index}", block)
    for level_index, level in enumerate(decoder.levels):
        for index, block in enumerate(level.blocks):
            copy_residual_block(weights, f"{prefix}.up.{level_index}.block.{index}", block)
        if level.upsample is not None:
            weights.copy_module(f"{prefix}.up.{level_index}.upsample_conv.", level.upsample)
    weights.copy_module(f"{prefix}.norm_out.", decoder.norm_out)
    weight = weights.take(f"{prefix}.conv_out.weight", decoder.conv_out.weight.shape)
    bias = weights.take(f"{prefix}.conv_out.bias", decoder.conv_out.bias.shape)
    # the official image y in [0, 1] is flexar's 2 y - 1
    decoder.conv_out.weight.copy_(2 * weight)
    decoder.conv_out.bias.copy_(2 * bias - 1)


def copy_residual_block(weights: Weights, prefix: str, block: nn.Module) -> None:
    weights.copy_module(f"{prefix}.norm1.", block.norm1)
    weights.copy(f"{prefix}.conv1.weight", block.conv1.weight)
    weights.copy_module(f"{prefix}.norm2.", block.norm2)
    weights.copy(f"{prefix}.conv2.weight", block.conv2.weight)
    if block.shortcut is not None:
        weights.copy(f"{prefix}.nin_shortcut.weight", block.shortcut.weight)
