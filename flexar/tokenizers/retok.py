"""ReTok: Redundant Token Padding and Hierarchical Semantic Regularisation on a TiTok-style 1D tokenizer
(ReTok, 2025; official code zfu006/ReTok, a fork of GigaTok / LlamaGen).

- Redundant Token Padding: the encoder holds N + M latent queries, the N of TiTok followed by M copies of the
  tail queries N - M, ..., N - 1 (ReTok: queries 32..255 of N = 256, M = 224), each copy with its own position
  embedding. Nested dropout draws k ~ U{1, ..., N + M} and the decoder keeps the first min(k, N) tokens: the M
  redundant draws all keep every token, so token i (1-based) is kept with probability (N + M - i + 1) / (N + M)
  instead of (N - i + 1) / N, and the tail tokens are trained far more often. ``encode`` returns the first N ids.
- Hierarchical Semantic Regularisation (HSR): a REPA-style term (Yu et al. 2025): the decoder's patch features at
  layer ``alignment_layer`` go through an MLP projector and are pulled toward a frozen teacher's features at the same
  grid by negative cosine similarity. A sample decoded from its first k tokens has the term scaled by w(k),
  non-increasing in k (``alignment_weights``), so the leading tokens are the ones made semantic.
- The teacher is pluggable: ``teacher="vgg16:PATH"`` / ``"vgg16-narrow:PATH"`` (a VGG feature stack from a
  safetensors file, last tap), ``"classifier:FOLDER"`` (a :class:`flexar.eval.DigitClassifier`, its last conv
  map), or any frozen module set with :meth:`ReTok.set_teacher`. It is loaded on the first training step, never
  saved with the tokenizer, and not needed to encode or decode.

The constructor takes ReTok's own switches; every other keyword argument is TiTok's, forwarded to
:class:`flexar.tokenizers.TiTok` (and recorded in the saved config with them).

Shapes: images (B, C, H, W) in [-1, 1]; ids (B, k) long with 1 <= k <= N = ``num_latent_tokens``; teacher
features (B, ``teacher_dim``, h, w), pooled to the (H / patch_size) ** 2 decoder grid.

Differences from the paper and its official code:
- no CNN encoder/decoder around the ViTs and no Q-Former: flexar's TiTok ViT (patch embedding, [patches; queries]
  self-attention encoder, [mask tokens; latents] decoder) carries the two ideas; at digit/MNIST scale the CNN
  stages (f16 downsampling) have nothing to downsample. The 1D queries are learned, not initialised by multi-level
  pooling of CNN features.
- w(k) decays linearly, w(k) = alignment_weight * (N + M - k + 1) / (N + M) (``alignment_decay="linear"``): the
  paper decays the strength toward the tail without the released code doing so; ``alignment_decay="none"`` is the
  released code's constant weight (0.5).
- the teacher is DINOv2-B in the paper; any frozen feature network here (``teacher_dim`` = 768 matches DINOv2-B).
  The projector's hidden width is 4x the decoder width (REPA: 2048).
- the notes do not fix whether k is drawn per batch or per image: one k per batch by default, as One-D-Piece
  (``lengths_per_sample`` switches).
- for a drawn k > N the decoder reads the first N tokens only: the M redundant queries' outputs are never decoded
  (they act on the encoder's attention alone), where the official decoder also reads them.
- the redundant queries' content is its own parameter (``padding_tokens``), initialised as a copy of the tail
  queries and then trained apart from them; the official queries share the tail queries' content and differ only in
  their position embeddings. ``tie_padding_tokens=True`` shares it.
- the HSR weight is indexed by the drawn k in 1..N + M, so draws k > N, which decode the same N tokens, still get
  smaller weights than k = N.
- the shipped configs use a fixed GAN weight (``adaptive_weight: false``), as the official training does; VQGAN's
  adaptive weight is one switch away in :class:`flexar.tokenizers.losses.ReconstructionLoss`.
- the paper presets (``retok-s-s``, ``retok-s-b``) set the paper's token counts, codebook, GigaTok transformer
  sizes and HSR settings on this CNN-free network, so their parameter counts are those of the transformers alone
  (39M and 106M here; the paper's tokenizers add the f16 CNN encoder and decoder).
- single-stage training as flexar's TiTok; the paper's losses (L2 1.0, LPIPS 1.0, PatchGAN hinge 0.5) come from
  :class:`flexar.tokenizers.losses.ReconstructionLoss` passed to the training module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from .losses import VGG_LAYOUTS, VGGFeatures
from .base import sample_lengths
from .titok import TiTok


# GigaTok's transformer sizes, which ReTok's encoder and decoder take (ReTok's modelling code: "small" is 512 wide)
GIGATOK_SIZES = {
    "small": dict(width=512, depth=6, num_heads=8),
    "base": dict(width=768, depth=12, num_heads=12),
}
RETOK_LAYOUT = dict(image_size=256, channels=3, patch_size=16, num_latent_tokens=256, redundant_tokens=224,
                    quantizer="vq", codebook_size=16384, code_dim=8, commitment=0.25, teacher_dim=768,
                    alignment_weight=0.5, alignment_layer=3)

class TeacherFeatures(nn.Module):
    """A frozen feature network named by ``kind:PATH``: forward(images in [-1, 1]) -> (B, C, h, w)."""

    def __init__(self, spec: str, channels: int):
        super().__init__()
        kind, _, path = spec.partition(":")
        if not path:
            raise ValueError(f"teacher {spec!r} must read KIND:PATH with KIND in {sorted(VGG_LAYOUTS) + ['classifier']}")
        if kind in VGG_LAYOUTS:
            self.vgg = VGGFeatures(path, kind)
            self.body, self.in_channels = None, 3
        elif kind == "classifier":
            from ..eval.classifier import DigitClassifier

            classifier = DigitClassifier.from_pretrained(path)
            self.vgg, self.body, self.in_channels = None, classifier.body[:-1], classifier.in_channels  # drop Flatten
        else:
            raise ValueError(f"unknown teacher kind {kind!r}; expected one of {sorted(VGG_LAYOUTS) + ['classifier']}")
        if channels != self.in_channels and not (channels == 1 and self.in_channels == 3):
            raise ValueError(f"teacher {spec!r} takes {self.in_channels}-channel images, the tokenizer has {channels}")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if self.vgg is not None:
            return self.vgg(images)[-1]
        if images.shape[1] != self.in_channels:
            images = images.expand(-1, self.in_channels, -1, -1)
        return self.body(images)


@register
class ReTok(TiTok):
    """Flexible-length 1D tokenizer with redundant token padding and hierarchical semantic regularisation."""

    presets = {
        # the paper's ReTok-S-S / ReTok-S-B (zfu006/ReTok configs/vq/VQ_{SS,SB}256.yaml): 256 px RGB at f16, N = 256
        # tokens with M = 224 redundant queries, an l2-normalised VQ of 16384 codes of 8 dims, GigaTok's
        # transformer sizes (small: 512 wide, 6 blocks, 8 heads; base: 768, 12, 12) for the encoder / decoder, and
        # HSR at decoder block 3 with weight 0.5 toward DINOv2-B's 768 channels (the teacher is given with
        # ``teacher=``; without one no projector is built)
        "retok-s-s": dict(RETOK_LAYOUT, **GIGATOK_SIZES["small"]),
        "retok-s-b": dict(RETOK_LAYOUT, **GIGATOK_SIZES["small"], decoder_width=GIGATOK_SIZES["base"]["width"],
                          decoder_depth=GIGATOK_SIZES["base"]["depth"]),
        "retok-digits": dict(TiTok.presets["titok-digits"], num_latent_tokens=16, redundant_tokens=14),
    }

    drops_tokens_in_training = True

    def __init__(
        self,
        redundant_tokens: int = 28,
        nested_dropout: bool = True,
        lengths_per_sample: bool = False,
        teacher: str | None = None,
        teacher_dim: int = 768,
        alignment_weight: float = 0.5,
        alignment_layer: int = 3,
        alignment_decay: str = "linear",
        tie_padding_tokens: bool = False,
        **kwargs,
    ):
        """ReTok's own switches (module docstring); ``kwargs``: :class:`~flexar.tokenizers.TiTok`'s arguments
        (``num_latent_tokens`` is N, the number of ids per image)."""
        super().__init__(**kwargs)
        num_latent_tokens, width, decoder_width = self.max_tokens, self.width, self.decoder_width
        if not 0 <= redundant_tokens <= num_latent_tokens:
            raise ValueError(f"redundant_tokens must lie in [0, {num_latent_tokens}], got {redundant_tokens}")
        if alignment_decay not in ("linear", "none"):
            raise ValueError(f"alignment_decay must be 'linear' or 'none', got {alignment_decay!r}")
        if teacher is not None and not 1 <= alignment_layer <= self.decoder.depth:
            raise ValueError(f"alignment_layer must lie in [1, {self.decoder.depth}] (decoder depth), got "
                             f"{alignment_layer}")
        self.redundant_tokens = redundant_tokens
        self.nested_dropout, self.lengths_per_sample = nested_dropout, lengths_per_sample
        self.teacher_spec, self.teacher_dim = teacher, teacher_dim
        self.alignment_weight, self.alignment_layer, self.alignment_decay = alignment_weight, alignment_layer, alignment_decay
        # redundant queries start as copies of the tail queries; their own position embeddings tell them apart
        self.tie_padding_tokens = tie_padding_tokens
        tail = self.latent_tokens.detach()[num_latent_tokens - redundant_tokens :]
        self.padding_tokens = None if tie_padding_tokens else nn.Parameter(tail.clone())
        self.padding_pos = nn.Parameter(torch.randn(redundant_tokens, width) * 0.02)
        self.projector = None
        if teacher is not None:
            hidden = 4 * decoder_width
            self.projector = nn.Sequential(
                nn.Linear(decoder_width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, teacher_dim)
            )
        # kept out of the module tree: the teacher is neither saved with the tokenizer nor needed to use it
        self.__dict__["_teacher"] = None

    @property
    def num_queries(self) -> int:
        return self.max_tokens + self.redundant_tokens

    # -- encoder -------------------------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> the first N continuous latent tokens (B, N, code_dim); the encoder runs all N + M queries."""
        self.check_images(images)
        queries = torch.cat([self.latent_tokens, self.padding_content() + self.padding_pos], dim=0)
        hidden = self.encoder_hidden(images, queries)
        return self.to_code(hidden[:, self.num_patches : self.num_patches + self.max_tokens])

    def padding_content(self) -> Tensor:
        """(M, width) content of the redundant queries: their own, or the tail queries' when tied."""
        if self.padding_tokens is not None:
            return self.padding_tokens
        return self.latent_tokens[self.max_tokens - self.redundant_tokens :]

    # -- nested dropout ------------------------------------------------------------------------------------------------
    def sample_lengths(self, batch_size: int, device) -> Tensor | None:
        """Training: k ~ U{1..N+M} (B,); the decoder keeps min(k, N) tokens. Evaluation: None (all N kept)."""
        if not (self.training and self.nested_dropout):
            return None
        return sample_lengths(batch_size, self.num_queries, per_sample=self.lengths_per_sample, device=device)

    def keep_probabilities(self) -> Tensor:
        """P(token i is kept) = (N + M - i + 1) / (N + M) for i = 1..N: (N,)."""
        positions = torch.arange(1, self.max_tokens + 1, dtype=torch.float64)
        return (self.num_queries - positions + 1) / self.num_queries

    def alignment_weights(self) -> Tensor:
        """w(k) for kept counts k = 1..N+M: (N + M,), non-increasing in k."""
        counts = torch.arange(1, self.num_queries + 1, dtype=torch.float32)
        if self.alignment_decay == "none":
            return torch.full_like(counts, self.alignment_weight)
        return self.alignment_weight * (self.num_queries - counts + 1) / self.num_queries

    # -- teacher -------------------------------------------------------------------------------------------------------
    def set_teacher(self, teacher: nn.Module) -> None:
        """Use ``teacher`` (images in [-1, 1] -> (B, teacher_dim, h, w)) as the frozen representation target."""
        if self.projector is None:
            raise ValueError("this ReTok was built with teacher=None and has no projector; pass teacher= to build one")
        self.__dict__["_teacher"] = teacher.requires_grad_(False).eval()

    def teacher(self) -> nn.Module | None:
        if self._teacher is None and self.teacher_spec is not None:
            self.set_teacher(TeacherFeatures(self.teacher_spec, self.channels))
        return self._teacher

    def alignment_loss(self, features: Tensor, images: Tensor) -> Tensor:
        """Negative cosine similarity between projected decoder patch features (B, N_patches, width) and the
        teacher's features pooled to the patch grid, averaged over patches: (B,)."""
        teacher = self.teacher().to(images.device)
        grid = self.image_size // self.patch_size
        with torch.no_grad():
            target = teacher(images)
            if target.shape[1] != self.teacher_dim:
                raise ValueError(f"teacher features have {target.shape[1]} channels, teacher_dim is {self.teacher_dim}")
            target = F.adaptive_avg_pool2d(target.float(), grid).flatten(2).transpose(1, 2)
        prediction = self.projector(features)
        return -F.cosine_similarity(prediction, target.to(prediction.dtype), dim=-1).mean(dim=1)

    # -- objective -----------------------------------------------------------------------------------------------------
    def training_loss(self, images: Tensor, criterion=None, step: int = 0) -> tuple[Tensor, dict]:
        quantized = self.quantizer(self.encode_latents(images))
        counts = self.sample_lengths(images.shape[0], images.device)
        hidden = self.decoder_input(quantized.codes, counts)
        features = None
        for index, block in enumerate(self.decoder.blocks, start=1):
            hidden = block(hidden)
            if index == self.alignment_layer:
                features = hidden[:, : self.num_patches]
        recon = self.to_image(self.decoder.final_norm(hidden)[:, : self.num_patches])
        loss, logs = self.reconstruction_objective(images, recon, quantized, criterion, step)
        if self.projector is not None and self.alignment_weight > 0:
            alignment = self.alignment_loss(features, images)
            if counts is None:
                counts = torch.full((images.shape[0],), self.max_tokens, device=images.device)
            weights = self.alignment_weights().to(images.device)[counts - 1]
            loss = loss + (weights * alignment).mean()
            logs.update(loss=loss.detach(), alignment=alignment.mean().detach())
        return loss, logs
