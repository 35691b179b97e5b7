"""KV-cache decoding against full recomputation, on a decoder-only :class:`flexar.nn.Transformer`.

A token embedding, a causal Transformer with 1D rotary embeddings and a linear head generate ``num_tokens`` tokens
greedily for a batch, from one random start token per sample; each new token costs one forward pass:

- ``cached``: prefill the start token into a preallocated :class:`flexar.nn.KVCache`, then ``num_tokens - 1``
  single-token steps, each attending to the cached keys and values;
- ``recompute``: no cache; step t runs the whole prefix of t + 1 tokens and keeps the last position.

Both apply the head to the last position only. They must pick the same tokens and their last-step logits must agree
to 1e-4. Tokens/s counts the tokens the batch generates (batch * num_tokens) over the whole loop; the two loops
alternate in the timed rounds, and the speed-up is the median over rounds of recompute time / cached time.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flexar.nn import RotaryEmbedding, Transformer, causal_mask

from .common import compare

SIZES = {
    "full": dict(dim=256, depth=6, heads=8, vocab_size=1024, batch=8, num_tokens=256),
    "quick": dict(dim=32, depth=2, heads=4, vocab_size=64, batch=2, num_tokens=32),
}
TOLERANCE = 1e-4
TARGET_SPEEDUP = 5.0


class DecoderLM(nn.Module):
    """Embedding -> causal Transformer with 1D RoPE -> head.

    forward(ids (B, L), start) -> logits (B, V) of the last position; `start` is the position of ids[:, 0].
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, max_length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.transformer = Transformer(dim, depth, heads)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = RotaryEmbedding(dim // heads)(torch.arange(max_length))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.mask = causal_mask()

    def forward(self, ids: Tensor, start: int = 0, kv_cache=None) -> Tensor:
        end = start + ids.shape[1]
        rope = (self.cos[start:end], self.sin[start:end])
        hidden = self.transformer(self.embed(ids), self.mask, rope, kv_cache=kv_cache)
        return self.head(hidden[:, -1])


@torch.inference_mode()
def generate_cached(model: DecoderLM, start_ids: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """start_ids (B, 1) -> generated ids (B, num_tokens) and the last step's logits (B, V)."""
    cache = model.transformer.new_cache(start_ids.shape[0], num_tokens)
    ids = torch.empty(start_ids.shape[0], num_tokens, dtype=torch.long, device=start_ids.device)
    token = start_ids
    for step in range(num_tokens):
        logits = model(token, start=step, kv_cache=cache)
        token = logits.argmax(dim=-1, keepdim=True)
        ids[:, step : step + 1] = token
    return ids, logits


@torch.inference_mode()
def generate_recompute(model: DecoderLM, start_ids: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`generate_cached`, running the full prefix at every step."""
    sequence = start_ids
    for _ in range(num_tokens):
        logits = model(sequence)
        sequence = torch.cat([sequence, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return sequence[:, 1:], logits


def run(quick: bool, device: str) -> dict:
    sizes = SIZES["quick" if quick else "full"]
    batch, num_tokens = sizes["batch"], sizes["num_tokens"]
    repeats = 2
    torch.manual_seed(0)
    model = DecoderLM(sizes["vocab_size"], sizes["dim"], sizes["depth"], sizes["heads"], num_tokens).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    start_ids = torch.randint(0, sizes["vocab_size"], (batch, 1), generator=generator).to(device)

    outputs = {}

    def timed(name, generate):
        def call():
            outputs[name] = generate(model, start_ids, num_tokens)

        return call

    # a recompute loop lasts minutes, so the timed runs double as the correctness check and only the cached loop,
    # whose steps are short enough for first-call costs to show, gets a warmup
    generate_cached(model, start_ids, num_tokens)
    comparison = compare(
        {"cached": timed("cached", generate_cached), "recompute": timed("recompute", generate_recompute)},
        device,
        warmup=0,
        repeats=repeats,
        description="kv_cache: cached vs recompute",
    )
    (cached_ids, cached_logits), (recompute_ids, recompute_logits) = outputs["cached"], outputs["recompute"]
    tokens_match = torch.equal(cached_ids, recompute_ids)
    max_abs_diff = (cached_logits - recompute_logits).abs().max().item()
    if not tokens_match or max_abs_diff > TOLERANCE:
        raise AssertionError(
            f"cached decoding differs from recompute: tokens match {tokens_match}, last-step max abs diff {max_abs_diff}"
        )
    generated = batch * num_tokens
    rows = [
        {
            "path": name,
            "seconds": comparison.seconds(name),
            "tokens_per_second": generated / comparison.seconds(name),
            "speedup_vs_recompute": comparison.speedup(name, "recompute"),
            "samples_seconds": comparison.timings[name].samples,
        }
        for name in ("cached", "recompute")
    ]
    speedup = comparison.speedup("cached", "recompute")
    return {
        "config": {
            **sizes,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "decoding": "greedy",
            "repeats": repeats,
            "tolerance": TOLERANCE,
        },
        "summary": {
            "cached_tokens_per_second": rows[0]["tokens_per_second"],
            "recompute_tokens_per_second": rows[1]["tokens_per_second"],
            "speedup": speedup,
            "target_speedup": TARGET_SPEEDUP,
            "meets_target": speedup >= TARGET_SPEEDUP,
            "tokens_match": tokens_match,
            "last_step_max_abs_diff": max_abs_diff,
        },
        "rows": rows,
    }
