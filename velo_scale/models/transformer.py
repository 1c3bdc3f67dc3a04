"""Encoder-decoder Transformer for translation (Vaswani et al. 2017), in
AlgoPerf's WMT layout.

Pre-LayerNorm blocks; a token embedding shared by the encoder input, the
decoder input and the output layer (logits = decoder output times the
embedding transposed, divided by sqrt(width)); fixed sinusoidal position
encodings; attention projections without biases; a ReLU MLP; dropout on
embeddings, attention weights, attention outputs and the MLP. Token 0 is
padding: it is masked out of every attention. The decoder reads the targets
shifted right by one (a 0 in front), so position t predicts target t.

`Transformer.WMT` is AlgoPerf's WMT model: vocabulary 32,000, width 1,024,
6 encoder + 6 decoder layers, 16 heads, MLP width 1,024 (AlgoPerf keeps the
MLP at the model width, unlike Transformer-big's 4,096), max length 256:
133,521,408 parameters (`WMT_NUM_PARAMS`).

Greedy decoding uses `decode=True`: a key/value cache per self-attention
layer (the `cache` collection), one target position per call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# AlgoPerf's WMT Transformer (`Transformer(**Transformer.WMT)`).
WMT_NUM_PARAMS = 133_521_408

_KERNEL_INIT = nn.initializers.xavier_uniform()
_BIAS_INIT = nn.initializers.normal(stddev=1e-6)


def _kernel(axes):
    return nn.with_logical_partitioning(_KERNEL_INIT, axes)


def _bias(axes):
    return nn.with_logical_partitioning(_BIAS_INIT, axes)


def _layer_norm(name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def sinusoidal_positions(max_len: int, width: int) -> np.ndarray:
    """Fixed position encodings: float32[max_len, width].

    The first half of the features are sin(p * w_i), the second half
    cos(p * w_i), with w_i = 10000^(-i / (width / 2 - 1)), i < width / 2.
    """
    half = width // 2
    position = np.arange(max_len, dtype=np.float64)[:, None]
    frequency = np.exp(-np.log(10_000.0) * np.arange(half) / max(half - 1, 1))
    table = np.zeros((max_len, width), np.float32)
    table[:, :half] = np.sin(position * frequency)
    table[:, half : 2 * half] = np.cos(position * frequency)
    return table


def shift_right(targets: jax.Array) -> jax.Array:
    """[b, L] -> [b, L]: a 0 in front, the last token dropped."""
    return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


class Attention(nn.Module):
    """Multi-head dot-product attention, no projection biases.

    With `decode=True` (self-attention of the decoder only) each call handles
    one new position `index` and keeps the keys and values of the earlier
    positions in the `cache` collection (`cached_key`, `cached_value`:
    [b, max_len, heads, head_dim]).
    """

    num_heads: int
    dropout_rate: float = 0.0
    decode: bool = False
    max_len: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        mask: jax.Array | None,
        *,
        train: bool,
        index: jax.Array | None = None,
    ) -> jax.Array:
        """x: [b, q, width] queries from; context: [b, k, width] keys/values
        from; mask: bool [b, 1 or heads, q, k] (True = attend), or None.
        Returns [b, q, width]."""
        width = x.shape[-1]
        head_dim = width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        project = lambda name: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, head_dim),
            kernel_init=_kernel(("embed", "heads", "kv")),
            name=name,
            **kw,
        )
        q = project("query")(x)
        k = project("key")(context)
        v = project("value")(context)
        if self.decode:
            b = x.shape[0]
            shape = (b, self.max_len, self.num_heads, head_dim)
            cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
            start = (0, index, 0, 0)
            cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, start)
            cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, start)
            k, v = cached_k.value, cached_v.value
            mask = (jnp.arange(self.max_len) <= index)[None, None, None, :]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(
            self.dtype
        )
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            kernel_init=_kernel(("heads", "kv", "embed")),
            name="out",
            **kw,
        )(y)


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> ReLU -> dropout -> Dense(width) -> dropout."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.Dense(
            self.mlp_dim,
            kernel_init=_kernel(("embed", "mlp")),
            bias_init=_bias(("mlp",)),
            name="wi",
            **kw,
        )(x)
        y = nn.Dropout(self.dropout_rate)(nn.relu(y), deterministic=not train)
        y = nn.Dense(
            x.shape[-1],
            kernel_init=_kernel(("mlp", "embed")),
            bias_init=_bias(("embed",)),
            name="wo",
            **kw,
        )(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class EncoderBlock(nn.Module):
    """x + Drop(SelfAttn(LN(x))), then + Drop(MLP(LN(.)))."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _layer_norm("ln_attention", **kw)(x)
        y = Attention(
            self.num_heads, self.attention_dropout_rate, name="attention", **kw
        )(y, y, mask, train=train)
        x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = _layer_norm("ln_mlp", **kw)(x)
        return x + MlpBlock(self.mlp_dim, self.dropout_rate, name="mlp", **kw)(
            y, train=train
        )


class DecoderBlock(nn.Module):
    """Causal self-attention, attention to the encoder output, MLP; each
    pre-LN with a residual connection."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    decode: bool = False
    max_len: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        y: jax.Array,
        encoded: jax.Array,
        self_mask: jax.Array | None,
        cross_mask: jax.Array,
        *,
        train: bool,
        index: jax.Array | None = None,
    ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(self.dropout_rate)
        z = _layer_norm("ln_self_attention", **kw)(y)
        z = Attention(
            self.num_heads,
            self.attention_dropout_rate,
            decode=self.decode,
            max_len=self.max_len,
            name="self_attention",
            **kw,
        )(z, z, self_mask, train=train, index=index)
        y = y + drop(z, deterministic=not train)
        z = _layer_norm("ln_cross_attention", **kw)(y)
        z = Attention(
            self.num_heads, self.attention_dropout_rate, name="cross_attention", **kw
        )(z, encoded, cross_mask, train=train)
        y = y + drop(z, deterministic=not train)
        z = _layer_norm("ln_mlp", **kw)(y)
        return y + MlpBlock(self.mlp_dim, self.dropout_rate, name="mlp", **kw)(
            z, train=train
        )


def padding_mask(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """bool [b, 1, q, k]: both tokens are not padding (nonzero ids)."""
    return (queries > 0)[:, None, :, None] & (keys > 0)[:, None, None, :]


class Transformer(nn.Module):
    """Encoder-decoder Transformer over token ids (0 = padding).

    Attributes:
      vocab_size: shared source/target vocabulary size V.
      width: model width (embedding size) D.
      num_layers: blocks in the encoder and, again, in the decoder.
      num_heads: attention heads (D divisible by it).
      mlp_dim: hidden width of the MLPs.
      max_len: longest sequence (position table, decode cache).
      dropout_rate: dropout on embeddings, residual branches and the MLP
        (AlgoPerf: 0.1).
      attention_dropout_rate: dropout on attention weights (AlgoPerf: 0.1).
      decode: autoregressive mode for `decode_step` (key/value caches).
      dtype / param_dtype: computation / storage dtypes.
    """

    vocab_size: int = 32_000
    width: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    mlp_dim: int = 1024
    max_len: int = 256
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # Named sizes (gin: `Transformer.width = 1024` etc.).
    WMT = dict(vocab_size=32_000, width=1024, num_layers=6, num_heads=16,
               mlp_dim=1024, max_len=256)  # fmt: skip
    SMALL = dict(width=128, num_layers=2, num_heads=4, mlp_dim=512)

    def setup(self):
        self.embedding = self.param(
            "shared_embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("vocab", "embed")
            ),
            (self.vocab_size, self.width),
            self.param_dtype,
        )
        kw = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder_blocks = [
            EncoderBlock(name=f"encoderblock_{i}", **kw) for i in range(self.num_layers)
        ]
        self.decoder_blocks = [
            DecoderBlock(
                decode=self.decode,
                max_len=self.max_len,
                name=f"encoderdecoderblock_{i}",
                **kw,
            )
            for i in range(self.num_layers)
        ]
        ln = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder_norm = _layer_norm("encoder_layernorm", **ln)
        self.decoder_norm = _layer_norm("encoderdecoder_layernorm", **ln)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.positions = sinusoidal_positions(self.max_len, self.width)

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0)
        return (x + positions).astype(self.dtype)

    def encode(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
        """inputs: int [b, Ls] -> encoded [b, Ls, D]."""
        x = self._embed(inputs, self.positions[None, : inputs.shape[1]])
        x = self.dropout(x, deterministic=not train)
        mask = padding_mask(inputs, inputs)
        for block in self.encoder_blocks:
            x = block(x, mask, train=train)
        return self.encoder_norm(x)

    def _logits(self, y: jax.Array) -> jax.Array:
        y = self.decoder_norm(y).astype(jnp.float32)
        logits = y @ self.embedding.astype(jnp.float32).T
        return logits / np.sqrt(self.width).astype(np.float32)

    def decode_targets(
        self,
        encoded: jax.Array,
        inputs: jax.Array,
        targets: jax.Array,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Teacher-forced logits: float32 [b, Lt, V]; position t predicts
        targets[:, t] from targets[:, :t] and the encoded inputs."""
        length = targets.shape[1]
        y = self._embed(shift_right(targets), self.positions[None, :length])
        y = self.dropout(y, deterministic=not train)
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        self_mask = padding_mask(targets, targets) & causal
        cross_mask = padding_mask(targets, inputs)
        for block in self.decoder_blocks:
            y = block(y, encoded, self_mask, cross_mask, train=train)
        return self._logits(y)

    def decode_step(
        self,
        encoded: jax.Array,
        inputs: jax.Array,
        tokens: jax.Array,
        index: jax.Array,
    ) -> jax.Array:
        """One autoregressive step (`decode=True`, `mutable=["cache"]`).

        tokens: int [b, 1], the previous output (0 at index 0);
        index: int scalar, the position being predicted.
        Returns float32 logits [b, V] for position `index`.
        """
        pos = jax.lax.dynamic_slice_in_dim(self.positions, index, 1)[None]
        y = self._embed(tokens, pos)
        cross_mask = (inputs > 0)[:, None, None, :]
        for block in self.decoder_blocks:
            y = block(y, encoded, None, cross_mask, train=False, index=index)
        return self._logits(y)[:, 0]

    def __call__(
        self, inputs: jax.Array, targets: jax.Array, *, train: bool = False
    ) -> jax.Array:
        """inputs: int [b, Ls], targets: int [b, Lt] -> logits [b, Lt, V]."""
        encoded = self.encode(inputs, train=train)
        return self.decode_targets(encoded, inputs, targets, train=train)


GIN_CONFIGURABLES = {"Transformer": Transformer}
