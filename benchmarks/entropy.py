"""Entropy-aware sampling against a fixed temperature at equal settings, on a raster generator trained on digits.

Models come from :mod:`benchmarks.digits_models` (``FLEXAR_BENCH_DIGITS`` / ``FLEXAR_BENCH_PIPELINE`` reuse trained
ones). For each guidance scale, the rows share top-k / top-p, seed and labels and differ only in the temperature
rule: a fixed temperature ``T``, the paper's ``T(H) = T (2.5 exp(-H / 3) + 0.6)`` with ``T0 = T``, and the same with
flexar's entropy-dependent top-k added. FID uses the classifier features against the digits test split; the mean
temperature actually applied is recorded for the entropy rows.
"""
from __future__ import annotations

import time

import torch

from flexar.sampling import EntropySampler, Sampler

from .digits_models import fid, load_or_train

SETTINGS = {
    "quick": dict(images=40, cfg_scales=[2.0], temperatures=[1.0], top_k=0, batch_size=20),
    "full": dict(images=1000, cfg_scales=[1.5, 3.0], temperatures=[0.8, 1.0], top_k=0, batch_size=100),
}


def run(quick: bool, device: str) -> dict:
    settings = SETTINGS["quick" if quick else "full"]
    models = load_or_train(quick, device)
    pipe = models.pipeline
    labels = torch.arange(settings["images"]) % 10
    rows = []
    for cfg_scale in settings["cfg_scales"]:
        for temperature in settings["temperatures"]:
            common = dict(temperature=temperature, top_k=settings["top_k"], cfg_scale=cfg_scale)
            samplers = {
                "fixed": Sampler(**common),
                "entropy_temperature": EntropySampler(**common),
                "entropy_temperature_top_k": EntropySampler(**common, entropy_top_k=True, top_k_min=4),
            }
            for name, sampler in samplers.items():
                start = time.perf_counter()
                samples = pipe.generate(labels, sampler=sampler, seed=0, batch_size=settings["batch_size"], progress=False)
                seconds = time.perf_counter() - start
                rows.append({"cfg_scale": cfg_scale, "temperature": temperature, "rule": name,
                             "fid": fid(samples, models, device), "seconds": seconds,
                             "mean_applied_temperature": _mean_temperature(models, sampler, device)})
    summary = {}
    for row in rows:
        if row["rule"] != "fixed":
            baseline = next(r for r in rows if r["rule"] == "fixed" and r["cfg_scale"] == row["cfg_scale"]
                            and r["temperature"] == row["temperature"])
            summary[f"{row['rule']}_cfg{row['cfg_scale']}_t{row['temperature']}_fid_ratio"] = row["fid"] / baseline["fid"]
    config = {**settings, "models": str(models.folder), "tokens_per_image": models.tokenizer.max_tokens,
              "train_seconds": models.train_seconds}
    return {"config": config, "summary": summary, "rows": rows}


@torch.no_grad()
def _mean_temperature(models, sampler, device) -> float | None:
    """Mean T(H) over the first-token distributions of every class (None for a fixed temperature)."""
    if not isinstance(sampler, EntropySampler):
        return None
    from flexar.sampling import SamplingState

    labels = torch.arange(10, device=device)
    conditions = models.target.guidance_labels(labels, sampler)
    logits = models.target.prefill(conditions, models.target.new_cache(conditions.shape[0]))
    state = SamplingState()
    sampler.process(logits, state)
    return float(state.extra["temperature"].mean())
