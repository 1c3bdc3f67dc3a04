"""Small image classifiers for CPU runs: an MLP and a LeNet-style CNN.

Weights carry flax logical axis names (`embed`, `mlp`, `conv_in`,
`conv_out`, `vocab`...) so `train.logical_axis_rules` decides how they shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def _dense(
    features: int, axes: tuple[str, str], dtype: Any, param_dtype: Any, name: str
):
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


class MLP(nn.Module):
    """Flattens the input and applies relu hidden layers, then a linear head.

    Attributes:
      hidden: widths of the hidden layers.
      num_classes: output logits.
      dtype: computation dtype; param_dtype: storage dtype of the weights.
    """

    hidden: Sequence[int] = (128,)
    num_classes: int = 10
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [batch, ...] -> logits f32[batch, num_classes]."""
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, width in enumerate(self.hidden):
            x = _dense(
                width, ("embed", "mlp"), self.dtype, self.param_dtype, f"dense{i}"
            )(x)
            x = nn.relu(x)
        head = _dense(
            self.num_classes, ("mlp", "vocab"), self.dtype, self.param_dtype, "head"
        )
        return head(x).astype(jnp.float32)


class CNN(nn.Module):
    """Two 3x3 conv + max-pool stages and a dense head (LeNet-like)."""

    features: Sequence[int] = (32, 64)
    dense: int = 128
    num_classes: int = 10
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [batch, H, W, C] -> logits f32[batch, num_classes]."""
        x = x.astype(self.dtype)
        for i, f in enumerate(self.features):
            x = nn.Conv(
                f,
                (3, 3),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
                ),
                bias_init=nn.with_logical_partitioning(
                    nn.initializers.zeros, ("conv_out",)
                ),
                name=f"conv{i}",
            )(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(
            _dense(self.dense, ("embed", "mlp"), self.dtype, self.param_dtype, "dense")(
                x
            )
        )
        head = _dense(
            self.num_classes, ("mlp", "vocab"), self.dtype, self.param_dtype, "head"
        )
        return head(x).astype(jnp.float32)
