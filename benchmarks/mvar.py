"""MVAR against VAR: peak memory of a training step and of generation, and generation speed.

Both models have the same width, depth and heads (VAR-d16 / MVAR-d16: width 1024, 16 blocks, 16 heads; with
``FLEXAR_MVAR_SIZE=narrow``, for a CPU, 4 blocks of width 256) on the paper's 256 px layout: 10 scales 1, 2, 3, 4, 5,
6, 8, 10, 13, 16 (680 tokens), 4096 codes of 32 dims, 1000 classes, MVAR's 7 x 7 neighbourhoods on the 13 x 13 and
16 x 16 maps. Weights and the tokenizer's pyramid are random
(memory and speed do not depend on them); ids and labels are random.

Every measurement runs in a fresh Python process (``python -m benchmarks.mvar TASK``), so that no allocator cache,
compiled kernel or fragmentation from another measurement is counted:

- ``train``: AdamW steps at batch ``train_batch`` (on CUDA in bf16 autocast with fp32 weights, after one warm-up
  step that allocates the optimiser state). VAR: every step trains all 680 tokens under the block-causal mask.
  MVAR: two whole cycles of MVAR's schedule (8 steps over scales 0-7 jointly, 255 tokens, block-diagonal; then one
  step for each of the 13 x 13 and 16 x 16 maps alone with neighbourhood attention), so the peak is that of its most
  expensive step. ``train_memory_ratio`` = VAR's peak / MVAR's peak (weights, gradients and optimiser state
  included); ``train_activation_memory_ratio`` the same above what is allocated before the measured steps;
  ``train_saved_activation_ratio`` the ratio of the largest step's bytes saved for backward (every storage a
  ``saved_tensors_hooks`` pack sees, once, weights excluded): exact and the same on every device.
- ``generate``: ``generate`` at batch ``generate_batch`` with classifier-free guidance (the batch doubles) and VAR's
  FID sampler (cfg 1.5 = ``cfg_scale`` 2.5, top-k 900, top-p 0.96), weights in bf16: VAR through its KV cache, MVAR
  one map per pass without one. ``generate_memory_ratio`` = VAR's peak / MVAR's peak (weights included),
  ``generate_extra_memory_ratio`` above the weights, ``generate_speedup`` = VAR's median seconds / MVAR's.

Attention runs through flexar's ``auto`` backend: SDPA, with a dense boolean mask for the structured masks (compiled
FlexAttention is off), so MVAR's neighbourhoods save memory (smaller sequences) but no attention FLOPs here.

Memory is ``torch.cuda.max_memory_allocated`` on CUDA. On CPU it is the process's peak resident set size
(``ru_maxrss``), the baseline its size before the first step or generation (no warm-up: a warm-up would already
set the peak), which counts the optimiser state and allocator slack: a rough figure; the saved-activation ratio is
the CPU's exact one.

Sample quality (``fid``, in this process after the memory measurements): one :class:`flexar.tokenizers.MultiScaleVQ`
(the ``msvq-digits`` preset: 32 px MNIST at f4, scales 1, 2, 3, 4, 6, 8, 130 ids of 256 codes) trained for
``tokenizer_steps``; a VAR and an MVAR (its ``mvar-digits`` neighbourhoods: 3 x 3 on the 6 x 6 and 8 x 8 maps) of the
same width, depth and heads, each bound to that tokenizer's pyramid, trained with the same budget (steps, batch,
learning rate and schedule, seed) on the ids of ``train_images`` training images; MVAR's steps follow its cycle (8
joint steps over the four coarse scales, then one step on each refined map, per-token weight 1 / L throughout), so
it sees fewer targets per step, as in the paper. Each samples ``gfid_samples`` class-balanced images with the same
sampler (temperature 1, CFG ``cfg_scale`` ramped over the scales as VAR's), scored against the first
``gfid_samples`` test images with the features of a digit classifier trained for this run
(``configs/eval/classifier.yaml``); ``rfid`` is the tokenizer's reconstructions of those images, the floor of both
generators, and ``codebook_usage_per_scale`` the share of the 256 codes each scale uses over the reference images.
The verdict ``meets_mvar_fid_within_10_percent``: MVAR's FID <= 1.1 x VAR's. With ``FLEXAR_MVAR_MODELS=FOLDER`` the
classifier, the tokenizer and both generators are loaded from ``FOLDER/NAME`` when present, else trained and saved
there. Measured single-thread steps (64 images or id rows, width 64, 4 blocks: 0.33M parameters each): tokenizer
~1.5 s, VAR ~0.8 s, MVAR ~0.25 s (its cycle trains at most 64 of the 130 ids per step), so a first run of this part
takes ~55 min on one core. Quick: the embedded digits at 16 px with the tiny presets, a few
steps (a smoke test; its numbers mean nothing).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import REPO_ROOT, Models, fit, progress

LAYOUT = dict(scales=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16], vocab_size=4096, code_dim=32, num_classes=1000, kernel_size=7,
              refine_step=8, joint_steps=8)
SIZES = {
    # VAR-d16 / MVAR-d16, for a GPU
    "full": dict(LAYOUT, depth=16, dim=1024, num_heads=16, train_batch=16, generate_batch=16, repeats=3,
                 train_steps=2),
    # the same 256 px layout with 4 blocks of width 256, for a CPU (FLEXAR_MVAR_SIZE=narrow)
    "narrow": dict(LAYOUT, depth=4, dim=256, num_heads=4, train_batch=4, generate_batch=16, repeats=2,
                   train_steps=2),
    "quick": dict(depth=2, dim=64, num_heads=2, scales=[1, 2, 3, 4], vocab_size=32, code_dim=8, num_classes=10,
                  kernel_size=3, refine_step=3, joint_steps=2, train_batch=4, generate_batch=4, repeats=2,
                  train_steps=2),
}
# the sample-quality part: one tokenizer, VAR and MVAR trained on its ids with one budget
QUALITY = {
    "full": dict(generation_dataset="mnist", image_size=32, train_images=20000, classifier_epochs=1,
                 tokenizer="msvq-digits", tokenizer_steps=500, tokenizer_batch=64, lr=1e-3, warmup_steps=50,
                 var="var-digits", mvar="mvar-digits", dim=64, depth=4, num_heads=4, generator_steps=2000,
                 generator_batch=64, generator_lr=1e-3, cfg_scale=2.0, gfid_samples=1000),
    "quick": dict(generation_dataset="digits", image_size=16, train_images=128, classifier_epochs=1,
                  tokenizer="msvq-tiny", tokenizer_steps=4, tokenizer_batch=16, lr=3e-3, warmup_steps=2,
                  var="var-tiny", mvar="mvar-tiny", dim=32, depth=1, num_heads=2, generator_steps=6,
                  generator_batch=16, generator_lr=3e-3, cfg_scale=2.0, gfid_samples=40),
}
FID_MARGIN = 1.1  # MVAR's FID within 10 % of VAR's
PAPER_MEMORY_RATIO = 3.0
BAR_MEMORY_RATIO = 2.5
SAMPLER = dict(cfg_scale=2.5, top_k=900, top_p=0.96)


# ----------------------------------------------------------------------------------------------------------------------
# the worker: one measurement in this (fresh) process


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryMeter:
    """Peak memory of what runs between :meth:`start` and :meth:`peak`: CUDA allocator peaks, or CPU peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = _resident_bytes()
        return self.baseline

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(family: str, sizes: dict, device: torch.device):
    from flexar.generators import MVAR, VAR
    from flexar.tokenizers import MultiScaleResidualVQ

    torch.manual_seed(0)
    names = ("vocab_size", "code_dim", "scales", "num_classes", "depth", "dim", "num_heads")
    kwargs = {key: sizes[key] for key in names}
    if family == "mvar":
        model = MVAR(**kwargs, kernel_size=sizes["kernel_size"], refine_step=sizes["refine_step"],
                     joint_steps=sizes["joint_steps"])
    else:
        model = VAR(**kwargs)
    # a random pyramid: memory and speed do not depend on the tokenizer's weights
    model.load_quantizer(MultiScaleResidualVQ(sizes["vocab_size"], sizes["code_dim"], sizes["scales"]))
    return model.to(device)


def measure_train(family: str, sizes: dict, device: torch.device) -> dict:
    model = build(family, sizes, device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator(device).manual_seed(0)
    batch = sizes["train_batch"]
    ids = torch.randint(0, model.vocab_size, (batch, model.max_tokens), device=device, generator=generator)
    labels = torch.randint(0, model.num_classes, (batch,), device=device, generator=generator)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step() -> tuple[str, int]:
        """One step; returns its part of the schedule and the bytes its graph saved for backward (activations,
        weights excluded, each storage once)."""
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, logs = model.training_loss(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        part = f"{int(logs['first_scale'])}+{int(logs['trained_tokens'])}" if "first_scale" in logs else "all"
        return part, sum(saved.values())

    meter = MemoryMeter(device)
    if device.type == "cuda":
        step()  # allocates the optimiser state; on CPU the peak RSS would already hold it, so it is measured
    static = meter.start()
    if family == "mvar":
        # two whole cycles of MVAR's schedule
        count = 2 * (sizes["joint_steps"] + len(sizes["scales"]) - sizes["refine_step"])
    else:
        count = sizes["train_steps"]
    parts = {}
    for _ in range(count):
        part, saved = step()
        parts[part] = max(saved, parts.get(part, 0))
    return {"peak_bytes": meter.peak(), "static_bytes": static, "steps": count, "saved_bytes": max(parts.values()),
            "parts": {part: saved / 2**20 for part, saved in sorted(parts.items())},
            "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measure_generate(family: str, sizes: dict, device: torch.device) -> dict:
    from flexar.sampling import Sampler

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(family, sizes, device).to(dtype).eval()
    sampler = Sampler(**{**SAMPLER, "top_k": min(SAMPLER["top_k"], sizes["vocab_size"] - 1)})
    labels = torch.arange(sizes["generate_batch"], device=device) % sizes["num_classes"]
    rng = torch.Generator(device).manual_seed(0)
    meter = MemoryMeter(device)
    weights = meter.start()
    model.generate(labels, sampler, rng)  # untimed warm-up (kernels, allocator); on CPU the peak RSS is its own
    if device.type == "cuda":
        weights = meter.start()
    seconds, passes = [], 0
    for _ in range(sizes["repeats"]):
        out = model.generate(labels, sampler, rng)
        seconds.append(out.stats["seconds"])
        passes = out.stats["forward_passes"]
    return {"peak_bytes": meter.peak(), "static_bytes": weights, "seconds": statistics.median(seconds),
            "forward_passes": passes, "tokens": out.stats["tokens"]}


def worker(task: dict) -> dict:
    device = torch.device(task["device"])
    sizes = SIZES[task["size"]]
    measure = measure_train if task["mode"] == "train" else measure_generate
    return {**task, **measure(task["family"], sizes, device)}


# ----------------------------------------------------------------------------------------------------------------------
# the benchmark: one fresh process per measurement


def run_in_fresh_process(task: dict) -> dict:
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    result = subprocess.run([sys.executable, "-m", "benchmarks.mvar", json.dumps(task)], cwd=REPO_ROOT,
                            env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker {task} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


@torch.no_grad()
def sample_images(model, tokenizer, sampler, count: int, device: str) -> torch.Tensor:
    """`count` class-balanced decoded images in [-1, 1] (seeded, 250 per batch)."""
    stream = torch.Generator(device).manual_seed(0)
    images = []
    for chunk in (torch.arange(count) % 10).split(250):
        ids = model.generate(chunk.to(device), sampler, stream).ids
        images.append(tokenizer.decode(ids).clamp(-1, 1).float().cpu())
    return torch.cat(images)


def quality(quick: bool, device: str) -> dict:
    """VAR and MVAR trained with one budget on one multi-scale VQ: FID, rFID and per-scale codebook usage."""
    from flexar.eval import compute_metrics
    from flexar.generators import MVAR, VAR
    from flexar.sampling import Sampler
    from flexar.tokenizers import MultiScaleVQ

    from .adaptive import load_split, train_classifier

    size = QUALITY["quick" if quick else "full"]
    sampler = Sampler(temperature=1.0, cfg_scale=size["cfg_scale"])
    tag = f"{size['generation_dataset']}{size['image_size']}"
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        models = Models(os.environ.get("FLEXAR_MVAR_MODELS"), Path(scratch))
        extractor = f"classifier:{train_classifier(size, device, models, quick)}"
        train_images, train_labels = load_split(size["generation_dataset"], "train", size, 1, size["train_images"])
        reference, _ = load_split(size["generation_dataset"], "test", size, 1, size["gfid_samples"])

        def fid(images: torch.Tensor) -> float:
            return compute_metrics(images, reference, extractor=extractor, kid=False, device=device)["fid"]

        tokenizer_name = f"{size['tokenizer']}_{tag}"

        def train_tokenizer():
            torch.manual_seed(0)
            return fit(MultiScaleVQ.from_preset(size["tokenizer"]), train_images, size["tokenizer_steps"],
                       size["tokenizer_batch"], size["lr"], size["warmup_steps"], device, "mvar: train tokenizer",
                       checkpoint=models.checkpoint(tokenizer_name))[0]

        tokenizer = models.get(tokenizer_name, train_tokenizer).to(device).eval()
        with torch.no_grad():
            ids = torch.cat([tokenizer.encode(chunk.to(device)).ids.cpu() for chunk in train_images.split(500)])
            reference_ids = torch.cat([tokenizer.encode(chunk.to(device)).ids for chunk in reference.split(500)])
            reconstructions = torch.cat([tokenizer.decode(chunk).clamp(-1, 1).float().cpu()
                                         for chunk in reference_ids.split(500)])
        rfid = fid(reconstructions)
        usage = tokenizer.codebook_usage(reference_ids)
        widths = dict(dim=size["dim"], depth=size["depth"], num_heads=size["num_heads"])
        train = dict(steps=size["generator_steps"], batch_size=size["generator_batch"], lr=size["generator_lr"],
                     warmup=max(1, size["generator_steps"] // 20), device=device, labels=train_labels)
        rows = []
        for family, cls in progress([("var", VAR), ("mvar", MVAR)], "mvar: generators"):

            name = f"{size[family]}_{size['dim']}x{size['depth']}_{tag}"

            def train_generator(cls=cls, family=family, name=name):
                torch.manual_seed(0)
                model = cls.from_preset(size[family], **widths)
                model.load_tokenizer(tokenizer)
                return fit(model, ids, description=f"mvar: train {family}", checkpoint=models.checkpoint(name),
                           **train)[0]

            model = models.get(name, train_generator).to(device).eval()
            began = time.perf_counter()
            images = sample_images(model, tokenizer, sampler, size["gfid_samples"], device)
            rows.append({"mode": "fid", "family": family, "preset": size[family],
                         "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "fid": fid(images), "rfid": rfid, "sample_seconds": time.perf_counter() - began,
                         "train_seconds": models.seconds(name)})
    by = {row["family"]: row for row in rows}
    summary = {
        "fid": {"var": by["var"]["fid"], "mvar": by["mvar"]["fid"]},
        "fid_ratio_mvar_over_var": ratio(by["mvar"]["fid"], by["var"]["fid"]),
        "rfid": rfid,
        "codebook_usage_per_scale": dict(zip(map(str, tokenizer.scales), usage)),
        "meets_mvar_fid_within_10_percent": by["mvar"]["fid"] <= FID_MARGIN * by["var"]["fid"],
    }
    config = dict(size, scales=tokenizer.scales, sampler={"temperature": 1.0, "cfg_scale": size["cfg_scale"],
                                                           "cfg_schedule": "linear over the scales (VAR)"},
                  models_loaded=models.loaded,
                  fid_extractor="classifier trained with configs/eval/classifier.yaml on the same dataset")
    return {"config": config, "summary": summary, "rows": rows}


def run(quick: bool, device: str) -> dict:
    size = "quick" if quick else os.environ.get("FLEXAR_MVAR_SIZE", "full")
    if size not in SIZES:
        raise ValueError(f"FLEXAR_MVAR_SIZE must be one of {sorted(set(SIZES) - {'quick'})}, got {size!r}")
    sizes = SIZES[size]
    results = {}
    for mode in ("train", "generate"):
        for family in ("var", "mvar"):
            results[mode, family] = run_in_fresh_process(
                {"family": family, "mode": mode, "device": str(device), "size": size})
    rows = []
    for (mode, family), record in results.items():
        rows.append({
            "mode": mode, "family": family,
            "peak_mib": record["peak_bytes"] / 2**20,
            "static_mib": record["static_bytes"] / 2**20,
            "above_static_mib": (record["peak_bytes"] - record["static_bytes"]) / 2**20,
            **({"seconds": record["seconds"], "forward_passes": record["forward_passes"]} if mode == "generate" else
               {"saved_mib": record["saved_bytes"] / 2**20, "steps": record["steps"],
                "saved_mib_per_part": record["parts"]}),
        })
    train_var, train_mvar = results["train", "var"], results["train", "mvar"]
    generate_var, generate_mvar = results["generate", "var"], results["generate", "mvar"]

    def above(record):
        return record["peak_bytes"] - record["static_bytes"]

    summary = {
        "train_memory_ratio": ratio(train_var["peak_bytes"], train_mvar["peak_bytes"]),
        "train_activation_memory_ratio": ratio(above(train_var), above(train_mvar)),
        "train_saved_activation_ratio": ratio(train_var["saved_bytes"], train_mvar["saved_bytes"]),
        "generate_memory_ratio": ratio(generate_var["peak_bytes"], generate_mvar["peak_bytes"]),
        "generate_extra_memory_ratio": ratio(above(generate_var), above(generate_mvar)),
        "generate_speedup": ratio(generate_var["seconds"], generate_mvar["seconds"]),
        "forward_passes": {"var": generate_var["forward_passes"], "mvar": generate_mvar["forward_passes"]},
        "paper_memory_ratio": PAPER_MEMORY_RATIO,
        "bar_memory_ratio": BAR_MEMORY_RATIO,
    }
    memory = "torch.cuda.max_memory_allocated" if torch.device(device).type == "cuda" else "peak RSS (approximate)"
    config = {
        "size": size,
        **sizes,
        "tokens": sum(side * side for side in sizes["scales"]),
        "parameters": train_var["parameters"],
        "sampler": SAMPLER,
        "train_precision": "bf16 autocast, fp32 weights, AdamW" if memory.startswith("torch") else "fp32, AdamW",
        "generate_precision": "bf16 weights" if memory.startswith("torch") else "fp32",
        "attention_backend": "auto (SDPA, dense masks)",
        "memory": memory,
        "processes": "one fresh process per measurement",
    }
    sample_quality = quality(quick, device)
    config["fid"] = sample_quality["config"]
    summary.update(sample_quality["summary"])
    return {"config": config, "summary": summary, "rows": rows + sample_quality["rows"]}


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
