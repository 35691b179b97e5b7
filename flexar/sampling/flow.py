"""Sampling for flow generators over continuous tokens (xAR): the integrator of the probability-flow ODE or of its
reverse-time SDE, and classifier-free guidance on the velocity.

Path (rectified flow / xAR's ``SILoss`` with ``path_type="linear"``): x_t = (1 - t) x_0 + t eps, t = 1 pure noise, and
the network predicts the velocity v = eps - x_0 (dx_t / dt). A :class:`FlowSampler` integrates from t = 1 to t = 0:

- ``noise=True`` (default, xAR's ``euler_maruyama_sampler``): Euler-Maruyama on the reverse SDE with diffusion
  coefficient w(t) = 2t, the score read from the velocity, s = (-(1 - t) v - x) / t (the Gaussian path's identity),
  drift d = v - w s / 2 and update x <- x + d dt + sqrt(w) sqrt(|dt|) eps, over the times linspace(1, t_min, steps)
  (t_min = 0.04); the last call takes the mean step from t_min to 0 (x <- x + d dt, no noise). ``steps`` network
  calls in all.
- ``noise=False``: plain Euler on the probability-flow ODE, x <- x + v dt over linspace(1, 0, steps + 1), ``steps``
  calls.

Guidance: with ``cfg_scale`` != 1 every call evaluates [labels; null] and uses u + s (c - u) of the two velocities
(xAR guides the SDE's drift, which is affine in v with the same coefficients for both halves, so guiding either is the
same). A generator over several entities ramps the scale per entity (:meth:`FlowSampler.entity_scale`):
1 + (s - 1) k / (K - 1) for entity k of K, starting at 1 for the first; a single entity (xAR's ``image``) gets s.

A flow sampler has no logits, so none of :class:`~flexar.sampling.Sampler`'s processors (temperature, top-k / top-p,
entropy-aware temperature) applies; :func:`check_flow_sampler` refuses one given to a flow generator, by name.
"""
from __future__ import annotations

import torch
from torch import Tensor


class FlowSampler:
    """Integrator settings of a flow generator: ``steps`` network calls per entity, ``cfg_scale`` (1 = none),
    ``noise`` (Euler-Maruyama on the SDE, else Euler on the ODE) and ``t_min`` (the SDE's last noisy time)."""

    def __init__(self, steps: int = 40, cfg_scale: float = 1.0, noise: bool = True, t_min: float = 0.04):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if not isinstance(noise, bool):
            raise ValueError(f"noise must be a bool, got {noise!r}")
        if noise and steps < 2:
            raise ValueError(f"noise=True (Euler-Maruyama) needs steps >= 2 (one noisy step and the final mean step), "
                             f"got {steps}; use noise=False for a single Euler step")
        cfg_scale = float(cfg_scale)
        if not cfg_scale >= 0.0 or cfg_scale == float("inf"):
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")
        t_min = float(t_min)
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.steps, self.cfg_scale, self.noise, self.t_min = steps, cfg_scale, noise, t_min

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    def to_dict(self) -> dict:
        """Constructor arguments, JSON-serialisable; ``from_dict`` rebuilds the sampler."""
        return {"steps": self.steps, "cfg_scale": self.cfg_scale, "noise": self.noise, "t_min": self.t_min}

    @classmethod
    def from_dict(cls, settings: dict) -> "FlowSampler":
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**settings)

    def __repr__(self) -> str:
        return f"FlowSampler(steps={self.steps}, cfg_scale={self.cfg_scale}, noise={self.noise}, t_min={self.t_min})"

    def times(self) -> Tensor:
        """The ``steps + 1`` times (float64) from 1 down to 0 that the ``steps`` calls integrate between."""
        if self.noise:
            return torch.cat([torch.linspace(1.0, self.t_min, self.steps, dtype=torch.float64),
                              torch.zeros(1, dtype=torch.float64)])
        return torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)

    def entity_scale(self, index: int, count: int) -> float:
        """The guidance scale of entity `index` of `count`: 1 + (s - 1) index / (count - 1); s for a single one."""
        if count <= 1:
            return self.cfg_scale
        return 1.0 + (self.cfg_scale - 1.0) * index / (count - 1)

    def guide(self, velocity: Tensor, scale: float) -> Tensor:
        """(2B, ...) [conditional; unconditional] velocities -> (B, ...) u + scale (c - u); (B, ...) without CFG."""
        if not self.uses_cfg:
            return velocity
        conditional, unconditional = velocity.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    def step(self, x: Tensor, velocity: Tensor, t: float, t_next: float, noise: Tensor | None = None) -> Tensor:
        """One update of x (B, ...) at time t to t_next < t given the guided velocity (B, ...).

        With ``noise`` the SDE step: a standard normal `noise` of x's shape, except on the last step (t_next == 0),
        the mean step, which takes none. Without it, Euler on the ODE."""
        dt = t_next - t
        if not self.noise:
            return x + dt * velocity
        # score of the linear path from the velocity: s = (-(1 - t) v - x) / t, and drift v - (w / 2) s with w = 2t
        score = (-(1.0 - t) * velocity - x) / t
        drift = velocity - t * score
        if t_next == 0.0:
            return x + dt * drift
        if noise is None:
            raise ValueError("an Euler-Maruyama step before the last needs its noise draw")
        return x + dt * drift + (2.0 * t) ** 0.5 * abs(dt) ** 0.5 * noise


def check_flow_sampler(sampler, where: str) -> FlowSampler:
    """`sampler` when it is a :class:`FlowSampler` (None: the default one); anything else is refused by name."""
    if sampler is None:
        return FlowSampler()
    if isinstance(sampler, FlowSampler):
        return sampler
    described = type(sampler).__name__
    processors = getattr(sampler, "processors", None)
    if processors:
        names = [getattr(p, "func", p).__name__ if hasattr(getattr(p, "func", p), "__name__") else repr(p)
                 for p in processors]
        described += f" with the logit processors {names}"
    raise ValueError(
        f"{where} is a flow generator over continuous latents: it predicts velocities, not logits, so a {described} "
        "(temperature, top-k / top-p, entropy-aware sampling, speculative decoding) cannot apply. Pass "
        "flexar.sampling.FlowSampler(steps=..., cfg_scale=..., noise=True | False)"
    )
