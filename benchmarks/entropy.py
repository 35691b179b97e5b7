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

from .common import progress
from .digits_models import fid, load_or_train

SETTINGS = {
    "quick": dict(images=40, cfg_scales=[2.0], temperatures=[1.0], top_k=0, batch_size=20, calibration_images=20),
    "full": dict(images=1000, cfg_scales=[1.5, 3.0], temperatures=[0.8, 1.0], top_k=0, batch_size=100,
                 calibration_images=200),
}


def run(quick: bool, device: str) -> dict:
    settings = SETTINGS["quick" if quick else "full"]
    models = load_or_train(quick, device)
    pipe = models.pipeline
    labels = torch.arange(settings["images"]) % 10
    rows = []
    # one step per (guidance scale, temperature): its calibration and its four rules
    bar = progress(description="entropy", total=len(settings["cfg_scales"]) * len(settings["temperatures"]),
                   unit="setting")
    for cfg_scale in settings["cfg_scales"]:
        for temperature in settings["temperatures"]:
            bar.set_postfix_str(f"cfg {cfg_scale} T {temperature}")
            common = dict(temperature=temperature, top_k=settings["top_k"], cfg_scale=cfg_scale)
            ratio = _mean_factor(pipe, EntropySampler(**dict(common, temperature=1.0)), labels[: settings["calibration_images"]], settings)
            samplers = {
                "fixed": Sampler(**common),
                "entropy_temperature": EntropySampler(**common),
                "entropy_temperature_top_k": EntropySampler(**common, entropy_top_k=True, top_k_min=4),
                "entropy_temperature_matched": EntropySampler(**dict(common, temperature=temperature / ratio)),
            }
            for name, sampler in samplers.items():
                start = time.perf_counter()
                samples = pipe.generate(labels, sampler=sampler, seed=0, batch_size=settings["batch_size"], progress=False)
                seconds = time.perf_counter() - start
                applied = None
                if isinstance(sampler, EntropySampler):
                    applied = sampler.temperature * _mean_factor(pipe, sampler, labels[: settings["calibration_images"]], settings)
                rows.append({"cfg_scale": cfg_scale, "temperature": temperature, "rule": name, "t0": sampler.temperature,
                             "fid": fid(samples, models, device), "seconds": seconds,
                             "mean_applied_temperature": applied})
            bar.update()
    bar.close()
    summary = {}
    for row in rows:
        if row["rule"] != "fixed":
            baseline = next(r for r in rows if r["rule"] == "fixed" and r["cfg_scale"] == row["cfg_scale"]
                            and r["temperature"] == row["temperature"])
            summary[f"{row['rule']}_cfg{row['cfg_scale']}_t{row['temperature']}_fid_ratio"] = row["fid"] / baseline["fid"]
    config = {**settings, "models": str(models.folder), "tokens_per_image": models.tokenizer.max_tokens,
              "train_seconds": models.train_seconds}
    return {"config": config, "summary": summary, "rows": rows}


class _Recording(EntropySampler):
    """An EntropySampler that keeps the T(H) / T0 factor of every row it draws."""

    def __init__(self, sampler: EntropySampler):
        super().__init__(**{k: v for k, v in sampler.to_dict().items() if k != "strategy"})
        self.factors: list[torch.Tensor] = []

    def process(self, logits, state=None):
        out = super().process(logits, state)
        if state is not None and "temperature" in state.extra:
            self.factors.append(state.extra["temperature"].float().flatten().cpu() / self.temperature)
        return out


def _mean_factor(pipe, sampler: EntropySampler, labels: torch.Tensor, settings: dict) -> float:
    """Mean of T(H) / T0 over every draw of a generation of `labels` with `sampler`."""
    recording = _Recording(sampler)
    pipe.generate(labels, sampler=recording, seed=1, batch_size=settings["batch_size"], progress=False)
    return float(torch.cat(recording.factors).mean())
