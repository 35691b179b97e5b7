"""Logit processors: pure functions ``(logits, state, **settings) -> logits``.

Every processor works on the last dimension (the vocabulary), so ``logits`` may be
``(B, V)`` for one token per step or ``(B, L, V)`` for several tokens per step (scale-,
cell- and patch-wise orderings). Processors never modify their input in place; a
processor that has nothing to do may return its input tensor itself. Processors draw no
random numbers: every draw lives in :class:`flexar.sampling.Sampler`, which takes an
explicit ``torch.Generator``.

Departures from common reference code:

- ``top_k`` keeps exactly ``k`` tokens per row even when logits tie at the boundary, by
  scattering the ``topk`` values into a ``-inf`` tensor. VAR's
  ``sample_with_top_k_top_p_`` and HuggingFace's ``TopKLogitsWarper`` compare against the
  k-th value instead and keep every tied token.
- ``top_p`` computes its cumulative mass in at least float32 (float64 inputs stay
  float64) so that bf16 logits do not shift the nucleus boundary.
- ``temperature`` refuses values ``<= 0``. Temperature 0 is greedy decoding, which the
  sampler runs as an argmax rather than dividing by zero. Below 1 it subtracts each row's
  maximum before dividing, so that no finite logit overflows (the largest becomes 0, the
  others at worst ``-inf``): the same softmax, top-k and top-p as ``logits / value``, and
  the limit of a vanishing temperature is the argmax instead of NaN.
- ``classifier_free_guidance`` above a scale of ``1e4`` computes
  ``s * (d - max d)`` with ``d = (c - u) + u / s``, which equals LlamaGen's and VAR's
  ``u + s * (c - u)`` up to a per-row constant (which softmax ignores) and cannot overflow;
  up to ``1e4`` it runs their formula as written, which cannot overflow float32 or
  bfloat16 logits smaller than ``1e34``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor


@dataclass
class SamplingState:
    """Where the decoding loop stands when logits are processed.

    Attributes:
        step: index of the current decoding step, from 0.
        num_steps: total number of decoding steps of the schedule (at least 1).
        extra: free-form values that later processors may read or record (for example
            the entropy of the filtered distribution); processors must not rely on keys
            that the decoding loop does not set.
    """

    step: int = 0
    num_steps: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class LogitProcessor(Protocol):
    """Anything callable as ``processor(logits, state) -> logits`` (shapes kept, except
    classifier-free guidance, which halves the leading dimension)."""

    def __call__(self, logits: Tensor, state: SamplingState) -> Tensor: ...


def _constant_guidance(scale: float, state: SamplingState) -> float:
    return scale


def _linear_guidance(scale: float, state: SamplingState) -> float:
    progress = state.step / max(state.num_steps - 1, 1)
    return 1.0 + (scale - 1.0) * progress


CFG_SCHEDULES: dict[str, Callable[[float, SamplingState], float]] = {
    "constant": _constant_guidance,
    "linear": _linear_guidance,
}
"""Guidance schedules by name: ``schedule(scale, state) -> guidance scale at this step``."""


def check_cfg_schedule(schedule: str) -> None:
    """Raise ``ValueError`` when ``schedule`` is not a key of :data:`CFG_SCHEDULES`."""
    if schedule not in CFG_SCHEDULES:
        known = ", ".join(sorted(CFG_SCHEDULES))
        raise ValueError(f"unknown cfg schedule {schedule!r}; known schedules: {known}")


def guidance_scale(scale: float, state: SamplingState, schedule: str = "constant") -> float:
    """Guidance scale at ``state.step``.

    ``"constant"`` returns ``scale`` at every step. ``"linear"`` ramps from 1 at step 0
    to ``scale`` at step ``num_steps - 1``:
    ``1 + (scale - 1) * step / max(num_steps - 1, 1)``; guidance that grows over the
    generation, as in Token-Shuffle's CFG scheduler (arXiv 2504.17789).
    """
    check_cfg_schedule(schedule)
    return CFG_SCHEDULES[schedule](scale, state)


_DIRECT_GUIDANCE_LIMIT = 1e4


def classifier_free_guidance(
    logits: Tensor, state: SamplingState, scale: float, schedule: str = "constant"
) -> Tensor:
    """Classifier-free guidance on logits (Ho & Salimans, arXiv 2207.12598), as used by
    autoregressive image models such as LlamaGen and VAR.

    Args:
        logits: ``(2B, ..., V)``; rows ``[:B]`` are conditional, rows ``[B:]``
            unconditional.
        state: decoding position, read by non-constant schedules.
        scale: guidance scale ``s`` (1 means no guidance).
        schedule: a key of :data:`CFG_SCHEDULES`.

    Returns:
        ``(B, ..., V)`` guided logits ``uncond + s * (cond - uncond)`` (above ``s = 1e4``
        shifted by a per-row constant, see the module docstring). When the scale at this
        step is exactly 1 the conditional rows come back unchanged (a copy), so no rounding
        creeps in and ``-inf`` entries do not turn into NaN.
    """
    check_cfg_schedule(schedule)
    if logits.shape[0] % 2 != 0:
        raise ValueError(
            "classifier_free_guidance expects conditional then unconditional rows, "
            f"so an even leading dimension; got shape {tuple(logits.shape)}"
        )
    conditional, unconditional = logits.chunk(2, dim=0)
    step_scale = guidance_scale(scale, state, schedule)
    if step_scale == 1.0:
        return conditional.clone()
    if step_scale <= _DIRECT_GUIDANCE_LIMIT:
        return unconditional + step_scale * (conditional - unconditional)
    # s * (c - u) would overflow: factor s out and shift each row to a maximum of 0 first
    direction = (conditional - unconditional) + unconditional / step_scale
    return step_scale * (direction - direction.amax(dim=-1, keepdim=True))


def temperature(logits: Tensor, state: SamplingState, value: float) -> Tensor:
    """Divide logits by a temperature.

    Args:
        logits: ``(..., V)``.
        state: unused; part of the processor signature.
        value: temperature, at least float32's smallest normal number (about 1.2e-38).
            Temperature 0 (greedy decoding) is not a logit transform:
            :class:`flexar.sampling.Sampler` runs it as an argmax, and this function raises
            rather than divide by zero.

    Returns:
        ``(..., V)`` logits ``logits / value``, below ``value = 1`` shifted by each row's
        maximum first so that nothing overflows (the input itself when ``value == 1``).
    """
    if not value >= torch.finfo(torch.float32).tiny:
        raise ValueError(
            f"temperature must be at least {torch.finfo(torch.float32).tiny:.3g} here, got {value}; "
            "temperature 0 is greedy decoding and is handled by Sampler as an argmax"
        )
    if value == 1.0:
        return logits
    if value < 1.0:
        return (logits - logits.amax(dim=-1, keepdim=True)) / value
    return logits / value


def top_k(logits: Tensor, state: SamplingState, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf``
    (Fan et al., "Hierarchical Neural Story Generation", arXiv 1805.04833).

    Exactly ``k`` entries survive per row even when values tie at the boundary (which
    of the tied entries survive follows ``torch.topk``).

    Args:
        logits: ``(..., V)``.
        state: unused; part of the processor signature.
        k: number of tokens to keep; ``k <= 0`` or ``k >= V`` leaves logits unchanged.

    Returns:
        ``(..., V)`` filtered logits (the input itself when there is nothing to filter).
    """
    vocabulary_size = logits.shape[-1]
    if k <= 0 or k >= vocabulary_size:
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p(logits: Tensor, state: SamplingState, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al., "The Curious Case of Neural Text
    Degeneration", arXiv 1904.09751).

    Keeps, per row, the smallest set of highest-probability tokens whose probability
    mass is at least ``p`` (always at least the most likely token) and sets the rest to
    ``-inf``.

    Args:
        logits: ``(..., V)``.
        state: unused; part of the processor signature.
        p: mass to keep, in ``(0, 1]``; ``p >= 1`` leaves logits unchanged.

    Returns:
        ``(..., V)`` filtered logits (the input itself when ``p >= 1``).
    """
    if not p > 0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    sorted_logits, sorted_indices = logits.to(compute_dtype).sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # A token is needed while the mass of the tokens ranked above it is still below p;
    # the top token always has mass 0 above it, so every row keeps at least one token.
    # Shifting the cumulative sum (rather than subtracting) keeps it bit-exact.
    cumulative = sorted_probs.cumsum(dim=-1)
    mass_above = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    keep_sorted = mass_above < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, sorted_indices, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))
