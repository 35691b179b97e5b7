"""Datasets (embedded, torchvision, image folders) and Lightning DataModules."""
from flexar.data.datamodule import ImageDataModule
from flexar.data.datasets import build_dataset, dataset_info
from flexar.data.token_cache import TokenDataModule, TokenDataset, read_meta, write_token_cache

__all__ = ["ImageDataModule", "TokenDataModule", "TokenDataset", "build_dataset", "dataset_info", "read_meta", "write_token_cache"]
