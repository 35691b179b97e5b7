"""Per-image random streams, so that an image depends on its seed and its index, never on the batch it was drawn in.

A ``torch.Generator`` serves a whole batch: image 7 of a batch of 50 and image 7 of a batch of 100 draw different
numbers, and ``Pipeline.generate(batch_size=...)`` would change the images. :class:`ImageStreams` gives each image
its own counter-based stream keyed by ``(seed, image index)`` (a SplitMix64 hash of the key and a running counter,
computed as int64 tensor arithmetic in one vectorised pass on any device), so every draw of image ``i`` is a pure
function of ``(seed, i, how many numbers image i drew before)``.

Every sampling draw in flexar goes through :func:`uniform` / :func:`normal`, which take either a ``torch.Generator``
(one stream for the batch, as before) or an :class:`ImageStreams` (one stream per image, rows in the leading
dimension). A loop that keeps all rows in lockstep (the same number of draws per row per call) keeps every image's
stream independent of the batch composition.

Shapes: an :class:`ImageStreams` over B images draws tensors whose leading dimension is B, or a multiple
``B * m`` laid out image-major (``m`` trajectories or copies per image, as ScalingAR's candidates).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64 as in C)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


class ImageStreams:
    """One random stream per image.

    Args:
        seed: the call's seed (any int).
        indices: (B,) the images' indices within the call (``arange(B)`` for a single batch; the k-th batch of a
            call passes its own slice, so image i keeps its stream whatever the batch size).
        device: where the drawn tensors live.
    """

    def __init__(self, seed: int, indices: Tensor, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        seed_key = _splitmix64(torch.tensor([int(seed) & ((1 << 63) - 1)], dtype=torch.long))
        self.keys = _splitmix64(seed_key ^ _splitmix64(indices)).to(self.device)
        self._position = [0]  # shared with the views made by select / split: one running counter for all of them

    @property
    def counter(self) -> int:
        """How many numbers each stream has drawn so far (the same for every stream: draws run in lockstep)."""
        return self._position[0]

    @property
    def num_streams(self) -> int:
        return self.keys.shape[0]

    def _bits(self, shape: tuple[int, ...]) -> Tensor:
        """(B * m, ...) uniformly random int64 words; advances every stream by prod(shape) / B numbers."""
        total = math.prod(shape)
        if not shape or shape[0] % self.num_streams or total == 0:
            if total == 0:
                return torch.zeros(shape, dtype=torch.long, device=self.device)
            raise ValueError(
                f"ImageStreams over {self.num_streams} images draws tensors whose leading dimension is a multiple of "
                f"{self.num_streams} (image-major); got shape {tuple(shape)}"
            )
        per_stream = total // self.num_streams
        offsets = torch.arange(self.counter, self.counter + per_stream, dtype=torch.long, device=self.device)
        self._position[0] += per_stream
        words = _splitmix64(self.keys[:, None] ^ _splitmix64(offsets)[None, :])
        return words.reshape(shape)

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform numbers in [0, 1), exactly representable in ``dtype`` (24 random bits for float32 and narrower,
        53 for float64)."""
        bits = 53 if dtype == torch.float64 else 24
        words = _shift_right(self._bits(tuple(shape)), 64 - bits)
        return (words.to(torch.float64 if bits == 53 else torch.float32) * 2.0**-bits).to(dtype)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal numbers by Box-Muller from two uniforms each."""
        first = self.uniform(shape, torch.float64 if dtype == torch.float64 else torch.float32)
        second = self.uniform(shape, first.dtype)
        radius = torch.sqrt(-2.0 * torch.log1p(-first))  # 1 - u lies in (0, 1]: the log is finite
        return (radius * torch.cos(2 * math.pi * second)).to(dtype)

    def select(self, rows: Tensor) -> "ImageStreams":
        """A view over a subset of the streams (rows: (k,) indices or a (B,) bool mask) that shares this object's
        counter: a loop that draws for the surviving rows only (ScalingAR's pruned trajectories) keeps every
        stream at the same position as if all rows had drawn."""
        return self._view(self.keys[rows.to(self.device)])

    def split(self, copies: int) -> "ImageStreams":
        """(B * copies) streams, image-major, each copy of an image with its own key: independent trajectories of
        one image that stay independent of the batch. Shares this object's counter."""
        copy_keys = _splitmix64(torch.arange(1, copies + 1, dtype=torch.long, device=self.device))
        return self._view(_splitmix64(self.keys[:, None] ^ copy_keys[None, :]).reshape(-1))

    def _view(self, keys: Tensor) -> "ImageStreams":
        out = ImageStreams.__new__(ImageStreams)
        out.device, out.keys, out._position = self.device, keys, self._position
        return out


def uniform(generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniforms in [0, 1) of ``shape`` from a ``torch.Generator`` or an :class:`ImageStreams` (rows first)."""
    if isinstance(generator, ImageStreams):
        return generator.uniform(shape, dtype).to(device)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def normal(generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normals of ``shape`` from a ``torch.Generator`` or an :class:`ImageStreams` (rows first)."""
    if isinstance(generator, ImageStreams):
        return generator.normal(shape, dtype).to(device)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
