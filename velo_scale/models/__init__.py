"""Flax models with logical-axis annotations (they take arrays, know nothing
of training or data)."""

from velo_scale.models.small import CNN, MLP
from velo_scale.models.vit import ViT

__all__ = ["CNN", "MLP", "ViT"]
