"""Decoding strategies: samplers that own the decoding loop.

A plain :class:`~flexar.sampling.Sampler` turns logits into ids and leaves the loop to the generator family's
``generate``. A decoding strategy (speculative decoding, LANTERN, ScalingAR) changes the loop itself: it drives a
generator through a run of its decoding hooks (``model.start_decoding(...)`` over ``new_cache`` / ``prefill`` /
``step``, see :mod:`flexar.generators.base`) and draws every token through the :class:`~flexar.sampling.Sampler` it
wraps, so CFG, temperature, top-k / top-p and entropy-aware temperature apply unchanged.

The protocol, which :meth:`flexar.generators.Generator.generate_with` and :meth:`flexar.Pipeline.generate` follow:

- ``decode(model, labels, generator=None, num_tokens=None, use_cache=True, progress=False) -> GenerationOutput``;
- ``prepare(pipeline)``: called by the pipeline before decoding, for strategies that need more than the generator
  (LANTERN reads the tokenizer's code vectors); it first checks the pipeline's generator, so a family the strategy
  cannot drive is refused before any work;
- ``uses_cfg`` and ``to_dict()`` like a sampler.

Adaptive lengths: with a generator that has an end-of-sequence token (``eos_token``, logits over ``vocab_size + 1``
ids), every strategy ends a row when it commits that token, drops the row from its decoding run (so it costs no
further pass), never writes the token into the ids, and returns the lengths in :class:`GenerationOutput`; no row
ends before its first token (:func:`forbid_empty`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flexar.sampling.sampler import Sampler
from flexar.sampling.streams import ImageStreams


@dataclass
class GenerationOutput:
    """What a generator's ``generate`` and a strategy's ``decode`` return.

    ids: (B, L) long generated tokens, zero past ``lengths`` (a valid id, so ``tokenizer.decode(ids, lengths)``
    takes them as they are); lengths: (B,) long, the tokens each row generated before its end-of-sequence token or
    the cap ``L`` (``num_tokens``). The end-of-sequence token itself never appears in ``ids``. Families without one
    generate ``L`` tokens per row, and ``lengths`` (filled in when not given) is ``L`` everywhere.

    stats: ``forward_passes`` (network evaluations of the whole, possibly CFG-doubled, batch), ``tokens`` (generated
    ids over the batch, ``lengths.sum()``: B * L at a fixed length), ``seconds`` (wall time, CUDA synchronised),
    ``batch_size``; the token-by-token loop adds ``row_passes``, the label rows summed over its network calls, so a
    row that has ended counts no more.

    latents: the output of a flow generator over continuous tokens (``Generator.continuous``, xAR): (B, C, h, w)
    normalised latents for the tokenizer's ``decode_latents``; ``ids`` is then None and ``lengths`` is h * w, the
    latent positions of every row.
    """

    ids: Tensor | None
    stats: dict = field(default_factory=dict)
    lengths: Tensor | None = None
    latents: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids is None and self.latents is None:
            raise ValueError("GenerationOutput needs ids (a token generator) or latents (a flow generator)")
        if self.lengths is None:
            rows, count = (self.ids.shape[:2] if self.ids is not None
                           else (self.latents.shape[0], self.latents[0, 0].numel()))
            device = (self.ids if self.ids is not None else self.latents).device
            self.lengths = torch.full((rows,), count, dtype=torch.long, device=device)


class DecodingStrategy:
    """Base class: holds the per-token :class:`~flexar.sampling.Sampler` and checks the generator's hooks."""

    name = "strategy"

    def __init__(self, sampler: Sampler | None = None) -> None:
        if sampler is not None and not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a flexar.sampling.Sampler, got {type(sampler).__name__}")
        self.sampler = sampler if sampler is not None else Sampler()

    @property
    def uses_cfg(self) -> bool:
        return self.sampler.uses_cfg

    def prepare(self, pipeline) -> None:
        """Check the pipeline's generator (:func:`check_step_decoding`); subclasses then read what they need from the
        :class:`flexar.Pipeline`, after calling this."""
        check_step_decoding(pipeline.generator, strategy=type(self).__name__)

    def decode(
        self,
        model,
        labels: Tensor,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ):
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, "sampler": self.sampler.to_dict()}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.to_dict().items())
        return f"{type(self).__name__}({arguments})"


def check_step_decoding(model, tokens_per_step: int = 1, strategy: str = "this decoding strategy") -> None:
    """Refuse, with a ValueError that names the family, a generator whose schedule a strategy cannot drive.

    A family declares what it supports with class attributes (see :class:`flexar.generators.Generator`):
    ``supports_step_decoding`` (it decodes token by token through ``new_cache`` / ``prefill`` / ``step``; NAR, which
    decodes a whole diagonal per pass, and VAR, a whole scale, do not) and ``tokens_per_step`` (Token-Shuffle emits a
    window of s^2 tokens per step). The strategies read these declarations, never the methods themselves.
    """
    family = type(model).__name__
    if not getattr(model, "supports_step_decoding", False):
        raise ValueError(
            f"{strategy} cannot decode with {family}: the {family} family has no token-by-token decoding "
            f"({family}.supports_step_decoding is False). Speculative decoding, LANTERN, ScalingAR and best-of-N "
            "drive new_cache / prefill / step (raster order, NPP and other one-token-per-step schedules); sample "
            "this family with a plain Sampler"
        )
    step_tokens = getattr(model, "tokens_per_step", 1)
    if step_tokens != tokens_per_step:
        raise ValueError(
            f"{strategy} cannot decode with {family}: it emits {step_tokens} tokens per step, and this strategy drives "
            f"{tokens_per_step} token per step"
        )


def generation_output(ids: Tensor, stats: dict, lengths: Tensor | None = None) -> GenerationOutput:
    return GenerationOutput(ids=ids, stats=stats, lengths=lengths)


# -- end of sequence -------------------------------------------------------------------------------------------------
# A generator trained on adaptive-length tokens (``eos_token=True``) emits logits over vocab_size + 1 entries, the
# last one the end-of-sequence token (id vocab_size). Every decoding loop honours it the same way: a row that draws
# it ends there (its length is the number of tokens before it, and it is never written into the ids), and no row may
# end before its first token (tokenizers decode at least one).


def end_of_sequence(model) -> int | None:
    """The end-of-sequence id of `model` (its ``vocab_size``) when it has one, else None."""
    return model.vocab_size if getattr(model, "eos_token", False) else None


def forbid_empty(logits: Tensor, step: int, vocab_size: int) -> Tensor:
    """Logits (..., V') with the end-of-sequence entries (ids >= vocab_size) made impossible at step 0.

    The entries get the dtype's most negative finite value rather than -inf, so that classifier-free guidance
    ``u + s (c - u)`` over two masked rows stays finite (-inf - -inf would be NaN) and still gives the entry no mass.
    Other steps, and logits without such entries, are returned as they are.
    """
    if step != 0 or logits.shape[-1] <= vocab_size:
        return logits
    logits = logits.clone()
    logits[..., vocab_size:] = torch.finfo(logits.dtype).min
    return logits


def rows_generator(generator, rows: Tensor, total: int):
    """The random source for the surviving `rows` (k,) of `total` rows: a per-image
    :class:`~flexar.sampling.streams.ImageStreams` keeps only their streams (all of them while none has ended); a
    ``torch.Generator`` serves any rows."""
    if isinstance(generator, ImageStreams) and rows.numel() != total:
        return generator.select(rows)
    return generator
