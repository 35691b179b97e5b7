"""xAR: next-X prediction with flow matching on continuous tokens ("Beyond Next-Token: Next-X Prediction for
Autoregressive Visual Generation", Ren et al. 2025; OliverRensu/xAR, models/{xar,flow,sampler,rope}.py).

The model generates the latents of a KL autoencoder (:class:`flexar.tokenizers.VAE`, whose ``encode_latents`` already
normalises them to roughly unit variance, the role of xAR's fixed 0.2325 scale on MAR's KL-16 latents) one *entity* at
a time, each entity a group of latent positions generated together by a flow:

- ``token``: one position (K = h w entities, raster order);
- ``cell``: a k x k neighbourhood (``cell_size`` = k; cells in raster order, raster order inside), xAR's default and
  the only entity of the official code (16 x 16 latents, 2 x 2 cells of 8 x 8);
- ``subsample``: the positions of one phase of a stride-s lattice, (i, j) with i = a mod s and j = b mod s
  (``stride`` = s; s^2 non-local entities, each a (h / s) x (w / s) subsampled view of the image);
- ``scale``: coarse to fine over nested lattices: entity 0 is position (0, 0), the lattice of stride h; entity l holds
  the positions of the lattice of stride h / 2^l not in a coarser one (1, 3, 12, 48 positions on 8 x 8), so each scale
  refines the image the previous ones sketch; h must be a power of two;
- ``image``: every position at once (K = 1: a class-conditional flow-matching transformer over the whole latent).

Sequence: the latent positions reordered so each entity is contiguous (``order``, a permutation of the raster
indices; ``inverse`` undoes it), embedded by a linear map plus learned position embeddings (xAR's ``z_proj`` and
``encoder_pos_embed_learned``), then an encoder stack and a decoder stack of AdaLN transformer blocks (RMSNorm, SwiGLU,
2D RoPE at each token's own grid position, so the rotation follows the reordering) with a linear velocity head.
Attention is block-causal by entity: bidirectional within an entity, causal across entities. The condition of every
token is the class embedding plus the timestep embedding of its own entity's t.

Training (noisy context learning): every entity, the context included, draws its own t from a logit-normal (sigmoid of
a standard normal), x_t = (1 - t) x + t eps, and the head predicts the velocity eps - x at every position, MSE averaged
over positions and channels. No entity is ever clean, so there is no input/target shift: entity k's output is its own
velocity, read with the noisier or cleaner views of entities < k as context. ``noisy_context=False`` is the paper's
ablation, teacher forcing on clean context: the sequence is [clean x (t = 0); x_t], each noisy entity attending to
the clean entities before it and to itself, each clean entity to the clean ones up to it; the loss is on the noisy
half (twice the sequence per step, the same targets).

Sampling (:meth:`XAR.generate`, a :class:`flexar.sampling.FlowSampler`): for each entity k, from pure noise, the
sampler's ``steps`` network calls integrate t from 1 to 0 (Euler-Maruyama on the reverse SDE with its final mean step,
or plain Euler); the first call of entity k > 0 also feeds entity k - 1, finished and clean (t = 0), whose keys and
values enter the KV cache as context for every later entity; the other calls feed entity k alone against the cache.
Forward passes: entities x steps. CFG evaluates [labels; null] and guides the velocity with the scale ramped
1 + (s - 1) k / (K - 1) over entities. ``use_cache=False`` recomputes the whole clean prefix with the entity at every
call instead (the reference the cache must equal).

Differences from the official code:
- every entity of the paper (the official code has cells only, with 16 x 16 latents, 2 x 2 cells and 16 channels as
  literals); the ``scale`` entity is a partition of the latent positions into nested lattices, not the paper's pyramid
  of downsampled maps, so that every entity type covers the same h w positions once, with the same parameters;
- AdaLN-zero: the modulation layers start at zero (every block the identity at initialisation), where the official code
  initialises them like its other linear layers (Xavier); no bias on attention and MLP projections (timm's SwiGLU and
  qkv carry biases); no attention or projection dropout (0.1 in the official B config); QK-norm off;
- the timestep embedding reads the continuous 1000 t (the official code rounds it down to an integer first);
- the final norms are RMSNorm with a learned scale, as in the official code; the ``noisy_context=False`` ablation is
  flexar's teacher-forcing construction (the official code has only noisy context).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from ..nn import Block, KVCache, RotaryEmbedding, block_causal_mask, dense_to_mask, grid_positions
from ..nn.embeddings import timestep_embedding
from ..sampling.flow import FlowSampler, check_flow_sampler
from ..sampling.strategy import GenerationOutput
from ..sampling.streams import normal
from .base import Generator

ENTITIES = ("token", "cell", "subsample", "scale", "image")


def entity_partition(entity: str, side: int, cell_size: int = 2, stride: int = 2) -> tuple[Tensor, Tensor]:
    """The reordering of a side x side latent grid into `entity` groups.

    Returns ``order`` (side^2,) long, the raster index of each position in entity order, and ``sizes`` (K,) long, the
    positions of each entity in that order (they sum to side^2). Every raster index appears in ``order`` exactly once.
    """
    if entity not in ENTITIES:
        raise ValueError(f"entity must be one of {ENTITIES}, got {entity!r}")
    if side < 1:
        raise ValueError(f"the latent side must be >= 1, got {side}")
    # index tables live on the CPU whatever the default device (a preset built on the meta device keeps them)
    raster = torch.arange(side * side, device="cpu").view(side, side)
    if entity == "token":
        return raster.flatten(), torch.ones(side * side, dtype=torch.long, device="cpu")
    if entity == "image":
        return raster.flatten(), torch.tensor([side * side], device="cpu")
    if entity == "cell":
        if cell_size < 1 or side % cell_size:
            raise ValueError(f"cell_size {cell_size} must divide the latent side {side}")
        cells = side // cell_size
        # (cells, k, cells, k) -> (cell row, cell column, row in cell, column in cell)
        order = raster.view(cells, cell_size, cells, cell_size).permute(0, 2, 1, 3).flatten()
        return order, torch.full((cells * cells,), cell_size * cell_size, device="cpu")
    if entity == "subsample":
        if stride < 1 or side % stride:
            raise ValueError(f"stride {stride} must divide the latent side {side}")
        order = torch.cat([raster[a::stride, b::stride].flatten() for a in range(stride) for b in range(stride)])
        return order, torch.full((stride * stride,), (side // stride) ** 2, device="cpu")
    # scale: nested lattices of strides side, side / 2, ..., 1
    if side & (side - 1):
        raise ValueError(f"entity 'scale' needs a latent side that is a power of two, got {side}")
    taken = torch.zeros(side, side, dtype=torch.bool, device="cpu")
    pieces, sizes = [], []
    lattice = side
    while lattice >= 1:
        mine = torch.zeros(side, side, dtype=torch.bool, device="cpu")
        mine[::lattice, ::lattice] = True
        mine &= ~taken
        pieces.append(raster[mine])  # raster order within the scale
        sizes.append(int(mine.sum()))
        taken |= mine
        lattice //= 2
    return torch.cat(pieces), torch.tensor(sizes, device="cpu")


def sample_logit_normal(shape: tuple[int, ...], device, mean: float = 0.0, std: float = 1.0,
                        generator: torch.Generator | None = None) -> Tensor:
    """t = sigmoid(N(mean, std^2)) of `shape` (xAR's ``sample_logit_normal``, SD3's logit-normal timesteps)."""
    return torch.sigmoid(mean + std * torch.randn(shape, device=device, generator=generator))


class TimestepEmbedder(nn.Module):
    """Timesteps (...) in [0, 1] -> (..., dim): sinusoidal features of 1000 t through Linear-SiLU-Linear (DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        # the sinusoidal features are float32; the layers may run in bf16
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def xar_size(dim: int, depth: int, num_heads: int) -> dict:
    """One of xAR's sizes (encoder and decoder of `depth` blocks each) in its ImageNet 256 setting: MAR's KL-16 VAE
    (16 channels, 16 x 16 latents), 2 x 2 cells of 8 x 8, 1000 classes, class dropout 0.1."""
    return dict(latent_channels=16, latent_size=16, num_classes=1000, entity="cell", cell_size=8, dim=dim, depth=depth,
                decoder_depth=depth, num_heads=num_heads, class_dropout=0.1)


@register
class XAR(Generator):
    """Class-conditional next-X flow generator over continuous latents.

    Shapes: latents (B, latent_channels, latent_size, latent_size) float (a VAE's normalised ``encode_latents``);
    labels (B,) long in [0, num_classes); the network maps noisy tokens (B, n, C), their times and labels to
    velocities (B, n, C).
    """

    presets = {
        # the paper's xAR-B / L / H (Ren et al. 2025, Table 5: 172M, 608M, 1.1B); official models/xar.py xar_base ...
        "xar-b": xar_size(768, 8, 12),
        "xar-l": xar_size(1024, 16, 16),
        "xar-h": xar_size(1280, 20, 16),
        # CPU-sized presets for tests and MNIST VAE latents (the caller gives the latent sizes)
        "xar-tiny": dict(dim=32, depth=1, decoder_depth=1, num_heads=2),
        "xar-digits": dict(dim=128, depth=3, decoder_depth=3, num_heads=4),
    }
    continuous = True

    def __init__(
        self,
        latent_channels: int,
        latent_size: int,
        num_classes: int = 10,
        entity: str = "cell",
        cell_size: int = 2,
        stride: int = 2,
        dim: int = 256,
        depth: int = 4,
        decoder_depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        class_dropout: float = 0.1,
        noisy_context: bool = True,
        time_mean: float = 0.0,
        time_std: float = 1.0,
        rope_base: float = 10000.0,
        attention_backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("latent_channels", latent_channels), ("latent_size", latent_size),
                            ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(decoder_depth, bool) or not isinstance(decoder_depth, int) or decoder_depth < 0:
            raise ValueError(f"decoder_depth must be an int >= 0, got {decoder_depth!r}")
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"dim {dim} / num_heads {num_heads} must give a head width divisible by 4 (2D RoPE)")
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must lie in [0, 1], got {class_dropout}")
        if not isinstance(noisy_context, bool):
            raise ValueError(f"noisy_context must be a bool, got {noisy_context!r}")
        if not time_std > 0:
            raise ValueError(f"time_std must be positive, got {time_std}")
        order, sizes = entity_partition(entity, latent_size, cell_size, stride)
        self.vocab_size = None
        self.latent_channels, self.latent_size = latent_channels, latent_size
        self.max_tokens = latent_size * latent_size
        self.grid = (latent_size, latent_size)
        self.num_classes, self.class_dropout = num_classes, class_dropout
        self.entity, self.cell_size, self.stride = entity, cell_size, stride
        self.dim, self.noisy_context = dim, noisy_context
        self.time_mean, self.time_std = time_mean, time_std
        self.encoder_depth, self.decoder_depth = depth, decoder_depth

        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        self.register_buffer("sizes", sizes, persistent=False)
        self.register_buffer("starts", torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]), persistent=False)
        self.register_buffer("entity_ids", torch.repeat_interleave(torch.arange(len(sizes), device="cpu"), sizes),
                             persistent=False)
        self.register_buffer("positions", grid_positions(latent_size, latent_size, device="cpu")[order], persistent=False)

        self.class_embed = nn.Embedding(num_classes + 1, dim)
        self.time_embed = TimestepEmbedder(dim)
        self.input_proj = nn.Linear(latent_channels, dim)
        self.encoder_pos = nn.Parameter(torch.zeros(1, self.max_tokens, dim))  # raster order
        self.input_norm = nn.RMSNorm(dim, eps=1e-6)
        block = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, mlp="swiglu", norm="rms", cond_dim=dim,
                     backend=attention_backend)
        self.encoder = nn.ModuleList(Block(dim, **block) for _ in range(depth))
        self.encoder_norm = nn.RMSNorm(dim, eps=1e-6)
        if decoder_depth:
            self.decoder_embed = nn.Linear(dim, dim)
            self.decoder_pos = nn.Parameter(torch.zeros(1, self.max_tokens, dim))
            self.decoder = nn.ModuleList(Block(dim, **block) for _ in range(decoder_depth))
            self.decoder_norm = nn.RMSNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, latent_channels)
        self.rope = RotaryEmbedding(dim // num_heads, axes=2, base=rope_base)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.encoder_pos, std=0.02)
        if self.decoder_depth:
            nn.init.normal_(self.decoder_pos, std=0.02)
        for block in self.blocks():  # AdaLN-zero: every block starts as the identity
            nn.init.zeros_(block.modulation[1].weight)
            nn.init.zeros_(block.modulation[1].bias)

    @property
    def mask(self):
        """Block-causal by entity: query i sees key j iff entity(j) <= entity(i)."""
        return self.cached_mask("block_causal", lambda device: block_causal_mask(self.entity_ids))

    def blocks(self) -> list[Block]:
        return list(self.encoder) + (list(self.decoder) if self.decoder_depth else [])

    @property
    def num_entities(self) -> int:
        return int(self.sizes.numel())

    # -- layout ----------------------------------------------------------------------------------------------------
    def check_latents(self, latents: Tensor) -> None:
        expected = (self.latent_channels, self.latent_size, self.latent_size)
        if not isinstance(latents, Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"XAR expects latents of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) (the "
                             f"tokenizer's encode_latents), got {shape}")
        if not latents.is_floating_point():
            raise ValueError(f"latents must be a float tensor (continuous tokens), got dtype {latents.dtype}")

    def to_sequence(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, h w, C) tokens in entity order."""
        return latents.flatten(2).transpose(1, 2)[:, self.order]

    def to_latents(self, sequence: Tensor) -> Tensor:
        """Inverse of :meth:`to_sequence`: (B, h w, C) in entity order -> (B, C, h, w)."""
        raster = sequence[:, self.inverse]
        return raster.transpose(1, 2).reshape(sequence.shape[0], self.latent_channels, self.latent_size, self.latent_size)

    # -- network -----------------------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, times: Tensor, labels: Tensor, index: Tensor, mask=None,
                kv_cache: KVCache | None = None, commit: int = 0) -> Tensor:
        """Velocities of noisy tokens.

        tokens (B, n, C) at sequence positions `index` (n,) long (entity order); times (B, n) the t of each token;
        labels (B,) long (``null_class`` for the unconditional branch); mask: the attention mask over (queries, keys)
        (default: block-causal by entity over the absolute positions, the queries after the cached prefix).
        With `kv_cache`, the tokens' keys and values are written after its prefix and the first `commit` of them stay
        there (the rest is dropped once the call returns). Returns (B, n, C).
        """
        mask = self.mask if mask is None else mask
        condition = self.class_embed(labels)[:, None] + self.time_embed(times)
        rope = self.rope(self.positions[index])
        h = self.input_norm(self.input_proj(tokens) + self.encoder_pos[:, self.order[index]])
        for layer, block in enumerate(self.encoder):
            h = block(h, mask, rope, condition, kv_cache, layer)
        h = self.encoder_norm(h)
        if self.decoder_depth:
            h = self.decoder_embed(h) + self.decoder_pos[:, self.order[index]]
            for layer, block in enumerate(self.decoder):
                h = block(h, mask, rope, condition, kv_cache, self.encoder_depth + layer)
            h = self.decoder_norm(h)
        if kv_cache is not None:
            kv_cache.advance(commit)
        return self.head(h)

    def new_cache(self, batch_size: int) -> KVCache:
        """A KV cache of every encoder and decoder layer for `batch_size` rows (2B under CFG) and h w positions."""
        parameter = self.head.weight
        return KVCache(self.encoder_depth + self.decoder_depth, batch_size, self.encoder[0].attn.num_heads,
                       self.max_tokens, self.dim // self.encoder[0].attn.num_heads, device=parameter.device,
                       dtype=parameter.dtype)

    # -- training ----------------------------------------------------------------------------------------------------
    def training_loss(self, latents: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """Flow matching with noisy context: MSE between predicted and true velocity eps - x at every position.

        latents (B, C, h, w); labels (B,) long; ``lengths`` must be None or h w everywhere (continuous latents have
        no variable length).
        """
        self.check_latents(latents)
        labels = self.check_labels(labels)
        batch = latents.shape[0]
        if lengths is not None and bool((torch.as_tensor(lengths) != self.max_tokens).any()):
            raise ValueError(f"XAR trains on whole latents: lengths must all be {self.max_tokens} (h * w), got "
                             f"{torch.as_tensor(lengths).unique().tolist()}")
        x = self.to_sequence(latents.float())
        labels = self.drop_labels(labels)
        # one t per (image, entity), spread over the entity's positions
        entity_times = sample_logit_normal((batch, self.num_entities), latents.device, self.time_mean, self.time_std)
        times = entity_times[:, self.entity_ids]
        noise = torch.randn_like(x)
        noisy = (1 - times[..., None]) * x + times[..., None] * noise
        target = noise - x
        every = torch.arange(self.max_tokens, device=latents.device)
        if self.noisy_context:
            velocity = self(noisy, times, labels, every)
        else:  # teacher forcing: [clean x at t = 0; x_t], the noisy half reading the clean entities before its own
            sequence = torch.cat([x, noisy], dim=1)
            both = torch.cat([torch.zeros_like(times), times], dim=1)
            velocity = self(sequence, both, labels, torch.cat([every, every]), mask=self.teacher_forcing_mask())
            velocity = velocity[:, self.max_tokens:]
        loss = F.mse_loss(velocity.float(), target)
        logs = {"loss": loss.detach(), "t_mean": entity_times.mean().detach()}
        return loss, logs

    def teacher_forcing_mask(self):
        """The (2 h w, 2 h w) mask of ``noisy_context=False``: clean half block-causal, noisy entity k reading the
        clean entities < k and itself."""
        return self.cached_mask("teacher_forcing", lambda device: self._teacher_forcing_mask())

    def _teacher_forcing_mask(self):
        ids = self.entity_ids
        clean_sees_clean = ids[None, :] <= ids[:, None]
        noisy_sees_clean = ids[None, :] < ids[:, None]
        noisy_sees_noisy = ids[None, :] == ids[:, None]
        nothing = torch.zeros_like(clean_sees_clean)
        allowed = torch.cat([torch.cat([clean_sees_clean, nothing], 1), torch.cat([noisy_sees_clean, noisy_sees_noisy], 1)])
        return dense_to_mask(allowed)

    # -- sampling ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        sampler: FlowSampler | None = None,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> GenerationOutput:
        """Latents for `labels` (B,), one entity after the other (see the module docstring).

        sampler: a :class:`flexar.sampling.FlowSampler` (None: its defaults); any token sampler is refused.
        Returns ``GenerationOutput(ids=None, latents=(B, C, h, w), stats)`` with ``forward_passes`` = entities x steps.
        """
        sampler = check_flow_sampler(sampler, type(self).__name__)
        labels, count, generator, timer, conditions, copies = self.begin_generation(
            labels, sampler, generator, num_tokens, whole=f"{type(self).__name__} generates whole latents")
        batch, channels = labels.shape[0], self.latent_channels
        times = sampler.times().tolist()
        cache = self.new_cache(conditions.shape[0]) if use_cache else None
        dtype = self.input_proj.weight.dtype
        done = torch.empty(batch, 0, channels, device=labels.device)  # finished entities, clean, in entity order
        passes = 0
        starts = self.starts.tolist()
        for k in self.progress_range(self.num_entities, progress, f"{type(self).__name__} entities"):
            start, end = starts[k], starts[k + 1]
            scale = sampler.entity_scale(k, self.num_entities)
            x = normal(generator, (batch, end - start, channels), labels.device)
            for step in range(sampler.steps):
                t, t_next = times[step], times[step + 1]
                if cache is not None:
                    # the first call of entity k > 0 brings entity k - 1, clean, into the cache
                    context = done[:, starts[k - 1]:] if step == 0 and k > 0 else done[:, :0]
                else:
                    context = done  # the reference: the whole clean prefix at every call
                first = end - start + context.shape[1]
                tokens = torch.cat([context, x], dim=1)
                token_times = torch.cat([torch.zeros(batch, context.shape[1], device=x.device),
                                         torch.full((batch, end - start), t, device=x.device)], dim=1)
                index = torch.arange(end - first, end, device=x.device)
                # the flow's state stays float32; the network reads it in its own precision
                velocity = self(tokens.repeat(copies, 1, 1).to(dtype), token_times.repeat(copies, 1), conditions, index,
                                kv_cache=cache, commit=context.shape[1] if cache is not None else 0)
                passes += 1
                velocity = sampler.guide(velocity[:, -(end - start):].float(), scale)
                noise = normal(generator, x.shape, x.device) if sampler.noise and t_next > 0 else None
                x = sampler.step(x, velocity, t, t_next, noise)
            done = torch.cat([done, x], dim=1)
        stats = {"forward_passes": passes, "tokens": batch * count, "seconds": timer.seconds(), "batch_size": batch,
                 "entities": self.num_entities, "steps_per_entity": sampler.steps}
        return GenerationOutput(ids=None, stats=stats, latents=self.to_latents(done))
