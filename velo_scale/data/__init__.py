"""Input pipelines: real datasets, read from files that ship offline."""

from velo_scale.data.fashion_mnist import load_fashion_mnist

__all__ = ["load_fashion_mnist"]
