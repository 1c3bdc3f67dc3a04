"""Antithetic Evolution Strategies gradient of VeLO's meta-loss.

meta-loss L(theta): train a sampled task with VeLO(theta) for N steps and take
the mean training loss of the last `last_k` steps (the paper's choice of
final loss over average loss). The ES estimate with antithetic pairs
eps_i ~ N(0, sigma^2 I),

    g = 1/P sum_i (L(theta + eps_i) - L(theta - eps_i)) / (2 sigma^2) eps_i,

is unbiased for the gradient of the Gaussian-smoothed meta-loss. Both members
of a pair share the task's initial params and every batch. The pairs are a
leading (vmapped) axis; sharding it over a mesh axis splits the unrolls across
devices, and the final mean is a small all-reduce of theta-sized gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from velo_scale._src import loss_features
from velo_scale._src.velo import init_state, velo_step


@dataclasses.dataclass(frozen=True)
class ESConfig:
    """Static settings of one ES estimate.

    Attributes:
      num_pairs: antithetic pairs P per estimate.
      sigma: perturbation scale.
      num_steps: inner training steps N (VeLO's horizon too).
      last_k: meta-loss = mean training loss of the last k steps.
    """

    num_pairs: int = 8
    sigma: float = 0.01
    num_steps: int = 50
    last_k: int = 5


def meta_loss(theta: Any, task: Any, key: jax.Array, config: ESConfig) -> jax.Array:
    """Trains `task` for `config.num_steps` VeLO steps; returns f32[] meta-loss.

    `key` fixes the task's initial params and batches. A non-finite inner loss
    makes the meta-loss +inf-free: it is replaced by a large constant so that
    ES sees divergence as bad rather than as NaN.
    """
    init_key, data_key = jax.random.split(key)
    params = task.init(init_key)
    decays = loss_features.compiled_decays(config.num_steps)
    state = init_state(theta, params, config.num_steps, loss_decays=decays)

    def step(carry, t):
        params, state = carry
        loss, grads = jax.value_and_grad(task.loss)(params, task.batch(data_key, t))
        updates, state, _ = velo_step(theta, state, grads, params, loss)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        return (params, state), loss

    _, losses = jax.lax.scan(step, (params, state), jnp.arange(config.num_steps))
    value = jnp.mean(losses[-config.last_k :])
    return jnp.where(jnp.isfinite(value), value, 1e3)


def perturbations(theta: Any, key: jax.Array, num_pairs: int, sigma: float) -> Any:
    """Gaussian perturbations, leaves [num_pairs, *leaf.shape], scale sigma."""
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [
            sigma * jax.random.normal(k, (num_pairs, *jnp.shape(x)), jnp.float32)
            for k, x in zip(keys, leaves)
        ]
    )


def antithetic_estimate(
    loss_fn: Any,
    theta: Any,
    key: jax.Array,
    num_pairs: int,
    sigma: float,
    *,
    sharding: Any = None,
) -> tuple[Any, jax.Array]:
    """Antithetic ES gradient of `loss_fn(theta) -> f32[]`.

    Args:
      loss_fn: the (deterministic) objective.
      theta: pytree of parameters.
      key: perturbation randomness.
      num_pairs: P.
      sigma: perturbation scale.
      sharding: optional `NamedSharding` of the pair axis (e.g.
        `NamedSharding(mesh, P("pop"))`): the unrolls are split across its
        devices.

    Returns:
      (gradient estimate like theta, mean loss of the 2P evaluations).
    """
    eps = perturbations(theta, key, num_pairs, sigma)
    if sharding is not None:
        eps = jax.tree_util.tree_map(
            lambda e: jax.lax.with_sharding_constraint(e, sharding), eps
        )

    def pair(e):
        plus = jax.tree_util.tree_map(lambda t, d: t + d, theta, e)
        minus = jax.tree_util.tree_map(lambda t, d: t - d, theta, e)
        return loss_fn(plus), loss_fn(minus)

    loss_plus, loss_minus = jax.vmap(pair)(eps)
    weight = (loss_plus - loss_minus) / (2 * sigma**2)
    grad = jax.tree_util.tree_map(
        lambda e: jnp.tensordot(weight, e, axes=1) / num_pairs, eps
    )
    return grad, jnp.mean(jnp.concatenate([loss_plus, loss_minus]))


def es_gradient(
    theta: Any, task: Any, key: jax.Array, config: ESConfig, *, sharding: Any = None
) -> tuple[Any, jax.Array]:
    """Antithetic ES estimate of d meta-loss / d theta for one task.

    Every pair trains the same initialisation on the same batches (both drawn
    from `key`); see `antithetic_estimate` for `sharding`.

    Returns:
      (gradient like theta, mean meta-loss of the 2P unrolls).
    """
    eps_key, task_key = jax.random.split(key)
    return antithetic_estimate(
        lambda t: meta_loss(t, task, task_key, config),
        theta,
        eps_key,
        config.num_pairs,
        config.sigma,
        sharding=sharding,
    )


def normalise(grad: Any) -> Any:
    """`grad / ||grad||`: each task's estimate gets unit length before tasks
    are averaged, so no task dominates by its loss scale (paper App. D)."""
    norm = jnp.sqrt(
        sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grad))
    )
    return jax.tree_util.tree_map(lambda g: g / jnp.maximum(norm, 1e-12), grad)
