"""``llamagen-vq``: LlamaGen's image tokenizers VQ-16 and VQ-8 into :class:`~flexar.tokenizers.LlamaGenVQ`.

Source: "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (Sun et al. 2024),
FoundationVision/LlamaGen ``tokenizer/tokenizer_image/vq_model.py`` (``VQModel``, ``VQ_models``). ``vq_train.py``
saves ``{"model": ..., "optimizer": ..., "discriminator": ..., "optimizer_disc": ..., "steps": ..., "args": ...}``
plus ``"ema"`` when trained with EMA; the released ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` / ``vq_ds16_t2i.pt`` hold
``"model"``. The weights are read from ``"ema"``, ``"model"`` or ``"state_dict"``, the first present, the order of
the official loaders (``vq_demo.py``, ``reconstruction_vq_ddp.py``). A training checkpoint also pickles its
``argparse.Namespace`` (``"args"``), which ``torch.load(weights_only=True)`` refuses: such a file is refused, never
unpickled; ``torch.save({"model": checkpoint["model"]}, ...)`` in a trusted session gives a readable one.

Presets are the official sizes at 256 px (``VQ_16``, ``VQ_8`` with ``ModelArgs``' defaults); the released VQ-16
also serves LlamaGen's 384 px generators, built with ``build("vq-16", image_size=384)`` (a 24 x 24 grid).

Key map (official -> LlamaGenVQ; the encoder and decoder are diffusers' VAE blocks), every tensor copied unchanged
except the attention projections:

- ``encoder.conv_in`` / ``norm_out`` / ``conv_out`` -> ``encoder.conv_in`` / ``conv_norm_out`` / ``conv_out``, the
  same for the decoder;
- ``{coder}.conv_blocks.{i}.res.{j}.{norm1, conv1, norm2, conv2, nin_shortcut}`` ->
  ``encoder.down_blocks.{i}`` / ``decoder.up_blocks.{i}`` ``.resnets.{j}.{norm1, conv1, norm2, conv2,
  conv_shortcut}`` (the decoder's levels in the same order: the official ``conv_blocks`` of the decoder start at the
  lowest resolution, as diffusers' ``up_blocks`` do);
- ``{coder}.conv_blocks.{i}.attn.{j}.{norm, q, k, v, proj_out}`` -> ``.attentions.{j}.{group_norm, to_q, to_k, to_v,
  to_out.0}``: the 1x1 conv weights (C, C, 1, 1) become the linear weights (C, C);
- ``encoder.conv_blocks.{i}.downsample.conv`` -> ``encoder.down_blocks.{i}.downsamplers.0.conv``;
  ``decoder.conv_blocks.{i}.upsample.conv`` -> ``decoder.up_blocks.{i}.upsamplers.0.conv``;
- ``{coder}.mid.0`` / ``mid.1`` / ``mid.2`` -> ``mid_block.resnets.0`` / ``mid_block.attentions.0`` /
  ``mid_block.resnets.1``;
- ``quant_conv`` / ``post_quant_conv`` -> the same names; ``quantize.embedding.weight`` (the raw codebook, normalised
  in every lookup by both) -> ``quantizer.embedding.weight``;
- ``quantize.codebook_used`` (the ids of the last 65536 training lookups, for the usage log) is ignored.

Differences from the official forward are those of :class:`~flexar.tokenizers.LlamaGenVQ` (its module docstring):
the clamp of ``decode`` to [-1, 1], attention through ``scaled_dot_product_attention``, no entropy term or usage
window in the training loss. Images are in [-1, 1] on both sides, so the converted model reads and writes the
official range unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..tokenizers.llamagen_vq import LlamaGenVQ
from . import Weights

PRESETS = {name: dict(LlamaGenVQ.presets[name]) for name in ("vq-16", "vq-8")}
CHECKPOINT_KEYS = ("ema", "model", "state_dict")


def build(preset: str, **overrides) -> LlamaGenVQ:
    """The official size `preset` ("vq-16" or "vq-8") as a LlamaGenVQ, with constructor `overrides` (e.g.
    ``image_size=384``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown llamagen-vq preset {preset!r}; known: {', '.join(PRESETS)}")
    return LlamaGenVQ(**{**PRESETS[preset], **overrides})


def _copy_resnet(weights: Weights, key: str, block: nn.Module) -> None:
    """An official ``ResnetBlock`` at `key` into diffusers' ``ResnetBlock2D`` `block`."""
    for name in ("norm1", "conv1", "norm2", "conv2"):
        weights.copy_module(f"{key}.{name}.", getattr(block, name))
    if block.conv_shortcut is not None:  # the width changes: the official 1x1 ``nin_shortcut``
        weights.copy_module(f"{key}.nin_shortcut.", block.conv_shortcut)


def _copy_attention(weights: Weights, key: str, attention: nn.Module) -> None:
    """An official ``AttnBlock`` at `key` (1x1 convs) into diffusers' single-head ``Attention`` (linear layers)."""
    weights.copy_module(f"{key}.norm.", attention.group_norm)
    for official, linear in (("q", attention.to_q), ("k", attention.to_k), ("v", attention.to_v),
                             ("proj_out", attention.to_out[0])):
        out_features, in_features = linear.weight.shape
        kernel: Tensor = weights.take(f"{key}.{official}.weight", (out_features, in_features, 1, 1))
        with torch.no_grad():
            linear.weight.copy_(kernel.reshape(out_features, in_features).to(linear.weight.dtype))
        weights.copy(f"{key}.{official}.bias", linear.bias)


def _copy_level(weights: Weights, key: str, level: nn.Module, resample: str) -> None:
    """One official ``conv_blocks`` entry at `key` into a diffusers down / up block `level`; `resample` names the
    official resampling module ("downsample" or "upsample")."""
    for j, resnet in enumerate(level.resnets):
        _copy_resnet(weights, f"{key}.res.{j}", resnet)
    for j, attention in enumerate(getattr(level, "attentions", None) or ()):
        _copy_attention(weights, f"{key}.attn.{j}", attention)
    samplers = level.downsamplers if resample == "downsample" else level.upsamplers
    if samplers is not None:
        weights.copy_module(f"{key}.{resample}.conv.", samplers[0].conv)


def _copy_middle(weights: Weights, key: str, middle: nn.Module) -> None:
    """The official ``mid`` list (ResnetBlock, AttnBlock, ResnetBlock) into diffusers' ``UNetMidBlock2D``."""
    _copy_resnet(weights, f"{key}.0", middle.resnets[0])
    _copy_attention(weights, f"{key}.1", middle.attentions[0])
    _copy_resnet(weights, f"{key}.2", middle.resnets[1])


def load(model: LlamaGenVQ, weights: Weights) -> None:
    """Copy every tensor of an official VQModel state dict into `model` (see the module docstring's key map)."""
    encoder, decoder = model.encoder, model.decoder
    weights.copy_module("encoder.conv_in.", encoder.conv_in)
    for i, level in enumerate(encoder.down_blocks):
        _copy_level(weights, f"encoder.conv_blocks.{i}", level, "downsample")
    _copy_middle(weights, "encoder.mid", encoder.mid_block)
    weights.copy_module("encoder.norm_out.", encoder.conv_norm_out)
    weights.copy_module("encoder.conv_out.", encoder.conv_out)

    weights.copy_module("quant_conv.", model.quant_conv)
    weights.copy("quantize.embedding.weight", model.quantizer.embedding.weight)
    weights.ignore(r"quantize\.codebook_used", "the ids of LlamaGen's last 65536 training lookups, kept only to log "
                                               "codebook usage")
    weights.copy_module("post_quant_conv.", model.post_quant_conv)

    weights.copy_module("decoder.conv_in.", decoder.conv_in)
    _copy_middle(weights, "decoder.mid", decoder.mid_block)
    for i, level in enumerate(decoder.up_blocks):
        _copy_level(weights, f"decoder.conv_blocks.{i}", level, "upsample")
    weights.copy_module("decoder.norm_out.", decoder.conv_norm_out)
    weights.copy_module("decoder.conv_out.", decoder.conv_out)
