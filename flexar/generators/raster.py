"""Raster-order autoregressive generation, LlamaGen style ("Autoregressive Model Beats Diffusion: Llama for Scalable
Image Generation", Sun et al. 2024; FoundationVision/LlamaGen, autoregressive/models/{gpt,generate}.py).

A decoder-only Llama transformer (RMSNorm, SwiGLU, rotary embeddings) over [class token, t_0, ..., t_{L-2}] predicts
t_0, ..., t_{L-1} with a causal mask (next-token prediction, teacher forcing, cross-entropy). The class token comes from
a table of ``num_classes + 1`` embeddings whose last row is the null class of classifier-free guidance; during training
each label is replaced by the null class with probability ``class_dropout``. Rotary positions are 1D for 1D token
sequences and 2D (rows on the first half of each head's dimensions, columns on the second) for a token grid read in
raster order; the class token carries no rotation. Token t_i sits at the position of its own grid cell.

Generation is the token-by-token loop of :class:`~flexar.generators.Generator` (``supports_step_decoding``, one
token per step): a prefill over the class token, then one pass per new token through the KV cache (``num_tokens``
passes in all), or a full recompute of the prefix every step (``use_cache=False``, the reference). With CFG the batch
is doubled as [labels; null] and both halves are fed the token sampled from the guided logits.

Adaptive lengths (``eos_token=True``, for caches of KARL or ALIT tokens whose length each image chooses): the head
gets one output more, the end-of-sequence token (id ``vocab_size``). Training predicts it right after each row's last
real token (position ``lengths[b]``, when that is below ``max_tokens``: a full row ends at the cap) and ignores every
target past it, so the model learns the length distribution of each class (and, through class dropout, the
unconditional one that CFG guides against). Generation stops a row when it draws the token (see
:class:`~flexar.generators.Generator`). The token is an output only: it is never fed back (a row that draws it has
ended), so the embedding table keeps ``vocab_size`` rows. Off by default, so fixed-length models, presets and saved
weights are unchanged. A length head would be the alternative; the token composes with every sampler and strategy
unchanged (CFG, filters, speculative acceptance act on it as on any id).

Decoding hooks, which loop-changing decoders (speculative decoding, LANTERN, ScalingAR) drive too:

- ``new_cache(batch_size)`` -> KVCache holding ``max_tokens + 1`` positions;
- ``prefill(labels (B,), kv_cache) -> logits (B, V)`` for t_0 (the cache must be empty);
- ``step(ids (B, n), kv_cache) -> logits (B, n, V)``: feed n tokens after the cached prefix; row j predicts the token
  that follows ids[:, j]. Rejected drafts are rolled back with ``kv_cache.truncate(length)``;
- ``return_hidden=True`` on each of them (and on ``forward``) also returns the final hidden states (B, n, dim), after
  the final norm and before the output head, which is what EAGLE-style draft heads read; ``token_embed`` and ``head``
  are the embedding and output layers such a head shares.

Differences from LlamaGen's official code:
- no token, residual or FFN dropout (LlamaGen trains with 0.1 each); the shared transformer blocks have none.
- the SwiGLU hidden width is 2/3 of ``mlp_ratio * dim`` rounded to a multiple of 8, not of 256, so a GPT-L or GPT-XL
  width would be 1.7 % and 3.0 % smaller than LlamaGen's (B and XXL are unchanged: their widths are already multiples
  of 256). ``mlp_multiple_of=256`` restores LlamaGen's widths; the paper presets (``raster-b`` ... ``raster-3b``) set
  it, so they count LlamaGen's parameters (tests/test_generator_presets.py).
- norms use eps 1e-6 (LlamaGen: 1e-5); ``norm_eps=1e-5`` restores it (the paper presets set it).
- the class token's rotary tables are the identity (cos 1, sin 0: its query and key pass unrotated). LlamaGen
  prepends zero tables (cos 0, sin 0) for the class token, which zeroes its query and key in every layer, so no
  position attends to it through a non-zero logit and its own query sees uniform weights; its value still reaches
  every later token. ``class_token_rotary="zero"`` restores LlamaGen's tables.
- the output head is initialised like the other linear layers (normal, std 0.02) by default; LlamaGen zero-initialises
  it, which makes a fresh model emit constant logits. ``zero_init_head=True`` restores LlamaGen's choice.
- loss and accuracy are averaged over valid targets only when ``lengths`` is given (flexible-length tokenizers);
  LlamaGen always trains on full grids. With ``eos_token`` the end-of-sequence targets count among them.

Guidance interval. LlamaGen's ``generate(..., cfg_interval=n)`` guides only the first tokens: with n >= 0, tokens
0 ... n + 1 are drawn from the guided logits and every later token from the conditional logits alone (the null half
is still fed, so its cache stays whole); -1, its default, guides every token. ``cfg_interval`` here does the same in
:meth:`RasterAR.generate` (and so ``Pipeline.generate``): the sampler's guidance processor is wrapped, every other
processor of its chain runs as given. The decoding strategies (speculative decoding, LANTERN, ScalingAR) take the
sampler as it is and guide every token.
"""
from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from ..nn import KVCache, RotaryEmbedding, Transformer, causal_mask, grid_positions
from ..sampling import SamplingState
from ..sampling.processors import classifier_free_guidance
from ..sampling.strategy import GenerationOutput
from ..utils import IGNORE_INDEX
from .base import Generator

# LlamaGen's class-conditional ImageNet setting: its VQ-16 tokenizer (16384 codes) at 256 px gives a 16 x 16 grid,
# 1000 classes, class dropout 0.1, SwiGLU widths rounded to multiples of 256 and RMSNorm eps 1e-5 (gpt.py ModelArgs).
LLAMAGEN_C2I = dict(vocab_size=16384, max_tokens=256, grid=[16, 16], num_classes=1000, class_dropout=0.1,
                    mlp_multiple_of=256, norm_eps=1e-5)


def llamagen_size(dim: int, depth: int, num_heads: int) -> dict:
    """One of LlamaGen's GPT_models (width, depth, heads) in its class-conditional ImageNet 256 setting."""
    return dict(LLAMAGEN_C2I, dim=dim, depth=depth, num_heads=num_heads)


CLASS_TOKEN_ROTARY = ("identity", "zero")


@register
class RasterAR(Generator):
    """Class-conditional decoder-only transformer over tokens in raster order.

    Shapes: ids (B, L <= max_tokens) long in [0, vocab_size); labels (B,) long in [0, num_classes);
    logits (B, L_in, vocab_size).
    """

    presets = {
        # LlamaGen's GPT-B / L / XL / XXL / 3B (Sun et al. 2024, Table 1: 111M, 343M, 775M, 1.4B, 3.1B); flexar's own
        # departures (class-token rotary tables, head initialisation) keep their defaults, see the module docstring
        "raster-b": llamagen_size(768, 12, 12),
        "raster-l": llamagen_size(1024, 24, 16),
        "raster-xl": llamagen_size(1280, 36, 20),
        "raster-xxl": llamagen_size(1536, 48, 24),
        "raster-3b": llamagen_size(3200, 24, 32),
        # CPU-sized presets for tests, digits and MNIST (the caller gives the tokenizer's sizes)
        "raster-tiny": dict(dim=64, depth=2, num_heads=4),
        "raster-digits": dict(dim=256, depth=6, num_heads=8),
    }
    supports_step_decoding = True
    compiles_decoding = True

    def __init__(
        self,
        vocab_size: int,
        max_tokens: int,
        num_classes: int = 10,
        grid: list[int] | None = None,
        dim: int = 256,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        class_dropout: float = 0.1,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        init_std: float = 0.02,
        zero_init_head: bool = False,
        attention_backend: str = "auto",
        class_token_rotary: str = "identity",
        norm_eps: float = 1e-6,
        mlp_multiple_of: int = 8,
        eos_token: bool = False,
        cfg_interval: int = -1,
    ):
        super().__init__()
        self.set_sizes(vocab_size, max_tokens, num_classes, class_dropout, grid)
        if not isinstance(eos_token, bool):
            raise ValueError(f"eos_token must be a bool, got {eos_token!r}")
        self.eos_token = eos_token
        if isinstance(cfg_interval, bool) or not isinstance(cfg_interval, int) or cfg_interval < -1:
            raise ValueError(f"cfg_interval must be an int >= -1 (-1 guides every token; n >= 0 guides tokens "
                             f"0 ... n + 1, LlamaGen's generate), got {cfg_interval!r}")
        self.cfg_interval = cfg_interval
        if class_token_rotary not in CLASS_TOKEN_ROTARY:
            raise ValueError(f"class_token_rotary must be one of {CLASS_TOKEN_ROTARY}, got {class_token_rotary!r}")
        self.dim = dim
        self.class_token_rotary = class_token_rotary

        self.class_embed = nn.Embedding(num_classes + 1, dim)
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.transformer = Transformer(
            dim, depth, num_heads, mlp_ratio, mlp="swiglu", norm="rms", qk_norm=qk_norm, backend=attention_backend,
            norm_eps=norm_eps, mlp_multiple_of=mlp_multiple_of,
        )
        # the end-of-sequence token is an output only (never fed back): one more logit, no embedding
        self.head = nn.Linear(dim, vocab_size + int(eos_token), bias=False)
        self.rope = RotaryEmbedding(dim // num_heads, axes=1 if grid is None else 2, base=rope_base)
        self.mask = causal_mask()

        # rotary position of every input index: the class token (index 0) has none, token t_i (index i + 1) has its own
        if grid is None:
            positions = torch.arange(-1, max_tokens)
        else:
            positions = torch.cat([torch.full((1, 2), -1), grid_positions(*grid)])
        self.register_buffer("positions", positions, persistent=False)

        self.reset_parameters(init_std, zero_init_head)

    def reset_parameters(self, std: float = 0.02, zero_init_head: bool = False) -> None:
        """LlamaGen's initialisation: normal(0, std) for linear and embedding weights, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if zero_init_head:
            nn.init.zeros_(self.head.weight)

    # -- network -------------------------------------------------------------------------------------------------------
    def embed(self, ids: Tensor, labels: Tensor | None, start: int) -> Tensor:
        """Input embeddings (B, n, dim) for input indices [start, start + n): the class token leads when start == 0."""
        tokens = self.token_embed(ids)
        if start > 0:
            return tokens
        if labels is None:
            raise ValueError("labels are needed when the class token is fed (no cached prefix)")
        if labels.shape != (ids.shape[0],):
            raise ValueError(f"labels must have shape ({ids.shape[0]},) to match ids, got {tuple(labels.shape)}")
        return torch.cat([self.class_embed(labels).unsqueeze(1), tokens], dim=1)

    def rotary(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (length, head_dim / 2), for input indices [start, start + length)."""
        cos, sin = self.rope(self.positions[start : start + length])
        if start == 0 and self.class_token_rotary == "zero":  # LlamaGen: zero tables for the class token
            cos, sin = cos.clone(), sin.clone()
            cos[0], sin[0] = 0.0, 0.0
        return cos, sin

    def forward(
        self,
        ids: Tensor,
        labels: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ):
        """Logits for the input [class token, ids] (or just ids after a cached prefix).

        ids: (B, n) long; labels: (B,) long (ignored when kv_cache already holds a prefix);
        returns logits (B, L_in, vocab_size) (vocab_size + 1 with ``eos_token``, the last the end-of-sequence token)
        with L_in = n + 1 without a prefix, n with one; row j predicts the token after input j. With ``return_hidden``
        returns (logits, hidden (B, L_in, dim)).
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, n), got shape {tuple(ids.shape)}")
        # per-row positions in a compiled step or while rows hold different lengths (speculative decoding)
        positions = None if kv_cache is None else kv_cache.step_positions(ids.shape[1], self.max_tokens + 1)
        if positions is not None:
            x, length, rope = self.embed(ids, labels, 1), ids.shape[1], self.rope(self.positions[positions])
        else:
            start = 0 if kv_cache is None else kv_cache.length
            x = self.embed(ids, labels, start)
            length = x.shape[1]
            if start + length > self.max_tokens + 1:
                raise ValueError(f"input reaches index {start + length}, past the class token + {self.max_tokens} "
                                 "tokens this model holds")
            rope = self.rotary(start, length)
        # a single query sees every earlier key (the whole cached prefix): no mask needed
        mask = None if length == 1 else self.mask
        hidden = self.transformer(x, mask=mask, rope=rope, kv_cache=kv_cache)
        logits = self.head(hidden)
        return (logits, hidden) if return_hidden else logits

    # -- decoding hooks ------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows (2B under CFG) and up to class token + max_tokens positions."""
        return self.transformer.new_cache(batch_size, self.max_tokens + 1 if max_length is None else max_length)

    # -- sampling ------------------------------------------------------------------------------------------------------
    def interval_sampler(self, sampler):
        """``sampler`` with its guidance limited to tokens 0 ... ``cfg_interval`` + 1 (LlamaGen's ``cfg_interval``):
        a copy whose guidance processor is wrapped in place, every other processor kept in order; the sampler itself
        when the interval is off (-1) or the sampler runs no guidance."""
        if self.cfg_interval < 0 or not sampler.uses_cfg:
            return sampler
        guidance = [isinstance(p, partial) and p.func is classifier_free_guidance for p in sampler.processors]
        if not any(guidance):
            raise ValueError(f"cfg_interval={self.cfg_interval} needs a sampler whose chain holds flexar's "
                             f"classifier_free_guidance processor; {type(sampler).__name__} has none to limit")
        limited = copy.copy(sampler)
        limited.processors = [
            partial(guidance_until, guidance=processor, last_step=self.cfg_interval + 1) if guided else processor
            for processor, guided in zip(sampler.processors, guidance)
        ]
        return limited

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
        """Sample `num_tokens` (default max_tokens) tokens per label, one per forward pass
        (:meth:`~flexar.generators.Generator.decode_steps`), with guidance limited by ``cfg_interval``.
        labels (B,) long -> ids (B, num_tokens), stats."""
        return self.decode_steps(labels, self.interval_sampler(sampler), generator, num_tokens, use_cache, progress)

    # -- objective -----------------------------------------------------------------------------------------------------
    def training_loss(self, ids: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """Next-token cross-entropy with teacher forcing; targets at positions >= lengths[b] are ignored, except that
        with ``eos_token`` the target at position lengths[b] (< max_tokens) is the end-of-sequence token.

        ids: (B, L) long, anything past lengths is padding; labels: (B,) long; lengths: (B,) long in [1, L] or None
        (all valid).
        """
        labels = self.check_labels(labels)
        lengths = self.check_ids(ids, lengths)
        if labels.shape[0] != ids.shape[0]:
            raise ValueError(f"got {labels.shape[0]} labels for {ids.shape[0]} rows of ids")
        labels = self.drop_labels(labels)
        length = ids.shape[1]
        if self.eos_token and length < self.max_tokens:
            # rows as long as the ids end right after them: one target more, fed by the last id
            logits = self.forward(ids, labels)
            ids = F.pad(ids, (0, 1))
        else:
            logits = self.forward(ids[:, :-1], labels)
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        valid = positions < lengths[:, None]
        targets = ids.masked_fill(~valid, IGNORE_INDEX)
        if self.eos_token:
            targets = targets.masked_fill(positions == lengths[:, None], self.vocab_size)
        scored = targets != IGNORE_INDEX
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == targets) & scored
            accuracy = correct.sum() / scored.sum()
        logs = {"loss": loss.detach(), "accuracy": accuracy, "perplexity": loss.detach().exp()}
        return loss, logs


def guidance_until(logits: Tensor, state: SamplingState, guidance, last_step: int) -> Tensor:
    """The processor `guidance` (classifier-free guidance) up to step `last_step`; after it the conditional rows alone,
    as LlamaGen's ``decode_one_token`` with its ``cfg_flag`` off. logits (2B, ..., V) -> (B, ..., V)."""
    if state.step <= last_step:
        return guidance(logits, state)
    conditional, _ = logits.chunk(2, dim=0)
    return conditional.clone()
