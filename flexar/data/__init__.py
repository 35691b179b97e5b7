"""Datasets (embedded, torchvision, image folders) and Lightning DataModules."""
from flexar.data.datamodule import ImageDataModule
from flexar.data.datasets import build_dataset, dataset_info

__all__ = ["ImageDataModule", "build_dataset", "dataset_info"]
