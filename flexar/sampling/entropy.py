"""Entropy-aware sampling ("Towards Better & Faster Autoregressive Image Generation: From the Perspective of
Entropy", NeurIPS 2025, arXiv 2510.09012; krennic999/ARsample).

Image tokens carry far less information per token than text, and how much varies from token to token: a flat
distribution (high entropy, e.g. background) tolerates little randomness, a peaked one (low entropy, an object edge)
benefits from more. The paper therefore sets the temperature of each draw from the entropy ``H`` (nats) of the
distribution left after CFG and the top-k / top-p filter:

    T(H) = T0 * (a * exp(-H / b) + c),   a = 2.5, b = 3, c = 0.6 (the paper's defaults)

and samples ``softmax(logits / T(H))``. ``T`` falls strictly as ``H`` rises (for ``a, b > 0``), from ``T0 (a + c)`` at
``H = 0`` towards ``T0 c``.

Processors (pure, ``(logits, state, **settings) -> logits``):

- :func:`entropy_temperature`: the rule above, per row; it reads the entropy of the logits it receives, so it runs
  after top-k / top-p in the chain. It records ``entropy`` and ``temperature`` (per row) in ``state.extra``.
- :func:`entropy_top_k`: keeps ``k(H)`` tokens per row with ``k`` growing with ``H``:
  ``k(H) = round(k_min + (k_max - k_min) * clip(H / H_max, 0, 1))``, ``H_max = log V`` unless given.

:class:`EntropySampler` is a :class:`~flexar.sampling.Sampler` whose chain is CFG, entropy top-k, top-k, top-p,
entropy temperature (with ``temperature`` playing ``T0``).

Differences from the paper and its official code:

- the entropy-dependent top-k is a flexar extension. ARsample computes ``adjusted_topk = 100 if H > 8.5 else 16384``
  (smaller k for higher entropy) but the mask that would apply it is commented out, so the released method has no
  entropy top-k. flexar's k grows with entropy instead, the direction of ENkG (arXiv 2601.19488, whose formula is
  unpublished): a flat distribution spreads its mass over many plausible tokens, and cutting it to a few would turn
  it into a near-greedy choice. It is off by default.
- ``T0`` is the sampler's ``temperature`` (the paper's default ``T0 = 1.4`` with CFG 7.5 on LlamaGen is not imposed:
  flexar keeps 1.0, the plain sampler's default, so that switching the rule on changes only the rule).
- the paper's entropy-aware acceptance for speculative Jacobi decoding is not part of this module; the speculative
  decoders in :mod:`flexar.sampling.speculative` accept with the probabilities that this sampler produces.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from flexar.sampling import processors as logit_processors
from flexar.sampling.processors import LogitProcessor, SamplingState
from flexar.sampling.sampler import Sampler

PAPER_A, PAPER_B, PAPER_C = 2.5, 3.0, 0.6


def entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of ``softmax(logits)`` over the last dimension; ``-inf`` entries carry no mass.

    logits: ``(..., V)`` -> ``(...)`` in at least float32.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = logits.to(compute_dtype).log_softmax(dim=-1)
    probs = log_probs.exp()
    # 0 * log 0 = 0: filtered tokens have log-probability -inf
    return -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(dim=-1)


def temperature_from_entropy(
    entropy_value: Tensor | float, base: float = 1.0, a: float = PAPER_A, b: float = PAPER_B, c: float = PAPER_C
) -> Tensor:
    """``T(H) = base * (a * exp(-H / b) + c)``, elementwise."""
    entropy_value = torch.as_tensor(entropy_value)
    return base * (a * torch.exp(-entropy_value / b) + c)


def entropy_temperature(
    logits: Tensor,
    state: SamplingState,
    base: float = 1.0,
    a: float = PAPER_A,
    b: float = PAPER_B,
    c: float = PAPER_C,
) -> Tensor:
    """Divide each row by ``T(H)`` with ``H`` the entropy of that row's (already filtered) distribution.

    Args:
        logits: ``(..., V)``, after CFG and the top-k / top-p filter.
        state: ``state.extra["entropy"]`` and ``state.extra["temperature"]`` receive the ``(...)`` values used.
        base: ``T0``, strictly positive.
        a, b, c: the rule's constants, ``a >= 0``, ``b > 0``, ``c > 0``.

    Returns:
        ``(..., V)`` logits ``logits / T(H)`` (``-inf`` entries stay ``-inf``).
    """
    if not (base > 0 and b > 0 and c > 0 and a >= 0):
        raise ValueError(f"entropy temperature needs base > 0, a >= 0, b > 0, c > 0; got {base}, {a}, {b}, {c}")
    row_entropy = entropy(logits)
    row_temperature = temperature_from_entropy(row_entropy, base, a, b, c)
    state.extra["entropy"] = row_entropy
    state.extra["temperature"] = row_temperature
    return logits / row_temperature.unsqueeze(-1).to(logits.dtype)


def top_k_from_entropy(
    entropy_value: Tensor, vocabulary_size: int, k_min: int = 16, k_max: int = 0, max_entropy: float | None = None
) -> Tensor:
    """``k(H) = round(k_min + (k_max - k_min) * clip(H / max_entropy, 0, 1))`` as a long tensor, non-decreasing in H.

    ``k_max = 0`` means the whole vocabulary; ``max_entropy`` defaults to ``log(vocabulary_size)``, the entropy of
    the uniform distribution.
    """
    k_max = vocabulary_size if k_max <= 0 else min(k_max, vocabulary_size)
    k_min = max(1, min(k_min, k_max))
    max_entropy = math.log(vocabulary_size) if max_entropy is None else max_entropy
    if max_entropy <= 0:
        return torch.full_like(torch.as_tensor(entropy_value), k_max, dtype=torch.long)
    fraction = (torch.as_tensor(entropy_value, dtype=torch.float32) / max_entropy).clamp(0.0, 1.0)
    return torch.round(k_min + (k_max - k_min) * fraction).long()


def entropy_top_k(
    logits: Tensor,
    state: SamplingState,
    k_min: int = 16,
    k_max: int = 0,
    max_entropy: float | None = None,
) -> Tensor:
    """Keep, per row, the ``k(H)`` largest logits (see :func:`top_k_from_entropy`), ``H`` the row's entropy.

    Exactly ``k(H)`` tokens survive per row, ties broken by sort order as in :func:`flexar.sampling.top_k`.

    Args:
        logits: ``(..., V)``.
        state: ``state.extra["top_k"]`` receives the ``(...)`` k used per row.
        k_min, k_max, max_entropy: as in :func:`top_k_from_entropy`.

    Returns:
        ``(..., V)`` filtered logits.
    """
    vocabulary_size = logits.shape[-1]
    row_k = top_k_from_entropy(entropy(logits), vocabulary_size, k_min, k_max, max_entropy).to(logits.device)
    state.extra["top_k"] = row_k
    order = logits.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(vocabulary_size, device=logits.device).expand_as(order))
    return logits.masked_fill(ranks >= row_k.unsqueeze(-1), float("-inf"))


class EntropySampler(Sampler):
    """A :class:`~flexar.sampling.Sampler` with the entropy-aware temperature and the entropy top-k.

    Args:
        temperature: ``T0`` of the rule when ``entropy_temperature`` is on (a plain temperature otherwise); 0 is
            greedy decoding.
        top_k, top_p, cfg_scale, cfg_schedule: as in :class:`~flexar.sampling.Sampler`.
        entropy_temperature: apply ``T(H) = T0 (a exp(-H / b) + c)`` after the filters (the paper's method).
        entropy_a, entropy_b, entropy_c: the rule's constants (paper: 2.5, 3, 0.6).
        entropy_top_k: keep ``k(H)`` tokens with k growing with the entropy (a flexar extension, see the module
            docstring); applied after CFG, before the fixed top-k / top-p.
        top_k_min, top_k_max: range of ``k(H)``; ``top_k_max = 0`` is the whole vocabulary.

    Chain: CFG, [plain temperature when the rule is off], entropy top-k, top-k, top-p, entropy temperature.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cfg_scale: float = 1.0,
        cfg_schedule: str = "constant",
        entropy_temperature: bool = True,
        entropy_a: float = PAPER_A,
        entropy_b: float = PAPER_B,
        entropy_c: float = PAPER_C,
        entropy_top_k: bool = False,
        top_k_min: int = 16,
        top_k_max: int = 0,
    ) -> None:
        if not (entropy_a >= 0 and entropy_b > 0 and entropy_c > 0):
            raise ValueError(f"entropy_a must be >= 0, entropy_b and entropy_c > 0; got {entropy_a}, {entropy_b}, {entropy_c}")
        if top_k_min < 1 or top_k_max < 0 or (top_k_max and top_k_max < top_k_min):
            raise ValueError(f"need 1 <= top_k_min <= top_k_max (0 = vocabulary), got {top_k_min}, {top_k_max}")
        self.entropy_temperature = bool(entropy_temperature)
        self.entropy_a, self.entropy_b, self.entropy_c = float(entropy_a), float(entropy_b), float(entropy_c)
        self.entropy_top_k = bool(entropy_top_k)
        self.top_k_min, self.top_k_max = int(top_k_min), int(top_k_max)
        super().__init__(temperature, top_k, top_p, cfg_scale, cfg_schedule)

    def build_processors(self) -> list[LogitProcessor]:
        chain: list[LogitProcessor] = []
        if self.uses_cfg:
            chain.append(
                partial(logit_processors.classifier_free_guidance, scale=self.cfg_scale, schedule=self.cfg_schedule)
            )
        if not self.entropy_temperature and not self.greedy and self.temperature != 1.0:
            chain.append(partial(logit_processors.temperature, value=self.temperature))
        if self.entropy_top_k:
            chain.append(partial(entropy_top_k, k_min=self.top_k_min, k_max=self.top_k_max))
        if self.top_k > 0:
            chain.append(partial(logit_processors.top_k, k=self.top_k))
        if self.top_p < 1.0:
            chain.append(partial(logit_processors.top_p, p=self.top_p))
        if self.entropy_temperature and not self.greedy:
            chain.append(
                partial(entropy_temperature, base=self.temperature, a=self.entropy_a, b=self.entropy_b, c=self.entropy_c)
            )
        return chain

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "entropy_temperature": self.entropy_temperature,
            "entropy_a": self.entropy_a,
            "entropy_b": self.entropy_b,
            "entropy_c": self.entropy_c,
            "entropy_top_k": self.entropy_top_k,
            "top_k_min": self.top_k_min,
            "top_k_max": self.top_k_max,
        }
