"""``llamagen-gpt``: LlamaGen's class-conditional GPT into :class:`~flexar.generators.RasterAR`.

Source: "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (Sun et al. 2024),
FoundationVision/LlamaGen ``autoregressive/models/gpt.py`` (``Transformer``, ``GPT_models``) and
``autoregressive/models/generate.py``. The released ``c2i_*.pt`` files hold ``{"model": state_dict}`` (DDP training,
``train_c2i.py``); the FSDP ones (XXL, 3B: the README's ``--from-fsdp``) are the state dict itself.
``sample_c2i.py`` also reads ``"module"`` (DeepSpeed) and ``"state_dict"``, and so does this converter, in that
order.

Presets are the official sizes (``GPT_models``: B, L, XL, XXL, 3B) in LlamaGen's ImageNet setting: VQ-16 codes
(vocabulary 16384), 1000 classes plus the null class of guidance, one class token (``cls_token_num=1``). The
``gpt-*`` presets are the 256 px models (a 16 x 16 grid, ``c2i_B_256.pt``, ``c2i_L_256.pt``), the ``gpt-*-384``
presets the 384 px ones (24 x 24: ``c2i_B_384.pt`` ... ``c2i_3B_384.pt``; XL, XXL and 3B were released at 384 px
only). The weights do not record the grid (LlamaGen's rotary table is recomputed, never saved), so the preset, or the
``image_size`` / ``downsample_size`` overrides of :func:`build` (LlamaGen's ``--image-size`` / ``--downsample-size``),
must name the resolution the checkpoint was trained at.

Key map (official -> RasterAR), every tensor copied unchanged except the SwiGLU gate:

- ``tok_embeddings.weight`` -> ``token_embed.weight``; ``cls_embedding.embedding_table.weight`` (num_classes + 1
  rows, the last the null class, LlamaGen's ``num_classes`` index) -> ``class_embed.weight`` (flexar's
  ``null_class`` is ``num_classes`` too);
- ``layers.{i}.attention.wqkv.weight`` -> ``transformer.blocks.{i}.attn.qkv.weight``: both split the fused output
  as [q; k; v], each (heads, head_dim) head-major, and both rotate consecutive pairs (x[2j], x[2j + 1]) of a head,
  LlamaGen as the complex pairs of ``apply_rotary_emb``, flexar in ``apply_rotary``, with the same 2D table (the
  first half of the pairs by the grid row, the second by the column, frequencies ``base ** (-2j / (head_dim / 2))``),
  so no row needs permuting;
- ``layers.{i}.attention.wo.weight`` -> ``attn.proj.weight``; ``attention_norm`` / ``ffn_norm`` -> ``norm1`` /
  ``norm2``;
- ``layers.{i}.feed_forward.w1`` (gate, through SiLU) and ``w3`` (up) -> ``mlp.gate_up.weight`` = [w1; w3];
  ``w2`` -> ``mlp.down.weight``;
- ``norm.weight`` -> ``transformer.final_norm.weight``; ``output.weight`` -> ``head.weight``.

LlamaGen's forward is reproduced by RasterAR's switches: ``class_token_rotary="zero"`` (its rotary table starts with
zero rows for the class token, cos 0 and sin 0, which zero that token's query and key in every layer),
``norm_eps=1e-5``, ``mlp_multiple_of=256`` (``find_multiple``), ``zero_init_head=True`` (only the initialisation) and
``cfg_interval`` (its ``generate`` argument; -1, off, by default as in ``sample_c2i.py``).

Differences from the official code:

- dropout (token, residual, FFN; 0.1 each in training) and drop path are absent: they are the identity at inference,
  where converted models are used; fine-tuning a converted model trains without them.
- the rotary frequencies are computed in float64 and rounded to float32 (LlamaGen: float32 throughout), which moves
  the cos / sin tables by float32 rounding only (2e-7 at 24 x 24; the logits stay within 1e-5 of the official
  ones, tests/test_convert_llamagen_gpt.py).
- LlamaGen keeps its rotary table in float32 under bf16 inference (a plain attribute, not a buffer); flexar's
  frequencies are a buffer, cast with the model.
- the KV cache holds exactly the positions decoded (LlamaGen rounds it up to a multiple of 8 and masks the rest).
- ``cfg_interval`` is honoured by ``RasterAR.generate``; the decoding strategies guide every token.
- only ``n_kv_head = n_head`` (every official size) and ``cls_token_num = 1`` (class-conditional) are converted; a
  text-conditional (t2i) checkpoint is refused: it has no ``cls_embedding.embedding_table``.

A training checkpoint of ``train_c2i.py`` also pickles its ``argparse.Namespace`` (``"args"``), which the safe reader
(``torch.load(weights_only=True)``) refuses; save its ``"model"`` (or ``"ema"``) entry alone, from a file you trust,
and convert that.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..generators.raster import LLAMAGEN_C2I, RasterAR
from . import Weights

# GPT_models of gpt.py: (dim, n_layer, n_head), with LlamaGen's parameter counts (its comments and the paper's
# Table 1)
SIZES = {
    "gpt-b": (768, 12, 12),  # 111M
    "gpt-l": (1024, 24, 16),  # 343M
    "gpt-xl": (1280, 36, 20),  # 775M
    "gpt-xxl": (1536, 48, 24),  # 1.4B
    "gpt-3b": (3200, 24, 32),  # 3.1B
}
# the LlamaGen forward (see the module docstring); sizes from LLAMAGEN_C2I: vocabulary 16384, 1000 classes, a 16 x 16
# grid, class dropout 0.1, SwiGLU widths rounded to 256, eps 1e-5
LLAMAGEN_FORWARD = dict(LLAMAGEN_C2I, class_token_rotary="zero", zero_init_head=True, cfg_interval=-1)


def grid_setting(image_size: int, downsample_size: int = 16) -> dict:
    """RasterAR's token layout for LlamaGen images of `image_size` px through a VQ of stride `downsample_size`."""
    if image_size % downsample_size:
        raise ValueError(f"image_size {image_size} is not a multiple of downsample_size {downsample_size}")
    side = image_size // downsample_size
    return dict(max_tokens=side * side, grid=[side, side])


PRESETS: dict[str, dict] = {
    **{name: dict(LLAMAGEN_FORWARD, dim=dim, depth=depth, num_heads=heads)
       for name, (dim, depth, heads) in SIZES.items()},
    **{f"{name}-384": dict(LLAMAGEN_FORWARD, dim=dim, depth=depth, num_heads=heads, **grid_setting(384))
       for name, (dim, depth, heads) in SIZES.items()},
}
CHECKPOINT_KEYS = ("model", "module", "state_dict")


def build(preset: str, image_size: int | None = None, downsample_size: int = 16, **overrides) -> RasterAR:
    """The RasterAR of LlamaGen's size `preset`. ``image_size`` (256, 384, 512 ...) with ``downsample_size`` (16 for
    VQ-16, 8 for VQ-8) sets the token grid (image_size / downsample_size squared), as LlamaGen's sampling flags do;
    other `overrides` are RasterAR arguments (``vocab_size``, ``num_classes``, ``cfg_interval`` ...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown llamagen-gpt preset {preset!r}; known: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    if image_size is not None:
        kwargs.update(grid_setting(image_size, downsample_size))
    kwargs.update(overrides)
    return RasterAR(**kwargs)


def load(model: nn.Module, weights: Weights) -> None:
    """Copy LlamaGen's ``Transformer`` state dict into `model` (a RasterAR built by :func:`build`)."""
    if not isinstance(model, RasterAR):
        raise TypeError(f"llamagen-gpt converts into a RasterAR, got {type(model).__name__}")
    if model.eos_token or not isinstance(model.transformer.blocks[0].attn.q_norm, nn.Identity):
        raise ValueError("llamagen-gpt needs a RasterAR with eos_token=False and qk_norm=False (LlamaGen has neither)")
    if model.class_token_rotary != "zero":
        raise ValueError("llamagen-gpt needs class_token_rotary='zero': LlamaGen's rotary table zeroes the class token")
    layers = {int(match.group(1)) for key in weights.keys("layers.") if (match := re.match(r"layers\.(\d+)\.", key))}
    depth = len(model.transformer.blocks)
    if layers and max(layers) + 1 != depth:
        fitting = [name for name, (_, n_layer, _) in SIZES.items() if n_layer == max(layers) + 1]
        raise ValueError(f"{weights.source} has {max(layers) + 1} layers, the model {depth}; choose a preset of that "
                         f"depth ({', '.join(fitting) or 'none of the official sizes'})")

    weights.copy("tok_embeddings.weight", model.token_embed.weight)
    weights.copy("cls_embedding.embedding_table.weight", model.class_embed.weight)
    for index, block in enumerate(model.transformer.blocks):
        prefix = f"layers.{index}."
        weights.copy(prefix + "attention_norm.weight", block.norm1.weight)
        weights.copy(prefix + "attention.wqkv.weight", block.attn.qkv.weight)
        weights.copy(prefix + "attention.wo.weight", block.attn.proj.weight)
        weights.copy(prefix + "ffn_norm.weight", block.norm2.weight)
        hidden = block.mlp.down.in_features
        gate = weights.take(prefix + "feed_forward.w1.weight", (hidden, model.dim))
        up = weights.take(prefix + "feed_forward.w3.weight", (hidden, model.dim))
        with torch.no_grad():
            # SwiGLU's gate_up chunks [gate; up]: LlamaGen's silu(w1 x) * w3 x
            block.mlp.gate_up.weight.copy_(torch.cat([gate, up]).to(block.mlp.gate_up.weight.dtype))
        weights.copy(prefix + "feed_forward.w2.weight", block.mlp.down.weight)
    weights.copy("norm.weight", model.transformer.final_norm.weight)
    weights.copy("output.weight", model.head.weight)
    # older or inference-time saves may carry LlamaGen's recomputed tables and decoding buffers
    weights.ignore(r"freqs_cis", "LlamaGen's rotary table, recomputed by RasterAR from the grid")
    weights.ignore(r"causal_mask", "LlamaGen's decoding mask, rebuilt by flexar's KV cache")
    weights.ignore(r"layers\.\d+\.attention\.kv_cache\.[kv]_cache", "LlamaGen's KV cache buffers (decoding state)")
