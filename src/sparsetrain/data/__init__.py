"""Datasets (the bundled CIFAR-10 sample, CIFAR-10/100 python folders), augmentation, batching."""

from sparsetrain.data.augment import normalize, random_crop_flip
from sparsetrain.data.cifar import DATASET_NAMES, DataError, ImageDataset, load_dataset
from sparsetrain.data.loader import BatchLoader

__all__ = [
    "DATASET_NAMES",
    "BatchLoader",
    "DataError",
    "ImageDataset",
    "load_dataset",
    "normalize",
    "random_crop_flip",
]
