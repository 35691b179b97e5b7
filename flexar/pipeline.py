"""`flexar.Pipeline`: a tokenizer and a generator that models its ids, saved and loaded together.

    pipe = Pipeline.from_pretrained("runs/demo/pipeline")
    images = pipe.generate([0, 1, 2], sampler=Sampler(top_k=50, cfg_scale=2.0), seed=0)  # uint8 (3, 3, H, W)

Layout: folder/tokenizer/{config.json, model.safetensors}, folder/generator/{...}, folder/pipeline.json.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .hub import load_model

# per-batch counts of decoding strategies that add up over the batches of one call
SUMMED_STATS = ("draft_forward_passes", "rounds", "drafted", "accepted", "tokens_consumed")


class Pipeline:
    def __init__(self, tokenizer, generator):
        self.tokenizer = tokenizer.eval()
        self.generator = generator.eval()
        self.check_compatible()

    def check_compatible(self) -> None:
        """Refuse a generator that was trained on another tokenizer's vocabulary or token layout."""
        tokenizer, generator = self.tokenizer, self.generator
        problems = []
        if generator.vocab_size != tokenizer.codebook_size:
            problems.append(f"generator vocab_size {generator.vocab_size} != tokenizer codebook_size {tokenizer.codebook_size}")
        if generator.max_tokens != tokenizer.max_tokens:
            problems.append(f"generator max_tokens {generator.max_tokens} != tokenizer max_tokens {tokenizer.max_tokens}")
        generator_grid = None if generator.grid is None else list(generator.grid)
        tokenizer_grid = None if tokenizer.grid is None else list(tokenizer.grid)
        if generator_grid != tokenizer_grid:
            problems.append(f"generator grid {generator_grid} != tokenizer grid {tokenizer_grid}")
        if problems:
            raise ValueError("tokenizer and generator do not match: " + "; ".join(problems))

    # -- persistence ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.generator.save_pretrained(folder / "generator")
        (folder / "pipeline.json").write_text(json.dumps({"tokenizer": "tokenizer", "generator": "generator"}, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "Pipeline":
        from .generators import Generator
        from .tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / "pipeline.json").is_file():
            raise FileNotFoundError(f"{folder} has no pipeline.json: not a folder written by Pipeline.save_pretrained")
        layout = json.loads((folder / "pipeline.json").read_text())
        tokenizer = load_model(folder / layout["tokenizer"], kind=Tokenizer).to(device)
        generator = load_model(folder / layout["generator"], kind=Generator).to(device)
        return cls(tokenizer, generator)

    def to(self, device) -> "Pipeline":
        self.tokenizer.to(device)
        self.generator.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes

    # -- generation ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        labels,
        num_tokens: int | None = None,
        sampler=None,
        seed: int = 0,
        batch_size: int = 64,
        return_stats: bool = False,
        progress: bool | None = None,
        use_cache: bool = True,
    ):
        """Sample images for `labels` (sequence of ints or a (B,) tensor).

        Returns uint8 images (B, 3, H, W) (grayscale tokenizers are repeated to 3 channels), and with
        `return_stats=True` also a dict with forward passes, tokens and seconds summed over batches, and the
        strategy's counts in ``SUMMED_STATS`` (draft passes, rounds, drafted and accepted tokens, tokens consumed)
        where it reports them.
        The same seed gives the same images: one torch.Generator drives every draw, batch after batch.
        """
        from .sampling import Sampler
        from .train.callbacks import to_uint8

        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        self.generator.check_labels(labels)
        if num_tokens is not None:
            num_tokens = self.tokenizer.check_num_tokens(num_tokens)
        sampler = sampler if sampler is not None else Sampler()
        if hasattr(sampler, "prepare"):  # decoding strategies read what they need (token geometry, a draft model)
            sampler.prepare(self)
        rng = torch.Generator(device=self.device).manual_seed(seed)
        chunks = labels.split(batch_size)
        show = progress if progress is not None else len(chunks) > 1
        stats = {"forward_passes": 0, "tokens": 0, "seconds": 0.0, "decode_seconds": 0.0}
        images = []
        for chunk in tqdm(chunks, desc="generate", disable=not show):
            out = self.generator.generate_with(chunk, sampler, generator=rng, num_tokens=num_tokens, use_cache=use_cache)
            for key in ("forward_passes", "tokens", "seconds"):
                stats[key] += out.stats[key]
            for key in SUMMED_STATS:  # counts a decoding strategy reports, where it reports them
                if key in out.stats:
                    stats[key] = stats.get(key, 0) + out.stats[key]
            start = time.perf_counter()
            decoded = self.tokenizer.decode(out.ids)
            stats["decode_seconds"] += time.perf_counter() - start
            if decoded.shape[1] == 1:
                decoded = decoded.repeat(1, 3, 1, 1)
            images.append(to_uint8(decoded).cpu())
        images = torch.cat(images)
        return (images, stats) if return_stats else images
