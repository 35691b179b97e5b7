"""Datasets (embedded, torchvision, image folders), token and latent caches, and Lightning DataModules."""
from flexar.data.datamodule import GlobalBatchSampler, ImageDataModule
from flexar.data.datasets import build_dataset, dataset_info
from flexar.data.token_cache import (TokenCacheEncoder, TokenCacheWriter, TokenDataModule, TokenDataset, read_meta,
                                     write_token_cache)

__all__ = ["GlobalBatchSampler", "ImageDataModule", "TokenCacheEncoder", "TokenCacheWriter", "TokenDataModule",
           "TokenDataset", "build_dataset", "dataset_info", "read_meta", "write_token_cache"]
