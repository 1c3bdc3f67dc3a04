"""DeepSpeech 2 (Amodei et al. 2016) CTC speech recogniser, AlgoPerf's layout.

Normalised log-mel frames go through SpecAugment (training only), the same 4x
convolutional subsampling as `velo_scale.models.conformer` (two 3x3 stride-2
convs and a dense projection, no positional encoding), then

    num_lstm_layers x  x = x + BiLSTM(BatchNorm(x))
    num_ffn_layers  x  x = x + dropout(relu(Dense(BatchNorm(x))))

and LayerNorm + a linear layer for CTC logits. Each BiLSTM runs a forward and a
backward LSTM of `encoder_dim / 2` units over the unpadded frames of every
sequence and concatenates them. BatchNorm ignores padding frames
(`MaskedBatchNorm`, statistics in `batch_stats`).

Sizes: `DeepSpeech()` is AlgoPerf's `librispeech_deepspeech` model (encoder
dim 512, 6 BiLSTM layers of 2 x 256 units, 3 FFN layers, 1,024 tokens):
18,381,312 parameters (9,216 BatchNorm statistics). `DeepSpeech.SMALL` is the
CPU variant of the `_small` recipe.

Inputs: `inputs` float32[b, T, F], `input_paddings` float32[b, T] (1.0 =
padding); outputs: logits float32[b, ceil(T / 4), vocab_size] and their
paddings float32[b, ceil(T / 4)].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from velo_scale.models.conformer import (
    MaskedBatchNorm,
    dense,
    layer_norm,
    subsampled_features,
)


def reverse_padded(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverses each sequence's first `lengths[i]` steps; the padding steps
    stay after them (themselves reversed). x float[b, T, ...], lengths int[b]
    -> same shape; applying it twice is the identity."""
    t = x.shape[1]
    index = (jnp.arange(t - 1, -1, -1)[None, :] + lengths[:, None]) % t  # [b, T]
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


class LSTM(nn.Module):
    """One-direction LSTM over a batch of sequences (gates i, f, g, o).

    `z_t = x_t W + h_{t-1} U + b`; the input projection of all steps is one
    matmul before the time scan. Parameters: `input_kernel` [d_in, 4h]
    (LeCun normal), `recurrent_kernel` [h, 4h] (orthogonal), `bias` [4h]
    (zeros) - as many as flax's OptimizedLSTMCell, which AlgoPerf uses.
    """

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[b, T, d_in] -> hidden states float[b, T, hidden]."""
        h = self.hidden
        w = self.param(
            "input_kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
            (x.shape[-1], 4 * h),
        )
        u = self.param(
            "recurrent_kernel",
            nn.with_logical_partitioning(nn.initializers.orthogonal(), (None, "mlp")),
            (h, 4 * h),
        )
        b = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            (4 * h,),
        )
        projected = (x.astype(self.dtype) @ w.astype(self.dtype)).astype(
            jnp.float32
        ) + b

        def step(carry, z_x):
            c, h_prev = carry
            z = z_x + (h_prev.astype(self.dtype) @ u.astype(self.dtype)).astype(
                jnp.float32
            )
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_new = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h_new), h_new

        zeros = jnp.zeros((x.shape[0], h), jnp.float32)
        _, hs = jax.lax.scan(step, (zeros, zeros), projected.swapaxes(0, 1))
        return hs.swapaxes(0, 1).astype(x.dtype)


class BiLSTM(nn.Module):
    """Forward and backward LSTMs over the unpadded frames, concatenated."""

    hidden: int
    bidirectional: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, paddings: jax.Array) -> jax.Array:
        """x: float[b, T, d]; paddings: float[b, T] -> float[b, T, 2 * hidden]
        (hidden without `bidirectional`), zero on padding frames."""
        outputs = [LSTM(self.hidden, self.dtype, name="forward")(x)]
        if self.bidirectional:
            lengths = jnp.sum(paddings < 0.5, axis=1).astype(jnp.int32)
            backward = LSTM(self.hidden, self.dtype, name="backward")(
                reverse_padded(x, lengths)
            )
            outputs.append(reverse_padded(backward, lengths))
        y = jnp.concatenate(outputs, axis=-1)
        return y * (1.0 - paddings)[..., None].astype(y.dtype)


class DeepSpeech(nn.Module):
    """DeepSpeech 2 with residual BiLSTM and FFN layers
    (AlgoPerf `librispeech_deepspeech`).

    Attributes:
      vocab_size: output tokens including the CTC blank (id 0).
      encoder_dim: model width d (each LSTM direction has d / 2 units).
      num_lstm_layers, num_ffn_layers: residual layers.
      subsampling_channels: channels of the subsampling convs (None: d).
      dropout_rate: after the subsampling and in the FFN layers (0.1).
      use_specaug: SpecAugment while training (AlgoPerf: yes).
      bidirectional: BiLSTMs (AlgoPerf) or forward LSTMs of d units.
      batch_norm_momentum: running-average decay.
      dtype: computation dtype (params are float32).
    """

    vocab_size: int = 1024
    encoder_dim: int = 512
    num_lstm_layers: int = 6
    num_ffn_layers: int = 3
    subsampling_channels: int | None = None
    dropout_rate: float = 0.1
    use_specaug: bool = True
    bidirectional: bool = True
    batch_norm_momentum: float = 0.999
    dtype: Any = jnp.float32

    ALGOPERF = dict(encoder_dim=512, num_lstm_layers=6, num_ffn_layers=3)
    SMALL = dict(
        encoder_dim=128, num_lstm_layers=2, num_ffn_layers=1, subsampling_channels=16
    )

    @nn.compact
    def __call__(
        self, inputs: jax.Array, input_paddings: jax.Array, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """inputs float[b, T, F], input_paddings float[b, T] ->
        (logits float32[b, ceil(T/4), vocab_size], paddings float32[b, ceil(T/4)]).
        """
        x, paddings = subsampled_features(self, inputs, input_paddings, train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        bn = dict(momentum=self.batch_norm_momentum)
        hidden = self.encoder_dim // 2 if self.bidirectional else self.encoder_dim
        for i in range(self.num_lstm_layers):
            y = MaskedBatchNorm(**bn, name=f"lstm{i}_norm")(x, paddings, train)
            x = x + BiLSTM(hidden, self.bidirectional, self.dtype, name=f"lstm{i}")(
                y, paddings
            )
        valid = (1.0 - paddings)[..., None].astype(x.dtype)
        for i in range(self.num_ffn_layers):
            y = MaskedBatchNorm(**bn, name=f"ffn{i}_norm")(x, paddings, train)
            y = nn.relu(
                dense(self.encoder_dim, ("embed", "mlp"), f"ffn{i}", self.dtype)(y)
            )
            x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y * valid)
        x = layer_norm(dtype=self.dtype, name="ln_final")(x)
        logits = dense(self.vocab_size, ("embed", "vocab"), "head", self.dtype)(x)
        return logits.astype(jnp.float32), paddings.astype(jnp.float32)


GIN_CONFIGURABLES = {"DeepSpeech": DeepSpeech}
