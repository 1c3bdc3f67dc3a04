"""Tiny Vision Transformer classification tasks (meta-training family).

`ViTTask` trains `velo_scale.models.vit.ViT` (class token, learned positions,
pre-LN blocks) at tiny sizes on an in-memory image dataset: digits (8x8x1,
patches of 2 or 4 pixels) or Fashion-MNIST (28x28x1, patches of 7 or 14).
The model computes in the dtype of its input images, so the bfloat16
augmentation of `AugmentedTask` (which casts the images and params) runs the
whole forward/backward pass in bfloat16.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from velo_scale.meta.tasks import ClassificationTask
from velo_scale.models.vit import ViT

# Patch sizes (pixels per side) sampled per image side.
PATCHES = {8: (2, 4), 28: (7, 14)}


@dataclasses.dataclass(frozen=True, eq=False)
class ViTTask(ClassificationTask):
    """A tiny ViT classifier; images f32[n, H, W, C] with H, W multiples of
    `patch`. `hidden` is unused (kept from `ClassificationTask`).

    Attributes:
      patch: patch size; width: model width D; depth: encoder blocks;
      num_heads: attention heads (divide width); mlp_dim: MLP hidden size.
    """

    patch: int = 4
    width: int = 16
    depth: int = 1
    num_heads: int = 2
    mlp_dim: int = 32
    name: str = "vit"

    def __post_init__(self):
        h, w = self.images.shape[1:3]
        if h % self.patch or w % self.patch:
            raise ValueError(
                f"images {h}x{w} are not a multiple of patch={self.patch}."
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"width={self.width} must be divisible by num_heads={self.num_heads}."
            )

    @property
    def tokens_per_example(self) -> int:
        """Tokens per image (patches + class token), for the cost model."""
        h, w = self.images.shape[1:3]
        return (h // self.patch) * (w // self.patch) + 1

    def model(self, dtype: Any = np.float32) -> ViT:
        return ViT(
            patch=self.patch,
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            num_classes=self.num_classes,
            dtype=dtype,
        )

    def init(self, key: jax.Array) -> dict[str, Any]:
        """ViT params (flax names, unboxed); weights of rank >= 2 other than
        the position embedding are multiplied by `init_scale`."""
        variables = self.model().init(key, np.zeros((1, *self.images.shape[1:])))
        params = nn.meta.unbox(variables["params"])
        return jax.tree_util.tree_map_with_path(
            lambda path, p: (
                p * self.init_scale
                if p.ndim >= 2 and "pos_embedding" not in jax.tree_util.keystr(path)
                else p
            ),
            params,
        )

    def loss(self, params: dict[str, Any], batch: dict[str, Any]) -> jax.Array:
        x = batch["x"]
        logits = self.model(x.dtype).apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(np.float32), batch["y"]
        ).mean()


def sample_vit_task(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, name: str
) -> ViTTask:
    """A tiny ViT on (images, labels): patch from `PATCHES` by image side,
    width in {16, 32}, depth in {1, 2}, 2 heads, mlp_dim = 2 * width,
    batch_size in {32, 64}, init_scale log-uniform in [0.5, 2]."""
    side = images.shape[1]
    if side not in PATCHES:
        raise ValueError(f"no patch sizes for {side}x{side} images: {PATCHES}.")
    width = int(rng.choice([16, 32]))
    return ViTTask(
        images=images,
        labels=labels,
        batch_size=int(rng.choice([32, 64])),
        init_scale=float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))),
        patch=int(rng.choice(PATCHES[side])),
        width=width,
        depth=int(rng.integers(1, 3)),
        num_heads=2,
        mlp_dim=2 * width,
        name=name,
    )
