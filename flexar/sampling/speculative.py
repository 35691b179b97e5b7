"""Exact speculative decoding (Leviathan et al., "Fast Inference from Transformers via Speculative Decoding",
ICML 2023; Chen et al., arXiv 2302.01318) for autoregressive image generators, with drafts from a smaller generator or
from an EAGLE-style draft head (Li et al., "EAGLE", ICML 2024; the drafter of LANTERN, jadohu/LANTERN).

One round, with ``n`` tokens committed and ``g = draft_length`` drafts:

1. the drafter proposes ``d_n, ..., d_{n+g-1}``, each drawn from its distribution ``q`` (the wrapped sampler applied
   to the draft logits, so CFG, temperature and filters act on the draft exactly as on the target);
2. one target forward pass over [last committed token, drafts] gives the target distributions ``p`` at the g draft
   positions and one more (again through the same sampler: ``p`` is the law plain decoding draws from);
3. draft ``i`` is accepted with probability ``min(1, p(d_i) / q(d_i))`` (a uniform ``u`` with ``u q < p``), in order,
   until the first rejection; at the first rejected position the token is drawn from ``norm(max(0, p - q))``; when all
   ``g`` drafts pass, a bonus token is drawn from the target's next distribution. Each round commits accepted + 1
   tokens and the output keeps the target's joint law exactly.
4. KV caches of target and drafter are rolled back to the committed prefix with ``KVCache.truncate``.

Classifier-free guidance: target and drafter both run the doubled batch [labels; null], each guided by its own
unconditional rows with the same scale and schedule, and both halves are fed the committed tokens.

Batches: every row commits its own ``accepted + 1`` tokens per round. The KV caches of target and drafter hold a
length per row (:class:`flexar.nn.KVCache`), so rows drift apart: each round feeds every row at its own positions
(the drafter's uncached tokens, one or two per row, padded to one width and committed by count), and samples each
row's distributions at its own decoding step (one sampler call per distinct step). A round drafts
``min(draft_length, r - 1)`` tokens, ``r`` the fewest tokens any row still needs, so no row drafts past its end; a
row that reaches ``num_tokens`` leaves the runs. Each row's output follows the target's law exactly, as in the
single-sequence algorithm.

EAGLE drafting: the head reads pairs (token t_k, target feature h_k), where h_k is the target's final hidden state
(after its final norm) at the position that predicted t_k, and predicts h_{k+1}; the target's own output head turns
it into draft logits. Subsequent drafts of a round feed the head's own predicted features; the head's cache is rolled
back to the pairs built from true target features after every round. The head cannot draft t_0 (no pair yet): the
first round samples t_0 from the target alone.

Adaptive lengths: with a target that has an end-of-sequence token (``eos_token``), the token is drafted, verified
and resampled like any other id (a drafter without one proposes it with probability 0, and a target without one
accepts it with probability 0, so mixed pairs stay exact). A committed end-of-sequence token ends its row: the tokens
after it in the round are dropped, and the row leaves the target's and the drafter's runs, so it costs no further
pass. The prefix up to the token is a draw from the target's law, so the output law, lengths included, stays exact.
A drafted end-of-sequence token is fed to the networks as id 0 (no embedding holds it): the positions after it are
never used.

Differences from the paper and the official code:

- chain drafts only (one draft per position); EAGLE / LANTERN verify a static tree (63 nodes, depth 5, top-8). Tree
  drafts would need tree attention masks in the target's ``step``; the acceptance rule is the same per node.
- ``draft_length`` defaults to 5, the depth of LANTERN's draft tree.
- the stats report ``mean_accepted_length`` as tokens committed per target verification pass per row (accepted
  drafts + 1), the quantity EAGLE and LANTERN call the average acceptance length.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexar.sampling.processors import SamplingState
from flexar.sampling.sampler import Sampler, categorical
from flexar.sampling.strategy import (DecodingStrategy, check_step_decoding, end_of_sequence, forbid_empty,
                                     generation_output, rows_generator)
from flexar.sampling.streams import uniform


# ----------------------------------------------------------------------------------------------------------------------
# acceptance


def accept_drafts(
    target_probs: Tensor,
    draft_probs: Tensor,
    drafts: Tensor,
    uniforms: Tensor,
    bonus_probs: Tensor,
    residual_base: Tensor | None = None,
    uniform_fallback: bool = False,
) -> tuple[Tensor, Tensor]:
    """The accept / reject rule of speculative sampling for one round.

    Args:
        target_probs: ``(B, g, V)`` distributions the drafts are accepted against (the target ``p``, or a relaxed
            ``p~`` for LANTERN).
        draft_probs: ``(B, g, V)`` draft distributions ``q`` the drafts were drawn from.
        drafts: ``(B, g)`` long draft tokens.
        uniforms: ``(B, g)`` uniforms in ``[0, 1)``; draft i passes when ``u_i q(d_i) < p(d_i)``. The comparison is
            strict so that a draft with ``p(d_i) = 0`` is never accepted, even for ``u_i = 0``; for ``p >= q`` every
            ``u < 1`` passes, so the acceptance probability stays ``min(1, p / q)``.
        bonus_probs: ``(B, V)`` target distribution after the last draft (used when every draft passes).
        residual_base: ``(B, g, V)`` distribution whose excess over ``q`` is resampled on rejection; defaults to
            ``target_probs``.
        uniform_fallback: when the residual has no positive part, draw uniformly over the vocabulary (LANTERN's
            official code) instead of from ``target_probs`` at that position.

    Returns:
        ``accepted (B,)`` long, drafts accepted before the first rejection, and ``next_probs (B, V)``, the
        distribution of the token that follows them: ``norm(max(0, base - q))`` at the first rejected position, the
        bonus distribution when all passed (``target_probs`` at that position, or the uniform distribution with
        ``uniform_fallback``, if ``base - q`` has no positive part).
    """
    batch, length = drafts.shape
    residual_base = target_probs if residual_base is None else residual_base
    index = drafts.unsqueeze(-1)
    passed = uniforms * draft_probs.gather(-1, index).squeeze(-1) < target_probs.gather(-1, index).squeeze(-1)
    accepted = passed.long().cumprod(dim=1).sum(dim=1)
    if length == 0:
        return accepted, bonus_probs
    rows = torch.arange(batch, device=drafts.device)
    position = accepted.clamp(max=length - 1)
    base = residual_base[rows, position]
    residual = (base - draft_probs[rows, position]).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # no positive excess: for base = p the position could not reject; otherwise fall back as the caller chose
    fallback = torch.ones_like(residual) / residual.shape[-1] if uniform_fallback else target_probs[rows, position]
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), fallback)
    next_probs = torch.where((accepted == length).unsqueeze(-1), bonus_probs, residual)
    return accepted, next_probs


def acceptance_probability(target_probs: Tensor, draft_probs: Tensor) -> Tensor:
    """Expected acceptance of one draft, ``sum_x min(p(x), q(x))``, over the last dimension."""
    return torch.minimum(target_probs, draft_probs).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# drafters


class GeneratorDrafter:
    """Drafts with a (smaller) generator through its own decoding run (``model.start_decoding``) and KV cache."""

    needs_hidden = False

    def __init__(self, model) -> None:
        check_step_decoding(model, strategy="a speculative draft")
        self.model = model
        self.run = None

    def start(self, conditions: Tensor, copies: int, max_length: int, target_hidden: Tensor | None) -> None:
        self.run = self.model.start_decoding(conditions, copies, max_length)
        self.first_logits = self.run.start()

    @property
    def forward_passes(self) -> int:
        return 0 if self.run is None else self.run.forward_passes

    def ready(self, committed: Tensor) -> bool:
        return True

    def propose(self, ids: Tensor, committed: Tensor, num_drafts: int, copies: int, sample) -> tuple[Tensor, Tensor]:
        """ids (B, >= n) holding each row's committed[b] tokens -> drafts (B, g), q (B, g, V); `sample(logits,
        offset)` draws one position of every row."""
        # the tokens each row committed since its last feed: none at the start, then one or two per row
        counts = committed - (self.run.lengths - 1)
        width = int(counts.max())
        if width == 0:
            logits = self.first_logits
        else:
            index = torch.minimum((self.run.lengths - 1)[:, None] + torch.arange(width, device=ids.device),
                                  (committed - 1)[:, None])
            uniform_rows = bool((counts == width).all())
            out = self.run.feed(ids.gather(1, index), counts=None if uniform_rows else counts)
            last = (counts - 1).repeat(copies)
            logits = out[torch.arange(out.shape[0], device=out.device), last]
        drafts, probs = [], []
        for offset in range(num_drafts):
            token, q = sample(logits, offset)
            drafts.append(token)
            probs.append(q)
            if offset < num_drafts - 1:
                logits = self.run.feed(fed_tokens(token, self.model.vocab_size).unsqueeze(1))[:, -1]
        return torch.stack(drafts, dim=1), torch.stack(probs, dim=1)

    def rollback(self, committed: Tensor) -> None:
        # index k + 1 of the cache holds token k; fed drafts that were accepted stay valid
        self.run.truncate(torch.minimum(self.run.lengths, committed))

    def select(self, rows: Tensor) -> None:
        """Keep the label rows `rows` of the current batch (the others have ended)."""
        self.run.select(rows)


class EagleDrafter:
    """Drafts with an :class:`flexar.generators.EagleDraftHead` over the target's features."""

    needs_hidden = True

    def __init__(self, head, target) -> None:
        for attribute in ("token_embed", "head"):
            if not hasattr(target, attribute):
                raise ValueError(f"an EAGLE draft head needs the target's {attribute!r}; {type(target).__name__} has none")
        if getattr(target, "dim", head.dim) != head.dim:
            raise ValueError(f"EAGLE head width {head.dim} != target width {target.dim}")
        self.head_module, self.target = head, target
        self.forward_passes = 0

    def start(self, conditions: Tensor, copies: int, max_length: int, target_hidden: Tensor | None) -> None:
        rows = conditions.shape[0]
        self.copies = copies
        self.cache = self.head_module.new_cache(rows, max_length)
        self.features = target_hidden.new_zeros(rows, max_length, target_hidden.shape[-1])
        self.features[:, 0] = target_hidden
        self.forward_passes = 0

    def record(self, starts: Tensor, hidden: Tensor) -> None:
        """Target features (rows, n, dim) of input indices [starts[r], starts[r] + n) of each run row r."""
        index = starts[:, None] + torch.arange(hidden.shape[1], device=hidden.device)
        self.features.scatter_(1, index[..., None].expand(-1, -1, hidden.shape[-1]), hidden.to(self.features.dtype))

    def ready(self, committed: Tensor) -> bool:
        return bool((committed >= 1).all())

    def propose(self, ids: Tensor, committed: Tensor, num_drafts: int, copies: int, sample) -> tuple[Tensor, Tensor]:
        rows = committed.shape[0]
        starts = self.cache.lengths[:rows]
        counts = committed - starts  # pairs (token, true target feature) not yet in the head's cache, >= 1 per row
        width = int(counts.max())
        index = torch.minimum(starts[:, None] + torch.arange(width, device=ids.device), (committed - 1)[:, None])
        every = index.repeat(copies, 1)
        pair_ids = ids.gather(1, index).repeat(copies, 1)
        pair_features = self.features.gather(1, every[..., None].expand(-1, -1, self.features.shape[-1]))
        uniform_rows = bool((counts == width).all())
        before = self.cache.lengths.clone()
        predicted = self.head_module.draft_features(pair_ids, pair_features, self.target.token_embed, self.cache)
        if not uniform_rows:
            self.cache.truncate(before + counts.repeat(copies))
        self.forward_passes += 1
        last = (counts - 1).repeat(copies)
        feature = predicted[torch.arange(predicted.shape[0], device=predicted.device), last].unsqueeze(1)
        drafts, probs = [], []
        for offset in range(num_drafts):
            token, q = sample(self.target.head(feature[:, 0]), offset)
            drafts.append(token)
            probs.append(q)
            if offset < num_drafts - 1:
                fed = fed_tokens(token, self.target.vocab_size).unsqueeze(1).repeat(copies, 1)
                feature = self.head_module.draft_features(fed, feature, self.target.token_embed, self.cache)
                self.forward_passes += 1
        # pairs built from predicted features are dropped: the next round rebuilds them from true target features
        self.cache.truncate(committed.repeat(copies))
        return torch.stack(drafts, dim=1), torch.stack(probs, dim=1)

    def rollback(self, committed: Tensor) -> None:
        pass

    def select(self, rows: Tensor) -> None:
        """Keep the label rows `rows` of the current batch, with all their CFG copies (features and head cache)."""
        batch = self.features.shape[0] // self.copies
        every = torch.cat([rows + copy * batch for copy in range(self.copies)])
        self.cache.select(every)
        self.features = self.features[every]


def probs_at_steps(sampler: Sampler, logits: Tensor, steps: Tensor, num_steps: int, copies: int, vocab: int) -> Tensor:
    """The sampler's distributions (R, V) for logits (copies * R, V) ([conditional; null] rows under CFG) whose row r
    sits at decoding step steps[r]: one sampler call per distinct step, so schedules (CFG ramps, the ban on an empty
    sequence) see each row's own step."""
    values = steps.unique().tolist()
    if len(values) == 1:
        return sampler.probs(forbid_empty(logits, values[0], vocab), SamplingState(step=values[0], num_steps=num_steps))
    rows = steps.shape[0]
    out = None
    for step in values:
        index = (steps == step).nonzero().flatten()
        every = torch.cat([index + copy * rows for copy in range(copies)])
        probs = sampler.probs(forbid_empty(logits[every], step, vocab), SamplingState(step=step, num_steps=num_steps))
        if out is None:
            out = probs.new_zeros(rows, probs.shape[-1])
        out[index] = probs
    return out


def fed_tokens(tokens: Tensor, vocab_size: int) -> Tensor:
    """Tokens to feed a network: a drafted end-of-sequence token (id >= vocab_size, which no embedding holds) becomes
    id 0. Whatever follows it is never used: the row ends if the token is accepted, and rejection discards every
    later position."""
    return tokens.masked_fill(tokens >= vocab_size, 0)


def widen(probs: Tensor, width: int) -> Tensor:
    """(..., V) probabilities with zero mass appended up to `width` entries: a draft without an end-of-sequence
    token proposes it with probability 0, and a target without one accepts it with probability 0."""
    return probs if probs.shape[-1] == width else F.pad(probs, (0, width - probs.shape[-1]))


def check_draft(draft, strategy: str = "SpeculativeDecoder", decoding: bool = True) -> nn.Module:
    """Refuse anything but a loaded draft module: a generator (with token-by-token decoding unless ``decoding`` is
    False, which leaves that check to decoding time), or a head that drafts from the target's features
    (``drafts_from_features``, :class:`flexar.generators.EagleDraftHead`)."""
    if isinstance(draft, (str, os.PathLike)):
        raise TypeError(
            f"{strategy} takes the draft as a loaded module, not the folder {os.fspath(draft)!r}: load it with "
            "flexar.hub.load_model(folder), or pass it as Pipeline.from_pretrained(..., draft=folder) and use "
            "pipeline.draft"
        )
    if not isinstance(draft, nn.Module):
        raise TypeError(f"{strategy}: draft must be a generator or an EagleDraftHead module, got {type(draft).__name__}")
    if getattr(draft, "drafts_from_features", False):
        return draft
    if not hasattr(draft, "supports_step_decoding"):
        raise ValueError(f"{strategy}: the draft is a {type(draft).__name__}, not a generator or an EagleDraftHead; "
                         "pass a draft model trained on the target's tokens")
    if decoding:
        check_step_decoding(draft, strategy=f"{strategy}'s draft")
    return draft


# ----------------------------------------------------------------------------------------------------------------------
# decoder


class SpeculativeDecoder(DecodingStrategy):
    """Exact speculative decoding of a target generator with a draft generator or an EAGLE draft head.

    Args:
        draft: a loaded module: a generator with token-by-token decoding and the target's vocabulary and classes (a
            smaller model), or an :class:`flexar.generators.EagleDraftHead`, on the target's device. A folder is not
            accepted here: load it with ``flexar.hub.load_model(folder)`` or ``Pipeline.from_pretrained(...,
            draft=folder)`` (which puts it on the pipeline's device as ``pipeline.draft``).
        sampler: per-token :class:`~flexar.sampling.Sampler` applied to target and draft logits alike.
        draft_length: drafts per round (chain length), ``>= 1``.

    ``decode(model, labels, generator)`` returns ids ``(B, num_tokens)`` (zero past ``lengths`` (B,) when the target
    ends rows itself) and stats: ``forward_passes`` (target, prefill included), ``row_passes`` (label rows summed
    over the target's passes), ``draft_forward_passes``, ``rounds``, ``row_rounds`` (label rows summed over rounds),
    ``drafted`` and ``accepted`` (per row, summed over rows), ``acceptance_rate`` = accepted / drafted,
    ``mean_accepted_length`` (tokens committed per round per row, accepted + 1), ``tokens_per_target_pass`` (committed
    tokens per row per target pass; plain decoding has 1), ``tokens`` (generated, ``lengths.sum()``), ``seconds``,
    ``batch_size``.
    """

    name = "speculative"

    def __init__(self, draft: nn.Module, sampler: Sampler | None = None, draft_length: int = 5) -> None:
        super().__init__(sampler)
        if isinstance(draft_length, bool) or not isinstance(draft_length, int) or draft_length < 1:
            raise ValueError(f"draft_length must be an int >= 1, got {draft_length!r}")
        # whether the draft can decode token by token is checked with the target, when decoding starts
        self.draft = check_draft(draft, type(self).__name__, decoding=False)
        self.draft_length = draft_length

    # -- hooks for subclasses (LANTERN) --------------------------------------------------------------------------------
    # draw uniformly when the residual of a rejected position has no mass (see accept_drafts)
    uniform_fallback = False

    def relax(self, target_probs: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor | None]:
        """(acceptance distribution, residual base) for (B, g, V) target probs and (B, g) drafts: exact SD uses p."""
        return target_probs, None

    def drafter_for(self, model):
        """The drafter of ``self.draft`` for target ``model``, after checking that the two fit together."""
        draft = self.draft
        draft_device = next(draft.parameters()).device
        if draft_device != model.device:
            raise ValueError(f"the draft {type(draft).__name__} lives on {draft_device} but the target on "
                             f"{model.device}: move it with draft.to({str(model.device)!r})")
        if getattr(draft, "drafts_from_features", False):
            return EagleDrafter(draft, model)
        check_step_decoding(draft, strategy=f"{type(self).__name__}'s draft")
        if draft.vocab_size != model.vocab_size:
            raise ValueError(f"draft vocab_size {draft.vocab_size} != target vocab_size {model.vocab_size}")
        if draft.num_classes != model.num_classes:
            raise ValueError(f"draft num_classes {draft.num_classes} != target num_classes {model.num_classes}")
        return GeneratorDrafter(draft)

    # -- decoding ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        model,
        labels: Tensor,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ):
        """Sample ``num_tokens`` tokens per label with the target's law. labels (B,) -> GenerationOutput.

        ``use_cache`` is accepted for the interface; speculative decoding always runs on KV caches.
        """
        check_step_decoding(model, strategy=type(self).__name__)
        sampler = self.sampler
        labels, count, generator, timer, conditions, copies = model.begin_generation(labels, sampler, generator, num_tokens)
        drafter = self.drafter_for(model)
        batch = labels.shape[0]
        length = count + 1
        vocab, eos = model.vocab_size, end_of_sequence(model)

        run = model.start_decoding(conditions, copies, length)
        if drafter.needs_hidden:
            first_logits, first_hidden = run.start(return_hidden=True)
        else:
            first_logits, first_hidden = run.start(), None
        drafter.start(conditions, copies, length, first_hidden)
        rounds, row_rounds, drafted, accepted_total = 0, 0, 0, 0
        # room for one round's writes past the last token; the output keeps the first `count` columns
        ids = torch.zeros(batch, count + self.draft_length + 1, dtype=torch.long, device=labels.device)
        lengths = torch.full((batch,), count, dtype=torch.long, device=labels.device)
        committed = torch.zeros(batch, dtype=torch.long, device=labels.device)
        active = torch.arange(batch, device=labels.device)  # rows still decoding, in the runs' order
        bar = _progress(batch * count, progress)
        while True:
            rows = active.shape[0]
            done = committed[active]
            draws = rows_generator(generator, active, batch)
            num_drafts = min(self.draft_length, int((count - done).min()) - 1) if drafter.ready(done) else 0

            def sample_draft(logits: Tensor, offset: int) -> tuple[Tensor, Tensor]:
                q = probs_at_steps(sampler, logits, done + offset, count, copies, vocab)
                return categorical(q, draws), q

            row_ids = ids[active]
            if num_drafts:
                drafts, draft_probs = drafter.propose(row_ids, done, num_drafts, copies, sample_draft)
            else:
                drafts = ids.new_empty(rows, 0)
                draft_probs = first_logits.new_empty(rows, 0, first_logits.shape[-1])

            # target verification: [each row's last committed token (uncached); drafts] in one pass
            first_round = not bool(done.any())
            starts = run.cache.lengths.clone()
            feed = fed_tokens(drafts, vocab)
            if not first_round:
                feed = torch.cat([row_ids.gather(1, (done - 1)[:, None]), feed], dim=1)
            if feed.shape[1]:
                out = run.feed(feed, return_hidden=drafter.needs_hidden)
                logits, hidden = out if drafter.needs_hidden else (out, None)
                if hidden is not None:
                    drafter.record(starts, hidden)
                if first_round:
                    logits = torch.cat([first_logits.unsqueeze(1), logits], dim=1)
            else:
                logits = first_logits.unsqueeze(1)
            target_probs = torch.stack([probs_at_steps(sampler, logits[:, offset], done + offset, count, copies, vocab)
                                        for offset in range(num_drafts + 1)], dim=1)
            # a draft and a target that differ in having an end-of-sequence token compare over the wider vocabulary
            width = max(target_probs.shape[-1], draft_probs.shape[-1])
            target_probs, draft_probs = widen(target_probs, width), widen(draft_probs, width)

            uniforms = uniform(draws, (rows, num_drafts), ids.device, target_probs.dtype)
            acceptance, residual_base = self.relax(target_probs[:, :num_drafts], drafts)
            accepted, next_probs = accept_drafts(
                acceptance, draft_probs, drafts, uniforms, target_probs[:, num_drafts], residual_base,
                self.uniform_fallback,
            )
            next_token = categorical(next_probs, draws)

            # each row commits its accepted drafts and the token drawn after them
            new = torch.cat([drafts, drafts.new_zeros(rows, 1)], dim=1).scatter(1, accepted[:, None], next_token[:, None])
            take = accepted + 1
            offsets = torch.arange(num_drafts + 1, device=ids.device)[None, :]
            ended = None
            if eos is not None:
                # an end-of-sequence token among the committed ones ends its row there; what follows it is dropped
                is_end = (new == eos) & (offsets < take[:, None])
                ended = is_end.any(dim=1)
                first = torch.where(ended, is_end.long().argmax(dim=1), take)
                lengths[active[ended]] = done[ended] + first[ended]
                # drafts accepted past the end are not counted
                accepted = torch.where(ended, torch.minimum(accepted, first + 1), accepted)
                take = torch.where(ended, first, take)
            new = new.masked_fill(offsets >= take[:, None], 0)
            ids[active] = row_ids.scatter(1, done[:, None] + offsets, new)
            done = done + take
            committed[active] = done
            run.truncate(done)
            drafter.rollback(done)
            rounds += 1
            row_rounds += rows
            drafted += rows * num_drafts
            accepted_total += int(accepted.sum())
            if bar is not None:
                bar.update(int(take.sum()))
            finished = done >= count if ended is None else ended | (done >= count)
            if bool(finished.any()):
                going = (~finished).nonzero().flatten()
                if going.numel() == 0:
                    break
                run.select(going)
                drafter.select(going)
                active = active[going]
        if bar is not None:
            bar.close()
        ids = ids[:, :count].masked_fill(torch.arange(count, device=ids.device)[None, :] >= lengths[:, None], 0)
        tokens = batch * count if eos is None else int(lengths.sum())
        stats = {
            "forward_passes": run.forward_passes,
            "row_passes": run.row_passes,
            "draft_forward_passes": drafter.forward_passes,
            "rounds": rounds,
            "row_rounds": row_rounds,
            "drafted": drafted,
            "accepted": accepted_total,
            "acceptance_rate": accepted_total / drafted if drafted else 0.0,
            "mean_accepted_length": (accepted_total + row_rounds) / row_rounds,
            "tokens_per_target_pass": tokens / run.row_passes,
            "tokens": tokens,
            "seconds": timer.seconds(),
            "batch_size": batch,
        }
        return generation_output(ids, stats, None if eos is None else lengths)

    def to_dict(self) -> dict[str, Any]:
        # a draft loaded from a folder carries that folder's fingerprint, which names the saved model exactly
        return {**super().to_dict(), "draft": type(self.draft).__name__,
                "draft_fingerprint": getattr(self.draft, "fingerprint", None), "draft_length": self.draft_length}


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="speculative decoding", leave=False)
