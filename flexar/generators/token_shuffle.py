"""Token-Shuffle: fewer visual tokens per transformer position by merging spatial windows ("Token-Shuffle: Towards
High-Resolution Image Generation with Autoregressive Models", Ma et al., arXiv 2504.17789; no official code).

Neighbouring visual tokens are highly redundant along the channel dimension, so ``s x s`` windows of a token grid can
share one transformer position:

- token-shuffle (before the transformer): embed each token (dim ``d``), project ``d -> d / s^2``, concatenate the
  ``s^2`` tokens of every window (raster order inside the window) into one ``d``-dim token, then residual MLPs. The
  transformer sees ``N / s^2`` merged tokens, windows in raster order over the ``(h / s, w / s)`` window grid, after
  a class token, with 2D rotary positions of the window grid and a causal mask;
- token-unshuffle (after it): residual MLPs, split each output into ``s^2`` parts of ``d / s^2``, project each back to
  ``d``; one output head predicts each of the ``s^2`` tokens of the next window. Decoding emits ``s^2`` tokens per
  forward pass, drawn independently given the previous windows, as in the paper.

Guidance: the paper's CFG scheduler raises the guidance over the generation; ``Sampler(cfg_schedule="linear")`` does
that per merged step, and ``cfg_schedule`` here (when set) overrides the sampler's schedule for this model: only the
guidance step of the sampler's chain changes, every other processor (entropy-aware temperature, processors a caller
inserted into ``sampler.processors``) runs as given.

Shapes: ids (B, N) long in the tokenizer's raster order, N = h * w = ``max_tokens``; windows (B, M, s^2), M = N / s^2;
logits (B, M_in, s^2, V).

Differences from the paper:

- a class token conditions generation (class-conditional digits / MNIST); the paper conditions on text.
- MLP blocks are pre-norm residual GELU MLPs of width ``4 d``; the paper does not give their inner width.
- the decoding hooks (``prefill`` / ``step``) work on whole windows (``tokens_per_step = s^2``), so the one-token
  strategies (speculative decoding, LANTERN, ScalingAR) refuse this family.
- training needs whole grids (``lengths`` = N for every row): a window mixes tokens of several raster rows, so a
  valid token can be predicted from a window that holds padding, and padding would change the loss.
"""
from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from ..nn import KVCache, RotaryEmbedding, Transformer, causal_mask, grid_positions
from ..sampling import check_cfg_schedule
from ..sampling.processors import classifier_free_guidance
from .base import GenerationOutput, Generator

def shuffle_tokens(x: Tensor, grid: tuple[int, int], shuffle: int) -> Tensor:
    """Concatenate every ``s x s`` window: (B, N, C) raster order -> (B, N / s^2, s^2 C), windows in raster order."""
    height, width = grid
    batch, count, channels = x.shape
    if count != height * width or height % shuffle or width % shuffle:
        raise ValueError(f"need (B, {height * width}, C) on a grid divisible by {shuffle}, got {tuple(x.shape)}")
    x = x.view(batch, height // shuffle, shuffle, width // shuffle, shuffle, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, count // shuffle**2, shuffle * shuffle * channels)


def unshuffle_tokens(x: Tensor, grid: tuple[int, int], shuffle: int) -> Tensor:
    """Inverse of :func:`shuffle_tokens`: (B, N / s^2, s^2 C) -> (B, N, C) in raster order."""
    height, width = grid
    batch, windows, merged = x.shape
    channels = merged // (shuffle * shuffle)
    x = x.view(batch, height // shuffle, width // shuffle, shuffle, shuffle, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * width, channels)


class ResidualMLP(nn.Module):
    """x + MLP(LayerNorm(x)), width 4 d. (..., d) -> (..., d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x)), approximate="tanh"))


@register
class TokenShuffleAR(Generator):
    """Class-conditional AR transformer over ``s x s``-merged token windows, ``s^2`` tokens per step.

    Args:
        vocab_size, max_tokens, num_classes: as for every generator; ``max_tokens = h * w``.
        grid: (h, w), both divisible by ``shuffle`` (required: Token-Shuffle merges spatial windows).
        shuffle: window side ``s`` (paper: 2).
        dim, depth, num_heads, mlp_ratio: transformer size; ``dim`` divisible by ``s^2``.
        shuffle_mlps: residual MLP blocks after the shuffle and before the unshuffle.
        class_dropout: probability of the null class in training (classifier-free guidance).
        cfg_schedule: a key of ``flexar.sampling.CFG_SCHEDULES`` that overrides the sampler's schedule, or None.
    """

    presets = {
        # the paper's model (Ma et al. 2025, section 4): a 2.7B Llama, 20 blocks of width 3072, shuffle window 2, at
        # its 1024 px stage (64 x 64 tokens, 1024 merged positions). The paper does not give the heads (24: Llama's
        # head width 128) or the codebook here (8192 assumed); it conditions on text through the LLM's own
        # vocabulary, which this class-conditional model (1000 classes) does not have, so its count (2.63B with the
        # shuffle MLPs) is not the paper's 2.7B
        "token-shuffle-2.7b": dict(vocab_size=8192, max_tokens=64 * 64, grid=[64, 64], num_classes=1000, shuffle=2,
                                   dim=3072, depth=20, num_heads=24),
        # CPU-sized presets for tests, digits and MNIST (the caller gives the tokenizer's sizes)
        "token-shuffle-tiny": dict(dim=64, depth=2, num_heads=4),
        "token-shuffle-digits": dict(dim=256, depth=6, num_heads=8),
    }
    supports_step_decoding = True  # with tokens_per_step = s^2, which the one-token strategies refuse
    compiles_decoding = True

    def __init__(
        self,
        vocab_size: int,
        max_tokens: int,
        grid: list[int],
        num_classes: int = 10,
        shuffle: int = 2,
        dim: int = 256,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        shuffle_mlps: int = 2,
        class_dropout: float = 0.1,
        cfg_schedule: str | None = None,
        rope_base: float = 10000.0,
        init_std: float = 0.02,
        attention_backend: str = "auto",
    ):
        super().__init__()
        if grid is None or len(grid) != 2 or grid[0] * grid[1] != max_tokens:
            raise ValueError(f"Token-Shuffle needs grid (h, w) with h * w == max_tokens ({max_tokens}), got {grid}")
        grid = (int(grid[0]), int(grid[1]))
        if shuffle < 1 or grid[0] % shuffle or grid[1] % shuffle:
            raise ValueError(f"grid {grid} must be divisible by shuffle {shuffle}")
        if dim % (shuffle * shuffle):
            raise ValueError(f"dim {dim} must be divisible by shuffle^2 = {shuffle * shuffle}")
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must lie in [0, 1], got {class_dropout}")
        if cfg_schedule is not None:
            check_cfg_schedule(cfg_schedule)
        self.vocab_size, self.max_tokens, self.num_classes = vocab_size, max_tokens, num_classes
        self.grid, self.shuffle, self.dim = grid, shuffle, dim
        self.class_dropout, self.cfg_schedule = class_dropout, cfg_schedule
        self.window_grid = (grid[0] // shuffle, grid[1] // shuffle)
        self.num_windows = max_tokens // (shuffle * shuffle)
        part = dim // (shuffle * shuffle)

        self.class_embed = nn.Embedding(num_classes + 1, dim)
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.shuffle_in = nn.Linear(dim, part)
        self.shuffle_mlps = nn.Sequential(*[ResidualMLP(dim) for _ in range(shuffle_mlps)])
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio, mlp="swiglu", norm="rms", backend=attention_backend)
        self.unshuffle_mlps = nn.Sequential(*[ResidualMLP(dim) for _ in range(shuffle_mlps)])
        self.unshuffle_out = nn.Linear(part, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.rope = RotaryEmbedding(dim // num_heads, axes=2, base=rope_base)
        self.mask = causal_mask()
        positions = torch.cat([torch.full((1, 2), -1), grid_positions(*self.window_grid)])
        self.register_buffer("positions", positions, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def tokens_per_step(self) -> int:
        return self.shuffle * self.shuffle

    # -- token layout --------------------------------------------------------------------------------------------------
    def to_windows(self, ids: Tensor) -> Tensor:
        """(B, N) raster order -> (B, M, s^2) windows."""
        return shuffle_tokens(ids.unsqueeze(-1), self.grid, self.shuffle)

    def from_windows(self, windows: Tensor) -> Tensor:
        """(B, M, s^2) windows -> (B, N) raster order."""
        return unshuffle_tokens(windows.reshape(windows.shape[0], -1, self.tokens_per_step), self.grid, self.shuffle)[..., 0]

    # -- network -------------------------------------------------------------------------------------------------------
    def merge(self, windows: Tensor) -> Tensor:
        """Token-shuffle: windows (B, n, s^2) long -> merged tokens (B, n, dim)."""
        parts = self.shuffle_in(self.token_embed(windows))  # (B, n, s^2, d / s^2)
        return self.shuffle_mlps(parts.flatten(2))

    def split(self, hidden: Tensor) -> Tensor:
        """Token-unshuffle: hidden (B, n, dim) -> per-token features (B, n, s^2, dim)."""
        parts = self.unshuffle_mlps(hidden).unflatten(-1, (self.tokens_per_step, -1))
        return self.unshuffle_out(parts)

    def forward(self, windows: Tensor, labels: Tensor | None = None, kv_cache: KVCache | None = None,
                return_hidden: bool = False):
        """Logits for [class token, windows] (or windows after a cached prefix).

        windows: (B, n, s^2) long; returns logits (B, L_in, s^2, V), row j predicting window j of the input sequence
        (L_in = n + 1 without a prefix). With ``return_hidden`` also the transformer output (B, L_in, dim).
        """
        if windows.dim() != 3 or windows.shape[-1] != self.tokens_per_step:
            raise ValueError(f"windows must be (B, n, {self.tokens_per_step}), got {tuple(windows.shape)}")
        x = self.merge(windows)
        # per-row positions in a compiled step or while rows hold different lengths
        positions = None if kv_cache is None else kv_cache.step_positions(x.shape[1], self.num_windows + 1)
        if positions is not None:
            length, rope = x.shape[1], self.rope(self.positions[positions])
        else:
            start = 0 if kv_cache is None else kv_cache.length
            if start == 0:
                if labels is None:
                    raise ValueError("labels are needed when the class token is fed (no cached prefix)")
                x = torch.cat([self.class_embed(labels).unsqueeze(1), x], dim=1)
            length = x.shape[1]
            if start + length > self.num_windows + 1:
                raise ValueError(f"input reaches index {start + length}, past the class token + {self.num_windows} windows")
            rope = self.rope(self.positions[start : start + length])
        hidden = self.transformer(x, mask=None if length == 1 else self.mask, rope=rope, kv_cache=kv_cache)
        logits = self.head(self.split(hidden))
        return (logits, hidden) if return_hidden else logits

    # -- decoding hooks: one window of s^2 tokens per step (prefill and step come from Generator) -------------------
    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        return self.transformer.new_cache(batch_size, self.num_windows + 1 if max_length is None else max_length)

    def empty_steps(self, rows: int) -> Tensor:
        return torch.empty(rows, 0, self.tokens_per_step, dtype=torch.long, device=self.device)

    def ids_to_steps(self, ids: Tensor) -> Tensor:
        return self.to_windows(ids)

    def steps_to_ids(self, steps: Tensor) -> Tensor:
        return self.from_windows(steps)

    # -- objective -----------------------------------------------------------------------------------------------------
    def training_loss(self, ids: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """Cross-entropy over every token of every window given the previous windows. ids (B, N) raster order."""
        labels = self.check_labels(labels)
        lengths = self.check_ids(ids, lengths)
        if ids.shape[1] != self.max_tokens or bool((lengths != self.max_tokens).any()):
            raise ValueError(
                f"TokenShuffleAR trains on whole {self.grid[0]}x{self.grid[1]} grids: ids must be (B, {self.max_tokens}) "
                f"and every entry of lengths {self.max_tokens} (got ids {tuple(ids.shape)}, lengths in "
                f"[{int(lengths.min())}, {int(lengths.max())}]); a window holds tokens of several raster rows, so padding "
                "would condition valid tokens"
            )
        if labels.shape[0] != ids.shape[0]:
            raise ValueError(f"got {labels.shape[0]} labels for {ids.shape[0]} rows of ids")
        labels = self.drop_labels(labels)
        windows = self.to_windows(ids)
        logits = self.forward(windows[:, :-1], labels)  # (B, M, s^2, V)
        loss = F.cross_entropy(logits.flatten(0, 2).float(), windows.flatten())
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == windows).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "perplexity": loss.detach().exp()}

    # -- guidance ------------------------------------------------------------------------------------------------------
    def scheduled_sampler(self, sampler):
        """``sampler`` with its guidance on this model's ``cfg_schedule``: a copy whose guidance processor is
        replaced in place, so every other processor of its chain (inserted ones included) is kept, in order."""
        if self.cfg_schedule is None or not sampler.uses_cfg or sampler.cfg_schedule == self.cfg_schedule:
            return sampler
        scheduled = copy.copy(sampler)
        scheduled.cfg_schedule = self.cfg_schedule
        scheduled.processors = [
            _with_schedule(processor, self.cfg_schedule) if _is_guidance(processor) else processor
            for processor in sampler.processors
        ]
        return scheduled

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
        """Sample whole grids, one window (s^2 tokens) per forward pass: N / s^2 passes. labels (B,) -> ids (B, N).

        ``num_tokens`` must be None or ``max_tokens``: a grid is generated whole.
        """
        out = self.decode_steps(labels, self.scheduled_sampler(sampler), generator, num_tokens, use_cache, progress,
                                whole="Token-Shuffle generates whole grids")
        out.stats["sequence_length"] = self.num_windows + 1
        return out


def _is_guidance(processor) -> bool:
    return isinstance(processor, partial) and processor.func is classifier_free_guidance


def _with_schedule(processor: partial, schedule: str) -> partial:
    """The guidance processor ``processor`` (a partial of classifier_free_guidance) with another schedule."""
    return partial(processor.func, *processor.args, **{**processor.keywords, "schedule": schedule})
