"""Static key/value cache for incremental decoding, with a length per row (gpt-fast / LlamaGen style).

Keys and values of every layer live in one fixed tensor each, (layers, B, H, max_length, D), and ``lengths`` (B,)
holds how many positions each row has committed. A forward pass over n new tokens writes them in place at
[lengths[b], lengths[b] + n) of row b in every layer (:meth:`KVCache.update`, a scatter, no reallocation and no
``[:end]`` slice), and attention reads the whole buffer under :meth:`KVCache.attention_mask`: key j is visible to
query i of row b when j < lengths[b] + n and the model's mask allows (lengths[b] + i, j). Shapes therefore never
depend on how far decoding has gone, which is what CUDA graphs and ``torch.compile`` need.

Rows may hold different lengths: :meth:`advance` takes a count per row and :meth:`truncate` a length per row, so
speculative decoding commits each row's own accepted tokens. Positions written past a row's committed length (a
padded feed, rejected drafts) are invisible until overwritten. :attr:`length` is the common length of the rows and
is refused while they differ (read :attr:`lengths` and :meth:`positions` then).

Differences from the previous slicing cache: attention runs over all ``max_length`` keys with masked-out ones
contributing exact zeros, so one decoding step costs attention over the buffer, not the prefix (gpt-fast pays the
same); the logits agree with the sliced computation to float rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys/values for `num_layers` attention layers, batch `batch_size`, up to `max_length` positions per row."""

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
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.keys.device)
        self._common: int | None = 0  # the rows' common length when known without reading the device
        self._bound = 0  # an upper bound of lengths.max(), kept on the host
        self._masks: dict = {}  # attention masks of the current lengths, shared by the layers of one forward

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def length(self) -> int:
        """The length every row holds; a ValueError while the rows hold different lengths."""
        if self._common is None:
            first = self.lengths[:1]
            if self.lengths.numel() and not bool((self.lengths == first).all()):
                raise ValueError(f"the rows of this KV cache hold different lengths {self.lengths.tolist()}: read "
                                 "kv_cache.lengths (and kv_cache.positions(n) for the new tokens' positions)")
            self._common = int(first[0]) if self.lengths.numel() else 0
        return self._common

    @property
    def ragged(self) -> bool:
        """Whether the rows hold different lengths."""
        if self._common is not None:
            return False
        try:
            self.length
        except ValueError:
            return True
        return False

    @property
    def empty(self) -> bool:
        """Whether no row holds any position."""
        return self._bound == 0 or not bool(self.lengths.any())

    def positions(self, num_tokens: int) -> Tensor:
        """(B, num_tokens) absolute positions of `num_tokens` new tokens of every row: lengths[b] + [0, n)."""
        return self.lengths[:, None] + torch.arange(num_tokens, device=self.lengths.device)

    def step_positions(self, num_tokens: int, limit: int | None = None, prefix: bool = True) -> Tensor | None:
        """The (B, n) positions of `num_tokens` new tokens when a forward pass must address rows one by one: inside a
        compiled step (which reads only device state, never the host-side length) or while rows hold different
        lengths; None while every row holds :attr:`length`, so the caller may use that int. Eagerly, positions at or
        past `limit` are refused, and with `prefix` so is a row that holds nothing yet (it needs its prefill)."""
        if torch.compiler.is_compiling():
            return self.positions(num_tokens)
        if not self.ragged:
            return None
        positions = self.positions(num_tokens)
        if prefix and int(positions[:, 0].min()) == 0:
            raise ValueError("a KV cache with rows of different lengths must hold a prefix (the prefill) in every row")
        if limit is not None and int(positions[:, -1].max()) >= limit:
            raise ValueError(f"input reaches position {int(positions[:, -1].max()) + 1}, past the {limit} positions "
                             "this model holds")
        return positions

    def _changed(self) -> None:
        self._masks.clear()

    def attention_mask(self, mask, num_tokens: int) -> Tensor:
        """(B, 1, n, max_length) bool, True = attend, for `num_tokens` new queries of every row: the written prefix
        and the new tokens (j < lengths[b] + n), intersected with `mask` (a :class:`flexar.nn.Mask` on absolute
        positions, or None for no further restriction). Built once per forward and shared by its layers."""
        compiling = torch.compiler.is_compiling()
        if not compiling:
            key = (id(mask), num_tokens)
            cached = self._masks.get(key)
            if cached is not None and cached[0] is mask:
                return cached[1]
        if num_tokens < 1:
            raise ValueError(f"attention over a KV cache needs at least one new token, got {num_tokens}")
        q = self.positions(num_tokens)[:, :, None]
        kv = torch.arange(self.max_length, device=q.device)[None, None, :]
        allowed = kv < q[:, -1:] + 1
        if mask is not None:
            if isinstance(mask, Tensor):
                raise TypeError("with a KV cache the attention mask must be a flexar Mask (a predicate on absolute "
                                "positions) or None, not a tensor")
            allowed = allowed & mask.predicate(q, kv)
        allowed = allowed[:, None]
        if not compiling:
            self._masks[key] = (mask, allowed)
        return allowed

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, H, n, D) new keys/values of `layer` at each row's positions [lengths[b], lengths[b] + n); return
        the layer's whole (B, H, max_length, D) buffers (read them under :meth:`attention_mask`)."""
        count = keys.shape[-2]
        # a compiled step reads no host-side state (its guards would recompile every step); eager calls check bounds
        if not torch.compiler.is_compiling() and self._bound + count > self.max_length:
            end = int(self.lengths.max()) + count
            if end > self.max_length:
                raise ValueError(f"KV cache holds {self.max_length} positions; writing up to position {end}")
        index = self.positions(count)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        self.keys[layer].scatter_(2, index, keys.to(self.keys.dtype))
        self.values[layer].scatter_(2, index, values.to(self.values.dtype))
        return self.keys[layer], self.values[layer]

    def advance(self, num_tokens: int | Tensor) -> None:
        """Commit `num_tokens` positions in every row (an int), or a count per row ((B,) long), once every layer has
        written them."""
        if isinstance(num_tokens, Tensor):
            counts = num_tokens.to(self.lengths.device, torch.long)
            if counts.shape != self.lengths.shape:
                raise ValueError(f"advance takes one count per row ({self.batch_size}), got shape {tuple(counts.shape)}")
            self.lengths += counts
            self._common = None
            self._bound += int(counts.max()) if counts.numel() else 0
        elif torch.compiler.is_compiling():
            # inside a compiled step: only the device state moves; the host-side summaries are recomputed on demand
            # and the masks of the old lengths are dropped (attributes written, never read: no guard, no recompile)
            self.lengths += num_tokens
            self._common, self._bound, self._masks = None, self.max_length, {}
            return
        else:
            self.lengths += num_tokens
            if self._common is not None:
                self._common += num_tokens
            self._bound += num_tokens
        self._changed()

    def truncate(self, length: int | Tensor) -> None:
        """Keep the first `length` positions of every row (an int), or of each row ((B,) long): speculative decoding
        rolls rejected drafts back this way. A length above a row's current one is refused."""
        if isinstance(length, Tensor):
            target = length.to(self.lengths.device, torch.long)
            if target.shape != self.lengths.shape:
                raise ValueError(f"truncate takes one length per row ({self.batch_size}), got shape {tuple(target.shape)}")
            if bool(((target < 0) | (target > self.lengths)).any()):
                raise ValueError(f"cannot truncate rows of lengths {self.lengths.tolist()} to {target.tolist()}")
            self.lengths.copy_(target)
            self._common = None
        else:
            current = self._common
            if current is None:
                if length < 0 or bool((self.lengths < length).any()):
                    raise ValueError(f"cannot truncate rows of lengths {self.lengths.tolist()} to {length}")
            elif not 0 <= length <= current:
                raise ValueError(f"cannot truncate a cache of length {current} to {length}")
            self.lengths.fill_(length)
            self._common = length
        self._changed()

    def select(self, batch_index: Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the trajectories that survive a termination policy."""
        self.keys = self.keys.index_select(1, batch_index)
        self.values = self.values.index_select(1, batch_index)
        self.lengths = self.lengths.index_select(0, batch_index.to(self.lengths.device))
        if self._common is None and self.lengths.numel() and bool((self.lengths == self.lengths[0]).all()):
            self._common = int(self.lengths[0])
        self._changed()

    def reset(self) -> None:
        self.lengths.zero_()
        self._common, self._bound = 0, 0
        self._changed()
