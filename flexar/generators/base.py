"""The interface every generator family keeps (see DESIGN.md).

- ``training_loss(ids (B, L) long, labels (B,) long, lengths (B,) long | None) -> (loss, logs)``: the family's
  objective; ``lengths`` marks the valid prefix of each row for flexible- and adaptive-length tokenizers.
- ``generate(labels (B,), sampler, generator=None, num_tokens=None, use_cache=True, progress=False)
  -> GenerationOutput(ids (B, num_tokens) long, stats, lengths (B,) long)``: the family's decoding schedule; ids are
  zero past ``lengths``, which is ``num_tokens`` for every row unless the model ends rows itself (``eos_token``).
- attributes ``vocab_size``, ``max_tokens``, ``num_classes``, ``grid`` (None for 1D sequences, (h, w) for a token
  grid in raster order) and ``null_class`` (= ``num_classes``, the label of the unconditional branch of
  classifier-free guidance).

Token-by-token decoding. A family whose schedule feeds one step unit at a time after a class token (raster order,
NPP at inference: one token; Token-Shuffle: one window of s^2 tokens) declares ``supports_step_decoding = True`` and
``tokens_per_step``, and provides

- ``forward(steps (B, n, *unit) long, labels (B,) | None, kv_cache=None, return_hidden=False) -> logits
  (B, L_in, *unit, V)`` (and hidden (B, L_in, dim) with ``return_hidden``), the class token leading when the cache
  is empty (L_in = n + 1) and row j predicting the unit after input j; ``unit`` is () for one token a step;
- ``new_cache(batch_size, max_length=None)``, and the layout hooks ``empty_steps`` / ``ids_to_steps`` /
  ``steps_to_ids`` when a step is more than one token.

The base class supplies the decoding hooks ``prefill`` / ``step`` over them, :class:`StepDecoding` (one run of the
hooks: the KV cache, the CFG copies, rollback and row selection, or a full recompute of the prefix) and
:meth:`Generator.generate`, the one loop over it. The decoding strategies (speculative decoding, LANTERN, ScalingAR,
best-of-N) drive the same :class:`StepDecoding` through :meth:`Generator.start_decoding`; they read the declared
capabilities, never which methods a family overrides.

Adaptive lengths. A model with ``eos_token`` (trained on a cache of adaptive-length tokens, KARL or ALIT) has logits
over ``vocab_size + 1`` entries, the last the end-of-sequence token (``eos_id = vocab_size``). A row that draws it
ends: its length is the number of tokens before it, it leaves the decoding run (``StepDecoding.select``), and the
loop stops when every row has ended or ``num_tokens`` is reached. It is never drawn as the first token, and never
written into the returned ids. The decoding strategies end rows the same way (:mod:`flexar.sampling.strategy`).

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
from ..sampling import SamplingState
from ..sampling.strategy import GenerationOutput, end_of_sequence, forbid_empty, rows_generator
from ..sampling.streams import ImageStreams


class GenerationStart(NamedTuple):
    """What :meth:`Generator.begin_generation` hands a decoding loop; ``copies`` = conditions rows per label."""

    labels: Tensor
    count: int
    generator: torch.Generator
    timer: "_Timer"
    conditions: Tensor
    copies: int


def compile_step(function, device: torch.device, mode: str | None = None, backend: str = "inductor"):
    """``torch.compile(function)`` for a decoding step on `device`: the default mode on a CPU, ``"reduce-overhead"``
    (CUDA graphs) on CUDA, or `mode`. Another `backend` than inductor takes no mode: ``"eager"`` captures the graph
    and its guards (the same recompilation behaviour) and runs it eagerly, a check that costs no kernel compilation."""
    if backend != "inductor":
        if mode is not None:
            raise ValueError(f"mode={mode!r} is an inductor option; backend={backend!r} takes none")
        return torch.compile(function, backend=backend)
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(function, mode=mode)


class Generator(Configurable, PretrainedMixin, nn.Module):
    """Base class of the generator families: shared argument checks, CFG batching, seeding and bookkeeping."""

    vocab_size: int
    max_tokens: int
    num_classes: int
    grid: tuple[int, int] | None = None
    class_dropout: float = 0.0

    # -- capabilities: what a family declares it supports; decoding strategies read these, never the methods ---------
    supports_step_decoding: ClassVar[bool] = False
    """The family decodes token by token through ``new_cache`` / ``prefill`` / ``step`` (and :meth:`generate` is
    the loop over them): speculative decoding, LANTERN, ScalingAR and best-of-N drive such families only."""
    tokens_per_step: int = 1
    """Tokens one ``step`` position emits (Token-Shuffle: a window of s^2); the strategies drive 1."""
    continuous: ClassVar[bool] = False
    """A flow generator over continuous latents (xAR): ``training_loss`` takes latents (B, C, h, w) from a latent
    cache, ``generate`` takes a :class:`flexar.sampling.FlowSampler` and returns ``GenerationOutput.latents`` for the
    tokenizer's ``decode_latents``; it has no vocabulary (``vocab_size`` None) and no logits."""
    eos_token: bool = False
    """The network's logits carry one entry more, the end-of-sequence token (id ``vocab_size``): trained on
    adaptive-length tokens, the model chooses each row's length and every decoding loop stops the row there."""
    compiles_decoding: ClassVar[bool] = False
    """The family's ``step`` reads only the KV cache's device state (its per-row lengths), so
    :meth:`compile_decoding` can hand it to ``torch.compile`` without a recompilation per step."""

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id (``vocab_size``) when the model has one (``eos_token``), else None."""
        return end_of_sequence(self)

    def cached_mask(self, key, build):
        """The attention mask `key`, built by ``build(device)`` once per device of the model (masks hold index
        tables, which must live where the model's buffers do)."""
        buffer = next(iter(self.buffers()), None)
        device = buffer.device if buffer is not None else self.device
        masks = self.__dict__.setdefault("_masks", {})
        if (key, device) not in masks:
            masks[(key, device)] = build(device)
        return masks[(key, device)]

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
        """Sample `num_tokens` (default max_tokens) tokens per label. labels (B,) long -> ids (B, num_tokens), stats.

        Families with ``supports_step_decoding`` decode one step unit per forward pass (:meth:`decode_steps`);
        the others override this with their own schedule.
        """
        if not self.supports_step_decoding:
            raise NotImplementedError(f"{type(self).__name__} must implement generate (it has no token-by-token decoding)")
        return self.decode_steps(labels, sampler, generator, num_tokens, use_cache, progress)

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

    # -- token-by-token decoding (families with supports_step_decoding) -----------------------------------------------
    def require_step_decoding(self, what: str) -> None:
        if not self.supports_step_decoding:
            raise NotImplementedError(
                f"{type(self).__name__} has no token-by-token decoding ({type(self).__name__}.supports_step_decoding is "
                f"False), so no {what}"
            )

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows (2B under CFG) and up to `max_length` positions (class token
        included; default: the whole sequence)."""
        raise NotImplementedError(f"{type(self).__name__} has no KV cache")

    def empty_steps(self, rows: int) -> Tensor:
        """No step units: (rows, 0, *unit) long, the input of a prefill (one token a step: (rows, 0))."""
        return torch.empty(rows, 0, dtype=torch.long, device=self.device)

    def ids_to_steps(self, ids: Tensor) -> Tensor:
        """Token ids (B, L) -> step units (B, L / tokens_per_step, *unit) in decoding order (one token a step: ids)."""
        return ids

    def steps_to_ids(self, steps: Tensor) -> Tensor:
        """Inverse of :meth:`ids_to_steps`: (B, S, *unit) -> token ids (B, S * tokens_per_step)."""
        return steps

    def prefill(self, labels: Tensor, kv_cache: KVCache, return_hidden: bool = False):
        """Feed the class token into an empty cache. labels (B,) -> logits (B, *unit, V) of the first step unit
        (and hidden (B, dim) with ``return_hidden``)."""
        self.require_step_decoding("prefill")
        if not kv_cache.empty:
            raise ValueError(f"prefill needs an empty KV cache, this one holds {kv_cache.lengths.tolist()} positions")
        out = self.forward(self.empty_steps(labels.shape[0]), labels, kv_cache, return_hidden)
        return (out[0][:, 0], out[1][:, 0]) if return_hidden else out[:, 0]

    def step(self, steps: Tensor, kv_cache: KVCache, return_hidden: bool = False):
        """Feed step units (B, n, *unit) after the cached prefix -> logits (B, n, *unit, V) (and hidden (B, n, dim)),
        row j predicting the unit after steps[:, j]; advances the cache (roll back with ``kv_cache.truncate``).
        After :meth:`compile_decoding` the forward pass runs compiled."""
        self.require_step_decoding("step")
        if kv_cache.empty:
            raise ValueError("step needs a prefilled KV cache; call prefill(labels, kv_cache) first")
        network = self.__dict__.get("_compiled_step") or self._step_network
        return network(steps, kv_cache, return_hidden)

    def _step_network(self, steps: Tensor, kv_cache: KVCache, return_hidden: bool = False):
        return self.forward(steps, None, kv_cache, return_hidden)

    def compile_decoding(self, enabled: bool = True, mode: str | None = None, backend: str = "inductor") -> "Generator":
        """Run every decoding ``step`` (the forward pass after the prefill) through ``torch.compile``: the default
        mode on a CPU, ``"reduce-overhead"`` (CUDA graphs) on CUDA, or `mode`. The first steps compile (seconds);
        shapes that change (a batch that shrinks as rows end, drafts of another width) recompile at most once more,
        after which dynamo treats them as dynamic. Tokens equal eager decoding's to float rounding of the logits.
        ``enabled=False`` returns to eager steps; `backend` as in :func:`compile_step`. Returns the model."""
        if not enabled:
            self.__dict__.pop("_compiled_step", None)
            return self
        if not (self.supports_step_decoding and self.compiles_decoding):
            raise NotImplementedError(f"{type(self).__name__} has no compiled decoding step (compiles_decoding is "
                                      "False): decode it eagerly")
        self.__dict__["_compiled_step"] = compile_step(self._step_network, self.device, mode, backend)
        return self

    @property
    def decoding_compiled(self) -> bool:
        """Whether :meth:`compile_decoding` is on."""
        return "_compiled_step" in self.__dict__

    def start_decoding(self, conditions: Tensor, copies: int, length: int, use_cache: bool = True) -> "StepDecoding":
        """A :class:`StepDecoding` run over `conditions` (rows = copies * B, [labels; null] under CFG) for up to
        `length` step units."""
        self.require_step_decoding("start_decoding")
        return StepDecoding(self, conditions, copies, length, use_cache)

    @torch.no_grad()
    def decode_steps(
        self,
        labels: Tensor,
        sampler,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        use_cache: bool = True,
        progress: bool = False,
        whole: str | None = None,
    ) -> GenerationOutput:
        """The one decoding loop of the token-by-token families: a prefill over the class token, then one forward pass
        per step unit through the KV cache (or a recompute of the whole prefix, ``use_cache=False``, the reference);
        ``num_tokens / tokens_per_step`` passes in all. With CFG the batch is doubled as [labels; null] and both
        halves are fed the unit sampled from the guided logits. `whole` as in :meth:`begin_generation`.

        With an end-of-sequence token (``eos_token``) a row that draws it ends there: it leaves the batch
        (``StepDecoding.select``), so it costs no further forward pass, and the loop stops once every row has ended.
        The token cannot be drawn first (a row holds at least one token); ``num_tokens`` caps the rest.

        labels: (B,) long; sampler: a :class:`flexar.sampling.Sampler`; returns ids (B, num_tokens), zero past
        ``lengths`` (B,), and stats.
        """
        labels, count, generator, timer, conditions, copies = self.begin_generation(
            labels, sampler, generator, num_tokens, whole)
        batch = labels.shape[0]
        units = self.ids_to_steps(torch.empty(batch, count, dtype=torch.long, device=labels.device))
        steps = units.shape[1]
        run = self.start_decoding(conditions, copies, steps, use_cache)
        eos = self.eos_id
        if eos is None:
            for index in self.progress_range(steps, progress, f"{type(self).__name__} decoding"):
                logits = run.start() if index == 0 else run.feed(units[:, index - 1 : index])[:, -1]
                units[:, index] = sampler.sample(logits, SamplingState(step=index, num_steps=steps), generator)
            lengths, tokens = None, batch * count
        else:
            lengths = self.decode_until_end(run, units, sampler, generator, progress)
            tokens = int(lengths.sum())
        stats = {
            "forward_passes": run.forward_passes,
            "row_passes": run.row_passes,
            "tokens": tokens,
            "seconds": timer.seconds(),
            "batch_size": batch,
        }
        return GenerationOutput(ids=self.steps_to_ids(units), stats=stats, lengths=lengths)

    def decode_until_end(self, run: "StepDecoding", ids: Tensor, sampler, generator, progress: bool = False) -> Tensor:
        """The loop of :meth:`decode_steps` for a model with an end-of-sequence token: fills ids (B, count) in place,
        zero past each row's end, and returns the lengths (B,). One host synchronisation per step reads which rows
        ended, the price of dropping them from the batch."""
        if self.tokens_per_step != 1:
            raise NotImplementedError(f"{type(self).__name__}: an end-of-sequence token needs one token per step, "
                                      f"this family emits {self.tokens_per_step}")
        batch, count = ids.shape
        if isinstance(generator, ImageStreams) and generator.num_streams != batch:
            # rows that are several draws of one image (best-of-N) each get a stream, so any of them can end alone
            generator = generator.split(batch // generator.num_streams)
        lengths = torch.full((batch,), count, dtype=torch.long, device=ids.device)
        active = torch.arange(batch, device=ids.device)  # the label rows still decoding, in the run's order
        ids.zero_()
        for index in self.progress_range(count, progress, f"{type(self).__name__} decoding"):
            logits = run.start() if index == 0 else run.feed(ids[active, index - 1 : index])[:, -1]
            logits = forbid_empty(logits, index, self.vocab_size)
            state = SamplingState(step=index, num_steps=count)
            tokens = sampler.sample(logits, state, rows_generator(generator, active, batch))
            ended = tokens == self.eos_id
            ids[active, index] = tokens.masked_fill(ended, 0)
            if bool(ended.any()):
                lengths[active[ended]] = index
                going = (~ended).nonzero().flatten()
                if going.numel() == 0:
                    break
                run.select(going)
                active = active[going]
        return lengths


class StepDecoding:
    """One run of a generator's token-by-token decoding hooks, shared by :meth:`Generator.decode_steps` and the
    decoding strategies (speculative decoding and its drafts, LANTERN, ScalingAR, best-of-N).

    It holds the rows being decoded (``conditions``: ``copies`` rows per label, [labels; null] under CFG), the KV cache
    (or, with ``use_cache=False``, the fed prefix, recomputed in full at every call), and counts forward passes.
    Callers pass step units with one row per label; every call feeds them to all ``copies`` rows.

    Shapes: units (B, n, *unit) long; logits (copies * B, n, *unit, V); ``length`` = positions held, the class token
    included.
    """

    def __init__(self, model: Generator, conditions: Tensor, copies: int, length: int, use_cache: bool = True):
        self.model, self.conditions, self.copies = model, conditions, copies
        self.cache = model.new_cache(conditions.shape[0], length) if use_cache else None
        self.fed: Tensor | None = None  # without a cache: every unit fed so far, (rows, n, *unit)
        self.forward_passes = 0
        self.row_passes = 0  # label rows over all calls: rows removed by select (ended, pruned) cost nothing more

    @property
    def rows(self) -> int:
        """Label rows in the run now (CFG copies not counted)."""
        return self.conditions.shape[0] // self.copies

    @property
    def length(self) -> int:
        if self.cache is not None:
            return self.cache.length
        return 0 if self.fed is None else 1 + self.fed.shape[1]

    @property
    def lengths(self) -> Tensor:
        """(B,) positions each label row holds (class token included); rows may differ once :meth:`feed` took
        per-row counts or :meth:`truncate` per-row lengths (a KV cache only)."""
        if self.cache is not None:
            return self.cache.lengths[: self.rows].clone()
        return torch.full((self.rows,), self.length, dtype=torch.long, device=self.conditions.device)

    def repeat(self, units: Tensor) -> Tensor:
        """(B, n, *unit) -> (copies * B, n, *unit): the same units for every CFG copy."""
        return units.repeat(self.copies, *([1] * (units.dim() - 1)))

    def start(self, return_hidden: bool = False):
        """Feed the class token: logits (rows, *unit, V) of the first unit (and hidden (rows, dim))."""
        self.forward_passes += 1
        self.row_passes += self.rows
        if self.cache is not None:
            return self.model.prefill(self.conditions, self.cache, return_hidden)
        self.fed = self.model.empty_steps(self.conditions.shape[0])
        out = self.model.forward(self.fed, self.conditions, None, return_hidden)
        return (out[0][:, 0], out[1][:, 0]) if return_hidden else out[:, 0]

    def feed(self, units: Tensor, return_hidden: bool = False, counts: Tensor | None = None):
        """Feed units (B, n, *unit) after the prefix: logits (rows, n, *unit, V), row j predicting the unit after
        units[:, j] (and hidden (rows, n, dim)). ``counts`` (B,) long keeps only the first counts[b] units of row b
        (the rest is padding, fed but not kept: a KV cache only), so rows advance by different amounts."""
        self.forward_passes += 1
        self.row_passes += self.rows
        units = self.repeat(units)
        if self.cache is not None:
            before = self.cache.lengths.clone()
            out = self.model.step(units, self.cache, return_hidden)
            if counts is not None:
                self.cache.truncate(before + self.repeat(counts.to(before.device)))
            return out
        if counts is not None:
            raise ValueError("feeding rows by different counts needs a KV cache (use_cache=True)")
        if self.fed is None:
            raise ValueError("feed needs a started decoding run; call start() first")
        self.fed = torch.cat([self.fed, units], dim=1)
        out = self.model.forward(self.fed, self.conditions, None, return_hidden)
        new = units.shape[1]
        return (out[0][:, -new:], out[1][:, -new:]) if return_hidden else out[:, -new:]

    def truncate(self, length: int | Tensor) -> None:
        """Keep the first `length` positions (class token included), or (B,) per label row (a KV cache only): roll
        back rejected drafts."""
        if isinstance(length, Tensor):
            if self.cache is None:
                raise ValueError("truncating rows to different lengths needs a KV cache (use_cache=True)")
            self.cache.truncate(self.repeat(length.to(self.cache.lengths.device)))
        elif self.cache is not None:
            self.cache.truncate(length)
        elif self.fed is not None:
            self.fed = self.fed[:, : max(length - 1, 0)]

    def select(self, rows: Tensor) -> None:
        """Keep the label rows `rows` (B',) of the current batch, with all their CFG copies."""
        batch = self.conditions.shape[0] // self.copies
        every = torch.cat([rows + copy * batch for copy in range(self.copies)])
        self.conditions = self.conditions[every]
        if self.cache is not None:
            self.cache.select(every)
        if self.fed is not None:
            self.fed = self.fed[every]


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
