"""TiTok: a fixed-length 1D tokenizer ("An Image is Worth 32 Tokens for Reconstruction and Generation",
Yu et al., NeurIPS 2024; bytedance/1d-tokenizer).

Encoder: a ViT over [image patches; K learned latent tokens] (full attention); the K latent outputs are projected to
the code dimension and quantised (l2-normalised VQ as in the paper, or FSQ). Decoder: a ViT over [N mask tokens;
K latent codes]; the mask-token outputs are projected back to pixel patches.

Shapes: images (B, C, H, W) in [-1, 1]; ids (B, K) long; N = (H / patch_size) ** 2 patches.

Differences from the paper and its official code:
- single-stage training on pixels (reconstruction + quantiser loss). The paper's first stage regresses the codes of a
  pretrained MaskGIT-VQGAN ("proxy codes"), which cannot be downloaded here; its second stage fine-tunes the decoder
  on pixels, which is what flexar does from the start. Perceptual and adversarial terms come from
  :mod:`flexar.tokenizers.losses` when configured.
- the decoder has a learned padding embedding for latent positions past ``lengths``, so ``decode`` accepts truncated
  sequences. Plain TiTok never sees padding during training (the embedding keeps its random initialisation);
  flexible-length subclasses do. For a fair "TiTok, truncated" baseline against flexible-length tokenizers,
  ``decode(ids, lengths, fill)`` offers two fills besides it that do not rest on an untrained embedding:

  - ``"pad"`` (default): dropped latent positions take ``pad_token``, as training does for the subclasses;
  - ``"cut"``: the decoder attends only to the mask tokens and the kept latents; the dropped positions are removed
    from every attention (as if the sequence were [N mask tokens; k latents]);
  - ``"mean"``: dropped latent position i takes the mean, over a training set, of the quantised code vector at
    position i, ``c_i = (1 / M) sum_m e(ids[m, i])``, set by :meth:`TiTok.fit_mean_fill` from full-length ids;
    since ``from_code`` is affine, the decoder sees there the mean of what it saw at position i in training.
    The means are not saved with the model (fit them again after loading).

  At k = N the three are the same decode.
- the official ViTs prepend a learned class token to both the encoder and the decoder sequence, apply a LayerNorm
  (``ln_pre``) to each sequence before its transformer, and the pixel decoder ends in a 3x3 convolution over the
  image (``conv_out``); flexar's defaults have none of the three (the class token's output is never read, and at
  digit scale the extra layers change nothing measurable). ``class_token=True``, ``ln_pre=True`` and
  ``conv_out=True`` restore each. With full attention and learned positions the sequence order does not matter, so
  the class token is appended after the other tokens rather than prepended, which keeps every slice of the sequence
  where the subclasses read it. The paper presets (``titok-l32``, ``titok-b64``, ``titok-s128``) turn the class
  token and ``ln_pre`` on.
- the decoder's head: by default (``decoder_head="patches"``) flexar's decoder maps each mask-token output to its
  pixel patch with one linear layer. The official decoder predicts 1024-way logits of MaskGIT-VQGAN proxy codes at
  every patch (a two-layer 1x1-conv head) and decodes their soft codes with the MaskGIT-VQGAN pixel decoder
  (30.7M parameters), fine-tuned in its second stage; ``decoder_head="proxy-codes"`` builds that head and decoder
  (:mod:`flexar.tokenizers.titok_official`, sized by ``proxy_codebook_size``, ``proxy_code_dim`` and the
  ``pixel_decoder_*`` arguments; the pixel decoder upsamples the patch grid 2 ** (levels - 1) times, which must be
  ``patch_size``). The paper presets (``titok-l32``, ...) keep the linear head: they hold the official encoder,
  quantiser and decoder ViT (parameter counts within 0.2 % of the official ones; ``tests/test_tokenizer_presets.py``)
  and are trained on pixels from the start.
- the official encoder adds a second position table to the latent tokens (``latent_token_positional_embedding``);
  here the learned latent tokens carry their position themselves (the sum of two learned tables is one table).
- the released checkpoints (``flexar-convert titok``, :mod:`flexar.convert.titok`) need three more switches, off by
  default: ``official_blocks`` (the official ViT blocks: biased attention projections, exact GELU;
  :class:`~flexar.tokenizers.titok_official.ViT`), ``norm_eps=1e-5`` (every official LayerNorm has PyTorch's
  default epsilon; flexar's defaults use 1e-6) and ``legacy_latent_reshape`` (the released encoders read their
  latent outputs through a reshape rather than a transpose before projecting them to codes;
  :class:`~flexar.tokenizers.titok_official.LegacyLatentProjection`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import register
from ..nn import Transformer
from ..quantizers import FSQ, VQ
from .base import Encoded, Tokenizer
from .titok_official import MASKGIT_VQGAN, LegacyLatentProjection, ProxyCodeDecoder, ViT

# how decode fills latent positions past `lengths` (see the module docstring)
FILLS = ("pad", "cut", "mean")
# what maps the decoder's patch outputs to the image (see the module docstring)
DECODER_HEADS = ("patches", "proxy-codes")

# the official ViT sizes (1d-tokenizer modeling/modules/blocks.py), used by the encoder and the decoder alike
VIT_SIZES = {
    "small": dict(width=512, depth=8, num_heads=8),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
}
# the paper's layout around the ViTs: 256 x 256 RGB, 16 x 16 patches, an l2-normalised VQ of 4096 codes of 12 dims
# (commitment 0.25), and the official sequences' class token and pre-transformer LayerNorm
PAPER_LAYOUT = dict(image_size=256, channels=3, patch_size=16, quantizer="vq", codebook_size=4096, code_dim=12,
                    commitment=0.25, class_token=True, ln_pre=True)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C * p * p) in raster order of patches."""
    return F.unfold(images, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def unpatchify(patches: Tensor, patch_size: int, image_size: int) -> Tensor:
    """(B, N, C * p * p) -> (B, C, H, W); inverse of :func:`patchify`."""
    return F.fold(patches.transpose(1, 2), output_size=image_size, kernel_size=patch_size, stride=patch_size)


def build_quantizer(quantizer: str, codebook_size: int, code_dim: int, fsq_levels, commitment: float, dead_code_threshold: int):
    if quantizer == "vq":
        return VQ(codebook_size, code_dim, beta=commitment, l2_norm=True, dead_code_threshold=dead_code_threshold)
    if quantizer == "fsq":
        return FSQ(list(fsq_levels))
    raise ValueError(f"unknown quantizer {quantizer!r}; expected 'vq' or 'fsq'")


@register
class TiTok(Tokenizer):
    """Fixed-length 1D tokenizer: ``max_tokens`` = ``num_latent_tokens`` ids per image."""

    takes_criterion = True

    presets = {
        # the paper's tokenizers at 256 px (bytedance/1d-tokenizer configs/titok_{l32,b64,s128}.yaml): the whole
        # layout is PAPER_LAYOUT, the encoder and the decoder are the same ViT size
        "titok-l32": dict(PAPER_LAYOUT, num_latent_tokens=32, **VIT_SIZES["large"]),
        "titok-b64": dict(PAPER_LAYOUT, num_latent_tokens=64, **VIT_SIZES["base"]),
        "titok-s128": dict(PAPER_LAYOUT, num_latent_tokens=128, **VIT_SIZES["small"]),
        # CPU-sized presets for digits / MNIST
        "titok-tiny": dict(width=64, depth=2, num_heads=4),
        "titok-digits": dict(width=128, depth=4, num_heads=4),
    }

    # whether training decodes from fewer than all tokens (tail drop, nested dropout), which trains ``pad_token``
    drops_tokens_in_training = False

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
        class_token: bool = False,
        ln_pre: bool = False,
        conv_out: bool = False,
        norm_eps: float = 1e-6,
        official_blocks: bool = False,
        legacy_latent_reshape: bool = False,
        decoder_head: str = "patches",
        proxy_codebook_size: int = MASKGIT_VQGAN["proxy_codebook_size"],
        proxy_code_dim: int = MASKGIT_VQGAN["proxy_code_dim"],
        pixel_decoder_channels: int = MASKGIT_VQGAN["pixel_decoder_channels"],
        pixel_decoder_channel_mult: list[int] | None = None,
        pixel_decoder_res_blocks: int = MASKGIT_VQGAN["pixel_decoder_res_blocks"],
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {reconstruction_loss!r}")
        if decoder_head not in DECODER_HEADS:
            raise ValueError(f"TiTok decoder_head must be one of {DECODER_HEADS}, got {decoder_head!r}")
        if official_blocks and (mlp, norm) != ("gelu", "layer"):
            raise ValueError(f"TiTok official_blocks=True are LayerNorm + GELU blocks: mlp must be 'gelu' and norm "
                             f"'layer', got mlp={mlp!r}, norm={norm!r}")
        pixel_decoder_channel_mult = list(pixel_decoder_channel_mult or MASKGIT_VQGAN["pixel_decoder_channel_mult"])
        if decoder_head == "proxy-codes" and 2 ** (len(pixel_decoder_channel_mult) - 1) != patch_size:
            raise ValueError(f"TiTok decoder_head='proxy-codes' upsamples the patch grid by "
                             f"2 ** (len(pixel_decoder_channel_mult) - 1) = "
                             f"{2 ** (len(pixel_decoder_channel_mult) - 1)}, which must equal patch_size {patch_size}")
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.max_tokens = num_latent_tokens
        self.reconstruction_loss = reconstruction_loss
        decoder_width = decoder_width or width
        decoder_depth = decoder_depth or depth
        self.width, self.decoder_width = width, decoder_width
        patch_dim = channels * patch_size * patch_size

        self.quantizer = build_quantizer(
            quantizer, codebook_size, code_dim, fsq_levels or [8, 8, 8, 5, 5, 5], commitment, dead_code_threshold
        )
        self.codebook_size = self.quantizer.codebook_size
        self.code_dim = self.quantizer.dim

        # encoder
        self.patch_embed = nn.Linear(patch_dim, width)
        self.patch_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
        self.latent_tokens = nn.Parameter(torch.randn(num_latent_tokens, width) * 0.02)
        self.encoder = self.build_transformer(width, depth, num_heads, mlp, norm, norm_eps, official_blocks,
                                              attention_backend)
        self.to_code = (LegacyLatentProjection if legacy_latent_reshape else nn.Linear)(width, self.code_dim)

        # decoder
        self.from_code = nn.Linear(self.code_dim, decoder_width)
        self.latent_pos = nn.Parameter(torch.randn(num_latent_tokens, decoder_width) * 0.02)
        # fixed-length TiTok never decodes a dropped position in training, so its pad embedding gets no gradient: it is
        # frozen (out of the optimiser, and plain DDP finds no unused parameter); tail-dropping subclasses train it
        self.pad_token = nn.Parameter(torch.randn(decoder_width) * 0.02, requires_grad=self.drops_tokens_in_training)
        self.mask_token = nn.Parameter(torch.randn(decoder_width) * 0.02)
        self.mask_pos = nn.Parameter(torch.randn(self.num_patches, decoder_width) * 0.02)
        decoder_heads = max(1, num_heads * decoder_width // width)
        self.decoder = self.build_transformer(decoder_width, decoder_depth, decoder_heads, mlp, norm, norm_eps,
                                              official_blocks, attention_backend)
        if decoder_head == "patches":
            self.to_pixels, self.proxy_decoder = nn.Linear(decoder_width, patch_dim), None
        else:
            self.to_pixels = None
            self.proxy_decoder = ProxyCodeDecoder(decoder_width, channels, proxy_codebook_size, proxy_code_dim,
                                                  pixel_decoder_channels, pixel_decoder_channel_mult,
                                                  pixel_decoder_res_blocks)

        # the official layout's extras (see the module docstring), each off by default
        self.encoder_class_token = nn.Parameter(torch.randn(width) * 0.02) if class_token else None
        self.decoder_class_token = nn.Parameter(torch.randn(decoder_width) * 0.02) if class_token else None
        self.encoder_ln_pre = nn.LayerNorm(width, eps=norm_eps) if ln_pre else nn.Identity()
        self.decoder_ln_pre = nn.LayerNorm(decoder_width, eps=norm_eps) if ln_pre else nn.Identity()
        self.conv_out = nn.Conv2d(channels, channels, 3, padding=1) if conv_out else nn.Identity()
        # (K, code_dim) per-position mean code of a training set for fill="mean"; set by fit_mean_fill, not saved
        self.register_buffer("mean_fill_codes", None, persistent=False)

    @staticmethod
    def build_transformer(width: int, depth: int, num_heads: int, mlp: str, norm: str, norm_eps: float,
                          official_blocks: bool, backend: str) -> nn.Module:
        """flexar's :class:`~flexar.nn.Transformer`, or with ``official_blocks`` the official ViT
        (:class:`~flexar.tokenizers.titok_official.ViT`); both map (B, L, width) -> (B, L, width) under a mask."""
        if official_blocks:
            return ViT(width, depth, num_heads, norm_eps=norm_eps, backend=backend)
        return Transformer(width, depth, num_heads, mlp=mlp, norm=norm, backend=backend, norm_eps=norm_eps)

    # -- encoder -------------------------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> continuous latent tokens before quantisation (B, K, code_dim)."""
        self.check_images(images)
        hidden = self.encoder_hidden(images, self.latent_tokens)
        return self.to_code(hidden[:, self.num_patches : self.num_patches + self.max_tokens])

    def encoder_hidden(self, images: Tensor, queries: Tensor) -> Tensor:
        """images (B, C, H, W), latent queries (Q, width) -> encoder outputs (B, N + Q [+ 1], width) over
        [patches; queries] (and the class token last, when ``class_token``)."""
        patches = self.patch_embed(patchify(images, self.patch_size)) + self.patch_pos
        sequence = torch.cat([patches, queries.expand(images.shape[0], -1, -1)], dim=1)
        sequence = self.with_class_token(sequence, self.encoder_class_token)
        return self.encoder(self.encoder_ln_pre(sequence))

    @staticmethod
    def with_class_token(sequence: Tensor, token: Tensor | None) -> Tensor:
        return sequence if token is None else torch.cat([sequence, token.expand(sequence.shape[0], 1, -1)], dim=1)

    def to_image(self, patch_features: Tensor) -> Tensor:
        """Decoder outputs at the mask tokens (B, N, width) -> images (B, C, H, W): each output's pixel patch, or
        with ``decoder_head="proxy-codes"`` the pixel decoder's image of their proxy codes."""
        if self.proxy_decoder is not None:
            return self.conv_out(self.proxy_decoder(patch_features))
        return self.conv_out(unpatchify(self.to_pixels(patch_features), self.patch_size, self.image_size))

    def last_layer(self) -> Tensor:
        """The weight of the layer that writes the image (the adaptive GAN weight's gradient ratio is taken there)."""
        if isinstance(self.conv_out, nn.Conv2d):
            return self.conv_out.weight
        if self.proxy_decoder is not None:
            return self.proxy_decoder.pixel_decoder.conv_out.weight
        return self.to_pixels.weight

    def encode(self, images: Tensor, num_tokens: int | None = None) -> Encoded:
        keep = self.check_num_tokens(num_tokens)
        ids = self.quantizer(self.encode_latents(images)).ids[:, :keep]
        lengths = torch.full((images.shape[0],), keep, dtype=torch.long, device=images.device)
        return Encoded(ids, lengths)

    # -- decoder -------------------------------------------------------------------------------------------------------
    def decoder_input(self, codes: Tensor, lengths: Tensor | None = None, fill: str = "pad") -> Tensor:
        """codes (B, L <= K, code_dim) -> decoder sequence (B, N + K, width): [mask tokens; latents], where latent
        positions >= lengths (and >= L) take the pad embedding, or with ``fill="mean"`` the embedded mean code of
        their position (``fill="cut"`` fills with the pad embedding too; :meth:`decode_codes` masks those out)."""
        batch, length = codes.shape[:2]
        # codes from ids are float32 whatever the model's precision (the quantizers compute in float32)
        hidden = self.from_code(codes.to(self.from_code.weight.dtype))
        if fill == "mean":
            filler = self.from_code(self._mean_fill().to(hidden.dtype)).expand(batch, -1, -1)
        else:
            filler = self.pad_token.expand(batch, self.max_tokens, -1)
        if length < self.max_tokens:
            hidden = torch.cat([hidden, filler[:, length:]], dim=1)
        if lengths is not None:
            hidden = torch.where(self.kept_positions(lengths)[..., None], hidden, filler)
        hidden = hidden + self.latent_pos
        masks = (self.mask_token + self.mask_pos).expand(batch, -1, -1)
        sequence = self.with_class_token(torch.cat([masks, hidden], dim=1), self.decoder_class_token)
        return self.decoder_ln_pre(sequence)

    def kept_positions(self, lengths: Tensor) -> Tensor:
        """(B,) kept counts -> (B, K) bool, True at the latent positions a decode reads."""
        return torch.arange(self.max_tokens, device=lengths.device)[None, :] < lengths[:, None]

    def decode_codes(self, codes: Tensor, lengths: Tensor | None = None, fill: str = "pad") -> Tensor:
        """codes (B, L <= K, code_dim) -> images; latent positions >= lengths (and >= L) are filled as ``fill``
        says ("pad", "cut" or "mean", see the module docstring)."""
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
        mask = None
        if fill == "cut":
            kept = torch.full((codes.shape[0],), codes.shape[1], dtype=torch.long, device=codes.device)
            kept = kept if lengths is None else torch.minimum(kept, lengths.to(codes.device))
            if bool((kept < self.max_tokens).any()):
                # keys: every mask token, and the kept latents only; (B, 1, 1, N + K) broadcasts over heads and queries
                every_mask = torch.ones(codes.shape[0], self.num_patches, dtype=torch.bool, device=codes.device)
                parts = [every_mask, self.kept_positions(kept)]
                if self.decoder_class_token is not None:
                    parts.append(every_mask[:, :1])
                mask = torch.cat(parts, dim=1)[:, None, None, :]
        out = self.decoder(self.decoder_input(codes, lengths, fill), mask=mask)[:, : self.num_patches]
        return self.to_image(out)

    def decode(self, ids: Tensor, lengths: Tensor | None = None, fill: str = "pad") -> Tensor:
        """ids (B, L <= K), lengths (B,) -> images (B, C, H, W); ``fill`` as in :meth:`decode_codes`."""
        lengths = self.check_ids(ids, lengths)
        return self.decode_codes(self.quantizer.ids_to_codes(ids), lengths, fill)

    @torch.no_grad()
    def fit_mean_fill(self, ids: Tensor) -> Tensor:
        """Set the fill of ``decode(..., fill="mean")`` from full-length training ids (M, K): the mean quantised
        code vector at each latent position, (K, code_dim), which is also returned."""
        if ids.dim() != 2 or ids.shape[1] != self.max_tokens or ids.shape[0] < 1 or ids.dtype != torch.long:
            raise ValueError(
                f"fit_mean_fill needs full-length training ids, a (M >= 1, {self.max_tokens}) long tensor, "
                f"got {tuple(ids.shape)} {ids.dtype}"
            )
        self.check_ids(ids, None)
        codes = self.quantizer.ids_to_codes(ids.to(self.latent_pos.device))
        self.mean_fill_codes = codes.float().mean(dim=0).to(self.latent_pos.dtype)
        return self.mean_fill_codes

    def _mean_fill(self) -> Tensor:
        if self.mean_fill_codes is None:
            raise ValueError(
                f"{type(self).__name__}.decode(fill='mean') needs the per-position mean codes of a training set: call "
                "fit_mean_fill(ids) first with full-length training ids (e.g. tokenizer.encode(train_images).ids)"
            )
        return self.mean_fill_codes

    def code_vectors(self) -> Tensor:
        return self.quantizer.code_vectors()

    # -- objective -----------------------------------------------------------------------------------------------------
    def sample_lengths(self, batch_size: int, device) -> Tensor | None:
        """Per-image kept token counts during training; None keeps all (fixed-length TiTok)."""
        return None

    def training_loss(self, images: Tensor, criterion=None, step: int = 0) -> tuple[Tensor, dict]:
        """Reconstruction + quantiser loss. ``criterion`` (a :class:`flexar.tokenizers.losses.ReconstructionLoss`)
        replaces the built-in pixel loss with its pixel, perceptual and adversarial terms at tokenizer step ``step``."""
        quantized = self.quantizer(self.encode_latents(images))
        lengths = self.sample_lengths(images.shape[0], images.device)
        recon = self.decode_codes(quantized.codes, lengths)
        return self.reconstruction_objective(images, recon, quantized, criterion, step)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
