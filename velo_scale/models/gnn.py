"""Graph network (Battaglia et al. 2018) for molecular property prediction.

The AlgoPerf OGBG-molpcba model: node and edge features are embedded to
`latent_dim`, then `num_message_passing_steps` full GraphNetwork blocks update
edges, nodes and a per-graph global vector in turn, each with an MLP
(Dense -> LayerNorm -> activation -> dropout per hidden layer) on the
concatenation of

  edges:   [edge, node[sender], node[receiver], global]
  nodes:   [node, sum of outgoing edges, sum of incoming edges, global]
  globals: [sum of nodes, sum of edges, global]

and a Dense decoder maps the final global vector to one logit per task. The
global vector starts as zeros of width `num_outputs` (as in AlgoPerf, which
fixes the parameter count of the first block). There are no residual
connections.

Graphs arrive padded per example instead of as one concatenated jraph
`GraphsTuple`: `[b, max_nodes, .]` nodes and `[b, max_edges, .]` directed
edges with local `senders`/`receivers` and boolean masks. Padded edges and
nodes are zeroed after every update, so they never reach a real node or a
global sum: outputs do not depend on the padding, nor on the order of nodes.

Sizes: `GNN()` is AlgoPerf's (latent 256, hidden (256,), 5 steps, 128 tasks,
dropout 0.1, ReLU, raw-value Dense embeddings of 9 atom / 3 bond features):
3,554,176 parameters, the count of AlgoPerf's jraph model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# OGB categorical feature vocabularies (`ogb.utils.features`): atomic number,
# chirality, degree, formal charge, number of Hs, radical electrons,
# hybridisation, aromatic, in ring; bond type, bond stereo, conjugated.
OGB_ATOM_VOCAB = (119, 5, 12, 12, 10, 6, 6, 2, 2)
OGB_BOND_VOCAB = (5, 6, 2)

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}


def _init(axes):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


def _zeros(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def _ones(axes):
    return nn.with_logical_partitioning(nn.initializers.ones, axes)


def segment_sum(data: jax.Array, segment_ids: jax.Array, num_segments: int):
    """Per-example segment sums: `out[b, s] = sum_{i: ids[b, i] = s} data[b, i]`.

    Args:
      data: `[b, n, f]`.
      segment_ids: int `[b, n]` in `[0, num_segments)`.
      num_segments: static.

    Returns:
      `[b, num_segments, f]`.
    """
    fn = functools.partial(jax.ops.segment_sum, num_segments=num_segments)
    return jax.vmap(fn)(data, segment_ids)


def gather_nodes(nodes: jax.Array, index: jax.Array) -> jax.Array:
    """`nodes[b, index[b, e]]`: `[b, n, f]`, int `[b, e]` -> `[b, e, f]`."""
    return jax.vmap(lambda x, i: x[i])(nodes, index)


class UpdateMLP(nn.Module):
    """Dense -> LayerNorm -> activation -> dropout, per entry of `hidden_dims`."""

    hidden_dims: Sequence[int]
    activation: str = "relu"
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: `[..., f_in]` -> `[..., hidden_dims[-1]]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, dim in enumerate(self.hidden_dims):
            x = nn.Dense(
                dim, kernel_init=_init(("embed", "mlp")), bias_init=_zeros(("mlp",)),
                name=f"dense{i}", **kw,
            )(x)  # fmt: skip
            x = nn.LayerNorm(
                scale_init=_ones(("mlp",)), bias_init=_zeros(("mlp",)),
                name=f"ln{i}", **kw,
            )(x)  # fmt: skip
            x = _ACTIVATIONS[self.activation](x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return x


class GraphNetworkBlock(nn.Module):
    """One GraphNetwork step: edge, node and global updates (sum aggregation)."""

    hidden_dims: Sequence[int]
    activation: str = "relu"
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        nodes: jax.Array,
        edges: jax.Array,
        globals_: jax.Array,
        senders: jax.Array,
        receivers: jax.Array,
        node_mask: jax.Array,
        edge_mask: jax.Array,
        *,
        train: bool,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """nodes `[b, n, d]`, edges `[b, e, d]`, globals `[b, g]`, senders and
        receivers int `[b, e]`, masks bool `[b, n]`, `[b, e]` -> updated
        `(nodes [b, n, h], edges [b, e, h], globals [b, h])`."""
        mlp = functools.partial(
            UpdateMLP, self.hidden_dims, self.activation, self.dropout_rate,
            dtype=self.dtype, param_dtype=self.param_dtype,
        )  # fmt: skip
        num_nodes, num_edges = nodes.shape[1], edges.shape[1]
        edge_globals = jnp.broadcast_to(
            globals_[:, None], (globals_.shape[0], num_edges, globals_.shape[-1])
        )
        edges = mlp(name="edge_mlp")(
            jnp.concatenate(
                [
                    edges,
                    gather_nodes(nodes, senders),
                    gather_nodes(nodes, receivers),
                    edge_globals.astype(edges.dtype),
                ],
                axis=-1,
            ),
            train=train,
        )
        edges = jnp.where(edge_mask[..., None], edges, 0)
        node_globals = jnp.broadcast_to(
            globals_[:, None], (globals_.shape[0], num_nodes, globals_.shape[-1])
        )
        nodes = mlp(name="node_mlp")(
            jnp.concatenate(
                [
                    nodes,
                    segment_sum(edges, senders, num_nodes),
                    segment_sum(edges, receivers, num_nodes),
                    node_globals.astype(nodes.dtype),
                ],
                axis=-1,
            ),
            train=train,
        )
        nodes = jnp.where(node_mask[..., None], nodes, 0)
        globals_ = mlp(name="global_mlp")(
            jnp.concatenate(
                [nodes.sum(axis=1), edges.sum(axis=1), globals_.astype(nodes.dtype)],
                axis=-1,
            ),
            train=train,
        )
        return nodes, edges, globals_


class GNN(nn.Module):
    """Graph network predicting `num_outputs` logits per graph.

    Attributes:
      num_outputs: tasks (logits per graph); 128 for OGBG-molpcba.
      latent_dim: width of the node and edge embeddings.
      hidden_dims: widths of each update MLP (the last is the latent width
        of every later step).
      num_message_passing_steps: GraphNetwork blocks.
      dropout_rate: after every MLP activation (training only).
      activation: "relu" (AlgoPerf), "gelu" or "silu" (its variants).
      embedding: "dense": a Dense layer on the raw integer feature values
        cast to float (AlgoPerf's model, and its parameter count);
        "one_hot": one-hot of each OGB categorical feature
        (`OGB_ATOM_VOCAB`, `OGB_BOND_VOCAB`) then a Dense layer, i.e. a sum
        of per-feature embeddings as OGB's AtomEncoder/BondEncoder.
      dtype / param_dtype: computation / storage dtypes.
    """

    num_outputs: int = 128
    latent_dim: int = 256
    hidden_dims: Sequence[int] = (256,)
    num_message_passing_steps: int = 5
    dropout_rate: float = 0.1
    activation: str = "relu"
    embedding: str = "dense"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _embed(self, feats: jax.Array, vocab: Sequence[int], name: str):
        if self.embedding == "one_hot":
            if feats.shape[-1] != len(vocab):
                raise ValueError(
                    f"{name}: one_hot embedding needs {len(vocab)} OGB features "
                    f"per row; got {feats.shape[-1]}."
                )
            x = jnp.concatenate(
                [
                    jax.nn.one_hot(feats[..., i], v, dtype=self.dtype)
                    for i, v in enumerate(vocab)
                ],
                axis=-1,
            )
        elif self.embedding == "dense":
            x = feats.astype(self.dtype)
        else:
            raise ValueError(
                f"GNN.embedding must be 'dense' or 'one_hot'; got {self.embedding!r}."
            )
        return nn.Dense(
            self.latent_dim, kernel_init=_init((None, "embed")),
            bias_init=_zeros(("embed",)), dtype=self.dtype,
            param_dtype=self.param_dtype, name=name,
        )(x)  # fmt: skip

    @nn.compact
    def __call__(
        self,
        node_feat: jax.Array,
        edge_feat: jax.Array,
        senders: jax.Array,
        receivers: jax.Array,
        node_mask: jax.Array,
        edge_mask: jax.Array,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Logits of a batch of padded graphs.

        Args:
          node_feat: int `[b, n, 9]` OGB atom features (padding rows: any).
          edge_feat: int `[b, e, 3]` OGB bond features of directed edges.
          senders, receivers: int `[b, e]` local node indices in `[0, n)`.
          node_mask, edge_mask: bool `[b, n]`, `[b, e]`, True for real ones.
          train: enables dropout (needs a "dropout" rng).

        Returns:
          float32 logits `[b, num_outputs]`.
        """
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"GNN.activation must be one of {sorted(_ACTIVATIONS)}; "
                f"got {self.activation!r}."
            )
        node_mask = node_mask.astype(bool)
        edge_mask = edge_mask.astype(bool)
        nodes = self._embed(node_feat, OGB_ATOM_VOCAB, "node_embedding")
        edges = self._embed(edge_feat, OGB_BOND_VOCAB, "edge_embedding")
        globals_ = jnp.zeros((node_feat.shape[0], self.num_outputs), self.dtype)
        for step in range(self.num_message_passing_steps):
            nodes, edges, globals_ = GraphNetworkBlock(
                tuple(self.hidden_dims), self.activation, self.dropout_rate,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"block{step}",
            )(
                nodes, edges, globals_, senders, receivers, node_mask, edge_mask,
                train=train,
            )  # fmt: skip
        logits = nn.Dense(
            self.num_outputs, kernel_init=_init(("embed", "vocab")),
            bias_init=_zeros(("vocab",)), dtype=self.dtype,
            param_dtype=self.param_dtype, name="decoder",
        )(globals_)  # fmt: skip
        return logits.astype(jnp.float32)


GIN_CONFIGURABLES = {"GNN": GNN}
