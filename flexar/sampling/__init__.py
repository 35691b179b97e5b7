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
from flexar.sampling.sampler import Sampler, categorical
from flexar.sampling.entropy import EntropySampler, entropy, entropy_temperature, entropy_top_k
from flexar.sampling.strategy import DecodingStrategy
from flexar.sampling.speculative import SpeculativeDecoder, accept_drafts
from flexar.sampling.lantern import LanternDecoder, neighbour_table, relaxed_target
from flexar.sampling.scalingar import BestOfN, ScalingAR
from flexar.sampling.flow import FlowSampler

__all__ = [
    "CFG_SCHEDULES",
    "LogitProcessor",
    "Sampler",
    "SamplingState",
    "categorical",
    "check_cfg_schedule",
    "classifier_free_guidance",
    "guidance_scale",
    "temperature",
    "top_k",
    "top_p",
]
__all__ += [
    "BestOfN", "DecodingStrategy", "EntropySampler", "FlowSampler", "LanternDecoder", "ScalingAR", "SpeculativeDecoder",
    "accept_drafts", "entropy", "entropy_temperature", "entropy_top_k", "neighbour_table", "relaxed_target",
]
