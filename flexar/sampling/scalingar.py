"""ScalingAR: test-time scaling of AR image generation from token-level confidence ("Go with Your Gut: Scaling
Confidence for Autoregressive Image Generation", arXiv 2509.26376).

N trajectories per label are decoded in parallel. Each step streams a confidence value per trajectory; at checkpoints
a policy terminates trajectories whose confidence profile falls below a fraction of the best one of the same label,
and the guidance scale follows the generation phase and the trajectory's confidence. The surviving trajectory with
the best profile is returned.

The paper's exact formulas are not published (its code, EnVision-Research/ScalingAR, was not available), so this
module is a reconstruction from the published description and third-party summaries; every constant is a keyword
argument. With ``p`` the guided next-token distribution (CFG applied, temperature 1, no filter), ``V`` the vocabulary:

- token uncertainty ``u_t = entropy_weight * H(p) / log V + (1 - entropy_weight) * (1 - (p_(1) - p_(2)))``, in
  [0, 1], increasing in the entropy, decreasing in the top-1 / top-2 margin (:func:`token_uncertainty`);
- conditional signal (under CFG only) ``d_t = JS(p_cond, p_uncond) / log 2`` in [0, 1], how much the condition
  moves the prediction (:func:`condition_strength`);
- fused confidence ``c_t = 1 - [(1 - condition_weight) u_t + condition_weight (1 - d_t)]`` (``condition_weight`` is
  ignored without CFG);
- profile ``s_t`` = running mean of ``c`` over the trajectory's steps; a trajectory's score is its last ``s_t``;
- termination: at each checkpoint (fractions of the sequence, ``checkpoints``), alive trajectories with
  ``s < threshold * max s`` over the alive trajectories of the same label stop; the best always survives;
- guidance: before ``guidance_phase`` (a fraction of the sequence) every trajectory uses the sampler's scale (and
  schedule) ``w``; afterwards trajectory i uses ``w * (1 + guidance_gain * (1 - s_i))``, more guidance where the
  model is less sure. ``guidance_gain = 0`` keeps the sampler's guidance.

With ``terminate=False`` and ``guidance_gain=0`` the method is best-of-N selection by the confidence profile, draw
for draw the same as :class:`BestOfN` on the same random stream. Only tokens of alive trajectories are generated:
``stats["tokens_consumed"]`` is the sum of every trajectory's length when it stopped.

Adaptive lengths (a model with ``eos_token``): a trajectory that draws the end-of-sequence token is complete; it
leaves the decoding run (no further pass) and stays a candidate, with the profile of its own tokens (the step that
ended it adds no confidence). At a checkpoint, alive trajectories are compared with the best profile of their label
among the alive and the complete ones. The returned ids are zero past the selected trajectory's length.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flexar.sampling.processors import SamplingState, classifier_free_guidance
from flexar.sampling.sampler import Sampler
from flexar.sampling.strategy import (DecodingStrategy, check_step_decoding, end_of_sequence, forbid_empty,
                                     generation_output)
from flexar.sampling.streams import ImageStreams


def token_uncertainty(logits: Tensor, entropy_weight: float = 0.5) -> Tensor:
    """``u = w H(p) / log V + (1 - w)(1 - margin)`` in [0, 1] for ``p = softmax(logits)``. (..., V) -> (...)."""
    probs = logits.float().softmax(dim=-1)
    log_probs = logits.float().log_softmax(dim=-1)
    entropy_value = -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(-1)
    normalised = (entropy_value / math.log(logits.shape[-1])).clamp(0.0, 1.0) if logits.shape[-1] > 1 else entropy_value * 0
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0.0)
    return entropy_weight * normalised + (1.0 - entropy_weight) * (1.0 - margin)


def condition_strength(conditional_logits: Tensor, unconditional_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence between the two distributions over ``log 2``, in [0, 1]. (..., V) -> (...)."""
    p = conditional_logits.float().softmax(-1)
    q = unconditional_logits.float().softmax(-1)
    mixture = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return (a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum(-1)

    return ((0.5 * kl(p, mixture) + 0.5 * kl(q, mixture)) / math.log(2.0)).clamp(0.0, 1.0)


def fused_confidence(
    guided_logits: Tensor,
    conditional_logits: Tensor | None = None,
    unconditional_logits: Tensor | None = None,
    entropy_weight: float = 0.5,
    condition_weight: float = 0.3,
) -> Tensor:
    """Step confidence ``c`` in [0, 1] (see the module docstring). (..., V) -> (...)."""
    uncertainty = token_uncertainty(guided_logits, entropy_weight)
    if conditional_logits is None or condition_weight == 0:
        return 1.0 - uncertainty
    strength = condition_strength(conditional_logits, unconditional_logits)
    return 1.0 - ((1.0 - condition_weight) * uncertainty + condition_weight * (1.0 - strength))


class _Scorer:
    """Running mean of the fused confidence per trajectory."""

    def __init__(self, sampler: Sampler, entropy_weight: float, condition_weight: float):
        self.sampler, self.entropy_weight, self.condition_weight = sampler, entropy_weight, condition_weight

    def step_confidence(self, logits: Tensor, state: SamplingState, scale: Tensor | None = None) -> Tensor:
        """logits (rows, V) with [cond; uncond] rows under CFG -> confidence (rows / copies,)."""
        if not self.sampler.uses_cfg:
            return fused_confidence(logits, entropy_weight=self.entropy_weight)
        conditional, unconditional = logits.chunk(2, dim=0)
        if scale is None:
            guided = classifier_free_guidance(logits, state, self.sampler.cfg_scale, self.sampler.cfg_schedule)
        else:
            guided = unconditional + scale.unsqueeze(-1) * (conditional - unconditional)
        return fused_confidence(guided, conditional, unconditional, self.entropy_weight, self.condition_weight)


class ScalingAR(DecodingStrategy):
    """N confidence-scored trajectories per label with early termination and confidence-scheduled guidance.

    Args:
        sampler: per-token :class:`~flexar.sampling.Sampler`; its ``cfg_scale`` / ``cfg_schedule`` is the base guidance.
        num_trajectories: N, trajectories per label.
        entropy_weight: weight of the normalised entropy against ``1 - margin`` in the token uncertainty.
        condition_weight: weight of the conditional signal (``1 - JS / log 2``) in the fused uncertainty (CFG only).
        terminate: run the termination policy.
        threshold: a trajectory stops at a checkpoint when its profile is below ``threshold`` times the best alive
            profile of its label.
        checkpoints: fractions of the sequence (in (0, 1)) at which the policy runs.
        guidance_gain: after ``guidance_phase``, the guidance of trajectory i is ``w (1 + guidance_gain (1 - s_i))``.
        guidance_phase: fraction of the sequence after which guidance follows the confidence.

    ``decode`` returns the best surviving trajectory per label, ids ``(B, num_tokens)``, and stats:
    ``forward_passes``, ``tokens`` (B * num_tokens returned), ``tokens_consumed`` (sum of trajectory lengths),
    ``tokens_full`` (B * N * num_tokens, what best-of-N consumes), ``trajectory_lengths`` and ``scores`` ((B, N)
    lists), ``survivors`` (per label), ``selected`` (trajectory index per label), ``seconds``, ``batch_size``.
    """

    name = "scalingar"

    def __init__(
        self,
        sampler: Sampler | None = None,
        num_trajectories: int = 4,
        entropy_weight: float = 0.5,
        condition_weight: float = 0.3,
        terminate: bool = True,
        threshold: float = 0.97,
        checkpoints: tuple[float, ...] | list[float] = (0.25, 0.5),
        guidance_gain: float = 0.25,
        guidance_phase: float = 0.5,
    ) -> None:
        super().__init__(sampler)
        if num_trajectories < 1:
            raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
        if not (0.0 <= entropy_weight <= 1.0 and 0.0 <= condition_weight <= 1.0):
            raise ValueError("entropy_weight and condition_weight must lie in [0, 1]")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        if any(not 0.0 < fraction < 1.0 for fraction in checkpoints):
            raise ValueError(f"checkpoints must be fractions in (0, 1), got {list(checkpoints)}")
        if guidance_gain < 0 or not 0.0 <= guidance_phase <= 1.0:
            raise ValueError("guidance_gain must be >= 0 and guidance_phase in [0, 1]")
        self.num_trajectories = int(num_trajectories)
        self.entropy_weight, self.condition_weight = float(entropy_weight), float(condition_weight)
        self.terminate, self.threshold = bool(terminate), float(threshold)
        self.checkpoints = tuple(float(fraction) for fraction in checkpoints)
        self.guidance_gain, self.guidance_phase = float(guidance_gain), float(guidance_phase)
        self.inner_sampler = type(self.sampler).from_dict({**self.sampler.to_dict(), "cfg_scale": 1.0})

    def checkpoint_steps(self, count: int) -> set[int]:
        """Numbers of generated tokens after which the termination policy runs."""
        return {min(count - 1, max(1, round(fraction * count))) for fraction in self.checkpoints} if count > 1 else set()

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
        check_step_decoding(model, strategy=type(self).__name__)
        labels = model.check_labels(labels)
        count = model.check_num_tokens(num_tokens)
        generator = model.resolve_generator(generator)
        timer = model.start_timer()
        sampler, trajectories = self.sampler, self.num_trajectories
        # per-image streams: one per trajectory, so pruning draws for the survivors without shifting any stream
        streams = generator.split(trajectories) if isinstance(generator, ImageStreams) else None
        batch = labels.shape[0]
        total = batch * trajectories
        owner = torch.arange(batch, device=labels.device).repeat_interleave(trajectories)  # label of each trajectory
        conditions = model.guidance_labels(labels.repeat_interleave(trajectories), sampler)
        copies = conditions.shape[0] // total
        run = model.start_decoding(conditions, copies, count)
        scorer = _Scorer(sampler, self.entropy_weight, self.condition_weight)

        ids = torch.zeros(total, count, dtype=torch.long, device=labels.device)
        lengths = torch.zeros(total, dtype=torch.long, device=labels.device)
        confidence_sum = torch.zeros(total, device=labels.device)
        alive = torch.arange(total, device=labels.device)  # trajectory index of every active row
        # trajectories that drew the end-of-sequence token: whole, out of the run, still candidates
        complete = torch.zeros(total, dtype=torch.bool, device=labels.device)
        eos = end_of_sequence(model)
        checkpoints = self.checkpoint_steps(count) if self.terminate else set()
        dynamic_guidance = sampler.uses_cfg and self.guidance_gain > 0
        for index in model.progress_range(count, progress, "ScalingAR"):
            logits = run.start() if index == 0 else run.feed(ids[alive, index - 1 : index])[:, -1]
            logits = forbid_empty(logits, index, model.vocab_size)
            state = SamplingState(step=index, num_steps=count)
            if dynamic_guidance and index >= self.guidance_phase * (count - 1) and index > 0:
                profile = confidence_sum[alive] / lengths[alive].clamp_min(1)
                base = _scheduled_scale(sampler, state)
                scale = base * (1.0 + self.guidance_gain * (1.0 - profile))
                conditional, unconditional = logits.chunk(2, dim=0)
                guided = unconditional + scale.unsqueeze(-1).to(logits.dtype) * (conditional - unconditional)
                tokens = self.inner_sampler.sample(guided, state, generator if streams is None else streams.select(alive))
                confidence = scorer.step_confidence(logits, state, scale)
            else:
                tokens = sampler.sample(logits, state, generator if streams is None else streams.select(alive))
                confidence = scorer.step_confidence(logits, state)
            if eos is not None:
                ended = tokens == eos
                if bool(ended.any()):
                    # the profile covers the trajectory's tokens: the step that ends it adds no confidence
                    going = (~ended).nonzero().flatten()
                    complete[alive[ended]] = True
                    tokens, confidence, alive = tokens[going], confidence[going], alive[going]
                    if going.numel() == 0:
                        break
                    run.select(going)
            ids[alive, index] = tokens
            lengths[alive] += 1
            confidence_sum[alive] += confidence.float()
            if index + 1 in checkpoints:
                keep = self._survivors(alive, owner, confidence_sum / lengths.clamp_min(1), complete)
                if keep.numel() < alive.numel():
                    run.select(torch.searchsorted(alive, keep))
                    alive = keep
        scores = confidence_sum / lengths.clamp_min(1)
        finished = complete.clone()
        finished[alive] = True
        masked = scores.masked_fill(~finished, float("-inf")).view(batch, trajectories)
        selected = masked.argmax(dim=1)
        best = torch.arange(batch, device=labels.device) * trajectories + selected
        stats = {
            "forward_passes": run.forward_passes,
            "row_passes": run.row_passes,
            "tokens": batch * count if eos is None else int(lengths[best].sum()),
            "tokens_consumed": int(lengths.sum()),
            "tokens_full": total * count,
            "trajectory_lengths": lengths.view(batch, trajectories).tolist(),
            "scores": scores.view(batch, trajectories).tolist(),
            "survivors": finished.view(batch, trajectories).sum(1).tolist(),
            "selected": selected.tolist(),
            "seconds": timer.seconds(),
            "batch_size": batch,
        }
        return generation_output(ids[best], stats, None if eos is None else lengths[best])

    def _survivors(self, alive: Tensor, owner: Tensor, scores: Tensor, complete: Tensor | None = None) -> Tensor:
        """Alive trajectories (sorted) whose profile is >= threshold * the best profile of their label among the
        alive and the complete (ended by the end-of-sequence token) ones."""
        alive_scores = scores[alive]
        best = torch.full((int(owner.max()) + 1,), float("-inf"), device=scores.device)
        best = best.scatter_reduce(0, owner[alive], alive_scores, reduce="amax")
        if complete is not None and bool(complete.any()):
            done = complete.nonzero().flatten()
            best = best.scatter_reduce(0, owner[done], scores[done], reduce="amax")
        keep = alive_scores >= self.threshold * best[owner[alive]]
        # the best of each label survives even when threshold > 1 would remove it
        keep |= alive_scores == best[owner[alive]]
        return alive[keep]

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "num_trajectories": self.num_trajectories,
            "entropy_weight": self.entropy_weight,
            "condition_weight": self.condition_weight,
            "terminate": self.terminate,
            "threshold": self.threshold,
            "checkpoints": list(self.checkpoints),
            "guidance_gain": self.guidance_gain,
            "guidance_phase": self.guidance_phase,
        }


def _scheduled_scale(sampler: Sampler, state: SamplingState) -> float:
    from flexar.sampling.processors import guidance_scale

    return guidance_scale(sampler.cfg_scale, state, sampler.cfg_schedule)


class BestOfN(DecodingStrategy):
    """Best-of-N baseline: N independent samples per label from the family's own ``generate``, scored afterwards by
    the same confidence profile as :class:`ScalingAR` (teacher-forced) and the best one kept.

    Args: ``sampler``, ``num_trajectories``, ``entropy_weight``, ``condition_weight`` as in :class:`ScalingAR`.
    Stats: the family's stats plus ``tokens_consumed`` (= B * N * num_tokens), ``scores``, ``selected``;
    ``forward_passes`` counts every network call, the scoring pass included (a prefill and one teacher-forced step
    over the sequence: two calls, one when ``num_tokens`` is 1).
    """

    name = "best_of_n"

    def __init__(
        self,
        sampler: Sampler | None = None,
        num_trajectories: int = 4,
        entropy_weight: float = 0.5,
        condition_weight: float = 0.3,
    ) -> None:
        super().__init__(sampler)
        if num_trajectories < 1:
            raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
        self.num_trajectories = int(num_trajectories)
        self.entropy_weight, self.condition_weight = float(entropy_weight), float(condition_weight)

    @torch.no_grad()
    def decode(self, model, labels, generator=None, num_tokens=None, use_cache=True, progress=False):
        check_step_decoding(model, strategy=type(self).__name__)
        labels = model.check_labels(labels)
        count = model.check_num_tokens(num_tokens)
        generator = model.resolve_generator(generator)
        timer = model.start_timer()
        batch, trajectories = labels.shape[0], self.num_trajectories
        repeated = labels.repeat_interleave(trajectories)
        out = model.generate(repeated, self.sampler, generator, count, use_cache, progress)
        eos = end_of_sequence(model)
        lengths = None if eos is None else out.lengths
        scores, scoring_passes = self._score(model, repeated, out.ids, lengths)
        scores = scores.view(batch, trajectories)
        selected = scores.argmax(dim=1)
        best = torch.arange(batch, device=labels.device) * trajectories + selected
        stats = {
            **out.stats,
            "forward_passes": out.stats["forward_passes"] + scoring_passes,
            "tokens": batch * count if eos is None else int(out.lengths[best].sum()),
            "tokens_consumed": batch * trajectories * count if eos is None else int(out.lengths.sum()),
            "scores": scores.tolist(),
            "selected": selected.tolist(),
            "seconds": timer.seconds(),
            "batch_size": batch,
        }
        return generation_output(out.ids[best], stats, None if lengths is None else lengths[best])

    def score(self, model, labels: Tensor, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Mean fused confidence of each sequence over its first ``lengths`` tokens (all when None),
        teacher-forced. labels (R,), ids (R, L), lengths (R,) -> (R,)."""
        return self._score(model, labels, ids, lengths)[0]

    def _score(self, model, labels: Tensor, ids: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, int]:
        """(scores (R,), network calls made): the prefill, then one step over ids[:, :-1] when L > 1."""
        conditions = model.guidance_labels(labels, self.sampler)
        copies = conditions.shape[0] // labels.shape[0]
        count = ids.shape[1]
        run = model.start_decoding(conditions, copies, count)
        logits = forbid_empty(run.start(), 0, model.vocab_size).unsqueeze(1)
        if count > 1:
            logits = torch.cat([logits, run.feed(ids[:, :-1])], dim=1)
        scorer = _Scorer(self.sampler, self.entropy_weight, self.condition_weight)
        confidence = torch.stack(
            [scorer.step_confidence(logits[:, index], SamplingState(index, count)) for index in range(count)], dim=1
        ).float()
        if lengths is None:
            return confidence.mean(dim=1), run.forward_passes
        # as in ScalingAR's profile: the confidence of each row's own tokens, not of the step that ended it
        valid = torch.arange(count, device=ids.device)[None, :] < lengths[:, None]
        return (confidence * valid).sum(dim=1) / lengths.clamp_min(1), run.forward_passes

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "num_trajectories": self.num_trajectories,
                "entropy_weight": self.entropy_weight, "condition_weight": self.condition_weight}
