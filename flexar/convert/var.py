"""``var``: VAR's multi-scale VQVAE and its VAR-d16 / d20 / d24 / d30 transformers (and MVAR's) into flexar.

Sources: "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction" (Tian et al., NeurIPS
2024), FoundationVision/VAR ``models/{vqvae,basic_vae,quant,var,basic_var}.py``; "MVAR: Visual Autoregressive
Modeling with Scale and Spatial Markovian Conditioning" (Zhang et al., ICLR 2026), CVL-UESTC/MVAR
``models/{mvar,basic_mvar}.py``.

The preset chooses what the file is (the keys are checked against it, and a file of the other kind is refused with
the preset to use):

- ``vqvae``: ``vae_ch160v4096z32.pth`` (a raw state dict) into :class:`~flexar.tokenizers.MultiScaleVQ` with
  ``architecture="var"`` (VAR's CNN: ch 160, ch_mult (1, 1, 2, 2, 4), 2 residual blocks, self-attention at 16 x 16
  and in the middle), 4096 codes of 32 dims with the squared-L2 lookup (``using_znorm=False``), 3x3 quant convs,
  four partially shared phi convolutions (ratio 0.5) and the scales 1, 2, 3, 4, 5, 6, 8, 10, 13, 16;
- ``var-d16`` ... ``var-d30``: ``var_d16.pth`` ... (raw state dicts) into :class:`~flexar.generators.VAR` with
  ``attention_bias=True``: depth d, width 64 d, d heads, 1000 classes, cosine attention (``attn_l2_norm``);
- ``mvar-d16``, ``mvar-d20``, ``mvar-d24``: MVAR's ``mvar-d16.pth`` / ``mvar-finetune-d*.pth`` (``{"mvar_wo_ddp":
  state_dict}``, the layout its ``run_mvar_evaluate.py`` reads) into :class:`~flexar.generators.MVAR`: VAR's
  network and keys, 7 x 7 neighbourhoods from scale 8 (13 x 13) on.

A transformer checkpoint holds no tokenizer: VAR keeps its VQVAE outside the state dict (``vae_proxy``). Its inputs
are the VQVAE's pyramid, so convert the VQVAE first and pass its folder, ``convert("var", "var_d16.pth",
"var-d16", tokenizer=FOLDER)`` (the generator then copies the codebook and phi layers, and records the folder's
fingerprint as provenance), or call ``model.load_tokenizer(FOLDER)`` afterwards.

Key map, VQVAE (official -> MultiScaleVQ); every tensor unchanged:

- ``encoder.conv_in`` -> ``encoder.stem``; ``encoder.down.{i}.block.{j}`` -> ``encoder.levels.{i}.blocks.{j}``
  (``norm1``, ``conv1``, ``norm2``, ``conv2``; ``nin_shortcut`` -> ``skip``); ``encoder.down.{i}.attn.{j}`` ->
  ``encoder.levels.{i}.attentions.{j}`` (``norm``, ``qkv``; ``proj_out`` -> ``proj``);
  ``encoder.down.{i}.downsample.conv`` -> ``encoder.levels.{i}.resample.conv``; ``encoder.mid.block_1`` /
  ``attn_1`` / ``block_2`` -> ``encoder.middle.block1`` / ``attention`` / ``block2``; ``norm_out`` / ``conv_out``
  -> ``norm`` / ``head``;
- the decoder the same way, except that flexar keeps its levels in the order they run (lowest resolution first):
  ``decoder.up.{i}`` -> ``decoder.levels.{n - 1 - i}`` with n = len(ch_mult), ``upsample.conv`` -> ``resample.conv``;
- ``quant_conv``, ``post_quant_conv`` -> the same names; ``quantize.embedding.weight`` ->
  ``quantizer.embedding.weight``; ``quantize.quant_resi.qresi_ls.{k}`` (partially shared, VAR's
  ``share_quant_resi=4``; ``quant_resi.qresi`` when fully shared, ``quant_resi.{k}`` when not shared) ->
  ``quantizer.phis.{k}.conv`` (flexar picks phi k for scale s by VAR's ticks, :func:`~flexar.tokenizers.multiscale.
  phi_ticks`).
- ignored: ``quantize.ema_vocab_hit_SV``, VAR's running count of code hits per scale (a training statistic).

Key map, VAR / MVAR (official -> VAR); the AdaLN rows are reordered, everything else unchanged:

- ``word_embed`` -> ``word_embed``; ``class_emb.weight`` (1001 rows, the last the null class of guidance, flexar's
  ``null_class``) -> ``class_embed.weight``; ``pos_start`` (1, 1, C) and ``pos_1LC`` (1, L, C) -> ``pos_start``
  (1, C) and ``pos_embed`` (L, C); ``lvl_embed.weight`` -> ``level_embed.weight``;
- ``blocks.{i}.attn.mat_qkv.weight`` -> ``transformer.blocks.{i}.attn.qkv.weight`` (both split the output as
  [q; k; v], heads in order); ``attn.q_bias`` / ``attn.v_bias`` -> ``attn.q_bias`` / ``attn.v_bias``;
  ``attn.zero_k_bias`` (a zero buffer) is checked to be zero, the key bias flexar fixes at zero;
  ``attn.scale_mul_1H11`` (1, H, 1, 1) -> ``attn.log_scale`` (H,) (both the log of the per-head scale, clamped at
  log 100); ``attn.proj`` -> ``attn.proj``; ``ffn.fc1`` / ``ffn.fc2`` -> ``mlp.up`` / ``mlp.down`` (GELU, tanh
  approximation, in both);
- ``blocks.{i}.ada_lin.1`` (6C rows: gamma1, gamma2, scale1, scale2, shift1, shift2) -> ``modulation.1`` (flexar's
  order: shift1, scale1, gate1, shift2, scale2, gate2); ``head_nm.ada_lin.1`` (2C rows: scale, shift) ->
  ``transformer.final_modulation.1`` (shift, scale). Both apply LN(x) (1 + scale) + shift with a non-affine
  LayerNorm of eps 1e-6 and gate the residual branches by gamma.
- ``head`` -> ``head``;
- checked, not copied: ``lvl_1L`` (the scale of every position: it must be this preset's) and
  ``attn_bias_for_masking`` (the training mask: block-causal for VAR, block-diagonal for MVAR; the other one means
  the file is of the other family and is refused naming the preset to use). flexar builds both from ``scales``.

Differences from the official code:

- the VQVAE's GroupNorms of layers narrower than 32 channels take the largest divisor of their width as groups
  (VAR: 32 always); no layer of the released VQVAE is that narrow.
- ``decode`` clamps to [-1, 1] (flexar's tokenizer contract), as VAR's ``fhat_to_img``; ``decode_codes`` is the
  unclamped decoder. The images are in [-1, 1] on both sides (VAR's ``normalize_01_into_pm1``).
- the official attention runs flash-attention / xformers kernels when they are installed; flexar runs its own
  backends (:func:`flexar.nn.attention`): equal up to float rounding.
- VAR's shared-AdaLN variant (``shared_aln=True``, keys ``ada_gss`` / ``shared_ada_lin``: no released model) and the
  non-cosine attention (``attn_l2_norm=False``) are not converted; their keys are refused.
- sampling goes through flexar's samplers: VAR's ``cfg=1.5, top_k=900, top_p=0.96`` is ``Sampler(cfg_scale=2.5,
  top_k=900, top_p=0.96)`` with the linear guidance ramp (see :mod:`flexar.generators.var`), and MVAR runs without a
  KV cache as in its ``autoregressive_infer``.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..tokenizers.multiscale import VAR_SCALES
from . import Weights

CHECKPOINT_KEYS = ("mvar_wo_ddp",)  # VAR's files are the state dict itself; MVAR's hold it under "mvar_wo_ddp"


def _generator_sizes(depth: int) -> dict:
    # VAR's build_vae_var: width 64 d, d heads, on the 256 px VQVAE (4096 codes of 32 dims), 1000 ImageNet classes
    return dict(depth=depth, dim=64 * depth, num_heads=depth, scales=VAR_SCALES, vocab_size=4096, code_dim=32,
                num_classes=1000, attn_l2_norm=True, attention_bias=True, mlp_ratio=4.0, norm_eps=1e-6,
                phi_ratio=0.5, shared_phi=4)


PRESETS: dict[str, dict] = {
    # VAR's VQVAE (vqvae.py, vq-f16 ddconfig; build_vae_var: V 4096, Cvae 32, ch 160, share_quant_resi 4)
    "vqvae": dict(image_size=256, channels=3, downsample=16, width=160, channel_multipliers=[1, 1, 2, 2, 4],
                  num_res_blocks=2, codebook_size=4096, code_dim=32, scales=VAR_SCALES, commitment=0.25,
                  l2_norm=False, phi_ratio=0.5, shared_phi=4, quant_conv_kernel=3, architecture="var"),
    **{f"var-d{depth}": _generator_sizes(depth) for depth in (16, 20, 24, 30)},
    # MVAR's released sizes (README model zoo): VAR's networks, kernel 7, refine_step 8
    **{f"mvar-d{depth}": dict(_generator_sizes(depth), kernel_size=7, refine_step=8) for depth in (16, 20, 24)},
}


def _preset_name(family: str, depth: int) -> str:
    """The preset of `family` ("var" or "mvar") at `depth`, or how to build that size when none is official."""
    name = f"{family}-d{depth}"
    if name in PRESETS:
        return f"the preset {name!r}"
    return f"a {family}-d* preset with the overrides depth={depth}, dim={64 * depth}, num_heads={depth}"


# a var-d* / mvar-d* generator reads its VQVAE's codebook and phi layers: build takes the tokenizer folder
BINDS_TOKENIZER = True


def build(preset: str, **overrides) -> nn.Module:
    """The flexar model of `preset`: a MultiScaleVQ for ``vqvae``, an MVAR for ``mvar-d*``, a VAR for the others
    (``var-d*``); the name's prefix decides, so added sizes follow the same rule."""
    if preset not in PRESETS:
        raise ValueError(f"unknown var preset {preset!r}; known: {', '.join(PRESETS)}")
    kwargs = {**PRESETS[preset], **overrides}
    if preset.startswith("vqvae"):
        from ..tokenizers import MultiScaleVQ

        return MultiScaleVQ(**kwargs)
    from ..generators import MVAR, VAR

    return (MVAR if preset.startswith("mvar") else VAR)(**kwargs)


def load(model: nn.Module, weights: Weights) -> None:
    """Copy the official VQVAE or VAR / MVAR tensors into `model` (built by :func:`build`)."""
    from ..tokenizers import MultiScaleVQ

    if isinstance(model, MultiScaleVQ):
        if "quantize.embedding.weight" not in weights and "class_emb.weight" in weights:
            raise ValueError(f"{weights.source} is a VAR / MVAR transformer checkpoint, not the VQVAE: choose a "
                             f"var-d* or mvar-d* preset ({', '.join(p for p in PRESETS if p != 'vqvae')})")
        load_vqvae(model, weights)
    else:
        if "class_emb.weight" not in weights and "quantize.embedding.weight" in weights:
            raise ValueError(f"{weights.source} is VAR's VQVAE checkpoint, not a transformer: choose the preset "
                             "'vqvae'")
        load_generator(model, weights)


# -- VQVAE ---------------------------------------------------------------------------------------------------------


def _copy_resblock(weights: Weights, prefix: str, block: nn.Module) -> None:
    weights.copy_module(prefix, block, {"skip": "nin_shortcut"})


def _copy_attention(weights: Weights, prefix: str, attention: nn.Module) -> None:
    weights.copy_module(prefix, attention, {"proj": "proj_out"})


def _copy_middle(weights: Weights, prefix: str, middle: nn.Module) -> None:
    _copy_resblock(weights, prefix + "block_1.", middle.block1)
    _copy_attention(weights, prefix + "attn_1.", middle.attention)
    _copy_resblock(weights, prefix + "block_2.", middle.block2)


def _copy_level(weights: Weights, prefix: str, level: nn.Module, resample: str) -> None:
    for j, block in enumerate(level.blocks):
        _copy_resblock(weights, f"{prefix}block.{j}.", block)
    for j, attention in enumerate(level.attentions):
        _copy_attention(weights, f"{prefix}attn.{j}.", attention)
    if not isinstance(level.resample, nn.Identity):
        weights.copy_module(f"{prefix}{resample}.", level.resample)


def load_vqvae(model: nn.Module, weights: Weights) -> None:
    """VAR's VQVAE state dict into a MultiScaleVQ built with ``architecture="var"``."""
    from ..tokenizers.multiscale import VAREncoder

    if not isinstance(model.encoder, VAREncoder):
        raise ValueError("VAR's VQVAE loads into MultiScaleVQ(architecture='var'), got a MultiScaleVQ with another "
                         "encoder; keep the vqvae preset's architecture")
    encoder, decoder = model.encoder, model.decoder
    weights.copy("encoder.conv_in.weight", encoder.stem.weight)
    weights.copy("encoder.conv_in.bias", encoder.stem.bias)
    for i, level in enumerate(encoder.levels):
        _copy_level(weights, f"encoder.down.{i}.", level, "downsample")
    _copy_middle(weights, "encoder.mid.", encoder.middle)
    weights.copy_module("encoder.norm_out.", encoder.norm)
    weights.copy_module("encoder.conv_out.", encoder.head)

    weights.copy("decoder.conv_in.weight", decoder.stem.weight)
    weights.copy("decoder.conv_in.bias", decoder.stem.bias)
    _copy_middle(weights, "decoder.mid.", decoder.middle)
    count = len(decoder.levels)
    for index, level in enumerate(decoder.levels):
        _copy_level(weights, f"decoder.up.{count - 1 - index}.", level, "upsample")
    weights.copy_module("decoder.norm_out.", decoder.norm)
    weights.copy_module("decoder.conv_out.", decoder.head)

    weights.copy_module("quant_conv.", model.quant_conv)
    weights.copy_module("post_quant_conv.", model.post_quant_conv)
    quantizer = model.quantizer
    weights.copy("quantize.embedding.weight", quantizer.embedding.weight)
    if "quantize.quant_resi.qresi.weight" in weights:  # PhiShared: one phi
        phi_prefixes = ["quantize.quant_resi.qresi."]
    elif any(key.startswith("quantize.quant_resi.qresi_ls.") for key in weights.keys()):  # PhiPartiallyShared
        phi_prefixes = [f"quantize.quant_resi.qresi_ls.{k}." for k in range(len(quantizer.phis))]
    else:  # PhiNonShared: a ModuleList, one per scale
        phi_prefixes = [f"quantize.quant_resi.{k}." for k in range(len(quantizer.phis))]
    if len(phi_prefixes) != len(quantizer.phis):
        raise ValueError(f"{weights.source} has one shared phi layer, the model {len(quantizer.phis)}: build it "
                         "with shared_phi=1")
    for prefix, phi in zip(phi_prefixes, quantizer.phis):
        if not isinstance(phi, nn.Identity):  # phi_ratio 0: no convolution on either side
            weights.copy_module(prefix, phi.conv)
    weights.ignore(r"quantize\.ema_vocab_hit_SV", "VAR's running count of code hits per scale (a training statistic)")


# -- VAR / MVAR transformers ---------------------------------------------------------------------------------------

# flexar's AdaLN rows (shift1, scale1, gate1, shift2, scale2, gate2) as chunks of VAR's (gamma1, gamma2, scale1,
# scale2, shift1, shift2); the head's (shift, scale) as chunks of VAR's (scale, shift)
BLOCK_CHUNKS = (4, 2, 0, 5, 3, 1)
HEAD_CHUNKS = (1, 0)


def _reordered(tensor: Tensor, chunks: tuple[int, ...]) -> Tensor:
    parts = tensor.chunk(len(chunks), dim=0)
    return torch.cat([parts[index] for index in chunks], dim=0)


def _copy_modulation(weights: Weights, prefix: str, linear: nn.Linear, chunks: tuple[int, ...]) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            target = getattr(linear, name)
            target.copy_(_reordered(weights.take(prefix + name, target.shape), chunks).to(target.dtype))


def load_generator(model: nn.Module, weights: Weights) -> None:
    """A VAR or MVAR transformer state dict into flexar's VAR / MVAR (``attention_bias=True``)."""
    from ..generators import MVAR
    from ..generators.var import CosineAttention

    name = type(model).__name__
    unsupported = [key for key in weights.keys() if re.search(r"(^|\.)(ada_gss|shared_ada_lin)(\.|$)", key)]
    if unsupported:
        raise ValueError(f"{weights.source} is a shared-AdaLN VAR (shared_aln=True, keys such as "
                         f"{unsupported[0]!r}), which flexar does not convert")
    depth = len({key.split(".")[1] for key in weights.keys("blocks.")})
    if depth != len(model.transformer.blocks):
        family = "mvar" if isinstance(model, MVAR) else "var"
        raise ValueError(f"{weights.source} has {depth} blocks and the {name} built here has "
                         f"{len(model.transformer.blocks)}: choose {_preset_name(family, depth)}")
    attentions = [block.attn for block in model.transformer.blocks]
    if not all(isinstance(a, CosineAttention) and a.biased for a in attentions):
        raise ValueError(f"VAR's attention needs {name}(attn_l2_norm=True, attention_bias=True); keep the preset's")

    _check_layout(model, weights)
    weights.copy("word_embed.weight", model.word_embed.weight)
    weights.copy("word_embed.bias", model.word_embed.bias)
    weights.copy("class_emb.weight", model.class_embed.weight)
    with torch.no_grad():
        model.pos_start.copy_(weights.take("pos_start", (1, *model.pos_start.shape))[0])
        model.pos_embed.copy_(weights.take("pos_1LC", (1, *model.pos_embed.shape))[0])
    weights.copy("lvl_embed.weight", model.level_embed.weight)
    for index, block in enumerate(model.transformer.blocks):
        prefix = f"blocks.{index}."
        attention = block.attn
        weights.copy(prefix + "attn.mat_qkv.weight", attention.qkv.weight)
        weights.copy(prefix + "attn.q_bias", attention.q_bias)
        weights.copy(prefix + "attn.v_bias", attention.v_bias)
        if bool(weights.take(prefix + "attn.zero_k_bias", attention.q_bias.shape).any()):
            raise ValueError(f"{weights.source}: {prefix}attn.zero_k_bias is not zero; VAR's key bias is a zero "
                             "buffer, and flexar fixes it at zero")
        with torch.no_grad():
            attention.log_scale.copy_(weights.take(prefix + "attn.scale_mul_1H11", (1, attention.num_heads, 1, 1))
                                      .flatten())
        weights.copy(prefix + "attn.proj.weight", attention.proj.weight)
        weights.copy(prefix + "attn.proj.bias", attention.proj.bias)
        weights.copy(prefix + "ffn.fc1.weight", block.mlp.up.weight)
        weights.copy(prefix + "ffn.fc1.bias", block.mlp.up.bias)
        weights.copy(prefix + "ffn.fc2.weight", block.mlp.down.weight)
        weights.copy(prefix + "ffn.fc2.bias", block.mlp.down.bias)
        _copy_modulation(weights, prefix + "ada_lin.1.", block.modulation[1], BLOCK_CHUNKS)
    _copy_modulation(weights, "head_nm.ada_lin.1.", model.transformer.final_modulation[1], HEAD_CHUNKS)
    weights.copy("head.weight", model.head.weight)
    weights.copy("head.bias", model.head.bias)


def _check_layout(model: nn.Module, weights: Weights) -> None:
    """The checkpoint's level of every position and its training mask must be this model's scales and family."""
    from ..generators import MVAR
    from ..tokenizers.multiscale import scale_levels

    levels = scale_levels(model.grid)
    recorded = weights.take("lvl_1L")
    if recorded.numel() != levels.numel() or not torch.equal(recorded.flatten().long(), levels):
        raise ValueError(f"{weights.source}: lvl_1L (the scale of each of its {recorded.numel()} positions) does not "
                         f"match the scales {model.grid} of the {type(model).__name__} built here")
    mask = weights.take("attn_bias_for_masking", (1, 1, levels.numel(), levels.numel()))[0, 0] == 0
    causal = levels[None, :] <= levels[:, None]
    diagonal = levels[None, :] == levels[:, None]
    is_mvar = isinstance(model, MVAR)
    if not torch.equal(mask, diagonal if is_mvar else causal):
        depth = len(model.transformer.blocks)
        if torch.equal(mask, causal if is_mvar else diagonal):
            other = _preset_name("var" if is_mvar else "mvar", depth)
            raise ValueError(f"{weights.source}: its attention mask (attn_bias_for_masking) is "
                             f"{'block-causal, VAR' if is_mvar else 'block-diagonal, MVAR'}'s: choose {other}")
        raise ValueError(f"{weights.source}: attn_bias_for_masking is neither VAR's block-causal nor MVAR's "
                         "block-diagonal mask over the scales")
