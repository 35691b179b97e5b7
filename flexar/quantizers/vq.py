"""Vector quantization with a learned codebook (van den Oord et al. 2017, "Neural Discrete Representation Learning").

Each latent vector is replaced by its nearest codebook entry; the straight-through estimator copies the gradient
of the code to the latent, and the loss

    ||sg[z] - e||^2 + beta * ||z - sg[e]||^2

pulls the codebook toward the latents (codebook term) and keeps the encoder committed to its codes (commitment
term, beta = 0.25 in VQ-VAE). Both terms are means over elements, as in TiTok's and taming's code.

With ``l2_norm`` (ViT-VQGAN, Yu et al. 2022; TiTok, Yu et al. 2024) latents and codebook entries are normalised
to the unit sphere before the lookup, so the nearest code is the one of highest cosine similarity and the codes the
decoder sees are unit vectors; the loss is taken between the normalised vectors. Distances are always computed in
float32 (outside autocast): in bf16, near-tied distances to a few thousand codes pick the wrong argmin.

Dead-code restart (``dead_code_threshold > 0``; not in VQ-VAE, the usual remedy for codebook collapse, e.g. Jukebox
and Zeghidour et al. 2021): a buffer counts the training steps since each code was last chosen; a code unused for
that many steps is overwritten with a random latent of the current batch. A training step is a forward in training
mode that records gradients (a tokenizer's ``training_loss`` during fitting): a lookup in eval mode (every loaded
tokenizer) or under ``torch.no_grad`` / ``torch.inference_mode`` (tokenizing a dataset, previews, ``reconstruct``)
never moves the codebook. The draw uses a CPU
``torch.Generator`` seeded from the module's step counter (a buffer, so resuming from a checkpoint repeats it),
never the global RNG. Under ``torch.distributed`` the usage counts are summed over ranks and the replacement
latents come from rank 0, so every replica keeps the same codebook. Optimiser state (e.g. Adam moments) of a
restarted row is left as it is.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flexar.quantizers.fsq import QuantizerOutput, codebook_stats


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VQ(nn.Module):
    """Nearest-neighbour vector quantizer with straight-through gradients.

    Args:
        codebook_size: V, number of codes.
        dim: D, size of each code vector.
        beta: weight of the commitment term.
        l2_norm: normalise latents and codes before the lookup (cosine similarity), as in ViT-VQGAN and TiTok.
        dead_code_threshold: restart a code after this many training steps (training-mode forwards that record
            gradients) without use; 0 disables restarts.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        l2_norm: bool = True,
        dead_code_threshold: int = 0,
    ):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"VQ needs codebook_size >= 1 and dim >= 1, got codebook_size={codebook_size}, dim={dim}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0 (0 disables restarts), got {dead_code_threshold}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.l2_norm = l2_norm
        self.dead_code_threshold = dead_code_threshold
        self.embedding = nn.Embedding(codebook_size, dim)
        if l2_norm:
            # A standard normal is isotropic, so normalised rows are uniform on the sphere.
            nn.init.normal_(self.embedding.weight)
        else:
            # taming / TiTok initialisation: codes start near the origin, where fresh encoder outputs are.
            nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}, l2_norm={self.l2_norm}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )

    def _check_dim(self, z: Tensor) -> None:
        if z.shape[-1] != self.dim:
            raise ValueError(f"VQ with dim={self.dim} expects inputs of shape (..., {self.dim}), got {tuple(z.shape)}")

    def code_vectors(self) -> Tensor:
        """(V, D) float32 codebook, unit rows when ``l2_norm``."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """(...) long ids -> (..., D) float32 codes (unit norm when ``l2_norm``)."""
        return F.embedding(ids.long(), self.code_vectors())

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """(..., D) vectors -> (...) long ids of their nearest codes (cosine when ``l2_norm``)."""
        self._check_dim(codes)
        with torch.autocast(device_type=codes.device.type, enabled=False):
            vectors = codes.float()
            if self.l2_norm:
                vectors = F.normalize(vectors, dim=-1)
            return self._nearest(vectors, self.code_vectors())

    @staticmethod
    def _nearest(vectors: Tensor, codebook: Tensor) -> Tensor:
        """(..., D) and (V, D) float32 -> (...) argmin of squared Euclidean distance."""
        flat = vectors.reshape(-1, vectors.shape[-1])
        distances = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(-1)
        return distances.argmin(dim=-1).reshape(vectors.shape[:-1])

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise latents.

        Args:
            z: (..., D) latents, any float dtype.

        Returns:
            :class:`QuantizerOutput` with ``codes`` (..., D) in the dtype of ``z``, ``ids`` (...) long, ``loss`` =
            codebook + beta * commitment (float32 scalar) and logs ``usage``, ``perplexity``, ``codebook_loss``,
            ``commitment_loss``.
        """
        self._check_dim(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            latents = z.float()
            if self.l2_norm:
                latents = F.normalize(latents, dim=-1)
            codebook = self.code_vectors()
            with torch.no_grad():
                ids = self._nearest(latents, codebook)
            quantized = F.embedding(ids, codebook)
            codebook_loss = F.mse_loss(quantized, latents.detach())
            commitment_loss = F.mse_loss(latents, quantized.detach())
            loss = codebook_loss + self.beta * commitment_loss
            codes = latents + (quantized - latents).detach()
        logs = codebook_stats(ids, self.codebook_size)
        logs["codebook_loss"] = codebook_loss.detach()
        logs["commitment_loss"] = commitment_loss.detach()
        # only a step that trains counts usage and restarts codes: a gradient-free lookup (encode) is not one
        if self.training and self.dead_code_threshold > 0 and torch.is_grad_enabled():
            self._restart_dead_codes(ids, z)
        return QuantizerOutput(codes=codes.to(z.dtype), ids=ids, loss=loss, logs=logs)

    @torch.no_grad()
    def _restart_dead_codes(self, ids: Tensor, z: Tensor) -> None:
        """Overwrite codes unused for ``dead_code_threshold`` steps with latents of this batch.

        Runs after the batch was quantised, so this step's outputs and loss still use the old codes.
        ids: (...) chosen ids; z: (..., D) raw latents (the lookup normalises them again when ``l2_norm``).
        """
        counts = torch.bincount(ids.reshape(-1), minlength=self.codebook_size)
        if _distributed():
            dist.all_reduce(counts)
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        self.steps.add_(1)
        dead = (self.unused_steps >= self.dead_code_threshold).nonzero().squeeze(-1)
        num_dead = dead.numel()
        if num_dead == 0:
            return
        latents = z.detach().reshape(-1, self.dim)
        generator = torch.Generator().manual_seed(int(self.steps))
        if latents.shape[0] >= num_dead:
            rows = torch.randperm(latents.shape[0], generator=generator)[:num_dead]
        else:
            rows = torch.randint(latents.shape[0], (num_dead,), generator=generator)
        replacements = latents[rows.to(latents.device)].to(self.embedding.weight.dtype)
        if _distributed():
            dist.broadcast(replacements, src=0)
        self.embedding.weight.data[dead] = replacements
        self.unused_steps[dead] = 0
