"""Input pipelines: real datasets (files that ship offline, or prepared TFDS
directories) and deterministic, resumable batch iterators."""

from velo_scale.data.datasets import DATASETS, load_dataset, load_tfds
from velo_scale.data.fashion_mnist import load_fashion_mnist
from velo_scale.data.iterator import BatchIterator, epoch_batches

__all__ = [
    "DATASETS",
    "BatchIterator",
    "epoch_batches",
    "load_dataset",
    "load_fashion_mnist",
    "load_tfds",
]
