"""ResNet v1.5 with BatchNorm (He et al. 2016), AlgoPerf's ImageNet layout.

The AlgoPerf `imagenet_resnet` model (a fork of the Flax ImageNet example):
a 7x7/2 stem conv + BatchNorm + ReLU + 3x3/2 max-pool, then stages of
residual blocks (`num_filters * 2**i` filters in stage i; the first block of
every stage but the first has stride 2, on its 3x3 conv: "v1.5"), global
average pooling and a dense head. Convs have no bias; BatchNorm uses momentum
0.9 and epsilon 1e-5, and the last BatchNorm of every residual branch starts
with scale `bn_init_scale` (0: each block starts as the identity). A 1x1
projection conv + BatchNorm carries the shortcut when the shape changes.

`ResNet(**ResNet.R50)` is ResNet-50 (bottleneck blocks [3, 4, 6, 3]):
25,557,032 parameters for 1000 classes (`RESNET50_NUM_PARAMS`).
`small_stem=True` swaps the stem for a 3x3/1 conv without max-pool, for
28x28 or 32x32 images.

Running statistics live in the `batch_stats` collection: call with
`train=True` and `mutable=["batch_stats"]` to normalise by the batch and
update them, with `train=False` to normalise by them. Conv kernels carry the
logical axes `(None, None, "conv_in", "conv_out")`, the head
`("embed", "vocab")` (initialised N(0, 0.01^2), as AlgoPerf's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

RESNET50_NUM_PARAMS = 25_557_032  # 1000 classes, BatchNorm scale/bias included.

_CONV_AXES = (None, None, "conv_in", "conv_out")


def _conv(features, kernel, strides=(1, 1), *, name, dtype, param_dtype, **kw):
    return nn.Conv(
        features,
        kernel,
        strides,
        use_bias=False,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), _CONV_AXES
        ),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        **kw,
    )


class BottleneckBlock(nn.Module):
    """1x1 (filters) -> 3x3 (filters, stride) -> 1x1 (4 * filters), each
    followed by BatchNorm; ReLU after the first two and after the sum."""

    filters: int
    strides: tuple[int, int]
    norm: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]
    bn_init_scale: float

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [batch, H, W, C] -> [batch, H / stride, W / stride, 4 * filters]."""
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), self.strides, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(4 * self.filters, (1, 1), name="conv3")(y)
        y = self.norm(name="bn3", scale_init=_scale(self.bn_init_scale))(y)
        return nn.relu(_shortcut(self, x, y) + y)


class BasicBlock(nn.Module):
    """3x3 (filters, stride) -> 3x3 (filters), each followed by BatchNorm (the
    ResNet-18/34 block; for small variants)."""

    filters: int
    strides: tuple[int, int]
    norm: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]
    bn_init_scale: float

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [batch, H, W, C] -> [batch, H / stride, W / stride, filters]."""
        y = self.conv(self.filters, (3, 3), self.strides, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        y = self.norm(name="bn2", scale_init=_scale(self.bn_init_scale))(y)
        return nn.relu(_shortcut(self, x, y) + y)


def _scale(value: float):
    return nn.with_logical_partitioning(nn.initializers.constant(value), ("conv_out",))


def _shortcut(block: nn.Module, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """The identity, or a strided 1x1 conv + BatchNorm when shapes differ."""
    if x.shape == y.shape and tuple(block.strides) == (1, 1):
        return x
    x = block.conv(y.shape[-1], (1, 1), block.strides, name="conv_proj")(x)
    return block.norm(name="bn_proj")(x)


class ResNet(nn.Module):
    """ResNet v1.5 image classifier with BatchNorm.

    Attributes:
      stage_sizes: residual blocks per stage.
      num_filters: filters of the stem and of stage 0 (doubling per stage).
      bottleneck: bottleneck blocks (output 4x filters) or basic blocks.
      small_stem: a 3x3/1 stem conv without max-pool (small images) instead
        of the 7x7/2 conv + 3x3/2 max-pool.
      num_classes: logits.
      bn_momentum, bn_epsilon: BatchNorm running-average decay and epsilon.
      bn_init_scale: initial scale of the last BatchNorm of each residual
        branch (AlgoPerf: 0).
      dtype / param_dtype: computation / storage dtypes (BatchNorm statistics
        are float32).
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    num_filters: int = 64
    bottleneck: bool = True
    small_stem: bool = False
    num_classes: int = 1000
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_init_scale: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # Named sizes, usable from gin as `ResNet.stage_sizes = (3, 4, 6, 3)` etc.
    R50 = dict(stage_sizes=(3, 4, 6, 3), num_filters=64, bottleneck=True)
    R18 = dict(stage_sizes=(2, 2, 2, 2), num_filters=64, bottleneck=False)

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool | None = None) -> jnp.ndarray:
        """images: [batch, H, W, C] -> f32 logits [batch, num_classes].

        `train=True` normalises by batch statistics and updates the running
        averages (apply with `mutable=["batch_stats"]`); `train=False` uses
        the running averages.
        """
        if train is None:
            raise ValueError(
                "ResNet needs train=True (batch statistics, updates batch_stats) or "
                "train=False (running averages); with the Classification workload "
                "set Classification.train_flag = True."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(_conv, **kw)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            scale_init=_scale(1.0),
            bias_init=nn.with_logical_partitioning(
                nn.initializers.zeros, ("conv_out",)
            ),
            **kw,
        )
        x = images.astype(self.dtype)
        if self.small_stem:
            x = conv(self.num_filters, (3, 3), name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
        else:
            x = conv(
                self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
                name="conv_init",
            )(x)  # fmt: skip
            x = nn.relu(norm(name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_cls = BottleneckBlock if self.bottleneck else BasicBlock
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                x = block_cls(
                    self.num_filters * 2**i,
                    strides=(2, 2) if i > 0 and j == 0 else (1, 1),
                    norm=norm,
                    conv=conv,
                    bn_init_scale=self.bn_init_scale,
                    name=f"stage{i}_block{j}",
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        head = nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.01), ("embed", "vocab")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            name="head",
            **kw,
        )
        return head(x).astype(jnp.float32)


GIN_CONFIGURABLES = {"ResNet": ResNet}
