"""Fashion-MNIST (Xiao et al. 2017) from its original idx files.

The files ship in Debian's `dataset-fashion-mnist` package
(`/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`);
`$VELO_SCALE_FASHION_MNIST` points elsewhere.
"""

from __future__ import annotations

import gzip
import os
import pathlib
from typing import NamedTuple

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV = "VELO_SCALE_FASHION_MNIST"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class Split(NamedTuple):
    """images: uint8[n, 28, 28]; labels: int32[n] in [0, 10)."""

    images: np.ndarray
    labels: np.ndarray


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(
            f"{path} is not an idx file (magic {got:#x}, want {magic:#x})."
        )
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", data_dir: str | None = None) -> Split:
    """Loads one split ('train': 60,000 images, 'test': 10,000)."""
    root = pathlib.Path(data_dir or os.environ.get(ENV) or DEFAULT_DIR)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {root}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian) or set "
            f"${ENV} to a directory holding {images.name} and {labels.name}."
        )
    x = _read_idx(images, 0x803)
    y = _read_idx(labels, 0x801).astype(np.int32)
    if len(x) != len(y):
        raise ValueError(f"{images} has {len(x)} images but {labels} {len(y)} labels.")
    return Split(x, y)
