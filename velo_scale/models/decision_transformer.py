"""Decision Transformer (Chen et al. 2021): a causal GPT over trajectories.

A trajectory of K steps becomes 3K tokens (R_1, s_1, a_1, R_2, s_2, a_2, ...):
each return-to-go, state and action is embedded by its own linear layer, the
timestep's learned embedding is added to all three (there are no position
embeddings), and a LayerNorm follows. A GPT-2 decoder (pre-LayerNorm blocks
of causal multi-head attention and a ReLU MLP, dropout on embeddings,
attention probabilities and residual branches, a final LayerNorm) runs over
the tokens, and the output at each state token s_t predicts a_t through a
linear layer and tanh. Padding steps (mask 0) are never attended to.

Sizes: `DecisionTransformer.GYM` is the paper's gym configuration (embed 128,
3 layers, 1 head, MLP 512, K = 20, 1000 timestep embeddings, dropout 0.1).
For Hopper (state 11, action 3) it has 726,019 parameters:

    timestep embedding       1000 * 128                        128,000
    R, s, a embeddings       (1 + 11 + 3) * 128 + 3 * 128        2,304
    embedding LayerNorm      2 * 128                               256
    3 blocks x               LN 256 + QKV 49,536 + proj 16,512
                             + LN 256 + MLP 66,048 + 65,664    594,816
    final LayerNorm          2 * 128                               256
    action head              128 * 3 + 3                           387

The official PyTorch module holds 1,676 more, none of which the paper's loss
touches: GPT-2's 1x128 token embedding (the model is fed embeddings) and the
state (1,419) and return (129) prediction heads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_GPT_INIT = nn.initializers.normal(0.02)
_EMBED_INIT = nn.initializers.lecun_normal()
_LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon.


def _kernel(init, axes):
    return nn.with_logical_partitioning(init, axes)


def _zeros(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def _layer_norm(name: str, **kw) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=_LN_EPS,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
        **kw,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token i sees tokens j <= i with
    `key_mask[j]` set."""

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
        """x: [b, n, d]; key_mask: bool[b, n] -> [b, n, d]."""
        n, width = x.shape[-2], x.shape[-1]
        head_dim = width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (
            nn.DenseGeneral(
                (self.num_heads, head_dim),
                kernel_init=_kernel(_GPT_INIT, ("embed", "heads", "kv")),
                bias_init=_zeros(("heads", "kv")),
                name=name,
                **kw,
            )(x)
            for name in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        logits = logits / jnp.sqrt(jnp.float32(head_dim))
        causal = jnp.tril(jnp.ones((n, n), bool))
        allowed = causal[None, None] & key_mask[:, None, None, :]
        # A large finite value keeps all-masked rows (padding queries) finite.
        logits = jnp.where(allowed, logits, -1e9)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            kernel_init=_kernel(_GPT_INIT, ("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)),
            name="out",
            **kw,
        )(y)


class Block(nn.Module):
    """GPT-2 block: x + Drop(Attn(LN(x))), then x + Drop(MLP(LN(x)))."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        y = _layer_norm("ln_attn", **kw)(x)
        y = CausalSelfAttention(
            self.num_heads, self.dropout_rate, name="attention", **kw
        )(y, key_mask, train)
        x = x + drop(y)
        y = _layer_norm("ln_mlp", **kw)(x)
        y = nn.Dense(
            self.mlp_dim, kernel_init=_kernel(_GPT_INIT, ("embed", "mlp")),
            bias_init=_zeros(("mlp",)), name="mlp_in", **kw,
        )(y)  # fmt: skip
        y = nn.Dense(
            x.shape[-1], kernel_init=_kernel(_GPT_INIT, ("mlp", "embed")),
            bias_init=_zeros(("embed",)), name="mlp_out", **kw,
        )(nn.relu(y))  # fmt: skip
        return x + drop(y)


class DecisionTransformer(nn.Module):
    """Predicts a_t from (R_<=t, s_<=t, a_<t) for every step of a window.

    Attributes:
      state_dim, act_dim: sizes of s and a (Hopper: 11, 3).
      embed_dim: token width; num_layers; num_heads.
      mlp_dim: MLP hidden width (None: 4 * embed_dim).
      max_timestep: size of the timestep embedding table (the episode
        length limit; timesteps must be below it).
      dropout_rate: on the embeddings, attention and residual branches.
      action_tanh: squash predicted actions into (-1, 1).
      dtype / param_dtype: computation / storage dtypes.
    """

    state_dim: int = 11
    act_dim: int = 3
    embed_dim: int = 128
    num_layers: int = 3
    num_heads: int = 1
    mlp_dim: int | None = None
    max_timestep: int = 1000
    dropout_rate: float = 0.1
    action_tanh: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # The paper's gym size (usable as DecisionTransformer(**GYM)).
    GYM = dict(embed_dim=128, num_layers=3, num_heads=1, mlp_dim=512)

    @nn.compact
    def __call__(
        self,
        returns_to_go: jax.Array,
        states: jax.Array,
        actions: jax.Array,
        timesteps: jax.Array,
        mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """Action predictions for each step.

        Args:
          returns_to_go: f32[b, K, 1] (scaled, e.g. / 1000).
          states: f32[b, K, state_dim] (normalised).
          actions: f32[b, K, act_dim]; a_t only influences steps after t.
          timesteps: int[b, K] in [0, max_timestep).
          mask: [b, K], nonzero for real steps (None: all real).
          train: enables dropout (needs a "dropout" rng).

        Returns:
          f32[b, K, act_dim]: the prediction of a_t, read at token s_t.
        """
        b, k = states.shape[:2]
        d = self.embed_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if mask is None:
            mask = jnp.ones((b, k), bool)
        mask = mask.astype(bool)

        def embed(x, name):
            return nn.Dense(
                d, kernel_init=_kernel(_EMBED_INIT, (None, "embed")),
                bias_init=_zeros(("embed",)), name=name, **kw,
            )(x.astype(self.dtype))  # fmt: skip

        time = nn.Embed(
            self.max_timestep,
            d,
            embedding_init=_kernel(_GPT_INIT, (None, "embed")),
            name="embed_timestep",
            **kw,
        )(timesteps)
        tokens = jnp.stack(
            [
                embed(returns_to_go, "embed_return") + time,
                embed(states, "embed_state") + time,
                embed(actions, "embed_action") + time,
            ],
            axis=2,
        ).reshape(b, 3 * k, d)  # (R_1, s_1, a_1, R_2, ...)
        x = _layer_norm("embed_ln", **kw)(tokens)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        key_mask = jnp.repeat(mask, 3, axis=1)
        for i in range(self.num_layers):
            x = Block(
                self.num_heads,
                self.mlp_dim or 4 * d,
                self.dropout_rate,
                name=f"block{i}",
                **kw,
            )(x, key_mask, train)
        x = _layer_norm("ln_final", **kw)(x)
        x = x.reshape(b, k, 3, d)[:, :, 1]  # Outputs at the state tokens.
        a = nn.Dense(
            self.act_dim, kernel_init=_kernel(_EMBED_INIT, ("embed", None)),
            bias_init=_zeros((None,)), name="predict_action", **kw,
        )(x)  # fmt: skip
        a = a.astype(jnp.float32)
        return jnp.tanh(a) if self.action_tanh else a


def num_params(
    state_dim: int,
    act_dim: int,
    embed_dim: int = 128,
    num_layers: int = 3,
    mlp_dim: int | None = None,
    max_timestep: int = 1000,
) -> int:
    """The parameter count of `DecisionTransformer` from its sizes."""
    d = embed_dim
    m = mlp_dim or 4 * d
    embeddings = max_timestep * d + (1 + state_dim + act_dim) * d + 3 * d + 2 * d
    block = 2 * d + 3 * (d * d + d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    return embeddings + num_layers * block + 2 * d + d * act_dim + act_dim
