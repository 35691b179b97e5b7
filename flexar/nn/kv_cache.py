"""Preallocated key/value cache for incremental decoding (gpt-fast / LlamaGen style).

Keys and values of every layer live in one tensor each, (layers, B, H, max_length, D), so decoding allocates nothing
per step. A forward pass over n new tokens writes them at [length, length + n) in every layer and then calls
:meth:`KVCache.advance` once; attention reads the prefix [0, length + n).
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys/values for `num_layers` attention layers, batch `batch_size`, up to `max_length` positions."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, H, n, D) new keys/values of `layer` after the cached prefix; return the (B, H, length + n, D) views."""
        end = self.length + keys.shape[-2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; writing up to position {end}")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Commit `num_tokens` positions once every layer has written them."""
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Drop cached positions >= length (speculative decoding rolls rejected drafts back this way)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def select(self, batch_index: Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the trajectories that survive a termination policy."""
        self.keys = self.keys.index_select(1, batch_index)
        self.values = self.values.index_select(1, batch_index)

    def reset(self) -> None:
        self.length = 0
