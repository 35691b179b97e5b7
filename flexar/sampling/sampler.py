"""Token sampler: a chain of logit processors followed by one draw from an explicit
``torch.Generator``.

The chain runs classifier-free guidance, temperature, top-k and top-p, in that order
(VAR's ``sample_with_top_k_top_p_`` and LlamaGen's ``sample`` apply the same filters).
Methods that reshape the distribution further, such as entropy-aware temperature
(arXiv 2510.09012), are processors inserted into :attr:`Sampler.processors`; methods that
change the decoding loop itself (speculative decoding, LANTERN, ScalingAR) wrap a
generator's step and call :meth:`Sampler.probs` / :meth:`Sampler.sample`.

Departures from the reference code: temperature 0 means greedy decoding (argmax after
the filters) instead of a division by zero, and a draw without an explicit generator is
refused instead of falling back to the global random state.

Rows without valid probability mass (NaN or infinite logits, which a diverged network
produces) are refused with a ``ValueError`` instead of being drawn as token V - 1. The
check reads the row totals that the inverse-CDF draw computes anyway. On CPU it runs at
every call; on an accelerator :class:`Sampler` keeps it on the device and synchronises only
at the first and the last step of a decoding schedule (``state.step == 0`` and
``state.step == state.num_steps - 1``), naming the first step that failed, so that the
decoding loop never waits on the host in between. Settings that float32 cannot carry
(a temperature below its smallest normal number, a guidance scale beyond its largest) are
refused when the sampler is built; small temperatures and large guidance scales are
computed without overflow (see :mod:`flexar.sampling.processors`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from flexar.sampling import processors as logit_processors
from flexar.sampling.processors import LogitProcessor, SamplingState
from flexar.sampling.streams import uniform


FLOAT32 = torch.finfo(torch.float32)


def draw(probs: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The draw of :func:`categorical` without its check: ``(ids, valid)``, both (...).

    ``valid`` says whether each row had positive, finite mass; rows where it is False got an
    arbitrary id. Callers that check validity their own way (:class:`Sampler`) use this.
    """
    if probs.shape[-1] == 0:
        raise ValueError("cannot draw from an empty vocabulary")
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(dim=-1)
    total = cdf[:, -1:]
    uniforms = uniform(generator, (flat.shape[0], 1), flat.device, cdf.dtype)
    ids = torch.searchsorted(cdf, uniforms * total, right=True).clamp_max_(flat.shape[-1] - 1)
    # NaN fails both comparisons; an infinite or zero total has no law to draw from
    valid = (total > 0) & (total < float("inf"))
    return ids.view(probs.shape[:-1]), valid.view(probs.shape[:-1])


def refuse_invalid_rows(valid: Tensor, where: str, step: int | None = None) -> None:
    """Raise ``ValueError`` when a row of ``valid`` (...) is False (one host synchronisation)."""
    if bool(valid.all()):
        return
    bad = (~valid).reshape(-1).nonzero().flatten()
    shown = ", ".join(str(int(row)) for row in bad[:8]) + (", ..." if bad.numel() > 8 else "")
    at = f" at decoding step {step}" if step is not None else ""
    raise ValueError(
        f"{where}: {bad.numel()} of {valid.numel()} rows have no probability mass to draw from{at} (NaN, infinite "
        f"or all-zero probabilities), rows {shown}; NaN or infinite logits mean the network's outputs are not finite"
    )


def categorical(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of ``probs`` (..., V), non-negative and not necessarily normalised; returns (...) long ids.

    Inverse-CDF sampling: one uniform per row against the running sum. It keeps the law of
    ``torch.multinomial(probs, 1)`` and costs a cumulative sum instead of one exponential draw per entry, which on a
    CPU is 10-20x cheaper over a vocabulary of 1024. A zero-probability id is never drawn: the uniform lies in
    [0, total), and a zero entry leaves the running sum unchanged, so the first index whose sum exceeds the uniform
    is always one with mass. A row without positive, finite mass (NaN, infinite or all zero) is refused with a
    ``ValueError``; the check reads the row totals of the running sum and costs one host synchronisation per call
    on an accelerator (use :func:`draw` to check another way).
    """
    ids, valid = draw(probs, generator)
    refuse_invalid_rows(valid, "categorical")
    return ids


class Sampler:
    """Turns next-token logits into token ids.

    Args:
        temperature: softmax temperature, ``>= 0``; 0 is greedy decoding (argmax).
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all.
        top_p: nucleus mass in ``(0, 1]``; 1 keeps all.
        cfg_scale: classifier-free guidance scale, ``>= 0``; 1 means no guidance, and
            the logits then carry ``B`` rows instead of ``2B``.
        cfg_schedule: how the guidance scale moves over the decoding steps, a key of
            :data:`flexar.sampling.CFG_SCHEDULES` (``"constant"`` or ``"linear"``).

    The processors live in the public list :attr:`processors`, each called as
    ``processor(logits, state) -> logits``. Subclasses extend the chain by overriding
    :meth:`build_processors`; a single instance may also insert into the list directly,
    which :meth:`to_dict` does not record.

    Example::

        sampler = Sampler(temperature=1.0, top_k=600, cfg_scale=4.0)
        generator = torch.Generator().manual_seed(0)
        ids_B = sampler.sample(logits_2BV, SamplingState(step, num_steps), generator)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cfg_scale: float = 1.0,
        cfg_schedule: str = "constant",
    ) -> None:
        if not (isinstance(temperature, (int, float)) and 0.0 <= temperature < float("inf")):
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}"
            )
        if 0.0 < temperature < FLOAT32.tiny or temperature > FLOAT32.max:
            raise ValueError(
                f"temperature {temperature!r} is outside what float32 can divide by "
                f"([{FLOAT32.tiny:.3g}, {FLOAT32.max:.3g}]); use temperature 0 for greedy decoding"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 keeps all), got {top_k!r}")
        if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 keeps all), got {top_p!r}")
        if not (isinstance(cfg_scale, (int, float)) and 0.0 <= cfg_scale < float("inf")):
            raise ValueError(
                f"cfg_scale must be a finite number >= 0 (1 means no guidance), got {cfg_scale!r}"
            )
        if cfg_scale > FLOAT32.max:
            raise ValueError(f"cfg_scale {cfg_scale!r} exceeds the largest float32 ({FLOAT32.max:.3g})")
        logit_processors.check_cfg_schedule(cfg_schedule)
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.cfg_scale = float(cfg_scale)
        self.cfg_schedule = cfg_schedule
        self.processors: list[LogitProcessor] = self.build_processors()
        # on an accelerator: (first failing step, number of rows without mass then), kept on the device until a
        # schedule's first or last step (see the module docstring)
        self._pending_check: Tensor | None = None

    @property
    def uses_cfg(self) -> bool:
        """Whether logits carry conditional and unconditional rows (``2B`` rows)."""
        return self.cfg_scale != 1.0

    @property
    def greedy(self) -> bool:
        """Whether sampling is an argmax (temperature 0)."""
        return self.temperature == 0.0

    def build_processors(self) -> list[LogitProcessor]:
        """The chain in order: CFG, temperature, top-k, top-p (each only when active)."""
        chain: list[LogitProcessor] = []
        if self.uses_cfg:
            chain.append(
                partial(
                    logit_processors.classifier_free_guidance,
                    scale=self.cfg_scale,
                    schedule=self.cfg_schedule,
                )
            )
        if not self.greedy and self.temperature != 1.0:
            chain.append(partial(logit_processors.temperature, value=self.temperature))
        if self.top_k > 0:
            chain.append(partial(logit_processors.top_k, k=self.top_k))
        if self.top_p < 1.0:
            chain.append(partial(logit_processors.top_p, p=self.top_p))
        return chain

    def process(self, logits: Tensor, state: SamplingState | None = None) -> Tensor:
        """Run the processor chain.

        Args:
            logits: ``(B, ..., V)``, or ``(2B, ..., V)`` (conditional rows first) when
                :attr:`uses_cfg`.
            state: decoding position; ``SamplingState()`` when omitted.

        Returns:
            ``(B, ..., V)`` processed logits in at least float32 (bf16 or fp16 logits of a low-precision model are
            upcast first, so CFG, temperature and the filters never round); the input is left untouched.
        """
        state = SamplingState() if state is None else state
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        for processor in self.processors:
            logits = processor(logits, state)
        return logits

    def probs(self, logits: Tensor, state: SamplingState | None = None) -> Tensor:
        """Probabilities that :meth:`sample` draws from.

        Args:
            logits: as in :meth:`process`.
            state: as in :meth:`process`.

        Returns:
            ``(B, ..., V)`` probabilities in at least float32; a one-hot on the argmax
            when :attr:`greedy`.
        """
        processed = self.process(logits, state)
        compute_dtype = torch.promote_types(processed.dtype, torch.float32)
        if self.greedy:
            ids = processed.argmax(dim=-1)
            one_hot = torch.zeros(processed.shape, dtype=compute_dtype, device=processed.device)
            return one_hot.scatter_(-1, ids.unsqueeze(-1), 1.0)
        return processed.to(compute_dtype).softmax(dim=-1)

    def sample(
        self,
        logits: Tensor,
        state: SamplingState | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw one token per position.

        Args:
            logits: as in :meth:`process`.
            state: as in :meth:`process`.
            generator: source of randomness, on the device of ``logits``; required
                unless :attr:`greedy`, which draws nothing. The global random state is
                never used.

        Returns:
            ``(B, ...)`` long token ids.
        """
        state = SamplingState() if state is None else state
        if self.greedy:
            best, ids = self.process(logits, state).max(dim=-1)
            # NaN propagates through max; a row of -inf has nothing to choose
            self.check_rows(best > float("-inf"), state)
            return ids
        if generator is None:
            raise ValueError(
                "Sampler.sample needs an explicit torch.Generator when temperature > 0; "
                "pass generator=torch.Generator(device).manual_seed(seed)"
            )
        ids, valid = draw(self.probs(logits, state), generator)
        self.check_rows(valid, state)
        return ids

    def check_rows(self, valid: Tensor, state: SamplingState) -> None:
        """Refuse rows without probability mass: at once on CPU; on an accelerator, recorded on the device and
        checked (one host synchronisation) at the first and the last step of the schedule."""
        where = type(self).__name__
        if self.synchronisation_is_free(valid.device):
            refuse_invalid_rows(valid, where, state.step)
            return
        pending = self._pending_check
        if pending is not None and pending.device != valid.device:
            self._pending_check = None
            self._raise_pending(pending, where)
            pending = None
        failed = (~valid).sum()
        now = torch.stack([torch.full_like(failed, state.step), failed])
        # keep the first failing step
        self._pending_check = now if pending is None else torch.where(pending[1] > 0, pending, now)
        if state.step == 0 or state.step >= state.num_steps - 1:
            pending, self._pending_check = self._pending_check, None
            self._raise_pending(pending, where, valid.numel())

    @staticmethod
    def synchronisation_is_free(device: torch.device) -> bool:
        """Whether reading a device value on the host costs no wait for queued work (on CPU nothing is queued)."""
        return device.type == "cpu"

    @staticmethod
    def _raise_pending(pending: Tensor, where: str, rows: int | None = None) -> None:
        step, failed = (int(value) for value in pending.tolist())
        if failed:
            of = f" of {rows}" if rows is not None else ""
            raise ValueError(
                f"{where}: {failed}{of} rows have no probability mass to draw from at decoding step {step} (NaN, "
                "infinite or all-zero probabilities); NaN or infinite logits mean the network's outputs are not finite"
            )

    def to_dict(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable; ``from_dict`` rebuilds the sampler."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "cfg_scale": self.cfg_scale,
            "cfg_schedule": self.cfg_schedule,
        }

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> Sampler:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**settings)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.to_dict().items())
        return f"{type(self).__name__}({arguments})"
