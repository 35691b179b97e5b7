"""Scaled dot-product attention with interchangeable backends and structured masks.

`attention(q, k, v, mask, backend)` computes softmax(q k^T * scale + mask) v with one of:

- ``math``: the reference, plain matmul + softmax in the input dtype (fp32 accumulation on CPU);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math kernels);
- ``flex``: ``torch.nn.attention.flex_attention`` with a block-sparse ``BlockMask`` built from the mask's predicate,
  unfused in eager mode, fused once :func:`set_flex_compile` turns compilation on (5-20 s per new shape; off by
  default);
- ``xformers``: ``xformers.ops.memory_efficient_attention`` for CUDA tensors; wherever its kernels do not load
  (CPU tensors, a build for another torch) the call falls back to ``sdpa`` without a warning.

``auto`` picks per call (:func:`auto_backend`): SDPA for no mask and causal masks; for structured masks,
FlexAttention on CUDA only once :func:`set_flex_compile` has turned compiled FlexAttention on, and otherwise SDPA with
a dense boolean mask. Eager FlexAttention runs each mask block unfused: it is slower than SDPA with a dense mask on
CPU and on CUDA alike (0.2-0.6x the ``math`` reference measured on NAR's proximity mask on CUDA), so ``auto`` never
picks it; call ``set_flex_compile(True)`` where long runs amortise the compilation.

A :class:`Mask` is a predicate ``allowed(q_idx, kv_idx)`` on absolute positions. The same object materialises as a
dense boolean matrix for ``math`` / ``sdpa`` and as a FlexAttention ``BlockMask``; ``q_offset`` shifts query positions
so that incremental decoding with a KV cache sees the rows of the full mask that belong to its new tokens.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "math", "sdpa", "flex", "xformers")

Predicate = Callable[[Tensor, Tensor], Tensor]


class Mask:
    """A boolean attention pattern: ``predicate(q_idx, kv_idx)`` is True where a query may attend to a key.

    The predicate must be written with broadcasting tensor ops (no Python branching on values) so that it serves
    both the dense path (called on index grids) and FlexAttention (called under vmap on scalars).
    """

    def __init__(self, predicate: Predicate, name: str = "custom"):
        self.predicate = predicate
        self.name = name
        self._block_masks: dict = {}

    def __repr__(self) -> str:
        return f"Mask({self.name})"

    def dense(self, q_len: int, kv_len: int, q_offset: int = 0, device=None) -> Tensor:
        """(q_len, kv_len) bool, True = attend."""
        q_idx = torch.arange(q_len, device=device).unsqueeze(1) + q_offset
        kv_idx = torch.arange(kv_len, device=device).unsqueeze(0)
        return self.predicate(q_idx, kv_idx).expand(q_len, kv_len)

    def block_mask(self, q_len: int, kv_len: int, q_offset: int = 0, device=None):
        """FlexAttention BlockMask for the same pattern, cached per shape, offset and device."""
        from torch.nn.attention.flex_attention import create_block_mask

        key = (q_len, kv_len, q_offset, str(device))
        if key not in self._block_masks:
            predicate = self.predicate

            def mask_mod(batch, head, q_idx, kv_idx):
                return predicate(q_idx + q_offset, kv_idx)

            self._block_masks[key] = create_block_mask(
                mask_mod, None, None, q_len, kv_len, device=device if device is not None else "cpu"
            )
        return self._block_masks[key]


def causal_mask() -> Mask:
    """Lower-triangular mask: position i attends to positions <= i."""
    return Mask(lambda q, kv: kv <= q, name="causal")


def block_causal_mask(block_ids: Tensor) -> Mask:
    """Attend to every position whose block id is <= the query's block id (bidirectional inside a block).

    block_ids: (L,) long, non-decreasing along the sequence (e.g. scale index for next-scale prediction).
    """
    ids = block_ids.long()
    return Mask(lambda q, kv: ids[kv] <= ids[q], name="block_causal")


def dense_to_mask(allowed: Tensor) -> Mask:
    """Wrap an explicit (L_q, L_kv) boolean matrix (True = attend) as a Mask for the FlexAttention backend."""
    if allowed.dim() != 2 or allowed.dtype != torch.bool:
        raise ValueError(f"expected a 2D bool tensor (L_q, L_kv), got {tuple(allowed.shape)} {allowed.dtype}")
    return Mask(lambda q, kv: allowed[q, kv], name="dense")


# ----------------------------------------------------------------------------------------------------------------------
# backends

_FLEX_COMPILE = False


def set_flex_compile(enabled: bool = True) -> None:
    """Turn compiled FlexAttention on (or off) for the whole process: the ``flex`` backend then runs
    ``torch.compile``-fused kernels (the first call per shape and mask compiles), and ``auto`` sends structured masks
    on CUDA to it instead of SDPA with a dense mask."""
    global _FLEX_COMPILE
    _FLEX_COMPILE = bool(enabled)


def flex_compile_enabled() -> bool:
    """Whether :func:`set_flex_compile` has turned compiled FlexAttention on."""
    return _FLEX_COMPILE


@functools.lru_cache(maxsize=None)
def _flex_function(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


@functools.lru_cache(maxsize=None)
def _xformers_ops():
    """xformers.ops if its CUDA kernels load, else None; import noise is silenced because CPU runs never need it."""
    if not torch.cuda.is_available():
        return None
    import logging

    logging.getLogger("xformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import xformers.ops as xops  # noqa: PLC0415

            q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
            xops.memory_efficient_attention(q, q, q)
        except Exception:
            return None
    return xops


def xformers_available() -> bool:
    return _xformers_ops() is not None


def _dense_allowed(mask, q: Tensor, k: Tensor, q_offset: int) -> Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, Mask):
        return mask.dense(q.shape[-2], k.shape[-2], q_offset, device=q.device)
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be a flexar Mask or a bool tensor (True = attend), got {mask.dtype}")
    return mask


def _is_plain_causal(mask, q: Tensor, k: Tensor, q_offset: int) -> bool:
    return isinstance(mask, Mask) and mask.name == "causal" and q_offset == 0 and q.shape[-2] == k.shape[-2]


def _math(q, k, v, mask, scale, q_offset):
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    allowed = _dense_allowed(mask, q, k, q_offset)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def _sdpa(q, k, v, mask, scale, q_offset):
    if _is_plain_causal(mask, q, k, q_offset):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    allowed = _dense_allowed(mask, q, k, q_offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _flex(q, k, v, mask, scale, q_offset):
    if mask is not None and not isinstance(mask, Mask):
        if mask.dim() != 2:
            # per-batch/head boolean masks have no cached block structure to exploit
            return _sdpa(q, k, v, mask, scale, q_offset)
        mask = dense_to_mask(mask)
    block_mask = None if mask is None else mask.block_mask(q.shape[-2], k.shape[-2], q_offset, device=q.device)
    with warnings.catch_warnings():
        # eager (unfused) FlexAttention is a deliberate choice here; torch warns about it on every new call site
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex_function(_FLEX_COMPILE)(q, k, v, block_mask=block_mask, scale=scale)


def _xformers(q, k, v, mask, scale, q_offset):
    xops = _xformers_ops() if q.is_cuda else None
    if xops is None:
        return _sdpa(q, k, v, mask, scale, q_offset)
    bias = None
    if _is_plain_causal(mask, q, k, q_offset):
        bias = xops.LowerTriangularMask()
    elif mask is not None:
        allowed = _dense_allowed(mask, q, k, q_offset)
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        bias = torch.zeros(shape, device=q.device, dtype=q.dtype).masked_fill(~allowed.expand(shape), float("-inf"))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def resolve_backend(backend: str, q: Tensor, mask) -> str:
    """The backend ``auto`` resolves to for these inputs (also validates explicit names)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    return auto_backend(q.device.type, mask, _FLEX_COMPILE)


def auto_backend(device_type: str, mask, flex_compiled: bool) -> str:
    """The backend ``auto`` runs for a device type ("cpu", "cuda", ...) and a mask: ``flex`` for a structured
    :class:`Mask` (not plain causal) on CUDA when compiled FlexAttention is on, ``sdpa`` in every other case."""
    structured = isinstance(mask, Mask) and mask.name != "causal"
    if device_type == "cuda" and structured and flex_compiled:
        return "flex"
    return "sdpa"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Multi-head attention over (B, H, L, D) tensors.

    q: (B, H, L_q, D); k, v: (B, H, L_kv, D); mask: a :class:`Mask`, a bool tensor broadcastable to
    (B, H, L_q, L_kv) with True = attend, or None; q_offset: absolute position of the first query (KV-cache decoding).
    Returns (B, H, L_q, D).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, L, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    name = resolve_backend(backend, q, mask)
    return _BACKEND_FUNCTIONS[name](q, k, v, mask, scale, q_offset)


_BACKEND_FUNCTIONS = {"math": _math, "sdpa": _sdpa, "flex": _flex, "xformers": _xformers}
