"""Next-scale prediction, VAR ("Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction",
Tian et al., NeurIPS 2024; FoundationVision/VAR, models/{var,basic_var}.py).

The ids of a multi-scale residual VQ (:class:`flexar.tokenizers.MultiScaleVQ`) are S token maps r_1 .. r_S of sides
``scales``. VAR predicts each whole map at once from the maps before it:

- input of scale 1: the class embedding (the start token, ``first_l = side_1 ** 2`` copies) plus ``pos_start``;
- input of scale s > 1 (teacher forcing): the tokenizer's running continuous reconstruction of r_1 .. r_{s-1},
  area-downsampled to side_s and mapped to the width through a linear layer (VAR's ``idxBl_to_var_input`` and
  ``word_embed``), not a token-embedding lookup;
- every position adds an absolute position embedding (one table over the L = sum side ** 2 positions) and the
  embedding of its scale (level);
- attention is block-causal over scales: a token sees every token of its own and earlier scales (VAR's mask
  ``d >= d^T``), with q and k l2-normalised and q multiplied by a learnable per-head scale (initialised to 4, clamped
  at 100: VAR's ``attn_l2_norm``);
- the class embedding also conditions every block through AdaLN (shift, scale and gate of both sub-layers) and the
  final norm before the head; GELU MLPs, LayerNorm without affine parameters, eps 1e-6;
- the loss is the cross-entropy of all L targets, each weighted 1 / L (VAR's ``loss_weight``), class dropout 0.1.

Generation runs one forward pass per scale: the KV cache holds every earlier scale, so a pass feeds only the new
scale's map; the sampled ids go through the frozen copy of the tokenizer's pyramid (codebook and phi layers) into
f_hat, whose downsampling is the next input. ``use_cache=False`` recomputes the whole prefix with the mask every pass
(the reference). With CFG the batch is doubled as [labels; null] and the guidance ramps with the scale, VAR's
t = cfg * s / (S - 1) with logits (1 + t) cond - t uncond. flexar's guidance scale g runs u + g (c - u), so VAR's cfg
is g - 1 and the ramp is ``Sampler(cfg_scale=1 + cfg)`` on the ``linear`` schedule (1 at the first scale, g at the
last): ``cfg_schedule="linear"`` (the default) imposes that schedule on any sampler, keeping its other processors.
VAR's FID setting cfg 1.5, top-k 900, top-p 0.96 is ``Sampler(cfg_scale=2.5, top_k=900, top_p=0.96)``.

The generator needs the tokenizer's pyramid to build its inputs: ``tokenizer=FOLDER`` (a saved MultiScaleVQ, read
at construction; the saved generator keeps the copy in its own weights and records no folder) or
:meth:`VAR.load_tokenizer`. Training refuses a generator without it, and refuses ids from a token cache written by
another tokenizer than the one it copied. ``num_tokens`` in ``generate`` may stop at any scale boundary.

Shapes: ids (B, L) long; labels (B,); logits (B, n, vocab_size); pyramid inputs (B, n, code_dim).

Differences from VAR's official code:
- the blocks are flexar's shared :class:`~flexar.nn.Block` with AdaLN-zero initialisation (modulation weights zero,
  DiT); VAR scales its AdaLN weights by 0.5 and the gates by 1e-5 (close to zero as well) and divides the output
  projections by sqrt(2 depth). The other layers start as VAR's (truncated normal, std sqrt(1 / (3 width)), head
  weights times 0.02).
- by default the attention projections have no biases; ``attention_bias=True`` adds VAR's (a bias on q and on v,
  the key's fixed at zero, and a biased output projection: VAR's ``q_bias``, ``v_bias``, ``zero_k_bias``,
  ``proj.bias``), which its released checkpoints need (:mod:`flexar.convert.var`); it requires ``attn_l2_norm``.
  Without ``attn_l2_norm`` the logit scale is 1 / sqrt(head_dim) (VAR: 0.25 / sqrt(head_dim)).
- no stochastic depth (VAR: drop path 0.1 * depth / 24), no shared AdaLN variant, no progressive training.
- position and level embeddings and the per-head attention scale are decayed like other matrices by flexar's
  GeneratorModule (VAR exempts pos, level and scale parameters from weight decay); the attention scale is 1-D and
  exempt.
- ``generate`` accepts a ``torch.Generator`` and the flexar sampler chain (VAR's top-k keeps ties; see
  :mod:`flexar.sampling.processors`); VAR's ``more_smooth`` Gumbel visualisation is not implemented.
"""
from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import model_fingerprint, register
from ..nn import KVCache, SelfAttention, Transformer, attention, block_causal_mask
from ..sampling import SamplingState, check_cfg_schedule
from ..sampling.processors import classifier_free_guidance
from ..tokenizers.multiscale import VAR_SCALES, MultiScaleResidualVQ, check_scales, scale_boundaries, scale_levels
from ..utils import IGNORE_INDEX
from .base import GenerationOutput, Generator, compile_step


def var_size(depth: int) -> dict:
    """VAR's size rule (build_vae_var): width 64 * depth, heads = depth, on its 256 px tokenizer."""
    return dict(depth=depth, dim=64 * depth, num_heads=depth, scales=VAR_SCALES, vocab_size=4096, code_dim=32,
                num_classes=1000)


MAX_ATTENTION_SCALE = math.log(100.0)


class CosineAttention(SelfAttention):
    """VAR's ``attn_l2_norm`` attention: softmax(s_h * q_hat k_hat^T) v with q_hat, k_hat l2-normalised per head and a
    learnable per-head s_h = exp(min(theta_h, log 100)), theta_h = log 4 at the start. x (B, L, C) -> (B, L, C).

    ``bias``: VAR's projection biases, one on q and one on v (``q_bias``, ``v_bias``; the key's is zero: a key bias
    would move the normalised keys) and one on the output projection."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto", bias: bool = False):
        super().__init__(dim, num_heads, qk_norm=False, backend=backend)
        self.log_scale = nn.Parameter(torch.full((num_heads,), math.log(4.0)))
        self.biased = bias
        if bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.proj = nn.Linear(dim, dim)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, mask=None, rope=None, kv_cache: KVCache | None = None, layer_index: int = 0) -> Tensor:
        batch, length, dim = x.shape
        if self.biased:
            qkv = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]))
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scale = self.log_scale.clamp(max=MAX_ATTENTION_SCALE).exp().view(1, -1, 1, 1)
        q, k = F.normalize(q, dim=-1) * scale.to(q.dtype), F.normalize(k, dim=-1)
        if kv_cache is not None:
            mask = kv_cache.attention_mask(mask, length)
            k, v = kv_cache.update(layer_index, k, v)
        out = attention(q, k, v, mask=mask, backend=self.backend, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


def ramped_sampler(sampler, schedule: str | None):
    """`sampler` with its guidance processor on `schedule` (a copy; every other processor is kept, in order)."""
    if schedule is None or not sampler.uses_cfg or sampler.cfg_schedule == schedule:
        return sampler
    scheduled = copy.copy(sampler)
    scheduled.cfg_schedule = schedule
    scheduled.processors = [
        partial(p.func, *p.args, **{**p.keywords, "schedule": schedule})
        if isinstance(p, partial) and p.func is classifier_free_guidance else p
        for p in sampler.processors
    ]
    return scheduled


@register
class VAR(Generator):
    """Class-conditional next-scale prediction over a multi-scale residual VQ's token pyramid.

    ``grid`` is the list of scale sides (as the tokenizer's); ``max_tokens`` = sum side ** 2.
    """

    presets = {
        # VAR-d16 / d20 / d24 / d30 (Tian et al. 2024, Table 1 and the official model zoo: 310M, 600M, 1.0B, 2.0B) on
        # VAR's 256 px tokenizer: 10 scales (680 tokens), 4096 codes of dimension 32, 1000 classes
        **{f"var-d{depth}": var_size(depth) for depth in (16, 20, 24, 30)},
        # CPU-sized presets for tests, digits and MNIST (32 px tokenizers)
        "var-tiny": dict(depth=2, dim=32, num_heads=2, scales=[1, 2, 3, 4], vocab_size=32, code_dim=8, num_classes=10),
        "var-digits": dict(depth=4, dim=256, num_heads=4, scales=[1, 2, 3, 4, 6, 8], vocab_size=256, code_dim=8,
                           num_classes=10),
    }

    def __init__(
        self,
        vocab_size: int = 4096,
        code_dim: int = 32,
        scales: list[int] | None = None,
        num_classes: int = 1000,
        depth: int = 16,
        dim: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        class_dropout: float = 0.1,
        attn_l2_norm: bool = True,
        phi_ratio: float = 0.5,
        shared_phi: int = 4,
        tokenizer: str | None = None,
        norm_eps: float = 1e-6,
        init_std: float | None = None,
        head_init_scale: float = 0.02,
        attention_backend: str = "auto",
        cfg_schedule: str | None = "linear",
        attention_bias: bool = False,
    ):
        """``attention_bias``: VAR's q, v and output-projection biases in every attention layer (its released
        checkpoints have them; needs ``attn_l2_norm``); see the module docstring."""
        super().__init__()
        if attention_bias and not attn_l2_norm:
            raise ValueError("attention_bias=True is VAR's biased cosine attention and needs attn_l2_norm=True")
        scales = check_scales(VAR_SCALES if scales is None else scales)
        dim = 64 * depth if dim is None else dim
        num_heads = depth if num_heads is None else num_heads
        self.set_sizes(vocab_size, sum(side * side for side in scales), num_classes, class_dropout)
        if cfg_schedule is not None:
            check_cfg_schedule(cfg_schedule)
        self.grid = list(scales)
        self.dim, self.code_dim, self.cfg_schedule = dim, code_dim, cfg_schedule
        self.first_length = scales[0] ** 2
        self.boundaries = scale_boundaries(scales)

        # the tokenizer's pyramid, frozen: it turns ids into the inputs of the next scale
        self.quantizer = MultiScaleResidualVQ(vocab_size, code_dim, scales, phi_ratio=phi_ratio, shared_phi=shared_phi)
        self.quantizer.requires_grad_(False)
        self.register_buffer("quantizer_loaded", torch.zeros((), dtype=torch.bool))
        self.tokenizer_fingerprint: str | None = None

        self.class_embed = nn.Embedding(num_classes + 1, dim)
        self.pos_start = nn.Parameter(torch.empty(self.first_length, dim))
        self.pos_embed = nn.Parameter(torch.empty(self.max_tokens, dim))
        self.level_embed = nn.Embedding(len(scales), dim)
        self.word_embed = nn.Linear(code_dim, dim)
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio, mlp="gelu", norm="layer", cond_dim=dim,
                                       backend=attention_backend, norm_eps=norm_eps)
        if attn_l2_norm:
            for block in self.transformer.blocks:
                block.attn = CosineAttention(dim, num_heads, attention_backend, bias=attention_bias)
        self.head = nn.Linear(dim, vocab_size)
        self.register_buffer("levels", scale_levels(scales), persistent=False)
        self.reset_parameters(init_std, head_init_scale)
        if tokenizer is not None:
            self.load_tokenizer(tokenizer)

    def _saved_config(self, config: dict) -> dict:
        # the pyramid is saved in the weights: the folder alone rebuilds the model
        return {**config, "tokenizer": None}

    def reset_parameters(self, std: float | None = None, head_init_scale: float = 0.02) -> None:
        """VAR's initialisation of the layers it shares with flexar's blocks (AdaLN stays zero; see the docstring)."""
        std = math.sqrt(1 / self.dim / 3) if std is None else std
        modulations = {id(m) for b in self.transformer.blocks for m in b.modulation.modules()}
        modulations |= {id(m) for m in self.transformer.final_modulation.modules()}
        for module in [self.class_embed, self.level_embed, self.word_embed, self.head, *self.transformer.modules()]:
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in modulations:
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    # -- the tokenizer's pyramid ---------------------------------------------------------------------------------------
    def load_tokenizer(self, tokenizer) -> None:
        """Copy the pyramid (codebook and phi layers) of a :class:`~flexar.tokenizers.MultiScaleVQ` or of its saved
        folder; the generator is then bound to it (``provenance`` names its fingerprint)."""
        from ..hub import load_model
        from ..tokenizers import Tokenizer

        fingerprint = None
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_model(tokenizer, kind=Tokenizer)
            fingerprint = tokenizer.fingerprint
        quantizer = getattr(tokenizer, "quantizer", None)
        if not isinstance(quantizer, MultiScaleResidualVQ):
            raise ValueError(f"{type(self).__name__} reads a multi-scale residual VQ tokenizer (MultiScaleVQ), got "
                             f"{type(tokenizer).__name__}")
        self.load_quantizer(quantizer, fingerprint or model_fingerprint(tokenizer))

    def load_quantizer(self, quantizer: MultiScaleResidualVQ, fingerprint: str | None = None) -> None:
        """Copy a :class:`MultiScaleResidualVQ` (same codebook size, code dim, scales and phi layout)."""
        def layout(pyramid: MultiScaleResidualVQ) -> tuple:
            return pyramid.codebook_size, pyramid.dim, pyramid.scales, len(pyramid.phis), pyramid.phi_of_scale

        if layout(quantizer) != layout(self.quantizer):
            raise ValueError(
                f"tokenizer pyramid (codebook_size, code_dim, scales, phi layers, phi of each scale) = "
                f"{layout(quantizer)} does not match this {type(self).__name__}'s {layout(self.quantizer)}"
            )
        self.quantizer.load_state_dict(quantizer.state_dict())
        self.quantizer_loaded.fill_(True)
        self.tokenizer_fingerprint = fingerprint
        if fingerprint is not None:
            self.provenance = {"tokenizer_fingerprint": fingerprint}

    def check_training_pyramid(self) -> None:
        """Refuse training without the tokenizer's pyramid, or on a token cache of another tokenizer."""
        name = type(self).__name__
        if not bool(self.quantizer_loaded):
            raise ValueError(f"{name}'s inputs are the tokenizer's reconstructions: build it with tokenizer=FOLDER (a "
                             "saved MultiScaleVQ) or call load_tokenizer(tokenizer) before training")
        recorded = (getattr(self, "provenance", None) or {}).get("tokenizer_fingerprint")
        if recorded and self.tokenizer_fingerprint and recorded != self.tokenizer_fingerprint:
            raise ValueError(f"{name} copied the pyramid of tokenizer {self.tokenizer_fingerprint[:12]}..., but its "
                             f"ids come from tokenizer {recorded[:12]}...: pass the folder that wrote the token cache")

    # -- sizes and ids -------------------------------------------------------------------------------------------------
    def split_ids(self, ids: Tensor) -> list[Tensor]:
        """(B, L) -> each present scale's ids [(B, side_s ** 2)]."""
        return [ids[:, start:end] for start, end in zip([0] + self.boundaries, self.boundaries) if end <= ids.shape[1]]

    def check_num_tokens(self, num_tokens: int | None) -> int:
        count = super().check_num_tokens(num_tokens)
        if count not in self.boundaries:
            raise ValueError(f"{type(self).__name__} generates whole scales: num_tokens must be None or one of "
                             f"{self.boundaries} (the ends of scales {self.grid}), got {num_tokens}")
        return count

    def check_whole(self, ids: Tensor, labels: Tensor, lengths: Tensor | None) -> Tensor:
        labels = self.check_labels(labels)
        lengths = self.check_ids(ids, lengths)
        if labels.shape[0] != ids.shape[0]:
            raise ValueError(f"got {labels.shape[0]} labels for {ids.shape[0]} rows of ids")
        if ids.shape[1] != self.max_tokens or bool((lengths != self.max_tokens).any()):
            raise ValueError(f"{type(self).__name__} trains on whole pyramids: ids must be (B, {self.max_tokens}) "
                             f"with every length {self.max_tokens}, got {tuple(ids.shape)}")
        return labels

    # -- network -------------------------------------------------------------------------------------------------------
    @property
    def mask(self):
        """Block-causal over scales (VAR's ``d >= d^T``): query i sees key j iff level(j) <= level(i)."""
        return self.cached_mask("block_causal", lambda device: block_causal_mask(scale_levels(self.grid).to(device)))

    def scale_range(self, index: int) -> slice:
        return slice(self.boundaries[index] - self.grid[index] ** 2, self.boundaries[index])

    def start_input(self, class_embedding: Tensor) -> Tensor:
        """Scale 1's input (B, first_l, dim): the class embedding plus ``pos_start`` and scale 1's positions."""
        first = self.scale_range(0)
        return (class_embedding[:, None] + self.pos_start + self.pos_embed[first]
                + self.level_embed(self.levels[first]))

    def scale_input(self, index: int, pyramid: Tensor) -> Tensor:
        """Scale `index` (>= 1) input (B, side ** 2, dim) from its pyramid map (B, side ** 2, code_dim)."""
        piece = self.scale_range(index)
        tokens = self.word_embed(pyramid.to(self.word_embed.weight.dtype))
        return tokens + self.pos_embed[piece] + self.level_embed(self.levels[piece])

    def sequence_input(self, ids: Tensor, class_embedding: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Teacher-forcing input (B, end - start, dim) of positions [start, end) (default all) of whole pyramids
        ids (B, L)."""
        end = self.max_tokens if end is None else end
        with torch.no_grad():
            pyramid = self.quantizer.teacher_inputs(self.split_ids(ids))
        rest = slice(max(start, self.first_length), end)
        shifted = slice(rest.start - self.first_length, rest.stop - self.first_length)
        parts = [self.start_input(class_embedding)] if start == 0 else []
        if rest.stop > rest.start:
            parts.append(self.word_embed(pyramid[:, shifted].to(self.word_embed.weight.dtype)) + self.pos_embed[rest]
                         + self.level_embed(self.levels[rest]))
        return torch.cat(parts, dim=1)

    def network(self, x: Tensor, class_embedding: Tensor, mask=None, kv_cache: KVCache | None = None) -> Tensor:
        """Inputs (B, n, dim) -> logits (B, n, vocab_size); the class embedding conditions every block (AdaLN)."""
        return self.head(self.transformer(x, mask=mask, cond=class_embedding, kv_cache=kv_cache))

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits (B, L, vocab_size) of whole pyramids ids (B, L) under the block-causal mask."""
        class_embedding = self.class_embed(labels)
        return self.network(self.sequence_input(ids, class_embedding), class_embedding, self.mask)

    # -- objective -----------------------------------------------------------------------------------------------------
    def token_loss(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Sum over the given tokens of cross-entropy / L (VAR's per-token weight), averaged over the batch, and the
        accuracy. logits (B, n, V), targets (B, n)."""
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        loss = losses.view(targets.shape).sum(1).mean() / self.max_tokens
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == targets).float().mean()
        return loss, accuracy

    def training_loss(self, ids: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """Cross-entropy of every scale with teacher forcing. ids (B, L) whole pyramids; labels (B,)."""
        labels = self.check_whole(ids, labels, lengths)
        if self.training and torch.is_grad_enabled():
            self.check_training_pyramid()
        logits = self.forward(ids, self.drop_labels(labels))
        loss, accuracy = self.token_loss(logits, ids)
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "perplexity": loss.detach().exp()}

    # -- sampling ------------------------------------------------------------------------------------------------------
    def compile_decoding(self, enabled: bool = True, mode: str | None = None, backend: str = "inductor") -> "VAR":
        """Run every cached scale's forward pass through ``torch.compile`` (the default mode on a CPU,
        ``"reduce-overhead"`` on CUDA, or `mode`; `backend` as in :func:`flexar.generators.base.compile_step`). The
        scales differ in size: the first compiles for its own length, the second recompiles with a dynamic length,
        and every later scale (and generation) reuses that graph, which reads the cache's device lengths only.
        Tokens equal eager decoding's to float rounding of the logits. ``enabled=False`` returns to eager passes."""
        if not enabled:
            self.__dict__.pop("_compiled_network", None)
            return self
        self.__dict__["_compiled_network"] = compile_step(self._cached_network, self.device, mode, backend)
        return self

    @property
    def decoding_compiled(self) -> bool:
        """Whether :meth:`compile_decoding` is on."""
        return "_compiled_network" in self.__dict__

    def _cached_network(self, x: Tensor, class_embedding: Tensor, kv_cache: KVCache) -> Tensor:
        return self.network(x, class_embedding, kv_cache=kv_cache)

    def decode_scale(self, index: int, x: Tensor, class_embedding: Tensor, state: dict) -> Tensor:
        """Logits (cB, side ** 2, V) of scale `index` given its input x (cB, side ** 2, dim): through the KV cache
        (compiled after :meth:`compile_decoding`), or by recomputing every earlier scale's input kept in
        ``state["inputs"]`` (``use_cache=False``)."""
        if state["cache"] is not None:
            network = self.__dict__.get("_compiled_network") or self._cached_network
            return network(x, class_embedding, state["cache"])
        state["inputs"].append(x)
        logits = self.network(torch.cat(state["inputs"], dim=1), class_embedding, self.mask)
        return logits[:, -x.shape[1]:]

    def new_decoding_state(self, rows: int, count: int, use_cache: bool) -> dict:
        return {"cache": self.transformer.new_cache(rows, count) if use_cache else None, "inputs": []}

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        sampler,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> GenerationOutput:
        """Sample the token maps coarse to fine, one forward pass per scale, up to `num_tokens` (a scale boundary;
        default all). labels (B,) -> ids (B, num_tokens) and stats."""
        if not bool(self.quantizer_loaded):
            raise ValueError(f"{type(self).__name__} generates from the tokenizer's reconstructions between scales: "
                             "build it with tokenizer=FOLDER (a saved MultiScaleVQ) or call load_tokenizer(tokenizer) "
                             "before generating (its pyramid was never loaded)")
        sampler = ramped_sampler(sampler, self.cfg_schedule)
        start = self.begin_generation(labels, sampler, generator, num_tokens)
        labels, count, generator, timer, conditions, copies = start
        batch, num_scales = labels.shape[0], self.boundaries.index(count) + 1
        class_embedding = self.class_embed(conditions)
        state = self.new_decoding_state(conditions.shape[0], count, use_cache)
        x, f_hat, pieces = self.start_input(class_embedding), None, []
        for index in self.progress_range(num_scales, progress, f"{type(self).__name__} scales"):
            logits = self.decode_scale(index, x, class_embedding, state)
            ids = sampler.sample(logits, SamplingState(step=index, num_steps=len(self.grid)), generator)
            pieces.append(ids)
            f_hat, pyramid = self.quantizer.next_input(index, f_hat, ids)
            if index + 1 < num_scales:
                x = self.scale_input(index + 1, pyramid).repeat(copies, 1, 1)
        stats = {"forward_passes": num_scales, "tokens": batch * count, "seconds": timer.seconds(), "batch_size": batch}
        return GenerationOutput(ids=torch.cat(pieces, dim=1), stats=stats)
