"""Reconstruction metrics of a tokenizer on a dataset split: MSE, PSNR and codebook usage, per token count."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from flexar.utils import psnr


@torch.no_grad()
def reconstruction_metrics(
    tokenizer,
    dataset: Dataset,
    num_tokens: int | None = None,
    batch_size: int = 128,
    max_images: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Mean squared error (images in [-1, 1]), PSNR (dB, peak-to-peak 2) and the fraction of the codebook used.

    Returns {"num_tokens", "num_images", "mse", "psnr", "codebook_usage"}; PSNR is computed from the mean MSE.
    """
    tokenizer = tokenizer.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    squared_error, count = 0.0, 0
    used = torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    for images, _ in tqdm(loader, desc=f"reconstruct k={num_tokens or tokenizer.max_tokens}", disable=not progress):
        if max_images is not None and count >= max_images:
            break
        images = images.to(device)
        encoded = tokenizer.encode(images, num_tokens)
        recon = tokenizer.decode(encoded.ids, encoded.lengths).clamp(-1, 1)
        squared_error += torch.sum((recon - images) ** 2).item()
        count += images.shape[0]
        valid = torch.arange(encoded.ids.shape[1], device=device)[None] < encoded.lengths[:, None]
        used[encoded.ids[valid].cpu()] = True
    mse = squared_error / (count * images[0].numel())
    return {
        "num_tokens": num_tokens or tokenizer.max_tokens,
        "num_images": count,
        "mse": mse,
        "psnr": float(psnr(torch.tensor(mse, dtype=torch.float64))),
        "codebook_usage": used.float().mean().item(),
    }
