"""Shared building blocks: attention backends and masks, KV cache, rotary and timestep embeddings, transformer
blocks."""
from .attention import (
    BACKENDS,
    Mask,
    attention,
    block_causal_mask,
    causal_mask,
    dense_to_mask,
    resolve_backend,
    set_flex_compile,
    xformers_available,
)
from .blocks import Block, GeluMLP, SelfAttention, SwiGLU, Transformer, make_norm
from .embeddings import timestep_embedding
from .kv_cache import KVCache
from .rope import RotaryEmbedding, apply_rotary, grid_positions

__all__ = [
    "BACKENDS", "Mask", "attention", "block_causal_mask", "causal_mask", "dense_to_mask", "resolve_backend",
    "set_flex_compile", "xformers_available", "Block", "GeluMLP", "SelfAttention", "SwiGLU", "Transformer",
    "make_norm", "timestep_embedding", "KVCache", "RotaryEmbedding", "apply_rotary", "grid_positions",
]
