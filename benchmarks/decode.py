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

- ``nar_vs_raster``: NAR (h + w - 1 passes) against raster (h * w steps) on a 16 x 16 grid, both of the full
  target's width and depth and both compiled (NAR: one graph for every padded diagonal pass), batch 1 and 64;
  summary ``nar_over_raster_compiled_batch{1,64}`` = raster seconds / NAR seconds (random weights: the pass count and
  widths are fixed, so speed does not depend on training); each family's eager time and floor are on its row too;
- ``speculative``: the trained digits target with its EAGLE head (:mod:`benchmarks.digits_models`, trained or loaded
  from ``FLEXAR_BENCH_DIGITS``), both compiled, exact speculative decoding (4 drafts, temperature 1, CFG 2) against
  plain compiled decoding of the same target at batch 1 and 8; summary ``speculative_compiled_speedup_batch{1,8}``
  (plain seconds / speculative seconds) and the target passes per image of each.

Quick: tiny models, batch 1 and 4, a few rounds, compiled with dynamo's ``eager`` backend (graph capture and guards
without kernel compilation; a smoke test: the ratios mean nothing).
"""
from __future__ import annotations

import torch

from .common import compare, progress

SIZES = {
    "full": dict(dim=192, depth=6, num_heads=6, tokens=16, vocab_size=128, batches=(1, 64), rounds=7,
                 shuffle_grid=8, nar_grid=16, nar_rounds=3, speculative_batches=(1, 8), speculative_images=8,
                 draft_length=4, backend="inductor"),
    "quick": dict(dim=32, depth=1, num_heads=2, tokens=8, vocab_size=16, batches=(1, 4), rounds=3, shuffle_grid=4,
                  nar_grid=4, nar_rounds=2, speculative_batches=(1, 2), speculative_images=2, draft_length=2,
                  backend="eager"),
}
BAR_COMPILE_SPEEDUP_BATCH1 = 2.0
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def build(family: str, size: dict, device: str):
    from flexar.generators import NAR, RasterAR, TokenShuffleAR

    torch.manual_seed(0)
    sizes = dict(vocab_size=size["vocab_size"], num_classes=10, dim=size["dim"], depth=size["depth"],
                 num_heads=size["num_heads"])
    side = size["nar_grid"]
    if family == "raster":
        model = RasterAR(max_tokens=size["tokens"], **sizes)
    elif family == "raster_grid":
        model = RasterAR(max_tokens=side * side, grid=(side, side), **sizes)
    elif family == "nar":
        model = NAR(max_tokens=side * side, grid=[side, side], **sizes)
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
        compiled_model.compile_decoding(backend=size["backend"])
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
    nar_rows = nar_against_raster(size, sampler, device)
    rows += nar_rows
    for batch in size["batches"]:
        nar, raster = (next(row for row in nar_rows if row["family"] == family and row["batch"] == batch)
                       for family in ("nar", "raster_grid"))
        summary[f"nar_over_raster_compiled_batch{batch}"] = raster["compiled_seconds"] / nar["compiled_seconds"]
    speculative_rows = speculative_compiled(size, quick, device)
    rows += speculative_rows
    for row in speculative_rows:
        summary[f"speculative_compiled_speedup_batch{row['batch']}"] = row["speedup_vs_plain_compiled"]
    summary["same_tokens"] = all(row["same_tokens"] for row in rows if "same_tokens" in row)
    summary["meets_compile_speedup_batch1"] = summary["compile_speedup_batch1"] >= BAR_COMPILE_SPEEDUP_BATCH1
    config = {**size, "batches": list(size["batches"]), "speculative_batches": list(size["speculative_batches"]),
              "sampler": sampler.to_dict(), "weights": "random (speculative: the trained digits models)",
              "compile": "Generator.compile_decoding(): torch.compile of the step (mode default on CPU)",
              "floor": "torch.profiler self time of " + ", ".join(MATMUL_OPS) + " and the SDPA kernels, one eager call"}
    return {"config": config, "summary": summary, "rows": rows}


def with_floor(row: dict, function, eager_seconds: float, compiled_seconds: float, device: str) -> dict:
    """`row` with the matrix-product floor of one eager call of `function` and the distances to it (CPU only)."""
    if device != "cpu":
        return row
    floor = floor_seconds(function)
    total = floor["matmul_seconds"] + floor["attention_seconds"]
    return {**row, **floor, "eager_over_floor": eager_seconds / total if total else None,
            "compiled_over_floor": compiled_seconds / total if total else None}


def nar_against_raster(size: dict, sampler, device: str) -> list[dict]:
    """NAR and raster on the same grid, each eager and compiled, at every batch of `size`."""
    rows = []
    cases = [(family, batch) for batch in size["batches"] for family in ("nar", "raster_grid")]
    for family, batch in progress(cases, "decode: NAR against raster", unit="case"):
        eager_model, compiled_model = build(family, size, device), build(family, size, device)
        compiled_model.compile_decoding(backend=size["backend"])
        labels = torch.arange(batch, device=device) % 10

        def generate(model):
            return lambda: model.generate(labels, sampler, torch.Generator(device).manual_seed(0))

        same = torch.equal(generate(eager_model)().ids, generate(compiled_model)().ids)
        timing = compare({"eager": generate(eager_model), "compiled": generate(compiled_model)}, device, warmup=1,
                         repeats=size["nar_rounds"], description=f"decode: {family} batch {batch}")
        eager, compiled = timing.seconds("eager"), timing.seconds("compiled")
        tokens = batch * eager_model.max_tokens
        row = {"family": family, "batch": batch, "tokens": tokens, "grid": [size["nar_grid"]] * 2,
               "forward_passes": generate(eager_model)().stats["forward_passes"],
               "eager_seconds": eager, "compiled_seconds": compiled,
               "eager_tokens_per_second": tokens / eager, "compiled_tokens_per_second": tokens / compiled,
               "compile_speedup": timing.speedup("compiled", "eager"), "same_tokens": same,
               "parameters": sum(p.numel() for p in eager_model.parameters())}
        rows.append(with_floor(row, generate(eager_model), eager, compiled, device))
    return rows


def speculative_compiled(size: dict, quick: bool, device: str) -> list[dict]:
    """Exact speculative decoding with the EAGLE head against plain decoding, target and head compiled."""
    from flexar.sampling import Sampler, SpeculativeDecoder

    from .digits_models import load_or_train

    models = load_or_train(quick, device)
    target, head = models.target.eval(), models.eagle.eval()
    target.compile_decoding(backend=size["backend"])
    head.compile_decoding(backend=size["backend"])
    sampler = Sampler(temperature=1.0, cfg_scale=2.0)
    speculative = SpeculativeDecoder(head, sampler, size["draft_length"])
    rows = []
    for batch in progress(size["speculative_batches"], "decode: speculative compiled", unit="batch"):
        labels = torch.arange(size["speculative_images"], device=device) % 10
        passes = {}

        def generate(name, strategy):
            def call():
                total = 0
                for start in range(0, labels.shape[0], batch):
                    chunk = labels[start : start + batch]
                    seed = torch.Generator(device).manual_seed(start)
                    out = target.generate(chunk, strategy, seed) if strategy is sampler else \
                        target.generate_with(chunk, strategy, seed)
                    total += out.stats["forward_passes"]
                passes[name] = total
            return call

        timing = compare({"plain": generate("plain", sampler), "speculative": generate("speculative", speculative)},
                         device, warmup=1, repeats=size["rounds"], description=f"decode: speculative batch {batch}")
        images = labels.shape[0]
        rows.append({"family": "speculative_eagle", "batch": batch, "images": images,
                     "draft_length": size["draft_length"], "tokens_per_image": target.max_tokens,
                     "plain_compiled_seconds_per_image": timing.seconds("plain") / images,
                     "speculative_compiled_seconds_per_image": timing.seconds("speculative") / images,
                     "speedup_vs_plain_compiled": timing.speedup("speculative", "plain"),
                     "plain_target_passes_per_batch": passes["plain"] / -(-images // batch),
                     "speculative_target_passes_per_batch": passes["speculative"] / -(-images // batch),
                     "models": str(models.folder)})
    return rows
