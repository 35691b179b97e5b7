"""Sampling: pure logit processors and a sampler that draws from an explicit generator."""

from flexar.sampling.processors import (
    CFG_SCHEDULES,
    LogitProcessor,
    SamplingState,
    check_cfg_schedule,
    classifier_free_guidance,
    guidance_scale,
    temperature,
    top_k,
    top_p,
)
from flexar.sampling.sampler import Sampler

__all__ = [
    "CFG_SCHEDULES",
    "LogitProcessor",
    "Sampler",
    "SamplingState",
    "check_cfg_schedule",
    "classifier_free_guidance",
    "guidance_scale",
    "temperature",
    "top_k",
    "top_p",
]
