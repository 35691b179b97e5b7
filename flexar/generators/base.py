"""The interface every generator family keeps (see DESIGN.md).

- ``training_loss(ids (B, L) long, labels (B,) long, lengths (B,) long | None) -> (loss, logs)``: the family's
  objective; ``lengths`` marks the valid prefix of each row for flexible- and adaptive-length tokenizers.
- ``generate(labels (B,), sampler, generator=None, num_tokens=None, use_cache=True, progress=False)
  -> GenerationOutput(ids (B, num_tokens) long, stats)``: the family's decoding schedule.
- attributes ``vocab_size``, ``max_tokens``, ``num_classes``, ``grid`` (None for 1D sequences, (h, w) for a token
  grid in raster order) and ``null_class`` (= ``num_classes``, the label of the unconditional branch of
  classifier-free guidance).

Families whose schedule feeds tokens one position at a time after a condition prefix (raster order, NPP at inference,
Token-Shuffle) also implement the decoding hooks ``new_cache`` / ``prefill`` / ``step``, which loop-changing decoders
(speculative decoding, LANTERN, ScalingAR) wrap.

Randomness: ``generate`` draws only from its ``torch.Generator``; when none is given it seeds a fresh one from the OS,
so the global random state is never read or advanced. Class dropout during training is the one exception: like
``nn.Dropout`` it uses the default generator unless it is given one.
"""
from __future__ import annotations

import time
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..hub import Configurable, PretrainedMixin
from ..nn import KVCache
from ..sampling.strategy import GenerationOutput


class GenerationStart(NamedTuple):
    """What :meth:`Generator.begin_generation` hands a decoding loop; ``copies`` = conditions rows per label."""

    labels: Tensor
    count: int
    generator: torch.Generator
    timer: "_Timer"
    conditions: Tensor
    copies: int


class Generator(Configurable, PretrainedMixin, nn.Module):
    """Base class of the generator families: shared argument checks, CFG batching, seeding and bookkeeping."""

    vocab_size: int
    max_tokens: int
    num_classes: int
    grid: tuple[int, int] | None = None
    class_dropout: float = 0.0
    presets: dict[str, dict] = {}

    # -- capabilities: what a family declares it supports; decoding strategies read these, never the methods ---------
    supports_step_decoding: ClassVar[bool] = False
    """The family decodes token by token through ``new_cache`` / ``prefill`` / ``step`` (and :meth:`generate` is
    the loop over them): speculative decoding, LANTERN, ScalingAR and best-of-N drive such families only."""
    tokens_per_step: int = 1
    """Tokens one ``step`` position emits (Token-Shuffle: a window of s^2); the strategies drive 1."""

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Generator":
        """Build a named size preset of this family; keyword arguments override or complete it."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    # -- argument checks -----------------------------------------------------------------------------------------------
    def check_labels(self, labels) -> Tensor:
        """Class labels as a (B,) long tensor on the model's device; each must lie in [0, num_classes)."""
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype != torch.long:
            raise ValueError(f"labels must be a (B,) long tensor, got shape {tuple(labels.shape)} {labels.dtype}")
        if labels.numel() == 0:
            raise ValueError("labels must hold at least one class")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels.to(self.device)

    def check_ids(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Validate (B, L) token ids with 1 <= L <= max_tokens; return per-row valid lengths (B,) in [1, L]."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            dtype = ids.dtype if isinstance(ids, Tensor) else ""
            raise ValueError(f"ids must be a (B, L) long tensor with 1 <= L <= {self.max_tokens}, got {shape} {dtype}")
        if not 1 <= ids.shape[1] <= self.max_tokens:
            raise ValueError(
                f"ids must be a (B, L) long tensor with 1 <= L <= {self.max_tokens}, got shape {tuple(ids.shape)}"
            )
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        if lengths is None:
            return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        lengths = torch.as_tensor(lengths).to(ids.device)
        if lengths.shape != (ids.shape[0],) or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be a ({ids.shape[0]},) integer tensor, got {tuple(lengths.shape)} {lengths.dtype}")
        if lengths.min() < 1 or lengths.max() > ids.shape[1]:
            raise ValueError(
                f"lengths must lie in [1, {ids.shape[1]}], got [{int(lengths.min())}, {int(lengths.max())}]"
            )
        return lengths.long()

    def check_num_tokens(self, num_tokens: int | None) -> int:
        if num_tokens is None:
            return self.max_tokens
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= self.max_tokens:
            raise ValueError(f"num_tokens must be an int in [1, {self.max_tokens}], got {num_tokens!r}")
        return num_tokens

    # -- conditioning --------------------------------------------------------------------------------------------------
    def drop_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Class dropout for classifier-free guidance: in training mode each label becomes ``null_class`` with
        probability ``class_dropout``; in eval mode labels pass through. (B,) -> (B,)."""
        if not self.training or self.class_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.class_dropout
        return labels.masked_fill(drop, self.null_class)

    def guidance_labels(self, labels: Tensor, sampler) -> Tensor:
        """(B,) -> (2B,) = [labels; null] when the sampler runs classifier-free guidance, else the labels."""
        if not sampler.uses_cfg:
            return labels
        return torch.cat([labels, torch.full_like(labels, self.null_class)])

    # -- randomness and bookkeeping ------------------------------------------------------------------------------------
    def resolve_generator(self, generator: torch.Generator | None) -> torch.Generator:
        """The generator to draw from: the caller's (on the model's device type) or a fresh one seeded by the OS.
        A :class:`flexar.sampling.streams.ImageStreams` (one stream per image, as ``Pipeline.generate`` passes)
        is accepted wherever a ``torch.Generator`` is."""
        device = self.device
        if generator is None:
            generator = torch.Generator(device)
            generator.seed()
            return generator
        if generator.device.type != device.type:
            raise ValueError(f"generator lives on {generator.device} but the model on {device}; create it on {device}")
        return generator

    def progress_range(self, count: int, progress: bool = False, description: str | None = None):
        """range(count), wrapped in a tqdm bar when `progress`."""
        if not progress:
            return range(count)
        from tqdm.auto import tqdm

        return tqdm(range(count), desc=description or type(self).__name__, leave=False)

    def start_timer(self) -> "_Timer":
        return _Timer(self.device)

    def begin_generation(self, labels: Tensor, sampler, generator: torch.Generator | None, num_tokens: int | None,
                         whole: str | None = None) -> "GenerationStart":
        """The checks and setup every decoding loop starts with: labels, token count, generator, timer, and the
        (CFG-doubled) condition labels. `whole` names a schedule that only decodes whole sequences (num_tokens must
        then be None or max_tokens)."""
        labels = self.check_labels(labels)
        count = self.check_num_tokens(num_tokens)
        if whole is not None and count != self.max_tokens:
            raise ValueError(f"{whole}: num_tokens must be None or {self.max_tokens}, got {num_tokens}")
        generator = self.resolve_generator(generator)
        timer = self.start_timer()
        conditions = self.guidance_labels(labels, sampler)
        return GenerationStart(labels, count, generator, timer, conditions, conditions.shape[0] // labels.shape[0])

    def set_sizes(self, vocab_size: int, max_tokens: int, num_classes: int, class_dropout: float, grid=None,
                  require_grid: bool = False) -> None:
        """Validate and store the sizes every family shares; `grid` (h, w) must cover exactly max_tokens."""
        if vocab_size < 1 or max_tokens < 1 or num_classes < 1:
            raise ValueError(
                f"vocab_size, max_tokens and num_classes must be >= 1, got {vocab_size}, {max_tokens}, {num_classes}"
            )
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must lie in [0, 1], got {class_dropout}")
        if grid is None and require_grid:
            raise ValueError(f"{type(self).__name__} needs a grid (h, w)")
        if grid is not None:
            grid = tuple(int(side) for side in grid)
            if len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] != max_tokens:
                raise ValueError(f"grid must be (h, w) with h * w == max_tokens ({max_tokens}), got {grid}")
        self.vocab_size, self.max_tokens, self.num_classes = vocab_size, max_tokens, num_classes
        self.grid = grid
        self.class_dropout = class_dropout

    # -- interface -----------------------------------------------------------------------------------------------------
    def training_loss(self, ids: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def generate(
        self,
        labels: Tensor,
        sampler,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> GenerationOutput:
        raise NotImplementedError

    def generate_with(
        self,
        labels: Tensor,
        sampler,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> GenerationOutput:
        """`generate` for any sampler: a decoding strategy (an object with ``decode``, e.g. speculative decoding,
        LANTERN, ScalingAR) runs its own loop over this generator's decoding hooks; a plain Sampler runs the family's
        schedule."""
        decode = getattr(sampler, "decode", None)
        if decode is None:
            return self.generate(labels, sampler, generator, num_tokens, use_cache, progress)
        return decode(self, labels, generator=generator, num_tokens=num_tokens, use_cache=use_cache, progress=progress)

    # -- decoding hooks (families with a token-by-token schedule) -----------------------------------------------------
    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        raise NotImplementedError(f"{type(self).__name__} has no KV-cache decoding hooks")

    def prefill(self, labels: Tensor, kv_cache: KVCache, return_hidden: bool = False):
        raise NotImplementedError(f"{type(self).__name__} has no KV-cache decoding hooks")

    def step(self, ids: Tensor, kv_cache: KVCache, return_hidden: bool = False):
        raise NotImplementedError(f"{type(self).__name__} has no KV-cache decoding hooks")


class _Timer:
    """Wall-clock seconds since creation; synchronises CUDA so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sync()
        self.start = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self) -> float:
        self._sync()
        return time.perf_counter() - self.start
