"""NAR (next-neighbour, h + w - 1 passes) against raster decoding (h * w passes) on the same network.

For every grid side n, a :class:`flexar.generators.RasterAR` and a :class:`flexar.generators.NAR` of the same width,
depth and vocabulary are built; NAR copies the raster model's weights and adds its vertical-head block. Both generate
a batch of class-conditional n x n grids with their own schedule and KV cache, sampling at temperature 1 from one
seeded ``torch.Generator``:

- ``raster``: a prefill and n^2 - 1 single-token steps (n^2 forward passes);
- ``nar``: a prefill and 2n - 2 diagonal passes (2n - 1 forward passes, each over the previous diagonal).

The two loops alternate in the timed rounds (``benchmarks.common.compare``); images/s = batch / seconds per batch,
and the speed-up is the median over rounds of raster time / NAR time. Both run attention through SDPA with a dense
boolean mask, the backend ``auto`` picks on CPU (eager FlexAttention is slower there, and compiled FlexAttention would
recompile for every pass shape). On CUDA the paper's 24 x 24 grid is added.

The headline network is 256 wide and 6 deep (flexar's ``raster-digits`` / ``nar-digits`` presets), in float32. At the
target grid two more pairs are timed: a 64-wide, 2-deep one (the ``-tiny`` presets), and the headline network with
weights and activations in bfloat16 (both families; on a CPU with AVX512-BF16 the compute-bound NAR passes gain from
it, while raster's many small steps pay for bfloat16 elementwise ops). The summary also gives the speed-up with each
family at its own faster precision, the comparison a user choosing the dtype would see. On a CPU, NAR's gain is bounded by the work it cannot
batch away: a NAR pass over up to B * n rows is close to compute-bound (the same multiply-adds per token as raster,
plus the vertical block and second head), and the per-token costs (drawing from a softmax over the vocabulary, the
second head) stay per token; the fewer passes only save raster's per-step overhead. The narrow pair shows the second
bound, where sampling over the vocabulary is most of the work.

``linear_seconds`` splits each loop's time: every ``nn.Linear`` call of one generation is recorded (weight shape,
rows) and each distinct call is timed alone on random inputs, with its weights warm in cache; ``other_seconds`` is
the rest of the measured time (attention, norms, sampling, cache writes, cache misses and dispatch). On this CPU the
raster loop spends most of its time outside the warm matrix products: that is the part fewer passes remove. NAR's
remainder (attention over up to B * n queries with a dense mask, drawing B * n tokens per pass) is what keeps it
from the pass ratio.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from flexar.generators import NAR, RasterAR
from flexar.sampling import Sampler

from .common import compare, progress, time_calls

SIZES = {
    "full": dict(dim=256, depth=6, num_heads=8, vocab_size=1024, num_classes=10, batch=8, grids=[8, 16, 32]),
    "quick": dict(dim=32, depth=2, num_heads=2, vocab_size=64, num_classes=10, batch=2, grids=[4, 8]),
}
# a second, narrower network at the target grid: on a CPU the speed-up depends on how far a raster step (B rows per
# matrix product) is from compute-bound, which the width sets
NARROW = {"full": dict(dim=64, depth=2, num_heads=4), "quick": dict(dim=16, depth=1, num_heads=2)}
TARGET_GRID = 16
TARGET_SPEEDUP = 5.0
BACKEND = "sdpa"


def build_pair(side: int, sizes: dict, device: str) -> tuple[RasterAR, NAR]:
    kwargs = dict(vocab_size=sizes["vocab_size"], max_tokens=side * side, grid=[side, side],
                  num_classes=sizes["num_classes"], dim=sizes["dim"], depth=sizes["depth"],
                  num_heads=sizes["num_heads"], attention_backend=BACKEND)
    torch.manual_seed(side)
    raster = RasterAR(**kwargs)
    nar = NAR(**kwargs)
    nar.load_state_dict(raster.state_dict(), strict=False)
    return raster.to(device).eval(), nar.to(device).eval()


def linear_calls(model: torch.nn.Module, call) -> Counter:
    """(weight, bias, rows) -> number of calls, over every nn.Linear call `call()` makes."""
    calls: Counter = Counter()

    def record(module, inputs, output):
        calls[(module, inputs[0].numel() // module.in_features)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        call()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@torch.no_grad()
def matmul_seconds(calls: Counter, device: str) -> float:
    """Summed time of the recorded linear calls, each distinct (weight shape, rows) timed alone."""
    timed: dict = {}
    total = 0.0
    for (module, rows), count in calls.items():
        key = (tuple(module.weight.shape), module.bias is not None, rows)
        if key not in timed:
            x = torch.randn(rows, module.in_features, device=device, dtype=module.weight.dtype)
            timed[key] = min(time_calls(lambda: F.linear(x, module.weight, module.bias), device, number=10) for _ in range(3))
        total += count * timed[key]
    return total


def run(quick: bool, device: str) -> dict:
    mode = "quick" if quick else "full"
    sizes = SIZES[mode]
    grids = sorted(sizes["grids"] + ([24] if torch.device(device).type == "cuda" and not quick else []))
    target_side = TARGET_GRID if not quick else grids[-1]
    narrow = {**sizes, **NARROW[mode]}
    batch = sizes["batch"]
    repeats = 3
    labels = (torch.arange(batch) % sizes["num_classes"]).to(device)
    sampler = Sampler()
    rows, speedups, by_width, by_precision = [], {}, {}, {}
    cases = [(sizes, side, torch.float32) for side in grids] + [(narrow, target_side, torch.float32),
                                                                 (sizes, target_side, torch.bfloat16)]
    for model_sizes, side, dtype in progress(cases, "nar vs raster", unit="case"):
        width = f"dim{model_sizes['dim']}_depth{model_sizes['depth']}"
        raster, nar = build_pair(side, model_sizes, device)
        raster, nar = raster.to(dtype), nar.to(dtype)
        precision = str(dtype).removeprefix("torch.")
        stats = {}

        def timed(name, model):
            def call():
                generator = torch.Generator(device).manual_seed(0)
                stats[name] = model.generate(labels, sampler, generator).stats

            return call

        comparison = compare({"nar": timed("nar", nar), "raster": timed("raster", raster)}, device,
                             warmup=1, repeats=repeats)
        matmul = {name: matmul_seconds(linear_calls(model, timed(name, model)), device)
                  for name, model in (("nar", nar), ("raster", raster))}
        if model_sizes is sizes and dtype == torch.float32:
            speedups[f"{side}x{side}"] = comparison.speedup("nar", "raster")
        if side == target_side and dtype == torch.float32:
            by_width[width] = comparison.speedup("nar", "raster")
        if side == target_side and model_sizes is sizes:
            by_precision[precision] = {name: comparison.seconds(name) for name in ("nar", "raster")}
        for name, model in (("nar", nar), ("raster", raster)):
            seconds = comparison.seconds(name)
            rows.append({
                "model": width,
                "precision": precision,
                "grid": f"{side}x{side}",
                "family": name,
                "forward_passes": stats[name]["forward_passes"],
                "parameters": sum(p.numel() for p in model.parameters()),
                "seconds_per_batch": seconds,
                "images_per_second": batch / seconds,
                "speedup_vs_raster": comparison.speedup(name, "raster"),
                "linear_seconds": matmul[name],
                "other_seconds": seconds - matmul[name],
            })
        expected = {"nar": 2 * side - 1, "raster": side * side}
        for row in rows[-2:]:
            if row["forward_passes"] != expected[row["family"]]:
                raise AssertionError(f"{row['family']} ran {row['forward_passes']} passes at {side}x{side}, "
                                     f"expected {expected[row['family']]}")
    target = f"{TARGET_GRID}x{TARGET_GRID}"
    summary = {
        "speedup_nar_vs_raster": speedups,
        "forward_passes": {row["grid"]: {r["family"]: r["forward_passes"] for r in rows if r["grid"] == row["grid"]}
                           for row in rows},
        f"speedup_by_width_at_{target_side}x{target_side}": by_width,
        # the same network and grid with weights and activations in bfloat16, and each family at its faster precision
        f"speedup_bfloat16_at_{target_side}x{target_side}": by_precision["bfloat16"]["raster"] / by_precision["bfloat16"]["nar"],
        f"speedup_each_at_its_faster_precision_at_{target_side}x{target_side}":
            min(t["raster"] for t in by_precision.values()) / min(t["nar"] for t in by_precision.values()),
        "target_grid": target,
        "target_speedup": TARGET_SPEEDUP,
    }
    if target in speedups:
        summary["meets_target"] = speedups[target] >= TARGET_SPEEDUP
    return {
        "config": {**{k: v for k, v in sizes.items() if k != "grids"}, "grids": grids, "repeats": repeats,
                   "narrow_model": {**NARROW[mode], "grid": [target_side, target_side]},
                   "attention_backend": BACKEND, "sampler": sampler.to_dict(), "kv_cache": True},
        "summary": summary,
        "rows": rows,
    }
