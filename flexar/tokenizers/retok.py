"""ReTok: Redundant Token Padding and Hierarchical Semantic Regularisation on a TiTok-style 1D tokenizer
(ReTok, 2025; official code zfu006/ReTok, a fork of GigaTok / LlamaGen).

- Redundant Token Padding: the encoder holds N + M latent queries, the N of TiTok followed by M copies of the
  tail queries N - M, ..., N - 1 (ReTok: queries 32..255 of N = 256, M = 224), each copy with its own position
  embedding. Nested dropout draws k ~ U{1, ..., N + M} and the decoder keeps the first min(k, N) tokens: the M
  redundant draws all keep every token, so token i (1-based) is kept with probability (N + M - i + 1) / (N + M)
  instead of (N - i + 1) / N, and the tail tokens are trained far more often. ``encode`` returns the first N ids.
- Hierarchical Semantic Regularisation (HSR): a REPA-style term (Yu et al. 2025): the decoder's patch features at
  layer ``semantic_layer`` go through an MLP projector and are pulled toward a frozen teacher's features at the same
  grid by negative cosine similarity. A sample decoded from its first k tokens has the term scaled by w(k),
  non-increasing in k (``semantic_weights``), so the leading tokens are the ones made semantic.
- The teacher is pluggable: ``teacher="vgg16:PATH"`` / ``"vgg16-narrow:PATH"`` (a VGG feature stack from a
  safetensors file, last tap), ``"classifier:FOLDER"`` (a :class:`flexar.eval.DigitClassifier`, its last conv
  map), or any frozen module set with :meth:`ReTok.set_teacher`. It is loaded on the first training step, never
  saved with the tokenizer, and not needed to encode or decode.

Shapes: images (B, C, H, W) in [-1, 1]; ids (B, k) long with 1 <= k <= N = ``num_latent_tokens``; teacher
features (B, ``teacher_dim``, h, w), pooled to the (H / patch_size) ** 2 decoder grid.

Differences from the paper and its official code:
- no CNN encoder/decoder around the ViTs and no Q-Former: flexar's TiTok ViT (patch embedding, [patches; queries]
  self-attention encoder, [mask tokens; latents] decoder) carries the two ideas; at digit/MNIST scale the CNN
  stages (f16 downsampling) have nothing to downsample. The 1D queries are learned, not initialised by multi-level
  pooling of CNN features.
- w(k) decays linearly, w(k) = semantic_weight * (N + M - k + 1) / (N + M) (``semantic_decay="linear"``): the
  paper decays the strength toward the tail without the released code doing so; ``semantic_decay="none"`` is the
  released code's constant weight (0.5).
- the teacher is DINOv2-B in the paper; any frozen feature network here (``teacher_dim`` = 768 matches DINOv2-B).
  The projector's hidden width is 4x the decoder width (REPA: 2048).
- the notes do not fix whether k is drawn per batch or per image: one k per batch by default, as One-D-Piece
  (``dropout_per_sample`` switches).
- for a drawn k > N the decoder reads the first N tokens only: the M redundant queries' outputs are never decoded
  (they act on the encoder's attention alone), where the official decoder also reads them.
- the redundant queries' content is its own parameter (``padding_tokens``), initialised as a copy of the tail
  queries and then trained apart from them; the official queries share the tail queries' content and differ only in
  their position embeddings. ``tie_padding_tokens=True`` shares it.
- the HSR weight is indexed by the drawn k in 1..N + M, so draws k > N, which decode the same N tokens, still get
  smaller weights than k = N.
- the shipped configs use a fixed GAN weight (``adaptive_weight: false``), as the official training does; VQGAN's
  adaptive weight is one switch away in :class:`flexar.tokenizers.losses.ReconstructionLoss`.
- single-stage training as flexar's TiTok; the paper's losses (L2 1.0, LPIPS 1.0, PatchGAN hinge 0.5) come from
  :class:`flexar.tokenizers.losses.ReconstructionLoss` passed to the training module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from .losses import VGG_LAYOUTS, VGGFeatures
from .onedpiece import sample_kept_counts
from .titok import TiTok


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
        # ReTok's N = 256 with M = 224 redundant queries, on TiTok's ViT sizes
        "retok-s": dict(TiTok.presets["titok-s"], num_latent_tokens=256, redundant_tokens=224),
        "retok-b": dict(TiTok.presets["titok-b"], num_latent_tokens=256, redundant_tokens=224),
        "retok-digits": dict(TiTok.presets["titok-digits"], num_latent_tokens=16, redundant_tokens=14),
    }

    drops_tokens_in_training = True

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        patch_size: int = 4,
        num_latent_tokens: int = 32,
        width: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        mlp: str = "gelu",
        norm: str = "layer",
        quantizer: str = "vq",
        codebook_size: int = 1024,
        code_dim: int = 12,
        fsq_levels: list[int] | None = None,
        commitment: float = 0.25,
        dead_code_threshold: int = 0,
        reconstruction_loss: str = "l2",
        attention_backend: str = "auto",
        redundant_tokens: int = 28,
        nested_dropout: bool = True,
        dropout_per_sample: bool = False,
        teacher: str | None = None,
        teacher_dim: int = 768,
        semantic_weight: float = 0.5,
        semantic_layer: int = 3,
        semantic_decay: str = "linear",
        tie_padding_tokens: bool = False,
    ):
        super().__init__(
            image_size=image_size, channels=channels, patch_size=patch_size, num_latent_tokens=num_latent_tokens,
            width=width, depth=depth, num_heads=num_heads, decoder_width=decoder_width, decoder_depth=decoder_depth,
            mlp=mlp, norm=norm, quantizer=quantizer, codebook_size=codebook_size, code_dim=code_dim,
            fsq_levels=fsq_levels, commitment=commitment, dead_code_threshold=dead_code_threshold,
            reconstruction_loss=reconstruction_loss, attention_backend=attention_backend,
        )  # fmt: skip
        if not 0 <= redundant_tokens <= num_latent_tokens:
            raise ValueError(f"redundant_tokens must lie in [0, {num_latent_tokens}], got {redundant_tokens}")
        if semantic_decay not in ("linear", "none"):
            raise ValueError(f"semantic_decay must be 'linear' or 'none', got {semantic_decay!r}")
        decoder_width = decoder_width or width
        if teacher is not None and not 1 <= semantic_layer <= self.decoder.depth:
            raise ValueError(f"semantic_layer must lie in [1, {self.decoder.depth}] (decoder depth), got {semantic_layer}")
        self.redundant_tokens = redundant_tokens
        self.nested_dropout, self.dropout_per_sample = nested_dropout, dropout_per_sample
        self.teacher_spec, self.teacher_dim = teacher, teacher_dim
        self.semantic_weight, self.semantic_layer, self.semantic_decay = semantic_weight, semantic_layer, semantic_decay
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
        return sample_kept_counts(batch_size, self.num_queries, self.dropout_per_sample, device)

    def keep_probabilities(self) -> Tensor:
        """P(token i is kept) = (N + M - i + 1) / (N + M) for i = 1..N: (N,)."""
        positions = torch.arange(1, self.max_tokens + 1, dtype=torch.float64)
        return (self.num_queries - positions + 1) / self.num_queries

    def semantic_weights(self) -> Tensor:
        """w(k) for kept counts k = 1..N+M: (N + M,), non-increasing in k."""
        counts = torch.arange(1, self.num_queries + 1, dtype=torch.float32)
        if self.semantic_decay == "none":
            return torch.full_like(counts, self.semantic_weight)
        return self.semantic_weight * (self.num_queries - counts + 1) / self.num_queries

    # -- teacher -------------------------------------------------------------------------------------------------------
    def set_teacher(self, teacher: nn.Module) -> None:
        """Use ``teacher`` (images in [-1, 1] -> (B, teacher_dim, h, w)) as the frozen semantic target."""
        if self.projector is None:
            raise ValueError("this ReTok was built with teacher=None and has no projector; pass teacher= to build one")
        self.__dict__["_teacher"] = teacher.requires_grad_(False).eval()

    def teacher(self) -> nn.Module | None:
        if self._teacher is None and self.teacher_spec is not None:
            self.set_teacher(TeacherFeatures(self.teacher_spec, self.channels))
        return self._teacher

    def semantic_alignment(self, features: Tensor, images: Tensor) -> Tensor:
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
            if index == self.semantic_layer:
                features = hidden[:, : self.num_patches]
        recon = self.to_image(self.decoder.final_norm(hidden)[:, : self.num_patches])
        loss, logs = self.reconstruction_objective(images, recon, quantized, criterion, step)
        if self.projector is not None and self.semantic_weight > 0:
            alignment = self.semantic_alignment(features, images)
            if counts is None:
                counts = torch.full((images.shape[0],), self.max_tokens, device=images.device)
            weights = self.semantic_weights().to(images.device)[counts - 1]
            loss = loss + (weights * alignment).mean()
            logs.update(loss=loss.detach(), semantic=alignment.mean().detach())
        return loss, logs
