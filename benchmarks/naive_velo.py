"""A naive jnp VeLO: the baseline `gpu_step.py` times velo_scale against.

The same step as `velo_scale.velo` (the same state, weights and arithmetic,
up to the order of rounding), written the plain way, as the reference
writes it: per tensor, the 30 MLP input channels are materialised as one
[*s, 30] array, each channel is normalised by its mean square over the
tensor, and the per-parameter MLP runs as matmuls over that array. Nothing
is fused by hand, nothing is recomputed to save memory, and there is no
non-finite skip and no weight decay (so the baseline does strictly less
work than velo_scale's default update).

`naive_velo(num_steps, weights)` is an optax `GradientTransformationExtraArgs`
with velo_scale's state (`velo_scale.velo(...).init`), so both can be timed
on the same params and compared element by element
(`tests/test_gpu_step.py` checks they agree).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import velo_scale
from velo_scale._src import loss_features, param_net, tensor_net
from velo_scale._src import velo as velo_lib


def _mlp_update(mlp: dict[str, jax.Array], x: jax.Array, scale: jax.Array):
    """-step of one tensor from its normalised channels x: f32[*s, 30]."""
    w0 = jnp.concatenate(
        [mlp[f"w0__{i}"] for i in range(len(param_net.INPUT_GROUP_WIDTHS))], axis=0
    )
    hidden = x @ w0 + mlp["b0"]
    layers = param_net.num_hidden_layers(mlp)
    for layer in range(1, layers + 1):
        w, b = mlp[f"w{layer}"], mlp[f"b{layer}"]
        if layer == layers:
            w, b = w[:, :2], b[:2]
        hidden = jax.nn.relu(hidden) @ w + b
    direction, magnitude = hidden[..., 0], hidden[..., 1]
    return -(scale * (direction * jnp.exp(magnitude * param_net.EXP_MULT)))


def naive_step(
    theta: Any, state: Any, grads: Any, params: Any, loss: jax.Array
) -> tuple[Any, Any]:
    """(updates like params, new `VeLOState`): one VeLO step, the plain way."""
    _, treedef, all_p, all_g, active, shapes, lift = velo_lib._trained_leaves(
        params, grads
    )
    state_leaves, old = velo_lib._state_fields(treedef, state, active)
    loss_buffer = loss_features.update(state.loss_buffer, loss)
    loss_feats = loss_features.features(loss_buffer)
    fraction = state.iteration / jnp.asarray(state.num_steps, jnp.float32)

    stats, channels, new = [], [], []
    for k, i in enumerate(active):
        p, g, acc = velo_lib._lifted_inputs(
            all_p[i], all_g[i], old[k], lift[k], shapes[k] == ()
        )
        stats.append(tensor_net._statistics(p, acc.m, acc.v))
        updated = param_net.update_accumulators(g, acc)
        new.append(updated)
        chans = param_net.feature_channels(p, g, updated)
        channels.append(
            jnp.stack([jnp.broadcast_to(c, p.shape) for c in chans], axis=-1)
        )
    mean_sq = jnp.stack(
        [jnp.mean(jnp.square(x), axis=tuple(range(x.ndim - 1))) for x in channels]
    )
    b = velo_lib._phase_b(
        theta, state, jnp.stack(stats), mean_sq, shapes, fraction, loss_feats
    )
    updates = []
    for k, x in enumerate(channels):
        normalised = x * jax.lax.rsqrt(param_net._NORMALISER_EPS + mean_sq[k])
        mlp = {name: w[k] for name, w in b.mlps.items()}
        updates.append(_mlp_update(mlp, normalised, b.scale[k]).reshape(shapes[k]))

    return velo_lib.finish_step(
        state, treedef, all_p, active, state_leaves, old, shapes, updates, new, b,
        loss_buffer,
    )  # fmt: skip


def naive_velo(num_steps: int, weights: Any) -> optax.GradientTransformationExtraArgs:
    """The naive VeLO as an optax transformation (`update(..., loss=loss)`).

    Args:
      num_steps: the training horizon, as for `velo_scale.velo`.
      weights: a VeLO weights mapping (`velo_scale.load_weights`).
    """
    theta = jax.tree_util.tree_map(jnp.asarray, weights)
    init = velo_scale.velo(num_steps, weights=weights).init

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        del extra_args
        if params is None or loss is None:
            raise ValueError("naive_velo's update needs params and loss=")
        return naive_step(theta, state, updates, params, jnp.asarray(loss, jnp.float32))

    return optax.GradientTransformationExtraArgs(init, update_fn)
