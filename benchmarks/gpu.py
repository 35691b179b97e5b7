"""GPU evidence in one run: decoding, attention kernels, training throughput and speculative decoding at GPT-B size.

Every model has random weights: the speed of plain decoding, of attention and of a training step does not depend on
them. Speculative decoding's tokens per pass does; its rows record the cost of a round (draft + verification) of a
random target and head, and their ``tokens_per_target_pass`` is that of random weights, not of trained ones.

- ``decode``: :class:`flexar.generators.RasterAR` at LlamaGen GPT-B size (``raster-b``: 768 wide, 12 blocks,
  12 heads; 16384 codes) on a 16 x 16 grid (256 tokens), CFG 2 and top-k 1000, batch 1 and 64: eager against
  ``compile_decoding()`` (CUDA graphs through ``mode="reduce-overhead"`` on CUDA), tokens/s. Summary
  ``compile_speedup_batch{1,64}``;
- ``nar``: NAR (``nar-b``, h + w - 1 passes) against the same raster model, both compiled, images/s at 16 x 16 and
  24 x 24 at batch 64. Summary ``nar_over_raster_{16,24}`` (paper, Table 3: 13.8x over LlamaGen at 24 x 24, in
  their own serving setup);
- ``attention``: :mod:`benchmarks.attention`'s run on the same device (SDPA, FlexAttention eager and compiled,
  xformers on CUDA, each against ``math``; L = 1024 and 4096 in bf16 on CUDA);
- ``train``: bf16 autocast training steps (AdamW) of the GPT-B raster model at 256 tokens, tokens/s and MFU:
  6 N + 12 depth * dim * T floating-point operations per token (N the non-embedding parameters; the attention term
  as in PaLM's appendix B) against the device's dense bf16 peak (``PEAK_BF16``; None for another device);
- ``speculative``: exact speculative decoding and LANTERN (k = 100, delta = 0.1) with an EAGLE head over the GPT-B
  target, both compiled, against plain compiled decoding at batch 1: seconds per image and target passes.

A full run is sized for one H100 / H200 in under 8 minutes, compilation included. ``--quick`` runs the same code on
the CPU with tiny models (tested in CI), compiling with dynamo's ``eager`` backend: the graphs, guards and
recompilations of a full run without the kernel compilation; its numbers mean nothing.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .common import compare, device_name, progress, synchronize

SIZES = {
    "full": dict(preset="raster-b", nar_preset="nar-b", vocab_size=16384, side=16, nar_sides=(16, 24),
                 batches=(1, 64), nar_batch=64, rounds=3, train_batch=32, train_steps=10, warmup_steps=3,
                 draft_length=4, lantern_k=100, lantern_delta=0.1, speculative_images=4, top_k=1000,
                 backend="inductor"),
    "quick": dict(preset=None, nar_preset=None, tiny=dict(dim=32, depth=1, num_heads=2), vocab_size=32, side=4,
                  nar_sides=(4, 6), batches=(1, 4), nar_batch=4, rounds=2, train_batch=4, train_steps=2,
                  warmup_steps=1, draft_length=2, lantern_k=4, lantern_delta=0.1, speculative_images=2, top_k=8,
                  backend="eager"),
}
# dense bf16 peak FLOP/s (without sparsity) by a substring of the device name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def model_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def build(family: str, size: dict, side: int, device: str):
    """A random-weight raster or NAR generator on a side x side grid, on `device` in its decoding dtype."""
    from flexar.generators import NAR, RasterAR

    torch.manual_seed(0)
    cls = RasterAR if family == "raster" else NAR
    grid = dict(vocab_size=size["vocab_size"], max_tokens=side * side, num_classes=1000 if size["preset"] else 10)
    preset = size["preset"] if family == "raster" else size["nar_preset"]
    if family == "raster":
        grid["grid"] = (side, side)
    else:
        grid["grid"] = [side, side]
    model = cls.from_preset(preset, **grid) if preset else cls(**grid, **size["tiny"])
    return model.to(device=device, dtype=model_dtype(device)).eval()


def timed_generation(model, labels, sampler, device: str):
    return lambda: model.generate(labels, sampler, torch.Generator(device).manual_seed(0))


def decode_rows(size: dict, sampler, device: str) -> tuple[list[dict], dict]:
    """Eager against compiled decoding of the raster model at every batch; returns the rows and the compiled model."""
    eager, compiled = build("raster", size, size["side"], device), build("raster", size, size["side"], device)
    compiled.compile_decoding(backend=size["backend"])
    rows = []
    for batch in progress(size["batches"], "gpu: raster eager vs compiled", unit="batch"):
        labels = torch.arange(batch, device=device) % eager.num_classes
        start = time.perf_counter()
        timed_generation(compiled, labels, sampler, device)()  # compiles (and records the CUDA graphs)
        synchronize(device)
        first = time.perf_counter() - start
        timing = compare({"eager": timed_generation(eager, labels, sampler, device),
                          "compiled": timed_generation(compiled, labels, sampler, device)}, device, warmup=1,
                         repeats=size["rounds"], description=f"gpu: raster batch {batch}")
        tokens = batch * eager.max_tokens
        rows.append({"case": "decode", "family": "raster", "batch": batch, "tokens": tokens,
                     "eager_tokens_per_second": tokens / timing.seconds("eager"),
                     "compiled_tokens_per_second": tokens / timing.seconds("compiled"),
                     "compile_speedup": timing.speedup("compiled", "eager"), "first_compiled_call_seconds": first,
                     "parameters": sum(p.numel() for p in eager.parameters())})
    return rows, compiled


def nar_rows(size: dict, sampler, device: str, raster16) -> list[dict]:
    """NAR against raster, both compiled, images/s at every grid side of `size` (batch ``nar_batch``)."""
    rows = []
    batch = size["nar_batch"]
    for side in progress(size["nar_sides"], "gpu: NAR vs raster", unit="grid"):
        raster = raster16 if side == size["side"] else \
            build("raster", size, side, device).compile_decoding(backend=size["backend"])
        nar = build("nar", size, side, device).compile_decoding(backend=size["backend"])
        labels = torch.arange(batch, device=device) % nar.num_classes
        calls = {"raster": timed_generation(raster, labels, sampler, device),
                 "nar": timed_generation(nar, labels, sampler, device)}
        for call in calls.values():
            call()  # compiles
        timing = compare(calls, device, warmup=1, repeats=size["rounds"], description=f"gpu: NAR vs raster {side}")
        for family in ("raster", "nar"):
            rows.append({"case": "nar", "family": family, "grid": [side, side], "batch": batch,
                         "images_per_second": batch / timing.seconds(family),
                         "forward_passes": side * side if family == "raster" else 2 * side - 1,
                         "nar_over_raster": timing.speedup("nar", "raster")})
    return rows


def train_row(size: dict, device: str) -> dict:
    """bf16 autocast AdamW steps of the raster model at its grid, tokens/s and MFU."""
    model = build("raster", size, size["side"], device).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    tokens = size["side"] ** 2
    ids = torch.randint(0, size["vocab_size"], (size["train_batch"], tokens), device=device)
    labels = torch.arange(size["train_batch"], device=device) % model.num_classes
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss, _ = model.training_loss(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(size["warmup_steps"]):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in progress(range(size["train_steps"]), "gpu: bf16 training", unit="step"):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / size["train_steps"]
    embedding = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Embedding))
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    flops_per_token = 6 * non_embedding + 12 * len(model.transformer.blocks) * model.dim * tokens
    tokens_per_second = size["train_batch"] * tokens / seconds
    peak = peak_flops(device_name(device)) if device == "cuda" else None
    return {"case": "train", "family": "raster", "batch": size["train_batch"], "tokens": tokens,
            "seconds_per_step": seconds, "tokens_per_second": tokens_per_second,
            "flops_per_token": flops_per_token, "achieved_flops": flops_per_token * tokens_per_second,
            "peak_bf16_flops": peak, "mfu": flops_per_token * tokens_per_second / peak if peak else None,
            "autocast": "bf16" if device == "cuda" else "off (CPU)"}


def speculative_rows(size: dict, sampler, device: str, target) -> list[dict]:
    """Exact speculative decoding and LANTERN with a random EAGLE head over `target` (compiled), at batch 1."""
    from flexar.generators import EagleDraftHead
    from flexar.sampling import LanternDecoder, SpeculativeDecoder, neighbour_table

    with tempfile.TemporaryDirectory(prefix="flexar_gpu_") as folder:
        target.save_pretrained(Path(folder) / "target")
        torch.manual_seed(0)
        head = EagleDraftHead(target=str(Path(folder) / "target"), num_heads=target.transformer.num_heads)
    head = head.to(device=device, dtype=model_dtype(device)).eval().compile_decoding(backend=size["backend"])
    codes = torch.randn(size["vocab_size"], 8, generator=torch.Generator().manual_seed(0))
    table = neighbour_table(codes, size["lantern_k"]).to(device)
    strategies = {"plain": sampler,
                  "speculative": SpeculativeDecoder(head, sampler, size["draft_length"]),
                  "lantern": LanternDecoder(head, sampler, size["draft_length"], neighbours=table, k=size["lantern_k"],
                                            delta=size["lantern_delta"])}
    images, passes = size["speculative_images"], {}

    def generate(name):
        def call():
            total = 0
            for index in range(images):
                label = torch.tensor([index % target.num_classes], device=device)
                seed = torch.Generator(device).manual_seed(index)
                strategy = strategies[name]
                out = target.generate(label, strategy, seed) if name == "plain" else \
                    target.generate_with(label, strategy, seed)
                total += out.stats["forward_passes"]
            passes[name] = total
        return call

    calls = {name: generate(name) for name in strategies}
    for call in calls.values():
        call()  # compiles
    timing = compare(calls, device, warmup=0, repeats=size["rounds"], description="gpu: speculative at batch 1")
    return [{"case": "speculative", "family": name, "batch": 1, "images": images,
             "seconds_per_image": timing.seconds(name) / images, "speedup_vs_plain": timing.speedup(name, "plain"),
             "target_passes_per_image": passes[name] / images,
             "tokens_per_target_pass": target.max_tokens * images / passes[name]} for name in strategies]


def run(quick: bool, device: str) -> dict:
    from flexar.sampling import Sampler

    from . import attention

    size = SIZES["quick" if quick else "full"]
    sampler = Sampler(temperature=1.0, top_k=size["top_k"], cfg_scale=2.0)
    rows, raster16 = decode_rows(size, sampler, device)
    rows += nar_rows(size, sampler, device, raster16)
    rows.append(train_row(size, device))
    rows += speculative_rows(size, Sampler(temperature=1.0, top_k=size["top_k"]), device, raster16)
    kernels = attention.run(quick, device)
    rows += [{"case": "attention", **row} for row in kernels["rows"]]

    small, large = size["batches"]
    decode = {row["batch"]: row for row in rows if row["case"] == "decode"}
    nar = {row["grid"][0]: row for row in rows if row["case"] == "nar" and row["family"] == "nar"}
    train = next(row for row in rows if row["case"] == "train")
    speculative = {row["family"]: row for row in rows if row["case"] == "speculative"}
    summary = {
        "device": device_name(device),
        f"compile_speedup_batch{small}": decode[small]["compile_speedup"],
        f"compile_speedup_batch{large}": decode[large]["compile_speedup"],
        f"compiled_tokens_per_second_batch{large}": decode[large]["compiled_tokens_per_second"],
        **{f"nar_over_raster_{side}": row["nar_over_raster"] for side, row in nar.items()},
        "train_tokens_per_second": train["tokens_per_second"],
        "train_mfu": train["mfu"],
        "speculative_speedup_vs_plain": speculative["speculative"]["speedup_vs_plain"],
        "lantern_speedup_vs_speculative": speculative["speculative"]["seconds_per_image"]
        / speculative["lantern"]["seconds_per_image"],
        "attention_speedup_vs_math": kernels["summary"]["speedup_vs_math"],
        "attention_all_match_math": kernels["summary"]["all_match_math"],
    }
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in size.items()}
    config.update(sampler=sampler.to_dict(), weights="random", dtype=str(model_dtype(device)).removeprefix("torch."),
                  attention=kernels["config"],
                  compile="compile_decoding(): mode reduce-overhead (CUDA graphs) on CUDA, default on CPU")
    return {"config": config, "summary": summary, "rows": rows}
