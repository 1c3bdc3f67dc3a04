"""U-Net for MRI reconstruction (Ronneberger et al. 2015; fastMRI's baseline).

The layout of the fastMRI single-coil baseline (Zbontar et al. 2018) as
AlgoPerf trains it: `num_pool_layers` down-sampling stages of a `ConvBlock`
(two 3x3 convolutions without bias, each followed by parameter-free instance
normalisation, leaky ReLU with slope 0.2 and channel-wise dropout) and a 2x2
average pool; a `ConvBlock` bottleneck at twice the last width; then as many
up-sampling stages of a 2x2 stride-2 transposed convolution (`TransposeConvBlock`,
halving the width), concatenation with the skip connection and a `ConvBlock`;
finally a 1x1 convolution (with bias) to one output channel. Images are
real-valued magnitudes `[batch, height, width]`.

Sizes: `UNet()` (32 channels, 4 pool layers; AlgoPerf fastMRI) has 7,756,097
parameters; `UNet.SMALL` (8 channels, 4 pool layers) 484,817.
Kernels carry logical axes (`conv_in`, `conv_out`) for sharding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from velo_scale.workloads.base import gin_configurables

LEAKY_RELU_SLOPE = 0.2
INSTANCE_NORM_EPSILON = 1e-5


def instance_norm(x: jax.Array, epsilon: float = INSTANCE_NORM_EPSILON) -> jax.Array:
    """Parameter-free instance norm over the spatial axes of `[b, h, w, c]`.

    Statistics in (at least) float32; the variance is `E[x^2] - E[x]^2`,
    clamped at 0, as in AlgoPerf's reference.
    """
    dtype = x.dtype
    x = x.astype(jnp.promote_types(jnp.float32, dtype))
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), axis=(1, 2), keepdims=True) - mean**2, 0)
    return ((x - mean) / jnp.sqrt(var + epsilon)).astype(dtype)


def _kernel_init(axes):
    # flax's default initialiser, as AlgoPerf's jax U-Net uses.
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class ConvBlock(nn.Module):
    """Two (3x3 conv -> instance norm -> leaky ReLU -> dropout2d) layers.

    Attributes:
      features: output channels of both convolutions.
      dropout_rate: probability of zeroing a whole channel of an example.
    """

    features: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [b, h, w, c_in] -> [b, h, w, features]."""
        for i in range(2):
            x = nn.Conv(
                self.features,
                (3, 3),
                use_bias=False,
                kernel_init=_kernel_init((None, None, "conv_in", "conv_out")),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i}",
            )(x)
            x = nn.leaky_relu(instance_norm(x), LEAKY_RELU_SLOPE)
            # Dropout2d: one Bernoulli draw per (example, channel).
            x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(
                x, deterministic=not train
            )
        return x


class TransposeConvBlock(nn.Module):
    """2x2 stride-2 transposed conv (no bias) -> instance norm -> leaky ReLU."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [b, h, w, c_in] -> [b, 2h, 2w, features]."""
        x = nn.ConvTranspose(
            self.features,
            (2, 2),
            strides=(2, 2),
            use_bias=False,
            kernel_init=_kernel_init((None, None, "conv_in", "conv_out")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv_transpose",
        )(x)
        return nn.leaky_relu(instance_norm(x), LEAKY_RELU_SLOPE)


class UNet(nn.Module):
    """U-Net mapping a zero-filled reconstruction to the full-sampled image.

    Attributes:
      num_channels: width of the first stage (doubled at every pool layer).
      num_pool_layers: down-/up-sampling stages; height and width should be
        multiples of `2**num_pool_layers` (others are handled by reflect
        padding, as in the reference).
      dropout_rate: channel dropout in every `ConvBlock` (AlgoPerf: 0.0).
      dtype / param_dtype: computation / storage dtypes.
    """

    num_channels: int = 32
    num_pool_layers: int = 4
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # Named sizes, e.g. `UNet(**UNet.SMALL)`.
    ALGOPERF = dict(num_channels=32, num_pool_layers=4)
    SMALL = dict(num_channels=8, num_pool_layers=4)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images: [b, h, w] (normalised magnitudes) -> float32 [b, h, w]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = images.astype(self.dtype)[..., None]
        skips = []
        ch = self.num_channels
        for i in range(self.num_pool_layers):
            x = ConvBlock(ch, self.dropout_rate, name=f"down{i}", **kw)(x, train)
            skips.append(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            ch *= 2
        x = ConvBlock(ch, self.dropout_rate, name="bottleneck", **kw)(x, train)
        for i in range(self.num_pool_layers):
            ch //= 2
            skip = skips.pop()
            x = TransposeConvBlock(ch, name=f"up_transpose{i}", **kw)(x)
            # Odd sizes: reflect-pad one row/column at the bottom/right.
            pad_h, pad_w = skip.shape[1] - x.shape[1], skip.shape[2] - x.shape[2]
            if pad_h or pad_w:
                x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), "reflect")
            x = jnp.concatenate([x, skip], axis=-1)
            x = ConvBlock(ch, self.dropout_rate, name=f"up{i}", **kw)(x, train)
        x = nn.Conv(
            1,
            (1, 1),
            kernel_init=_kernel_init((None, None, "conv_in", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            name="head",
            **kw,
        )(x)
        return x[..., 0].astype(jnp.float32)


def unet_num_params(num_channels: int = 32, num_pool_layers: int = 4) -> int:
    """The parameter count of `UNet` in closed form (convs have no bias,
    instance norm no parameters; only the 1x1 head has a bias)."""
    total, c_in, ch = 0, 1, num_channels
    for _ in range(num_pool_layers):
        total += 9 * c_in * ch + 9 * ch * ch
        c_in, ch = ch, ch * 2
    total += 9 * c_in * ch + 9 * ch * ch  # bottleneck
    for _ in range(num_pool_layers):
        total += 4 * ch * (ch // 2)  # transposed conv
        total += 9 * ch * (ch // 2) + 9 * (ch // 2) ** 2  # conv on the concat
        ch //= 2
    return total + ch + 1  # 1x1 head with bias


GIN_CONFIGURABLES = gin_configurables(UNet)
