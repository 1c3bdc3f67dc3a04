"""DLRM (Naumov et al. 2019), the "DLRM-small" of AlgoPerf's Criteo 1TB task.

Dense features go through a bottom MLP to a vector of the embedding width;
each categorical id looks up one row of a single shared embedding table (the
ids of all 26 columns index the same `vocab_size` rows, modulo `vocab_size`,
as in AlgoPerf); the dot products between every pair of those 27 vectors
(upper triangle with the diagonal, 27 * 28 / 2 = 378 values) and the bottom
MLP output feed a top MLP that ends in one logit.

Full size (`DLRMSmall()`, AlgoPerf's defaults): 13 dense + 26 categorical
features, vocab_size 4,194,304 = 32 * 128 * 1024, embed_dim 128, bottom MLP
512-256-128, top MLP 1024-1024-512-256-1: 539,267,457 params, of which
536,870,912 (99.6%) are the embedding table, 2 GiB in float32.

Sharding: the table's rows carry the logical axis `vocab` (-> `model` under
the trainer's default rules; the full recipe maps it to every device,
`('data', 'model')`), its columns `embed` (replicated). VeLO keeps
per-parameter state that follows each parameter's sharding: for the table
it is 4.02x the table (momenta for 3 decays and one RMS accumulator, each
table-sized, plus row-sized factored second moments): 2,160,066,560 floats,
8.05 GiB, on top of the 2 GiB table and its 2 GiB dense gradient, which is
why the table is sharded rather than replicated at full size.

Initialisation follows AlgoPerf: table U[0, 1) / sqrt(vocab_size); bottom
kernels Glorot-uniform, top kernels N(0, 2 / (fan_in + fan_out)); biases
N(0, 1 / fan_out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from velo_scale.workloads.base import gin_configurables


def _normal_stddev(stddev: float):
    return nn.initializers.normal(stddev=stddev)


def _table_init(vocab_size: int):
    def init(key, shape, dtype=jnp.float32):
        scale = 1.0 / np.sqrt(vocab_size)
        return jax.random.uniform(key, shape, dtype) * jnp.asarray(scale, dtype)

    return init


def _axes(layer: int) -> tuple[tuple[str, str], tuple[str]]:
    """Logical axes of MLP layer `layer`'s kernel and bias: even layers split
    their outputs (`mlp`), odd layers their inputs (Megatron pairs)."""
    if layer % 2 == 0:
        return ("embed", "mlp"), ("mlp",)
    return ("mlp", "embed"), ("embed",)


def dot_interact(features: jax.Array) -> jax.Array:
    """Pairwise dot products of feature vectors.

    Args:
      features: [batch, f, d], the bottom MLP output and the f - 1 embeddings.

    Returns:
      [batch, f * (f + 1) / 2]: `<x_i, x_j>` for `i <= j` in row-major order
      of the upper triangle (diagonal included), as AlgoPerf's DLRM-small.
    """
    gram = jnp.einsum("bid,bjd->bij", features, features)
    rows, cols = np.triu_indices(features.shape[1])
    return gram[:, rows, cols]


class DLRMSmall(nn.Module):
    """DLRM-small: bottom MLP, shared embedding table, dot interaction, top MLP.

    Attributes:
      vocab_size: rows of the one embedding table shared by all columns.
      embed_dim: embedding width; the bottom MLP's last width must equal it.
      mlp_bottom_dims: widths of the bottom MLP (ReLU after each layer).
      mlp_top_dims: widths of the top MLP, ending in 1 (ReLU between).
      dropout_rate: dropout after the top MLP's second-to-last layer
        (AlgoPerf default 0).
      dtype / param_dtype: computation / storage dtypes.
    """

    vocab_size: int = 32 * 128 * 1024
    embed_dim: int = 128
    mlp_bottom_dims: Sequence[int] = (512, 256, 128)
    mlp_top_dims: Sequence[int] = (1024, 1024, 512, 256, 1)
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # A CPU-sized variant for the small click data sets.
    SMALL = dict(
        vocab_size=4096,
        embed_dim=16,
        mlp_bottom_dims=(64, 16),
        mlp_top_dims=(64, 32, 1),
    )

    @nn.compact
    def __call__(
        self, dense: jax.Array, sparse: jax.Array, train: bool = False
    ) -> jax.Array:
        """dense: float[batch, 13]; sparse: int[batch, 26] (any non-negative
        ids, taken mod vocab_size) -> float32 logits [batch]."""
        if self.mlp_bottom_dims[-1] != self.embed_dim:
            raise ValueError(
                f"DLRMSmall: the bottom MLP must end in embed_dim={self.embed_dim} "
                f"to interact with the embeddings; got mlp_bottom_dims="
                f"{tuple(self.mlp_bottom_dims)}."
            )
        if self.mlp_top_dims[-1] != 1:
            raise ValueError(
                f"DLRMSmall: the top MLP must end in 1 (the logit); got "
                f"mlp_top_dims={tuple(self.mlp_top_dims)}."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense.astype(self.dtype)
        for i, width in enumerate(self.mlp_bottom_dims):
            kernel_axes, bias_axes = _axes(i)
            x = nn.Dense(
                width,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.glorot_uniform(), kernel_axes
                ),
                bias_init=nn.with_logical_partitioning(
                    _normal_stddev(np.sqrt(1.0 / width)), bias_axes
                ),
                name=f"bottom_{i}",
                **kw,
            )(x)
            x = nn.relu(x)
        bottom = x  # [b, embed_dim]

        table = self.param(
            "embedding_table",
            nn.with_logical_partitioning(
                _table_init(self.vocab_size), ("vocab", "embed")
            ),
            (self.vocab_size, self.embed_dim),
            self.param_dtype,
        )
        ids = jnp.asarray(sparse, jnp.int32) % self.vocab_size
        embedded = jnp.take(table, ids, axis=0).astype(self.dtype)  # [b, 26, d]
        features = jnp.concatenate([bottom[:, None, :], embedded], axis=1)
        y = jnp.concatenate([bottom, dot_interact(features)], axis=-1)

        fan_in = y.shape[-1]
        for i, width in enumerate(self.mlp_top_dims):
            kernel_axes, bias_axes = _axes(i)
            y = nn.Dense(
                width,
                kernel_init=nn.with_logical_partitioning(
                    _normal_stddev(np.sqrt(2.0 / (fan_in + width))), kernel_axes
                ),
                bias_init=nn.with_logical_partitioning(
                    _normal_stddev(np.sqrt(1.0 / width)), bias_axes
                ),
                name=f"top_{i}",
                **kw,
            )(y)
            fan_in = width
            if i < len(self.mlp_top_dims) - 1:
                y = nn.relu(y)
            if self.dropout_rate and i == len(self.mlp_top_dims) - 2:
                y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        return y[:, 0].astype(jnp.float32)


GIN_CONFIGURABLES = gin_configurables(DLRMSmall)
