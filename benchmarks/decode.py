"""Decoding speed: compiled against eager decoding steps, and each family's time against its matrix-product floor.

Models have random weights: tokens/s of plain decoding does not depend on them.

- ``raster``: the digits raster generator's architecture (:mod:`benchmarks.digits_models`' full target: width 192,
  6 blocks, 6 heads, 16 tokens of 128 codes, 10 classes), generating with CFG 2 and top-k 20 at batch 1 and 64:
  eager decoding against ``compile_decoding()`` (``torch.compile`` of the step after an eager prefill). Summary:
  ``compile_speedup_batch1`` and ``compile_speedup_batch64`` (median over interleaved rounds of eager / compiled
  seconds; bar >= 2x at batch 1, ``meets_compile_speedup_batch1``);
- ``token_shuffle``: Token-Shuffle (s = 2) of the same width and depth on a 8 x 8 grid (16 windows), eager against
  compiled, batch 1 and 64;
- the floor: one eager generation of each case under ``torch.profiler``; ``matmul_seconds`` is the self time of the
  matrix products (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm``) and ``attention_seconds`` that of the fused
  attention kernels; ``eager_over_floor`` and ``compiled_over_floor`` divide the measured seconds by their sum, the
  distance to what the arithmetic alone costs.

Not measured here, with the reason in ``config["skipped"]``: NAR against raster compiled (NAR's per-pass forward has
no compiled path yet), and speculative decoding with the EAGLE head compiled (its speed depends on trained drafts:
the digits models of :mod:`benchmarks.digits_models`).

Quick: tiny models, batch 1 and 4, three rounds (a smoke test; the ratios mean nothing).
"""
from __future__ import annotations

import torch

from .common import compare, progress

SIZES = {
    "full": dict(dim=192, depth=6, num_heads=6, tokens=16, vocab_size=128, batches=(1, 64), rounds=7,
                 shuffle_grid=8),
    "quick": dict(dim=32, depth=1, num_heads=2, tokens=8, vocab_size=16, batches=(1, 4), rounds=3, shuffle_grid=4),
}
BAR_COMPILE_SPEEDUP_BATCH1 = 2.0
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def build(family: str, size: dict, device: str):
    from flexar.generators import RasterAR, TokenShuffleAR

    torch.manual_seed(0)
    sizes = dict(vocab_size=size["vocab_size"], num_classes=10, dim=size["dim"], depth=size["depth"],
                 num_heads=size["num_heads"])
    if family == "raster":
        model = RasterAR(max_tokens=size["tokens"], **sizes)
    else:
        side = size["shuffle_grid"]
        model = TokenShuffleAR(max_tokens=side * side, grid=(side, side), shuffle=2, **sizes)
    return model.to(device).eval()


def floor_seconds(function) -> dict:
    """Self seconds of the matrix products and of the attention kernels in one call of `function`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    matmul = attention = 0.0
    for event in profiler.key_averages():
        if event.key in MATMUL_OPS:
            matmul += event.self_cpu_time_total / 1e6
        elif "scaled_dot_product" in event.key and event.key.startswith("aten::_"):
            attention += event.self_cpu_time_total / 1e6
    return {"matmul_seconds": matmul, "attention_seconds": attention}


def run(quick: bool, device: str) -> dict:
    from flexar.sampling import Sampler

    size = SIZES["quick" if quick else "full"]
    sampler = Sampler(temperature=1.0, top_k=min(20, size["vocab_size"] - 1), cfg_scale=2.0)
    rows, summary = [], {}
    cases = [(family, batch) for family in ("raster", "token_shuffle") for batch in size["batches"]]
    for family, batch in progress(cases, "decode: cases"):
        eager_model, compiled_model = build(family, size, device), build(family, size, device)
        compiled_model.compile_decoding()
        labels = torch.arange(batch, device=device) % 10

        def generate(model):
            return lambda: model.generate(labels, sampler, torch.Generator(device).manual_seed(0))

        same = torch.equal(generate(eager_model)().ids, generate(compiled_model)().ids)  # also compiles the step
        timing = compare({"eager": generate(eager_model), "compiled": generate(compiled_model)}, device, warmup=1,
                         repeats=size["rounds"], description=f"decode: {family} batch {batch}")
        floor = floor_seconds(generate(eager_model)) if device == "cpu" else {}
        tokens = batch * eager_model.max_tokens
        row = {"family": family, "batch": batch, "tokens": tokens,
               "eager_seconds": timing.seconds("eager"), "compiled_seconds": timing.seconds("compiled"),
               "eager_tokens_per_second": tokens / timing.seconds("eager"),
               "compiled_tokens_per_second": tokens / timing.seconds("compiled"),
               "compile_speedup": timing.speedup("compiled", "eager"), "same_tokens": same,
               "parameters": sum(p.numel() for p in eager_model.parameters()), **floor}
        if floor:
            total = floor["matmul_seconds"] + floor["attention_seconds"]
            row["eager_over_floor"] = timing.seconds("eager") / total if total else None
            row["compiled_over_floor"] = timing.seconds("compiled") / total if total else None
        rows.append(row)
        summary[f"{family}_compile_speedup_batch{batch}"] = row["compile_speedup"]
    small, large = size["batches"]
    summary["compile_speedup_batch1"] = summary[f"raster_compile_speedup_batch{small}"]
    summary[f"compile_speedup_batch{large}"] = summary[f"raster_compile_speedup_batch{large}"]
    summary["same_tokens"] = all(row["same_tokens"] for row in rows)
    summary["meets_compile_speedup_batch1"] = summary["compile_speedup_batch1"] >= BAR_COMPILE_SPEEDUP_BATCH1
    config = {**size, "batches": list(size["batches"]), "sampler": sampler.to_dict(), "weights": "random",
              "compile": "Generator.compile_decoding(): torch.compile of the step (mode default on CPU)",
              "floor": "torch.profiler self time of " + ", ".join(MATMUL_OPS) + " and the SDPA kernels, one eager call",
              "skipped": {
                  "nar_vs_raster_compiled": "NAR's per-pass forward has no compiled path yet",
                  "speculative_eagle_compiled": "needs the trained digits models (benchmarks.digits_models)",
              }}
    return {"config": config, "summary": summary, "rows": rows}
