"""The interface every tokenizer keeps (see DESIGN.md).

- ``encode(images (B, C, H, W) in [-1, 1], num_tokens=None) -> Encoded(ids (B, L) long, lengths (B,) long)``
- ``decode(ids (B, L), lengths=None) -> images (B, C, H, W) in [-1, 1]``
- ``training_loss(images, criterion=None, step=0) -> (loss, logs)``: the family's objective (the LightningModule only
  optimises it). ``criterion`` (a :class:`flexar.tokenizers.losses.ReconstructionLoss`) replaces the pixel term at
  tokenizer step ``step`` in the families that reconstruct pixels (``takes_criterion = True``: TiTok and its
  subclasses, VQGAN2D, MultiScaleVQ); the others (FlexTok's flow, ALIT's and KARL's distillation, the VAE) refuse
  a criterion by name. Every family takes the same arguments, so a trainer calls them all alike.
- attributes ``codebook_size``, ``max_tokens``, ``grid`` (None for 1D), ``image_size``, ``channels``
- ``code_vectors() -> (V, D)``: the embedding of every id, for samplers that need token geometry (LANTERN)

Inputs are checked here once for every family (``check_images``, ``check_num_tokens``, ``check_ids``) and refused
with a message, never reinterpreted:

- images must be finite, in [-1, 1] (up to ``RANGE_TOLERANCE``, the overshoot of a bicubic or antialiased resize),
  and float32 / float16 / bfloat16. float64 is refused rather than cast, unless the tokenizer itself is float64: a
  silent cast would hide that the caller's pipeline runs at another precision than the tokenizer's weights.
- ``num_tokens`` is None or an integer (Python, numpy or a 0-d integer tensor; not bool) in [1, ``max_tokens``].
- ``lengths`` is None or an integer tensor of shape (B,) with 1 <= lengths <= L, the number of ids given.

Every family's ``decode`` returns images clamped to [-1, 1]: the decoders end in unconstrained linear layers (or an
ODE integration), so a few pixels overshoot the documented range. The clamp is applied once, here: the ``decode``
that a subclass defines is wrapped when the class is created (:meth:`Tokenizer.__init_subclass__`). Training
objectives use the families' unclamped ``decode_codes``, so the clamp never cuts a gradient. Likewise every
``encode`` runs without gradients (ids are discrete), so a quantiser's training-only updates, such as a VQ's dead-code
restarts, happen in ``training_loss`` alone and never because a model left in training mode encoded a batch.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import Configurable, PretrainedMixin
from ..utils import psnr

RANGE_TOLERANCE = 1e-3
IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Encoded:
    """ids: (B, L) long; lengths: (B,) long, the number of valid tokens of each row (ids past it are padding)."""

    ids: Tensor
    lengths: Tensor


def _clamped_decode(decode):
    """Wrap a family's ``decode`` so that its images are clamped to [-1, 1] (see the module docstring)."""
    if getattr(decode, "clamps_to_image_range", False):
        return decode

    @functools.wraps(decode)
    def decode_in_range(self, *args, **kwargs):
        return decode(self, *args, **kwargs).clamp(-1.0, 1.0)

    decode_in_range.clamps_to_image_range = True
    return decode_in_range


def _gradient_free_encode(encode):
    """Wrap a family's ``encode`` in ``torch.no_grad``: ids are discrete, and a quantiser's training-only updates
    (a VQ's dead-code restarts) must run in ``training_loss`` alone, never because a model in training mode encoded
    a batch."""
    if getattr(encode, "gradient_free", False):
        return encode

    @functools.wraps(encode)
    def encode_without_gradient(self, *args, **kwargs):
        with torch.no_grad():
            return encode(self, *args, **kwargs)

    encode_without_gradient.gradient_free = True
    return encode_without_gradient


def as_count(value) -> int | None:
    """``value`` as a Python int if it is an integer (int, numpy integer, integer 0-d tensor; not bool), else None."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and (value.dim() or value.is_floating_point())):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


LENGTH_SAMPLING = ("uniform", "pow2", "uniform_pow2")


def sample_lengths(batch_size: int, maximum: int, mode: str = "uniform", per_sample: bool = True,
                   generator: torch.Generator | None = None, device=None) -> Tensor:
    """Kept-token counts for training on prefixes (nested dropout, One-D-Piece's Tail Token Drop): (batch_size,)
    long in [1, maximum], one draw per image, or one shared by the batch when ``per_sample`` is False.

    ``mode``: ``"uniform"``, k ~ U{1..maximum}; ``"pow2"``, k uniform over the powers of two {1, 2, 4, ..., maximum};
    ``"uniform_pow2"`` (FlexTok's official ``MaskedNestedDropout``), k ~ U{1..maximum} rounded up to the next power
    of two. The pow2 modes need a power-of-two ``maximum``. The draw is made on the CPU (from ``generator``, else the
    global stream) and then moved to ``device``, so the same seed gives the same counts on every device.
    """
    if mode not in LENGTH_SAMPLING:
        raise ValueError(f"unknown length sampling {mode!r}; expected one of {LENGTH_SAMPLING}")
    if mode != "uniform" and not (maximum > 0 and maximum & (maximum - 1) == 0):
        raise ValueError(f"length sampling {mode!r} needs a power-of-two maximum length, got {maximum}")
    draws = batch_size if per_sample else 1
    if mode == "pow2":
        lengths = 2 ** torch.randint(0, maximum.bit_length(), (draws,), generator=generator)
    else:
        lengths = torch.randint(1, maximum + 1, (draws,), generator=generator)
        if mode == "uniform_pow2":
            lengths = 2 ** torch.ceil(torch.log2(lengths.double())).long()
    if not per_sample:
        lengths = lengths.expand(batch_size).clone()
    return lengths.to(device)


def check_criterion(model: nn.Module, criterion) -> None:
    """Refuse a reconstruction ``criterion`` given to a model whose objective has no pixel term to replace
    (``takes_criterion`` False); see the module docstring."""
    if criterion is not None and not getattr(model, "takes_criterion", False):
        raise ValueError(f"{type(model).__name__}.training_loss takes no reconstruction criterion (its objective has "
                         f"no pixel term to replace); train it without `loss`")


class Tokenizer(Configurable, PretrainedMixin, nn.Module):
    codebook_size: int
    max_tokens: int
    grid = None
    image_size: int
    channels: int
    # whether decode draws random numbers (a sampling decoder such as FlexTok's flow); it then takes `generator=`
    decode_draws: bool = False
    # whether training_loss uses a reconstruction `criterion` (pixel, perceptual and adversarial terms)
    takes_criterion: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "decode" in cls.__dict__:
            cls.decode = _clamped_decode(cls.__dict__["decode"])
        if "encode" in cls.__dict__:
            cls.encode = _gradient_free_encode(cls.__dict__["encode"])

    def check_images(self, images: Tensor) -> None:
        """Refuse images that are not (B, C, H, W) float in [-1, 1]; see the module docstring."""
        name = type(self).__name__
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, Tensor):
            raise ValueError(f"{name} expects images as a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{name} expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be float in [-1, 1], got dtype {images.dtype}; uint8 images in [0, 255] map with "
                f"images.float() / 127.5 - 1"
            )
        weights = next(self.parameters(), None)
        own_dtype = weights.dtype if weights is not None else torch.float32
        if images.dtype not in IMAGE_DTYPES and images.dtype != own_dtype:
            raise ValueError(
                f"images are {images.dtype} but {name}'s weights are {own_dtype}: pass images.to({own_dtype}) "
                f"(images are never cast silently)"
            )
        # one reduction (one device sync): NaN fails `<=` as well, so this also catches every non-finite value
        if images.numel() and not bool((images.abs() <= 1.0 + RANGE_TOLERANCE).all()):
            finite = torch.isfinite(images)
            if not bool(finite.all()):
                raise ValueError(f"images contain {int((~finite).sum())} NaN or Inf value(s); {name} encodes finite "
                                 f"images in [-1, 1]")
            low, high = float(images.min()), float(images.max())
            raise ValueError(
                f"images must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}]: images in [0, 1] map with "
                f"images * 2 - 1, images in [0, 255] with images / 127.5 - 1"
            )

    def check_num_tokens(self, num_tokens) -> int:
        """None -> ``max_tokens``; an integer in [1, ``max_tokens``] -> that int; anything else is refused."""
        if num_tokens is None:
            return self.max_tokens
        count = as_count(num_tokens)
        if count is None or not 1 <= count <= self.max_tokens:
            raise ValueError(f"num_tokens must be an int in [1, {self.max_tokens}], got {num_tokens!r}")
        return count

    def reconstruction_objective(self, images: Tensor, recon: Tensor, quantized, criterion=None, step: int = 0):
        """(loss, logs) of a reconstruction `recon` of `images` from `quantized` (a QuantizerOutput): the pixel loss
        (``self.reconstruction_loss``, "l2" or "l1") or ``criterion``'s pixel, perceptual and adversarial terms at
        tokenizer step `step` (its adaptive GAN weight reads ``self.last_layer()``), plus the quantiser loss; the
        logs add PSNR and the quantiser's codebook statistics."""
        mse = F.mse_loss(recon, images)
        if criterion is None:
            pixel_loss = mse if self.reconstruction_loss == "l2" else F.l1_loss(recon, images)
            criterion_logs = {"reconstruction": pixel_loss.detach()}
        else:
            pixel_loss, criterion_logs = criterion(images, recon, step=step, last_layer=self.last_layer())
        loss = pixel_loss + quantized.loss
        logs = {
            "loss": loss.detach(),
            **criterion_logs,
            "quantizer": quantized.loss.detach(),
            "psnr": psnr(mse.detach()),
            **{(k if k.endswith("_loss") else f"codebook_{k}"): v for k, v in quantized.logs.items()},
        }
        return loss, logs

    def check_ids(self, ids: Tensor, lengths: Tensor | None) -> Tensor:
        """Validate ids (B, L) and lengths (None or (B,) integers in [1, L]); return per-row lengths (B,) long."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a (B, L) long tensor, got {shape} {getattr(ids, 'dtype', '')}".rstrip())
        batch, length = ids.shape
        if length == 0:
            raise ValueError(f"ids hold no tokens (shape {tuple(ids.shape)}); decode needs 1 <= L <= {self.max_tokens}")
        if length > self.max_tokens:
            raise ValueError(f"got {length} tokens per image; {type(self).__name__} holds at most {self.max_tokens}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got [{ids.min()}, {ids.max()}]")
        if lengths is None:
            return torch.full((batch,), length, dtype=torch.long, device=ids.device)
        expected = f"lengths must be a ({batch},) integer tensor with 1 <= lengths <= {length} (the ids' L)"
        if not isinstance(lengths, Tensor):
            try:
                lengths = torch.as_tensor(lengths)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"{expected}, got {type(lengths).__name__}") from None
        if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"{expected}, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"{expected}, got shape {tuple(lengths.shape)}")
        if batch and (lengths.min() < 1 or lengths.max() > length):
            raise ValueError(f"{expected}, got values in [{int(lengths.min())}, {int(lengths.max())}]")
        return lengths.to(ids.device).long()

    @torch.no_grad()
    def reconstruct(self, images: Tensor, num_tokens: int | None = None) -> Tensor:
        encoded = self.encode(images, num_tokens)
        return self.decode(encoded.ids, encoded.lengths)
