"""ScalingAR against best-of-N at equal N, on a raster generator trained on digits.

Models come from :mod:`benchmarks.digits_models` (``FLEXAR_BENCH_DIGITS`` / ``FLEXAR_BENCH_PIPELINE`` reuse trained
ones). Both methods decode N trajectories per label with the same sampler and keep the one with the best confidence
profile; best-of-N runs every trajectory to the end, ScalingAR terminates low-confidence trajectories at its
checkpoints and schedules guidance by confidence. Plain sampling (one trajectory) is the reference row.

Tokens consumed count every token a trajectory generated before it stopped (ScalingAR) or all of them (best-of-N);
FID (classifier features, digits test split) scores one selected image per label.

ScalingAR's policy constants are not published (see :mod:`flexar.sampling.scalingar`), so the benchmark chooses them
the way a held-out evaluation would:

1. selection: plain, best-of-N and every ScalingAR setting in ``POLICIES`` run with the random streams of
   ``selection_seeds``; among the settings that save at least 40% of best-of-N's tokens, the one with the lowest
   mean FID is chosen;
2. confirmation: best-of-N and the chosen setting run again with fresh streams (``confirmation_seeds``), and the bar
   (at least 40% fewer tokens than best-of-N at equal or better mean FID) is judged on these runs only.

Every row reports the mean FID over its seeds with the standard deviation, so that a difference between methods can
be read against seed noise, and wall-clock seconds from the same run.
"""
from __future__ import annotations

import statistics
import time

import torch

from flexar.sampling import BestOfN, Sampler, ScalingAR

from .common import progress
from .digits_models import fid, load_or_train

SETTINGS = {
    "quick": dict(images=40, num_trajectories=3, batch_size=20, selection_seeds=[0, 1], confirmation_seeds=[2, 3]),
    "full": dict(images=1000, num_trajectories=4, batch_size=100, selection_seeds=[0, 1, 2], confirmation_seeds=[3, 4, 5]),
}
# ScalingAR settings: the library defaults first, then termination that is stricter and earlier, with and without the
# confidence-scheduled guidance (threshold 1.0 keeps only the best trajectory of each label at the checkpoint)
POLICIES = {
    "scalingar": {},
    "scalingar_no_guidance_schedule": dict(guidance_gain=0.0),
    "scalingar_t0.99_at_0.25": dict(threshold=0.99, checkpoints=(0.25,)),
    "scalingar_t1.0_at_0.25": dict(threshold=1.0, checkpoints=(0.25,)),
    "scalingar_t1.0_at_0.25_no_guidance_schedule": dict(threshold=1.0, checkpoints=(0.25,), guidance_gain=0.0),
    "scalingar_t0.97_at_0.125_0.25": dict(threshold=0.97, checkpoints=(0.125, 0.25)),
}
TARGET_TOKEN_SAVING = 0.40


def evaluate(name: str, strategy, seeds: list[int], models, labels: torch.Tensor, batch_size: int, device: str,
             bar=None) -> dict:
    """Mean FID (and its spread) and tokens consumed per seed, for one decoding strategy.

    `bar` (a :func:`benchmarks.common.progress` bar) advances by one per seed.
    """
    fids, consumed, seconds = [], 0, 0.0
    for seed in seeds:
        if bar is not None:
            bar.set_postfix_str(f"{name} seed {seed}")
        start = time.perf_counter()
        samples = []
        for chunk in labels.split(batch_size):
            stream = torch.Generator(device).manual_seed(1000 * seed + len(samples))
            out = models.target.generate_with(chunk.to(device), strategy, stream)
            consumed += out.stats.get("tokens_consumed", out.stats["tokens"])
            with torch.no_grad():
                decoded = models.tokenizer.decode(out.ids)
            samples.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        seconds += time.perf_counter() - start
        fids.append(fid(torch.cat(samples), models, device))
        if bar is not None:
            bar.update()
    return {"method": name, "seeds": list(seeds), "tokens_consumed": consumed / len(seeds),
            "tokens_per_image": consumed / len(seeds) / len(labels), "seconds": seconds / len(seeds),
            "fid": statistics.mean(fids), "fid_std_over_seeds": statistics.stdev(fids) if len(fids) > 1 else 0.0,
            "fid_per_seed": fids}


def run(quick: bool, device: str) -> dict:
    settings = SETTINGS["quick" if quick else "full"]
    models = load_or_train(quick, device)
    sampler = Sampler(temperature=1.0, cfg_scale=2.0)
    count = settings["num_trajectories"]
    methods = {"plain": sampler, "best_of_n": BestOfN(sampler, count)}
    methods.update({name: ScalingAR(sampler, count, **policy) for name, policy in POLICIES.items()})
    labels = torch.arange(settings["images"]) % 10

    # one step per (method, seed): every method on the selection seeds, then two on the confirmation seeds
    runs = len(methods) * len(settings["selection_seeds"]) + 2 * len(settings["confirmation_seeds"])
    bar = progress(description="scalingar", total=runs, unit="run")

    def measure(name: str, seeds: list[int], phase: str) -> dict:
        row = evaluate(name, methods[name], seeds, models, labels, settings["batch_size"], device, bar)
        return {**row, "phase": phase, "trajectories": 1 if name == "plain" else count}

    selection = [measure(name, settings["selection_seeds"], "selection") for name in methods]
    baseline = next(row for row in selection if row["method"] == "best_of_n")
    for row in selection:
        row["token_saving_vs_best_of_n"] = 1 - row["tokens_consumed"] / baseline["tokens_consumed"]
    eligible = [row for row in selection if row["method"] in POLICIES and row["token_saving_vs_best_of_n"] >= TARGET_TOKEN_SAVING]
    chosen = min(eligible, key=lambda row: row["fid"])["method"] if eligible else "scalingar"

    confirmation = [measure(name, settings["confirmation_seeds"], "confirmation") for name in ("best_of_n", chosen)]
    bar.close()
    confirmed_baseline, confirmed = confirmation
    for row in confirmation:
        row["token_saving_vs_best_of_n"] = 1 - row["tokens_consumed"] / confirmed_baseline["tokens_consumed"]
    saving = confirmed["token_saving_vs_best_of_n"]
    summary = {
        "chosen_policy": chosen,
        "chosen_policy_settings": methods[chosen].to_dict(),
        "token_saving_vs_best_of_n": saving,
        "scalingar_fid": confirmed["fid"],
        "scalingar_fid_std_over_seeds": confirmed["fid_std_over_seeds"],
        "best_of_n_fid": confirmed_baseline["fid"],
        "best_of_n_fid_std_over_seeds": confirmed_baseline["fid_std_over_seeds"],
        "fid_difference_vs_best_of_n": confirmed["fid"] - confirmed_baseline["fid"],
        "plain_fid_selection_seeds": next(row["fid"] for row in selection if row["method"] == "plain"),
        "target_token_saving": TARGET_TOKEN_SAVING,
        "meets_target": bool(saving >= TARGET_TOKEN_SAVING and confirmed["fid"] <= confirmed_baseline["fid"]),
    }
    config = {**settings, "sampler": sampler.to_dict(), "policies": {name: methods[name].to_dict() for name in POLICIES},
              "models": str(models.folder), "tokens_per_image": models.tokenizer.max_tokens,
              "train_seconds": models.train_seconds}
    return {"config": config, "summary": summary, "rows": selection + confirmation}
