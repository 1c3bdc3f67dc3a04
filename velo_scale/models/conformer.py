"""Conformer (Gulati et al. 2020) CTC speech recogniser, AlgoPerf's layout.

Normalised log-mel frames go through SpecAugment (training only), a 4x
convolutional time subsampling and a stack of Conformer blocks

    x = x + 1/2 FFN(x);  x = x + MHSA(x);  x = x + Conv(x);  x = x + 1/2 FFN(x)
    x = LayerNorm(x)

and a linear layer gives per-frame logits for CTC. The convolution module is
LN -> GLU (two dense layers) -> depthwise conv -> BatchNorm -> swish -> dense;
attention scales queries by a learned per-dimension factor (lingvo's
`per_dim_scale`). BatchNorm here (and in `velo_scale.models.deepspeech`)
ignores padding frames and keeps its running statistics in the `batch_stats`
collection.

Sizes: `Conformer()` is AlgoPerf's `librispeech_conformer` model (encoder dim
512, 4 blocks, 8 heads, depthwise kernel 5, FFN x4, 1,024 SentencePiece
tokens): 32,321,792 parameters (4,096 BatchNorm statistics). (The Conformer
paper's Conformer-L/M use 16-17 blocks and kernel 32; AlgoPerf uses 4 blocks
and kernel 5.) `Conformer.SMALL` is the CPU variant of the `_small` recipe.

Weights carry logical axes (`embed`, `mlp`, `heads`, `kv`, `vocab`,
`conv_in`, `conv_out`) for sharding. Inputs: `inputs` float32[b, T, F],
`input_paddings` float32[b, T] (1.0 = padding); outputs: logits
float32[b, ceil(T / 4), vocab_size] and their paddings float32[b, ceil(T / 4)].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_XAVIER = nn.initializers.xavier_uniform()


def _init(axes, init=_XAVIER):
    return nn.with_logical_partitioning(init, axes)


def _zeros(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def dense(features, axes, name=None, dtype=jnp.float32, use_bias=True, **kw):
    """`nn.Dense` with a Xavier-uniform kernel annotated `axes` (in, out)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=_init(axes),
        bias_init=_zeros(axes[-1:]),
        dtype=dtype,
        name=name,
        **kw,
    )


def layer_norm(axis="embed", name=None, dtype=jnp.float32):
    """LayerNorm (eps 1e-6) with scale/bias annotated `axis`."""
    return nn.LayerNorm(
        epsilon=1e-6,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)),
        bias_init=_zeros((axis,)),
        dtype=dtype,
        name=name,
    )


def spec_augment(
    rng: jax.Array,
    inputs: jax.Array,
    paddings: jax.Array,
    *,
    freq_masks: int = 2,
    freq_mask_max_bins: int = 27,
    time_masks: int = 10,
    time_mask_max_ratio: float = 0.05,
) -> jax.Array:
    """SpecAugment (Park et al. 2019) masks, AlgoPerf's settings by default.

    Zeroes `freq_masks` bands of width uniform in [0, freq_mask_max_bins) and
    `time_masks` spans of width uniform in [0, time_mask_max_ratio * length)
    frames per example (length = its unpadded frames), at uniform positions.

    Args:
      rng: PRNG key.
      inputs: float[b, T, F]; paddings: float[b, T] (1.0 = padding).

    Returns:
      float[b, T, F], the masked inputs.
    """
    b, t, f = inputs.shape
    k_fw, k_fs, k_tw, k_ts = jax.random.split(rng, 4)

    def spans(key_w, key_s, count, extent, max_width):
        # extent, max_width: float[b]; returns bool[b, count] masks over positions.
        width = (jax.random.uniform(key_w, (b, count)) * max_width[:, None]).astype(
            jnp.int32
        )
        width = jnp.minimum(width, extent[:, None].astype(jnp.int32))
        start = (
            jax.random.uniform(key_s, (b, count)) * (extent[:, None] - width + 1)
        ).astype(jnp.int32)
        return start, width

    def mask(start, width, size):
        pos = jnp.arange(size)[None, None, :]
        inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
        return 1.0 - jnp.any(inside, axis=1).astype(inputs.dtype)  # [b, size]

    if freq_masks:
        full = jnp.full((b,), float(f))
        start, width = spans(
            k_fw, k_fs, freq_masks, full, jnp.full((b,), float(freq_mask_max_bins))
        )
        inputs = inputs * mask(start, width, f)[:, None, :]
    if time_masks and time_mask_max_ratio > 0:
        lengths = jnp.sum(1.0 - paddings, axis=1)
        start, width = spans(
            k_tw, k_ts, time_masks, lengths, time_mask_max_ratio * lengths
        )
        inputs = inputs * mask(start, width, t)[:, :, None]
    return inputs


class MaskedBatchNorm(nn.Module):
    """BatchNorm over all non-padding positions (lingvo / AlgoPerf style).

    `y = (x - mean) * (1 + scale) / sqrt(var + eps) + bias`, `scale` and
    `bias` initialised to 0; training uses the batch statistics of the
    unpadded positions and updates running averages in `batch_stats`
    (`momentum` 0.999, eps 1e-3 as AlgoPerf); evaluation uses the running
    averages. Padding positions are set to 0.

    Attributes:
      axis: logical axis of the feature dimension.
    """

    momentum: float = 0.999
    epsilon: float = 1e-3
    axis: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array, paddings: jax.Array, train: bool) -> jax.Array:
        """x: float[b, T, d]; paddings: float[b, T] -> float[b, T, d]."""
        dim = x.shape[-1]
        axes = (self.axis,)
        ra_mean = self.variable(
            "batch_stats", "mean", nn.with_logical_partitioning(jnp.zeros, axes), (dim,)
        )
        ra_var = self.variable(
            "batch_stats", "var", nn.with_logical_partitioning(jnp.ones, axes), (dim,)
        )
        scale = self.param("scale", _zeros(axes), (dim,))
        bias = self.param("bias", _zeros(axes), (dim,))
        valid = (1.0 - paddings)[..., None].astype(jnp.float32)
        if train:
            xf = x.astype(jnp.float32)
            count = jnp.maximum(jnp.sum(valid), 1.0)
            mean = jnp.sum(xf * valid, axis=(0, 1)) / count
            var = jnp.sum(jnp.square(xf - mean) * valid, axis=(0, 1)) / count
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * var
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x - mean) * ((1.0 + scale) * jax.lax.rsqrt(var + self.epsilon)) + bias
        return (y * valid).astype(x.dtype)


class ConvSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions (ReLU) over (time, frequency), then a
    dense projection of the flattened (frequency x channels) to `features`.

    Attributes:
      features: output width; channels: conv channels (AlgoPerf: = features).
    """

    features: int
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, paddings):
        """x: float[b, T, F]; paddings float[b, T] ->
        (float[b, ceil(T/4), features], paddings float[b, ceil(T/4)])."""
        y = x[..., None].astype(self.dtype)
        for i, axes in enumerate(
            [(None, None, None, "conv_out"), (None, None, "conv_in", "conv_out")]
        ):
            y = nn.Conv(
                self.channels,
                (3, 3),
                strides=(2, 2),
                padding="SAME",
                kernel_init=_init(axes),
                bias_init=_zeros(("conv_out",)),
                dtype=self.dtype,
                name=f"conv{i}",
            )(y)
            paddings = paddings[:, ::2]
            y = nn.relu(y) * (1.0 - paddings)[:, :, None, None].astype(y.dtype)
        b, t, f, c = y.shape
        y = dense(self.features, (None, "embed"), "proj", self.dtype)(
            y.reshape(b, t, f * c)
        )
        return y, paddings


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
    """Transformer position encodings float32[length, dim]: sin on the first
    half, cos on the second, timescales 1 to 10,000."""
    half = dim // 2
    log_increment = math.log(10_000.0) / max(half - 1, 1)
    inv = jnp.exp(-log_increment * jnp.arange(half, dtype=jnp.float32))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
    signal = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    return jnp.pad(signal, ((0, 0), (0, dim % 2)))


class FeedForward(nn.Module):
    """LN -> dense (x expansion) -> swish -> dropout -> dense -> dropout."""

    expansion: int = 4
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, valid, train):
        """x: [b, T, d]; valid: [b, T, 1] (0.0 on padding) -> [b, T, d]."""
        d = x.shape[-1]
        y = layer_norm(dtype=self.dtype)(x)
        y = nn.swish(dense(d * self.expansion, ("embed", "mlp"), "wi", self.dtype)(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y) * valid
        y = dense(d, ("mlp", "embed"), "wo", self.dtype)(y) * valid
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class SelfAttention(nn.Module):
    """Pre-LN multi-head self-attention over unpadded frames, queries scaled by
    `1.4427 * softplus(per_dim_scale) / sqrt(head_dim)` (= 1/sqrt(head_dim) at
    initialisation)."""

    num_heads: int
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, paddings, train):
        """x: [b, T, d]; paddings: [b, T] -> [b, T, d]."""
        d = x.shape[-1]
        head_dim = d // self.num_heads
        y = layer_norm(dtype=self.dtype)(x)
        q, k, v = (
            nn.DenseGeneral(
                (self.num_heads, head_dim),
                kernel_init=_init(("embed", "heads", "kv")),
                bias_init=_zeros(("heads", "kv")),
                dtype=self.dtype,
                name=name,
            )(y)
            for name in ("query", "key", "value")
        )
        per_dim_scale = self.param("per_dim_scale", _zeros(("kv",)), (head_dim,))
        q_scale = jax.nn.softplus(per_dim_scale) / (
            jax.nn.softplus(0.0) * math.sqrt(head_dim)
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * q_scale.astype(q.dtype), k)
        valid = paddings < 0.5
        pair = valid[:, None, :, None] & valid[:, None, None, :]
        logits = jnp.where(pair, logits.astype(jnp.float32), -1e9)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        y = nn.DenseGeneral(
            d,
            axis=(-2, -1),
            kernel_init=_init(("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)),
            dtype=self.dtype,
            name="out",
        )(y)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class ConvModule(nn.Module):
    """LN -> GLU -> depthwise conv -> masked BatchNorm -> swish -> dense."""

    kernel_size: int
    dropout_rate: float = 0.1
    batch_norm_momentum: float = 0.999
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, paddings, train):
        """x: [b, T, d]; paddings: [b, T] -> [b, T, d]."""
        d = x.shape[-1]
        y = layer_norm(dtype=self.dtype)(x)
        gate_in = dense(d, ("embed", "mlp"), "glu_value", self.dtype)(y)
        gate = dense(d, ("embed", "mlp"), "glu_gate", self.dtype)(y)
        y = gate_in * jax.nn.sigmoid(gate) * (1.0 - paddings)[..., None]
        y = nn.Conv(
            d,
            (self.kernel_size,),
            padding="SAME",
            feature_group_count=d,
            use_bias=False,
            kernel_init=_init((None, None, "mlp")),
            dtype=self.dtype,
            name="depthwise",
        )(y)
        y = MaskedBatchNorm(self.batch_norm_momentum, axis="mlp", name="norm")(
            y, paddings, train
        )
        y = dense(d, ("mlp", "embed"), "out", self.dtype)(nn.swish(y))
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class ConformerBlock(nn.Module):
    """Macaron FFN halves around attention and convolution, then LayerNorm."""

    num_heads: int
    kernel_size: int
    ffn_expansion: int = 4
    dropout_rate: float = 0.1
    batch_norm_momentum: float = 0.999
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, paddings, train):
        """x: [b, T, d]; paddings: [b, T] -> [b, T, d]."""
        valid = (1.0 - paddings)[..., None].astype(x.dtype)
        ffn = dict(
            expansion=self.ffn_expansion,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
        )
        x = x + 0.5 * FeedForward(**ffn, name="ffn_in")(x, valid, train)
        x = x + SelfAttention(
            self.num_heads, self.dropout_rate, self.dtype, name="attention"
        )(x, paddings, train)
        x = x + ConvModule(
            self.kernel_size,
            self.dropout_rate,
            self.batch_norm_momentum,
            self.dtype,
            name="conv",
        )(x, paddings, train)
        x = x + 0.5 * FeedForward(**ffn, name="ffn_out")(x, valid, train)
        return layer_norm(dtype=self.dtype, name="ln_out")(x)


def subsampled_features(
    module: nn.Module, inputs: jax.Array, input_paddings: jax.Array, train: bool
) -> tuple[jax.Array, jax.Array]:
    """The front end shared by the Conformer and DeepSpeech: SpecAugment (when
    training and `module.use_specaug`), then the 4x conv subsampling, a
    submodule `subsample` of `module` (call from its compact `__call__`).

    inputs float[b, T, F], input_paddings float[b, T] ->
    (float[b, ceil(T/4), module.encoder_dim], paddings float[b, ceil(T/4)]).
    """
    x = inputs
    if train and module.use_specaug:
        x = spec_augment(module.make_rng("dropout"), x, input_paddings)
    return ConvSubsampling(
        module.encoder_dim,
        module.subsampling_channels or module.encoder_dim,
        module.dtype,
        name="subsample",
    )(x, input_paddings)


class Conformer(nn.Module):
    """Conformer encoder + linear CTC head (AlgoPerf `librispeech_conformer`).

    Attributes:
      vocab_size: output tokens including the CTC blank (id 0).
      encoder_dim: model width d; num_layers: blocks; num_heads.
      conv_kernel_size: depthwise convolution width (frames after subsampling).
      ffn_expansion: FFN hidden width / d.
      subsampling_channels: channels of the subsampling convs (None: d).
      dropout_rate: residual and input dropout (AlgoPerf 0.1).
      use_specaug: SpecAugment while training (AlgoPerf: yes).
      batch_norm_momentum: running-average decay.
      dtype: computation dtype (params are float32).
    """

    vocab_size: int = 1024
    encoder_dim: int = 512
    num_layers: int = 4
    num_heads: int = 8
    conv_kernel_size: int = 5
    ffn_expansion: int = 4
    subsampling_channels: int | None = None
    dropout_rate: float = 0.1
    use_specaug: bool = True
    batch_norm_momentum: float = 0.999
    dtype: Any = jnp.float32

    ALGOPERF = dict(encoder_dim=512, num_layers=4, num_heads=8, conv_kernel_size=5)
    SMALL = dict(
        encoder_dim=96,
        num_layers=2,
        num_heads=4,
        conv_kernel_size=5,
        ffn_expansion=2,
        subsampling_channels=16,
    )

    @nn.compact
    def __call__(
        self, inputs: jax.Array, input_paddings: jax.Array, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """inputs float[b, T, F], input_paddings float[b, T] ->
        (logits float32[b, ceil(T/4), vocab_size], paddings float32[b, ceil(T/4)]).
        """
        x, paddings = subsampled_features(self, inputs, input_paddings, train)
        x = x + sinusoidal_positions(x.shape[1], self.encoder_dim).astype(x.dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i in range(self.num_layers):
            x = ConformerBlock(
                self.num_heads,
                self.conv_kernel_size,
                self.ffn_expansion,
                self.dropout_rate,
                self.batch_norm_momentum,
                self.dtype,
                name=f"block{i:02d}",
            )(x, paddings, train)
        x = layer_norm(dtype=self.dtype, name="ln_final")(x)
        logits = dense(self.vocab_size, ("embed", "vocab"), "head", self.dtype)(x)
        return logits.astype(jnp.float32), paddings.astype(jnp.float32)


GIN_CONFIGURABLES = {"Conformer": Conformer}
