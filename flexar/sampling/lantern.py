"""LANTERN: relaxed speculative decoding for image AR models (Jang et al., "LANTERN: Accelerating Visual
Autoregressive Models with Relaxed Speculative Decoding", ICLR 2025; LANTERN++, arXiv 2502.06352; jadohu/LANTERN).

Image tokens that lie close in the tokenizer's latent space are nearly interchangeable, yet the target's mass is
spread over them, so exact speculative decoding rejects most drafts. LANTERN accepts a draft ``x`` against a relaxed
target that lends ``x`` the mass of its nearest latent neighbours:

- neighbour table: L2 distances between the tokenizer's ``code_vectors()``, the token itself excluded, the ``k``
  nearest kept in order of distance (:func:`neighbour_table`);
- ``c_j`` = target mass of the ``j`` nearest neighbours of ``x``; ``B`` = the longest prefix with ``c_j <= delta``
  (LANTERN) or ``c_j <= (lambda - 1) p(x)`` (LANTERN++, so that ``p~(x) <= lambda p(x)``);
- ``p~`` = ``p`` with ``B``'s mass moved onto ``x``: ``p~(x) = p(x) + c_|B|``, ``p~(b) = 0`` for ``b`` in ``B``;
- accept with probability ``min(1, p~(x) / q(x))``; on rejection draw from ``norm(max(0, p~ - q))``.

This is exact speculative sampling against ``p~``, so every committed token follows ``p~`` of its position: with a
deterministic draft the output law is ``p`` with ``B``'s mass moved to ``x``, and ``TV(p~, p) = mass(B) <= delta``.
With ``delta = 0`` (or ``k = 0``, or ``lambda = 1``) ``p~ = p`` and the decoder is exact speculative decoding, draw for
draw on the same random stream.

Differences from the official code, each kept as a switch:

- ``rejection="official"``: on rejection the official code zeroes the first ``k + 1`` entries of the draft's
  neighbour row (its table includes the token itself at distance 0, so: ``x`` and its ``k`` nearest neighbours),
  not only ``B``, before taking ``max(0, p - q)``. That removes mass LANTERN never moved to ``x``, so the output law
  can drift from ``p`` by more than ``delta``. The default, ``rejection="exact"``, removes exactly ``B``.
- drafts are chains (see :mod:`flexar.sampling.speculative`), not EAGLE trees.
- defaults follow the paper for LlamaGen: ``k = 1000``, ``delta = 0.1`` (capped at the codebook size minus one).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flexar.sampling.sampler import Sampler
from flexar.sampling.speculative import SpeculativeDecoder

REJECTIONS = ("exact", "official")


def neighbour_table(code_vectors: Tensor, k: int) -> Tensor:
    """The ``k`` nearest codes of every code by L2 distance, itself excluded, nearest first.

    code_vectors: ``(V, D)`` -> ``(V, min(k, V - 1))`` long. Ties are broken by the lower id (stable sort).
    """
    if code_vectors.dim() != 2:
        raise ValueError(f"code_vectors must be (V, D), got {tuple(code_vectors.shape)}")
    vectors = code_vectors.detach().double()
    vocabulary_size = vectors.shape[0]
    k = max(0, min(k, vocabulary_size - 1))
    distances = torch.cdist(vectors, vectors)
    distances.fill_diagonal_(float("inf"))
    order = distances.argsort(dim=-1, stable=True)
    return order[:, :k].contiguous()


def relaxed_target(
    target_probs: Tensor, drafts: Tensor, neighbours: Tensor, delta: float = 0.1, lam: float | None = None
) -> tuple[Tensor, Tensor]:
    """``p~`` and the accepted neighbourhood ``B`` of each draft.

    Args:
        target_probs: ``(..., V)`` target distributions.
        drafts: ``(...)`` long draft tokens.
        neighbours: ``(V, k)`` table from :func:`neighbour_table`.
        delta: LANTERN's budget: ``B`` keeps the nearest neighbours while their cumulative mass is ``<= delta``.
        lam: LANTERN++'s ratio ``lambda >= 1``; when given it replaces ``delta`` with ``(lambda - 1) p(x)``.

    Returns:
        ``p~ (..., V)`` and ``in_b (..., k)`` bool over the draft's neighbour row.
    """
    rows = neighbours[drafts]  # (..., k)
    neighbour_mass = target_probs.gather(-1, rows)
    cumulative = neighbour_mass.cumsum(dim=-1)
    draft_mass = target_probs.gather(-1, drafts.unsqueeze(-1))
    budget = (lam - 1.0) * draft_mass if lam is not None else torch.full_like(draft_mass, delta)
    # cumulative mass never decreases, so the entries under the budget form a prefix of the row
    in_b = cumulative <= budget
    moved = (neighbour_mass * in_b).sum(dim=-1, keepdim=True)
    relaxed = target_probs.scatter(-1, rows, neighbour_mass.masked_fill(in_b, 0.0))
    relaxed = relaxed.scatter(-1, drafts.unsqueeze(-1), draft_mass + moved)
    return relaxed, in_b


class LanternDecoder(SpeculativeDecoder):
    """Speculative decoding with LANTERN's relaxed acceptance.

    Args:
        draft, sampler, draft_length: as in :class:`~flexar.sampling.SpeculativeDecoder`.
        neighbours: ``(V, k)`` table from :func:`neighbour_table`; when None it is built from the pipeline's
            tokenizer in :meth:`prepare` (``Pipeline.generate`` calls it).
        k: neighbours considered per draft (the table is cut to ``k`` columns).
        delta: total mass a draft may borrow from its neighbours (LANTERN).
        lam: LANTERN++'s ``lambda`` (``p~(x) <= lambda p(x)``); None uses ``delta``.
        rejection: ``"exact"`` (remove exactly ``B`` on rejection) or ``"official"`` (the official code's removal of
            ``x`` and its ``k`` nearest neighbours).
    """

    name = "lantern"

    def __init__(
        self,
        draft: nn.Module | str,
        sampler: Sampler | None = None,
        draft_length: int = 5,
        neighbours: Tensor | None = None,
        k: int = 1000,
        delta: float = 0.1,
        lam: float | None = None,
        rejection: str = "exact",
    ) -> None:
        super().__init__(draft, sampler, draft_length)
        if k < 0 or not 0.0 <= delta <= 1.0:
            raise ValueError(f"LANTERN needs k >= 0 and delta in [0, 1], got k={k}, delta={delta}")
        if lam is not None and lam < 1.0:
            raise ValueError(f"LANTERN++ lambda must be >= 1, got {lam}")
        if rejection not in REJECTIONS:
            raise ValueError(f"rejection must be one of {REJECTIONS}, got {rejection!r}")
        self.k, self.delta, self.lam, self.rejection = k, float(delta), lam, rejection
        self.neighbours = None if neighbours is None else neighbours[:, :k]

    def prepare(self, pipeline) -> None:
        super().prepare(pipeline)
        if self.neighbours is None:
            self.neighbours = neighbour_table(pipeline.tokenizer.code_vectors(), self.k).to(pipeline.device)

    def relax(self, target_probs: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.neighbours is None:
            raise ValueError("LanternDecoder has no neighbour table: pass neighbours= or decode through a Pipeline")
        neighbours = self.neighbours.to(drafts.device)
        if neighbours.shape[1] == 0:
            return target_probs, None
        relaxed, in_b = relaxed_target(target_probs, drafts, neighbours, self.delta, self.lam)
        if self.rejection == "exact":
            return relaxed, None
        rows = torch.cat([drafts.unsqueeze(-1), neighbours[drafts]], dim=-1)
        return relaxed, target_probs.scatter(-1, rows, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "k": self.k, "delta": self.delta, "lam": self.lam, "rejection": self.rejection}
