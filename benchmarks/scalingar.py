"""ScalingAR against best-of-N at equal N, on a raster generator trained on digits.

Models come from :mod:`benchmarks.digits_models` (``FLEXAR_BENCH_DIGITS`` / ``FLEXAR_BENCH_PIPELINE`` reuse trained
ones). Both methods decode N trajectories per label with the same sampler and keep the one with the best confidence
profile; best-of-N runs every trajectory to the end, ScalingAR terminates low-confidence trajectories at its
checkpoints and schedules guidance by confidence. Plain sampling (one trajectory) is the reference row.

Tokens consumed count every token a trajectory generated before it stopped (ScalingAR) or all of them (best-of-N);
FID (classifier features, digits test split) scores one selected image per label. Wall-clock seconds are reported
from the same run. Every method runs with ``seeds`` random streams: FID is the mean over them, with its standard
deviation, so that a difference between methods can be read against seed noise. The bar: at least 40% fewer
tokens than best-of-N at equal or better (mean) FID.
"""
from __future__ import annotations

import statistics
import time

import torch

from flexar.sampling import BestOfN, Sampler, ScalingAR

from .digits_models import fid, load_or_train

SETTINGS = {
    "quick": dict(images=40, num_trajectories=3, batch_size=20, seeds=2),
    "full": dict(images=1000, num_trajectories=4, batch_size=100, seeds=3),
}
TARGET_TOKEN_SAVING = 0.40


def run(quick: bool, device: str) -> dict:
    settings = SETTINGS["quick" if quick else "full"]
    models = load_or_train(quick, device)
    pipe = models.pipeline
    sampler = Sampler(temperature=1.0, cfg_scale=2.0)
    count = settings["num_trajectories"]
    methods = {
        "plain": sampler,
        "best_of_n": BestOfN(sampler, count),
        "scalingar": ScalingAR(sampler, count),
        "scalingar_no_guidance_schedule": ScalingAR(sampler, count, guidance_gain=0.0),
        "scalingar_strict": ScalingAR(sampler, count, threshold=0.99, checkpoints=(0.25,)),
    }
    labels = torch.arange(settings["images"]) % 10
    rows = []
    for name, strategy in methods.items():
        fids, consumed, seconds = [], 0, 0.0
        for seed in range(settings["seeds"]):
            start = time.perf_counter()
            samples = []
            for chunk in labels.split(settings["batch_size"]):
                stream = torch.Generator(device).manual_seed(1000 * seed + len(samples))
                out = models.target.generate_with(chunk.to(device), strategy, stream)
                consumed += out.stats.get("tokens_consumed", out.stats["tokens"])
                with torch.no_grad():
                    decoded = models.tokenizer.decode(out.ids)
                samples.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
            seconds += time.perf_counter() - start
            fids.append(fid(torch.cat(samples), models, device))
        rows.append({"method": name, "trajectories": 1 if name == "plain" else count,
                     "tokens_consumed": consumed / settings["seeds"], "tokens_per_image": consumed / settings["seeds"] / len(labels),
                     "seconds": seconds / settings["seeds"], "fid": statistics.mean(fids),
                     "fid_std_over_seeds": statistics.stdev(fids) if len(fids) > 1 else 0.0, "fid_per_seed": fids})
    by_name = {row["method"]: row for row in rows}
    baseline, ours = by_name["best_of_n"], by_name["scalingar"]
    saving = 1 - ours["tokens_consumed"] / baseline["tokens_consumed"]
    for row in rows:
        row["token_saving_vs_best_of_n"] = 1 - row["tokens_consumed"] / baseline["tokens_consumed"]
    summary = {
        "token_saving_vs_best_of_n": saving,
        "scalingar_fid": ours["fid"],
        "best_of_n_fid": baseline["fid"],
        "plain_fid": by_name["plain"]["fid"],
        "fid_difference_vs_best_of_n": ours["fid"] - baseline["fid"],
        "best_of_n_fid_std_over_seeds": baseline["fid_std_over_seeds"],
        "target_token_saving": TARGET_TOKEN_SAVING,
        "meets_target": bool(saving >= TARGET_TOKEN_SAVING and ours["fid"] <= baseline["fid"]),
    }
    config = {**settings, "sampler": sampler.to_dict(), "scalingar": methods["scalingar"].to_dict(),
              "models": str(models.folder), "tokens_per_image": models.tokenizer.max_tokens,
              "train_seconds": models.train_seconds}
    return {"config": config, "summary": summary, "rows": rows}
