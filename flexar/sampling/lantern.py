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

The output law depends on how the draft is drawn:

- deterministic draft (the drafter's distribution ``q`` is one-hot on ``x``, e.g. a greedy drafter, or LANTERN's
  top-k tree candidates that the official code verifies with ``q(x) = 1``): this is exact speculative sampling
  against ``p~``, so every committed token follows ``p~`` of its position, ``p`` with ``B``'s mass moved to ``x``, and
  ``TV(p~, p) = mass(B) <= delta``. This is the bound the paper states.
- sampled draft (``x ~ q``, what :class:`~flexar.sampling.SpeculativeDecoder` drafts): ``p~ = p~_x`` depends on the
  draw, so the law of the committed token is the mixture
  ``law(y) = sum_x q(x) [a_x 1{y = x} + (1 - a_x) r_x(y)]``, ``a_x = min(1, p~_x(x) / q(x))``, ``r_x`` the residual
  of draft ``x``. Every token that can be drafted is accepted with its neighbours' mass added, so the law moves
  from ``p`` towards ``q``, and ``TV <= delta`` no longer holds; ``q = p`` gives ``law = p``. Measured exactly over
  one position (``V = 256`` random 4-D codes, ``k = 32``, ``delta = 0.1``, target logits ``2 N(0, 1)``, 200 draws
  of codes, target and draft; tests/test_lantern.py repeats a smaller version): with an unrelated draft (logits an
  independent ``2 N(0, 1)``) ``TV > delta`` in 100 % of cases, median 6.7 ``delta``, max 8.3 ``delta``; with draft
  logits = target logits + ``N(0, 1)`` noise, 98 %, median 2.9, max 4.8 ``delta``; with ``N(0, 0.3^2)`` noise, 68 %,
  median 1.1, max 1.9 ``delta``.

Adaptive lengths: the end-of-sequence token of a target trained on adaptive-length tokens has no code vector, so
it has no neighbours and lends its mass to none: a drafted end-of-sequence token is verified against ``p`` exactly,
and no image token borrows the mass of stopping (the table holds codes only). How long an image is stays the
target's decision; only which nearby code fills a position is relaxed.

With ``delta = 0`` (or ``k = 0``, or ``lambda = 1``) ``p~ = p`` and the decoder is exact speculative decoding, draw for
draw on the same random stream. Acceptance compares strictly (``u q(x) < p~(x)``), so a draft with ``p~(x) = 0`` is
never accepted; the official code's ``r <= p~ / q`` accepts it when the uniform is exactly 0.

Differences from the official code (``LANTERN/models/ea_model_llamagen.py``), each kept as a switch:

- ``rejection="official"`` follows the official rejection instead of removing exactly ``B``: when ``B`` is non-empty,
  the ``k + 1`` nearest neighbours of the rejected ``x`` (its table sets the diagonal to infinity, so ``x`` is not
  among them) are zeroed in ``p`` before the residual ``max(0, p - q)`` is taken, and when that residual has no mass
  the next token is drawn uniformly over the vocabulary. For a deterministic draft this is the official
  ``evaluate_posterior`` (``p(x) = 0``, neighbours zeroed, renormalised) exactly. It removes mass LANTERN never
  moved to ``x`` (neighbours ``|B| + 1 .. k + 1``), so even a deterministic draft's law drifts from ``p`` by more
  than ``delta`` (up to 7.2 ``delta`` in the measurement above). The default, ``rejection="exact"``, removes
  exactly ``B``. The official static-tree path (``evaluate_posterior_v1``, used for LANTERN++) zeroes the
  neighbours in the draft distribution ``q`` instead of in ``p``; that variant is not offered.
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
        neighbours: ``(V, k)`` table from :func:`neighbour_table` (``(V, k + 1)`` for ``rejection="official"``,
            which zeroes one neighbour more than ``B`` can hold); when None it is built from the pipeline's tokenizer
            in :meth:`prepare` (``Pipeline.generate`` calls it). A wider table is cut to the columns needed.
        k: neighbours considered per draft (at most the table's width).
        delta: total mass a draft may borrow from its neighbours (LANTERN).
        lam: LANTERN++'s ``lambda`` (``p~(x) <= lambda p(x)``); None uses ``delta``.
        rejection: ``"exact"`` (remove exactly ``B`` on rejection) or ``"official"`` (the official code's rule: the
            ``k + 1`` nearest neighbours of ``x`` are removed from ``p`` when ``B`` is non-empty, and an empty
            residual is replaced by the uniform distribution).
    """

    name = "lantern"

    def __init__(
        self,
        draft: nn.Module,
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
        self.neighbours = None
        if neighbours is not None:
            self.neighbours = neighbours[:, : self.table_width]
            self.check_table(self.neighbours)

    @property
    def table_width(self) -> int:
        """Neighbour columns the rule reads: ``k``, or ``k + 1`` for the official rejection."""
        return self.k + 1 if self.rejection == "official" else self.k

    @property
    def uniform_fallback(self) -> bool:
        # the official code replaces a residual without mass by the uniform distribution (torch.ones_like)
        return self.rejection == "official"

    def check_table(self, table: Tensor) -> None:
        """Refuse a table too narrow for the official rejection, which zeroes ``k + 1`` neighbours."""
        if table.dim() != 2:
            raise ValueError(f"neighbours must be a (V, k) table, got shape {tuple(table.shape)}")
        if self.rejection != "official":
            return
        width = min(self.k, table.shape[1])
        # with no neighbour considered B is always empty, and the official code zeroes nothing
        needed = min(width + 1, table.shape[0] - 1) if width else 0
        if table.shape[1] < needed:
            raise ValueError(
                f"rejection='official' zeroes the k + 1 = {width + 1} nearest neighbours of a rejected draft, but the "
                f"neighbours table has {table.shape[1]} columns; pass neighbour_table(code_vectors, {width + 1})"
            )

    def prepare(self, pipeline) -> None:
        super().prepare(pipeline)
        if self.neighbours is None:
            vectors = pipeline.tokenizer.code_vectors()
            self.neighbours = neighbour_table(vectors, self.table_width).to(pipeline.device)

    def relax(self, target_probs: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.neighbours is None:
            raise ValueError("LanternDecoder has no neighbour table: pass neighbours= or decode through a Pipeline")
        table = self.neighbours.to(drafts.device)
        width = min(self.k, table.shape[1])
        if width == 0:
            return target_probs, None
        # an end-of-sequence draft (id >= the table's codes) has no latent neighbours: it is verified against p
        ends = drafts >= table.shape[0]
        codes = drafts.masked_fill(ends, 0)
        relaxed, in_b = relaxed_target(target_probs, codes, table[:, :width], self.delta, self.lam)
        relaxed = torch.where(ends.unsqueeze(-1), target_probs, relaxed)
        in_b = in_b & ~ends.unsqueeze(-1)
        if self.rejection == "exact":
            return relaxed, None
        # the official table has the diagonal at infinity, so its first k + 1 entries are k + 1 true neighbours
        # (the draft itself is not among them); they are removed only where B is non-empty
        removed = table[:, : width + 1][codes]
        zeroed = target_probs.scatter(-1, removed, 0.0)
        return relaxed, torch.where(in_b.any(dim=-1, keepdim=True), zeroed, target_probs)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "k": self.k, "delta": self.delta, "lam": self.lam, "rejection": self.rejection}
