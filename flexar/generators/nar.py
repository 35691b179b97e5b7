"""Next-neighbour autoregressive generation ("Neighboring Autoregressive Modeling for Efficient Visual Generation",
He et al. 2025; ThisisBillhe/NAR, NAR-images/autoregressive/models/{gpt,generate}.py).

A token grid of h x w cells is generated outward from the top-left corner: the "distance" of cell (r, c) is r + c,
and every cell on the diagonal r + c = t is decoded in one forward pass once all cells of distance < t are known, so
a grid takes h + w - 1 passes instead of h * w (a prefill for (0, 0), then one pass per diagonal).

Network: LlamaGen's decoder (class token + token embeddings, RMSNorm/SwiGLU blocks with 2D rotary embeddings) over
[class token, t_0, ..., t_{N-1}] with the *proximity mask*: token i attends to token j iff d(j) <= d(i) (same diagonal
included) and every token sees the class token, which sees only itself. Two dimension-oriented heads read the hidden
state of each token:

- horizontal head = the transformer's final norm + output layer: token (r, c) predicts (r, c + 1);
- vertical head = one extra transformer block (after the last main block, under the same mask) + its own norm and
  output layer: token (r, c) predicts (r + 1, c).

Training (teacher forcing on the raster sequence, all N tokens fed): the logits of target (r, c) are
- (0, 0): the average of both heads at the class token;
- (0, c): the horizontal head at (0, c - 1);
- (r, 0): the vertical head at (r - 1, 0);
- otherwise the average of the horizontal head at (r, c - 1) and the vertical head at (r - 1, c);
then one cross-entropy over the N targets. Both heads are thus trained on every target they can see.

Generation: pass 0 feeds the class token (prefill) and samples (0, 0); pass t >= 1 feeds the diagonal t - 1 that the
previous pass decoded and samples the whole diagonal t from the combined logits above. The KV cache stores tokens in
*decode order* (class token, then diagonal after diagonal, each top row first), so the attention mask and the rotary
positions are built from the true grid position of every cache slot, not from its index; the result equals the
teacher-forced logits. (A cached pass feeds one whole diagonal, whose queries may see every cached key and each other,
so it runs unmasked; recomputing the decoded prefix without a cache uses the decode-order mask.) With CFG the batch
is doubled as [labels; null] as in :class:`RasterAR`. After ``compile_decoding()`` every cached pass after the
prefill runs through one ``torch.compile`` graph: the diagonal is padded to the longest one (min(h, w) cells), the
padding is written past the committed cache length and masked out of attention, and the pass reads only the cache's
device lengths and a device count of real cells.

Shapes: ids (B, N = h * w) long, raster order; labels (B,) long; head logits (B, L_in, vocab_size).

Differences from the paper and its official code:
- no token, residual or FFN dropout (the official code trains with 0.1 each), as in flexar's :class:`RasterAR`.
- SwiGLU widths round to multiples of 8 and norms use eps 1e-6 by default, as in :class:`RasterAR`; the official code
  (LlamaGen's) rounds to 256 with eps 1e-5, which ``mlp_multiple_of=256`` and ``norm_eps=1e-5`` restore and the paper
  presets (``nar-b`` ... ``nar-xxl``) set, so they count the paper's parameters (tests/test_generator_presets.py).
- the official code zero-initialises the horizontal output layer only; here both output layers use normal(0, 0.02)
  (``zero_init_head=True`` zeroes both), so that a fresh model does not favour one head.
- the official generation loop only supports square grids and reorders the decoded tokens row by row; here any h x w
  grid works, with h + w - 1 passes.
- the official code's ``cfg_interval`` (drop guidance after a number of tokens) is not implemented; guidance follows
  the sampler's schedule at every pass.
- grids are always generated and trained whole: ``num_tokens`` must be None or h * w, and ``lengths`` (flexible-length
  tokenizers) must cover the whole grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from ..nn import Block, KVCache, Mask, RotaryEmbedding, Transformer, grid_positions, make_norm
from ..sampling import SamplingState
from .base import GenerationOutput, Generator, compile_step
from .raster import llamagen_size

def proximity_mask(distance: Tensor) -> Mask:
    """The NAR mask over a sequence whose index k holds a token at grid distance ``distance[k]`` (r + c; -1 for the
    class token): query i may attend to key j iff distance[j] <= distance[i]."""
    return Mask(lambda q, kv: distance[kv] <= distance[q], name="proximity")


def decode_order(height: int, width: int) -> Tensor:
    """(h * w,) raster indices of the cells in NAR's decoding order: by distance r + c, then by row."""
    rows, cols = grid_positions(height, width).unbind(-1)
    return torch.argsort((rows + cols) * height + rows)


def neighbour_sources(order: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Where each target's logits come from, for a sequence [class token, cells in ``order``].

    Returns (horizontal, vertical), each (h * w,) indexed by raster cell: the sequence index whose horizontal head
    (its left neighbour) or vertical head (its upper neighbour) predicts that cell, -1 where there is none. Cell (0, 0)
    reads both heads at the class token (sequence index 0).
    """
    rows, cols = grid_positions(height, width).unbind(-1)
    sequence_index = torch.empty_like(order)
    sequence_index[order] = torch.arange(1, order.numel() + 1)
    cells = torch.arange(height * width)
    horizontal = torch.where(cols > 0, sequence_index[(cells - 1).clamp_min(0)], -1)
    vertical = torch.where(rows > 0, sequence_index[(cells - width).clamp_min(0)], -1)
    horizontal[0] = vertical[0] = 0
    return horizontal, vertical


def neighbour_logits(horizontal_features: Tensor, vertical_features: Tensor, horizontal_head: nn.Linear,
                     vertical_head: nn.Linear, horizontal_source: Tensor, vertical_source: Tensor) -> Tensor:
    """Logits of n targets from the two heads: the mean of the available sources (index -1 = absent).

    features: (B, L, dim), each head's normed input; heads: bias-free output layers; sources: (n,) long indices into
    L. Returns (B, n, V). The source rows are gathered and scaled by 1 / (number of sources) before the output
    layers, which equals averaging the heads' logits (the heads are linear and bias-free) while running each head once
    per target instead of once per input, and never building (B, L, V) logits to gather from.
    """
    has_horizontal = horizontal_source >= 0
    has_vertical = vertical_source >= 0
    count = (has_horizontal.to(horizontal_features.dtype) + has_vertical.to(horizontal_features.dtype))[:, None]

    def rows(features: Tensor, source: Tensor, present: Tensor) -> Tensor:
        # an absent source contributes nothing, even if its features are not finite
        return torch.where(present[:, None], features[:, source.clamp_min(0)] / count, 0.0)

    logits = horizontal_head(rows(horizontal_features, horizontal_source, has_horizontal))
    return logits + vertical_head(rows(vertical_features, vertical_source, has_vertical))


@register
class NAR(Generator):
    """Class-conditional next-neighbour generator over an h x w token grid (raster-order ids).

    The modules keep :class:`RasterAR`'s names (``class_embed``, ``token_embed``, ``transformer``, ``head``) and add
    ``vertical_block``, ``vertical_norm`` and ``vertical_head``.
    """

    presets = {
        # NAR-B / M / L / XL / XXL (He et al. 2025, Table 1: 130M, 290M, 372M, 816M, 1.46B): LlamaGen's GPT-B / M / L /
        # XL / XXL in LlamaGen's ImageNet 256 setting (the official gpt.py is LlamaGen's with its GPT_models, GPT-M
        # included: GPT-L's width with 6 fewer layers), plus the vertical head's block, norm and output layer
        "nar-b": llamagen_size(768, 12, 12),
        "nar-m": llamagen_size(1024, 18, 16),
        "nar-l": llamagen_size(1024, 24, 16),
        "nar-xl": llamagen_size(1280, 36, 20),
        "nar-xxl": llamagen_size(1536, 48, 24),
        # CPU-sized presets for tests, digits and MNIST (the caller gives the tokenizer's sizes)
        "nar-tiny": dict(dim=64, depth=2, num_heads=4),
        "nar-digits": dict(dim=256, depth=6, num_heads=8),
    }

    def __init__(
        self,
        vocab_size: int,
        max_tokens: int,
        grid: list[int],
        num_classes: int = 10,
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
        norm_eps: float = 1e-6,
        mlp_multiple_of: int = 8,
    ):
        super().__init__()
        self.set_sizes(vocab_size, max_tokens, num_classes, class_dropout, grid, require_grid=True)
        self.dim, self.depth = dim, depth

        self.class_embed = nn.Embedding(num_classes + 1, dim)
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.transformer = Transformer(
            dim, depth, num_heads, mlp_ratio, mlp="swiglu", norm="rms", qk_norm=qk_norm, backend=attention_backend,
            norm_eps=norm_eps, mlp_multiple_of=mlp_multiple_of,
        )
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.vertical_block = Block(dim, num_heads, mlp_ratio, mlp="swiglu", norm="rms", qk_norm=qk_norm,
                                    backend=attention_backend, norm_eps=norm_eps, mlp_multiple_of=mlp_multiple_of)
        self.vertical_norm = make_norm("rms", dim, eps=norm_eps)
        self.vertical_head = nn.Linear(dim, vocab_size, bias=False)
        self.rope = RotaryEmbedding(dim // num_heads, axes=2, base=rope_base)

        # the index tables are computed on the CPU, also under a meta-device context (a model built on the meta
        # device to count its parameters), where bincount and tolist cannot run; they then join the parameters' device
        height, width = grid
        with torch.device("cpu"):
            cells = grid_positions(height, width)
            order = decode_order(height, width)
            no_position, unused = torch.full((1, 2), -1), torch.tensor([-1])
            distance = cells.sum(-1)
            raster_horizontal, raster_vertical = neighbour_sources(torch.arange(max_tokens), height, width)
            decode_horizontal, decode_vertical = neighbour_sources(order, height, width)
            tables = {
                "order": order,
                # per sequence order: rotary position and grid distance of every input index (index 0 = class token)
                "raster_positions": torch.cat([no_position, cells]),
                "decode_positions": torch.cat([no_position, cells[order]]),
                "raster_distance": torch.cat([unused, distance]),
                "decode_distance": torch.cat([unused, distance[order]]),
                "horizontal_source": raster_horizontal,
                "vertical_source": raster_vertical,
                # the same sources in decode order, indexed by the target's decode-sequence index (entry 0 unused)
                "decode_horizontal_source": torch.cat([unused, decode_horizontal[order]]),
                "decode_vertical_source": torch.cat([unused, decode_vertical[order]]),
            }
            # decode-sequence index where each diagonal starts: pass t feeds [bounds[t], bounds[t+1]) and samples
            # [bounds[t+1], bounds[t+2]), i.e. the cells of distance t
            counts = torch.bincount(distance, minlength=height + width - 1)
            self.bounds = [0] + (1 + torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])).tolist()
            self.decode_diagonals = tables["decode_distance"].tolist()
            # a compiled pass feeds the longest diagonal's width; the padding's positions read rows past the table
            self.widest_diagonal = min(height, width)
            tables["padded_decode_positions"] = torch.cat(
                [tables["decode_positions"], torch.zeros(self.widest_diagonal, 2, dtype=torch.long)])
        for name, table in tables.items():
            self.register_buffer(name, table.to(self.head.weight.device), persistent=False)
        self._masks: dict = {}

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
            nn.init.zeros_(self.vertical_head.weight)

    @property
    def num_passes(self) -> int:
        """Forward passes per generated grid: h + w - 1."""
        return self.grid[0] + self.grid[1] - 1

    def mask(self, order: str) -> Mask:
        """The proximity mask for the raster (training) or decode (generation) sequence order."""
        distance = getattr(self, f"{order}_distance")
        key = (order, str(distance.device))
        if key not in self._masks:
            self._masks[key] = proximity_mask(distance)
        return self._masks[key]

    # -- network -------------------------------------------------------------------------------------------------------
    def embed(self, ids: Tensor, labels: Tensor | None, start: int) -> Tensor:
        """Input embeddings (B, n, dim) for sequence indices [start, start + n): the class token leads when start == 0."""
        tokens = self.token_embed(ids)
        if start > 0:
            return tokens
        if labels is None:
            raise ValueError("labels are needed when the class token is fed (no cached prefix)")
        if labels.shape != (ids.shape[0],):
            raise ValueError(f"labels must have shape ({ids.shape[0]},) to match ids, got {tuple(labels.shape)}")
        return torch.cat([self.class_embed(labels).unsqueeze(1), tokens], dim=1)

    def forward(
        self,
        ids: Tensor,
        labels: Tensor | None = None,
        kv_cache: KVCache | None = None,
        order: str = "raster",
    ) -> tuple[Tensor, Tensor]:
        """Horizontal and vertical head logits for the input [class token, ids] (or just ids after a cached prefix).

        ids: (B, n) long, the tokens at sequence indices [start, start + n) of the sequence ``order`` ("raster": cells
        in raster order, for training; "decode": cells in decoding order, for generation), start = the cache length;
        labels: (B,) long, needed when start == 0. Returns (horizontal, vertical), each (B, L_in, vocab_size) with
        L_in = n + 1 without a prefix and n with one.
        """
        horizontal, vertical = self.head_features(ids, labels, kv_cache, order)
        return self.head(horizontal), self.vertical_head(vertical)

    def head_features(
        self,
        ids: Tensor,
        labels: Tensor | None = None,
        kv_cache: KVCache | None = None,
        order: str = "raster",
    ) -> tuple[Tensor, Tensor]:
        """The inputs of the horizontal and vertical output layers, each (B, L_in, dim); arguments as in ``forward``."""
        if order not in ("raster", "decode"):
            raise ValueError(f"order must be 'raster' or 'decode', got {order!r}")
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, n), got shape {tuple(ids.shape)}")
        start = 0 if kv_cache is None else kv_cache.length
        x = self.embed(ids, labels, start)
        length = x.shape[1]
        if start + length > self.max_tokens + 1:
            raise ValueError(
                f"input reaches index {start + length}, past the class token + {self.max_tokens} tokens this model holds"
            )
        # decoding feeds whole diagonals in order: the new queries (distance t) see every cached key (distance < t)
        # and each other, so a cached decode pass needs no mask, like a raster step
        # (the class token alone, a cached prefill, sees only itself: unmasked too)
        one_diagonal = (start > 0 and self.decode_diagonals[start] == self.decode_diagonals[start + length - 1]
                        or kv_cache is not None and start == 0 and length == 1)
        mask = None if order == "decode" and one_diagonal else self.mask(order)
        rope = self.rope(getattr(self, f"{order}_positions")[start : start + length])
        for index, block in enumerate(self.transformer.blocks):
            x = block(x, mask, rope, kv_cache=kv_cache, layer_index=index)
        below = self.vertical_block(x, mask, rope, kv_cache=kv_cache, layer_index=self.depth)
        if kv_cache is not None:
            kv_cache.advance(length)
        return self.transformer.final_norm(x), self.vertical_norm(below)

    def grid_logits(self, ids: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits of every cell, (B, N, V) in raster order, from the rolled heads (see module doc)."""
        horizontal, vertical = self.head_features(ids, labels)
        return neighbour_logits(horizontal, vertical, self.head, self.vertical_head, self.horizontal_source,
                                self.vertical_source)

    # -- decoding ------------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache for the main blocks and the vertical block (depth + 1 layers), in decode order.

        NAR decodes whole diagonals, so it has no token-by-token ``prefill`` / ``step`` hooks, and the decoding
        strategies that drive them (speculative decoding, LANTERN, ScalingAR, best-of-N) refuse it with a ValueError
        before any work.
        """
        parameter = self.head.weight
        return KVCache(self.depth + 1, batch_size, self.transformer.num_heads,
                       self.max_tokens + 1 if max_length is None else max_length, self.transformer.head_dim,
                       device=parameter.device, dtype=parameter.dtype)

    def compile_decoding(self, enabled: bool = True, mode: str | None = None, backend: str = "inductor") -> "NAR":
        """Run every cached decoding pass after the prefill through ``torch.compile`` (the default mode on a CPU,
        ``"reduce-overhead"`` on CUDA, or `mode`). A compiled pass feeds its diagonal padded to the longest one
        (min(h, w) cells): the padding is written past the cache's committed length and masked out of attention,
        and the pass reads the cache's device lengths and a device count only, so one graph serves every pass of
        every grid of that batch size. Tokens equal eager decoding's to float rounding of the logits.
        ``enabled=False`` returns to eager passes; `backend` as in :func:`flexar.generators.base.compile_step`.
        Returns the model."""
        if not enabled:
            self.__dict__.pop("_compiled_pass", None)
            return self
        self.__dict__["_compiled_pass"] = compile_step(self._padded_pass_features, self.device, mode, backend)
        return self

    @property
    def decoding_compiled(self) -> bool:
        """Whether :meth:`compile_decoding` is on."""
        return "_compiled_pass" in self.__dict__

    def _padded_pass_features(self, fed: Tensor, count: Tensor, kv_cache: KVCache) -> tuple[Tensor, Tensor]:
        """The head inputs of a cached pass over `fed` (B, widest_diagonal) whose first `count` (a 0-dim long
        tensor) cells are the diagonal and the rest padding: every query sees the committed prefix and the diagonal,
        never the padding. Writes all widest_diagonal keys past the committed length and does not advance the cache."""
        positions = kv_cache.positions(fed.shape[1])
        limit = (kv_cache.lengths + count)[:, None, None]
        visible = Mask(lambda q, kv: kv < limit, name="diagonal")
        x = self.token_embed(fed)
        rope = self.rope(self.padded_decode_positions[positions])
        for index, block in enumerate(self.transformer.blocks):
            x = block(x, visible, rope, kv_cache=kv_cache, layer_index=index)
        below = self.vertical_block(x, visible, rope, kv_cache=kv_cache, layer_index=self.depth)
        return self.transformer.final_norm(x), self.vertical_norm(below)

    def compiled_pass_logits(self, step: int, decoded: Tensor, kv_cache: KVCache) -> Tensor:
        """:meth:`pass_logits` of pass ``step`` >= 1 through the compiled padded pass (:meth:`compile_decoding`)."""
        first, fed_end, end = self.bounds[step], self.bounds[step + 1], self.bounds[step + 2]
        if step < 1 or kv_cache.length != first:
            raise ValueError(f"a compiled pass {step} needs a prefilled KV cache holding {first} positions")
        count = fed_end - first
        if kv_cache.max_length < first + self.widest_diagonal:
            raise ValueError(f"a compiled pass needs a KV cache of {self.max_tokens + self.widest_diagonal} positions "
                             f"(room for the padded diagonal), this one holds {kv_cache.max_length}")
        fed = F.pad(decoded[:, first - 1 : fed_end - 1], (0, self.widest_diagonal - count))
        counts = self.__dict__.setdefault("_pass_counts", {})
        key = (count, str(fed.device))
        if key not in counts:
            counts[key] = torch.tensor(count, device=fed.device)
        horizontal, vertical = self.__dict__["_compiled_pass"](fed, counts[key], kv_cache)
        kv_cache.advance(count)
        return neighbour_logits(horizontal, vertical, self.head, self.vertical_head,
                                self.decode_horizontal_source[fed_end:end] - first,
                                self.decode_vertical_source[fed_end:end] - first)

    def pass_logits(self, step: int, decoded: Tensor, labels: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Logits of the cells at distance ``step``, given the decoded cells of distance < ``step``.

        decoded: (B, >= bounds[step] - 1) ids in decode order (cells of distance < step first); labels: (B,);
        kv_cache: a cache holding exactly the passes before ``step`` (None recomputes the whole prefix).
        Returns (B, n_step, V) for the cells ``order[bounds[step + 1] - 1 : bounds[step + 2] - 1]``.
        """
        first, fed_end, end = self.bounds[step], self.bounds[step + 1], self.bounds[step + 2]
        if kv_cache is not None:
            if kv_cache.length != first:
                raise ValueError(f"pass {step} needs a KV cache holding {first} positions, it holds {kv_cache.length}")
            fed = decoded[:, max(first - 1, 0) : fed_end - 1]
            horizontal, vertical = self.head_features(fed, labels, kv_cache, "decode")
            offset = first
        else:
            horizontal, vertical = self.head_features(decoded[:, : fed_end - 1], labels, None, "decode")
            offset = 0
        return neighbour_logits(
            horizontal,
            vertical,
            self.head,
            self.vertical_head,
            self.decode_horizontal_source[fed_end:end] - offset,
            self.decode_vertical_source[fed_end:end] - offset,
        )

    # -- objective -----------------------------------------------------------------------------------------------------
    def training_loss(self, ids: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """Cross-entropy of the rolled neighbour logits over every cell. ids: (B, N) long; labels: (B,) long."""
        labels = self.check_labels(labels)
        lengths = self.check_ids(ids, lengths)
        if ids.shape[1] != self.max_tokens or bool((lengths != self.max_tokens).any()):
            raise ValueError(f"NAR trains on whole {self.grid[0]}x{self.grid[1]} grids: ids must be (B, {self.max_tokens})"
                             f" with every length {self.max_tokens}")
        if labels.shape[0] != ids.shape[0]:
            raise ValueError(f"got {labels.shape[0]} labels for {ids.shape[0]} rows of ids")
        logits = self.grid_logits(ids, self.drop_labels(labels))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        with torch.no_grad():
            accuracy = (logits.argmax(dim=-1) == ids).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "perplexity": loss.detach().exp()}

    # -- sampling ------------------------------------------------------------------------------------------------------
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
        """Sample a whole grid per label, one diagonal per forward pass (h + w - 1 passes).

        labels: (B,) long; sampler: a :class:`flexar.sampling.Sampler` (CFG doubles the batch with null labels);
        returns ids (B, h * w) in raster order and stats.
        """
        labels, count, generator, timer, conditions, copies = self.begin_generation(
            labels, sampler, generator, num_tokens, whole=f"NAR generates whole {self.grid[0]}x{self.grid[1]} grids")
        batch = labels.shape[0]
        # ids in decode order, one row per row of the (CFG-doubled) batch; the last diagonal is never fed back
        decoded = torch.zeros(conditions.shape[0], self.max_tokens, dtype=torch.long, device=labels.device)
        compiled = use_cache and self.decoding_compiled
        room = self.max_tokens + (self.widest_diagonal if compiled else 0)
        kv_cache = self.new_cache(conditions.shape[0], room) if use_cache else None
        for step in self.progress_range(self.num_passes, progress, "NAR decoding"):
            if compiled and step > 0:
                logits = self.compiled_pass_logits(step, decoded, kv_cache)
            else:
                logits = self.pass_logits(step, decoded, conditions, kv_cache)
            state = SamplingState(step=step, num_steps=self.num_passes)
            sampled = sampler.sample(logits, state, generator)
            decoded[:, self.bounds[step + 1] - 1 : self.bounds[step + 2] - 1] = sampled.repeat(copies, 1)
        ids = torch.empty(batch, self.max_tokens, dtype=torch.long, device=labels.device)
        ids[:, self.order] = decoded[:batch]
        stats = {
            "forward_passes": self.num_passes,
            "tokens": batch * count,
            "seconds": timer.seconds(),
            "batch_size": batch,
        }
        return GenerationOutput(ids=ids, stats=stats)
