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
import functools
import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from velo_scale._src import loss_features
from velo_scale._src.velo import init_state, velo_step


@dataclasses.dataclass(frozen=True)
class ESConfig:
    """Static settings of one ES estimate.

    Attributes:
      num_pairs: antithetic pairs P per estimate.
      sigma: perturbation scale.
      num_steps: inner training steps N (VeLO's horizon too).
      last_k: meta-loss = mean training loss of the last k steps (full-unroll
        ES only).
      truncation_length: K > 0 switches to Persistent ES (`pes_gradient`,
        Vicol et al. 2021): the N-step unroll is cut into N / K truncations
        of K steps, one ES estimate per truncation, with the inner states and
        the accumulated perturbations carried over (`PESState`). Its
        meta-loss is the mean training loss over all N steps (PES needs a
        sum of per-step losses). 0 (default): full unrolls.
    """

    num_pairs: int = 8
    sigma: float = 0.01
    num_steps: int = 50
    last_k: int = 5
    truncation_length: int = 0

    def __post_init__(self):
        k = self.truncation_length
        if k < 0 or (k and self.num_steps % k):
            raise ValueError(
                f"truncation_length={k} must be 0 or divide num_steps={self.num_steps}."
            )


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
    """Gaussian perturbations, leaves [num_pairs, *leaf.shape], scale sigma.

    One draw of f32[num_pairs, n] (n: theta's total size) cut into the
    leaves: a draw per leaf compiled a random-bits kernel per leaf, ~10 s of
    XLA:CPU compile for VeLO's 33 leaves.
    """
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
    flat = sigma * jax.random.normal(key, (num_pairs, sum(sizes)), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    return treedef.unflatten(
        [
            flat[:, a:b].reshape((num_pairs, *jnp.shape(x)))
            for a, b, x in zip(offsets[:-1], offsets[1:], leaves)
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

    def member(e, sign):
        # sign is +-1, so t + sign * d is exactly t + d or t - d.
        return loss_fn(jax.tree_util.tree_map(lambda t, d: t + sign * d, theta, e))

    def pair(e):
        # Both members under one vmap: the program holds one copy of the
        # unroll, not one per sign (which doubled the compile).
        return jax.vmap(member, in_axes=(None, 0))(e, jnp.array([1.0, -1.0]))

    losses = jax.vmap(pair)(eps)  # [P, 2]
    loss_plus, loss_minus = losses[:, 0], losses[:, 1]
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


def task_signature(task: Any) -> tuple:
    """A hashable static configuration of a task: two tasks with equal
    signatures build the same computation (same class, same hyperparameters,
    arrays with the same contents), so one compiled ES estimator serves both.

    Dataclass fields are read recursively (an `AugmentedTask` includes its
    inner task); numpy / jax arrays enter as (shape, dtype, blake2b digest of
    the bytes), so equal datasets held by different objects still match. The
    class enters as itself, not its name: a class defined again (a notebook
    cell run twice, perhaps edited) is a new configuration.
    """
    if isinstance(task, (np.ndarray, jax.Array)):
        arr = np.asarray(task)
        digest = hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16)
        return ("array", arr.shape, str(arr.dtype), digest.hexdigest())
    if dataclasses.is_dataclass(task) and not isinstance(task, type):
        return (
            type(task),
            tuple(
                (f.name, task_signature(getattr(task, f.name)))
                for f in dataclasses.fields(task)
            ),
        )
    if isinstance(task, (list, tuple)):
        return tuple(task_signature(x) for x in task)
    if isinstance(task, dict):
        return tuple(sorted((k, task_signature(v)) for k, v in task.items()))
    hash(task)  # a clear TypeError for unhashable leaves
    return (type(task).__name__, task)


# Task fields that only enter the computation arithmetically (e.g. as a
# multiplier of the initial weights), so they can be traced values: tasks that
# differ only in them share one compiled estimator (`split_runtime`).
RUNTIME_FIELDS = ("init_scale",)


def _map_runtime(task: Any, new_value: Any) -> tuple[Any, list]:
    """(task with every `RUNTIME_FIELDS` value v replaced by `new_value(v)`,
    recursively through dataclass fields; the old values in visiting order)."""
    if not dataclasses.is_dataclass(task) or isinstance(task, type):
        return task, []
    changes, old = {}, []
    for f in dataclasses.fields(task):
        value = getattr(task, f.name)
        if f.name in RUNTIME_FIELDS:
            old.append(value)
            changes[f.name] = new_value(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name], inner = _map_runtime(value, new_value)
            old.extend(inner)
    return dataclasses.replace(task, **changes), old


def split_runtime(task: Any) -> tuple[Any, tuple[float, ...]]:
    """Separates a task's `RUNTIME_FIELDS` from its static configuration.

    Returns:
      (the task with every runtime field set to 1.0, recursively through
      dataclass fields such as `AugmentedTask.task`; the original values in
      the order `with_runtime` puts them back).
    """
    template, values = _map_runtime(task, lambda _: 1.0)
    return template, tuple(float(v) for v in values)


def with_runtime(template: Any, values: Any) -> Any:
    """Inverse of `split_runtime`: `template` with its runtime fields set from
    `values` (floats or traced f32[] scalars, e.g. the rows of a jit
    argument), in `split_runtime`'s order."""
    values = list(values)
    task, _ = _map_runtime(template, lambda _: values.pop(0))
    if values:
        raise ValueError(f"{len(values)} runtime values left over for {template!r}.")
    return task


# -- Persistent ES (PES, Vicol et al. 2021) -------------------------------------


class PESState(NamedTuple):
    """What PES carries between truncations.

    Attributes:
      inner: inner states, leaves [P, 2, ...] (pair, +/- particle).
      xi: accumulated perturbations of the current unroll, like theta with a
        leading [P] axis (eps summed over its truncations so far).
      t: i32[] inner steps of the current unroll done (0 = start a new one).
      unroll_key: the current unroll's task key (init and batches), shared by
        every particle.
    """

    inner: Any
    xi: Any
    t: jax.Array
    unroll_key: jax.Array


def pes_init(theta: Any, init_fn: Any, key: jax.Array, num_pairs: int) -> PESState:
    """A PES state whose next call starts a fresh unroll (t = 0).

    `init_fn(theta, unroll_key) -> inner state` (only its shapes are used
    here; `pes_estimate` re-initialises at t = 0 from the perturbed theta).
    """
    inner = init_fn(theta, key)
    inner = jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x, (num_pairs, 2, *jnp.shape(x))), inner
    )
    xi = jax.tree_util.tree_map(
        lambda x: jnp.zeros((num_pairs, *jnp.shape(x)), jnp.float32), theta
    )
    return PESState(inner, xi, jnp.zeros((), jnp.int32), key)


def pes_estimate(
    theta: Any,
    state: PESState,
    key: jax.Array,
    *,
    init_fn: Any,
    step_fn: Any,
    num_pairs: int,
    sigma: float,
    num_steps: int,
    truncation_length: int,
    sharding: Any = None,
) -> tuple[Any, jax.Array, PESState]:
    """One antithetic PES estimate over the next `truncation_length` steps.

    With eps_i ~ N(0, sigma^2 I) fresh for this truncation and xi_i the sum
    of the eps_i of every truncation of the current unroll, this one
    included, and L_i^+- the sum of the K per-step losses of particle
    theta +- eps_i divided by `num_steps`,

        g = 1/P sum_i (L_i^+ - L_i^-) / (2 sigma^2) xi_i.

    Summed over the N / K truncations of an unroll, g is an unbiased
    estimate of the gradient of the Gaussian-smoothed mean loss of the full
    N-step unroll in which every truncation has its own perturbation
    (Vicol et al. 2021, Eq. 5); it tends to the full-unroll gradient as
    sigma -> 0.

    Args:
      theta: meta-parameters (pytree).
      state: from `pes_init` or the previous call; t = 0 starts a new unroll
        whose init and batches come from a key drawn from `key`.
      key: randomness of this truncation.
      init_fn: `(theta, unroll_key) -> inner state` (e.g. params + optimizer
        state; may depend on theta).
      step_fn: `(theta, inner, unroll_key, t) -> (inner, f32[] loss)`, one
        inner step at step index t.
      num_pairs, sigma: as in `antithetic_estimate`.
      num_steps: N, the unroll length; truncation_length: K (divides N).
      sharding: optional `NamedSharding` of the pair axis, as in
        `antithetic_estimate` (the perturbations and the carried inner states
        are split across its devices).

    Returns:
      (gradient like theta, mean per-step loss of the 2P particles over this
      truncation, the next state).
    """
    if truncation_length <= 0 or num_steps % truncation_length:
        raise ValueError(
            f"truncation_length={truncation_length} must be > 0 and divide "
            f"num_steps={num_steps}."
        )
    eps_key, unroll_key = jax.random.split(key)
    eps = perturbations(theta, eps_key, num_pairs, sigma)
    inner_states = state.inner
    if sharding is not None:
        constrain = functools.partial(
            jax.tree_util.tree_map,
            lambda x: jax.lax.with_sharding_constraint(x, sharding),
        )
        eps, inner_states = constrain(eps), constrain(inner_states)
    start = state.t == 0
    unroll_key = jnp.where(start, unroll_key, state.unroll_key)
    xi = jax.tree_util.tree_map(
        lambda x, e: jnp.where(start, 0.0, x) + e, state.xi, eps
    )

    def particle(e, inner, sign):
        th = jax.tree_util.tree_map(lambda t, d: t + sign * d, theta, e)
        fresh = init_fn(th, unroll_key)
        inner = jax.tree_util.tree_map(
            lambda f, c: jnp.where(start, f, c), fresh, inner
        )

        def body(inner, t):
            inner, loss = step_fn(th, inner, unroll_key, t)
            return inner, jnp.where(jnp.isfinite(loss), loss, 1e3)

        inner, losses = jax.lax.scan(
            body, inner, state.t + jnp.arange(truncation_length)
        )
        return inner, jnp.sum(losses) / num_steps

    def pair(e, inner):
        signs = jnp.array([1.0, -1.0])
        return jax.vmap(particle, in_axes=(None, 0, 0))(e, inner, signs)

    inner, losses = jax.vmap(pair)(eps, inner_states)  # losses: [P, 2]
    weight = (losses[:, 0] - losses[:, 1]) / (2 * sigma**2)
    grad = jax.tree_util.tree_map(
        lambda x: jnp.tensordot(weight, x, axes=1) / num_pairs, xi
    )
    t = (state.t + truncation_length) % num_steps
    mean_loss = jnp.mean(losses) * num_steps / truncation_length
    return grad, mean_loss, PESState(inner, xi, t, unroll_key)


def _velo_fns(task: Any, config: ESConfig) -> tuple[Any, Any]:
    """`init_fn`, `step_fn` of `pes_estimate` for VeLO training `task`."""
    decays = loss_features.compiled_decays(config.num_steps)

    def init_fn(theta, unroll_key):
        params = task.init(jax.random.split(unroll_key)[0])
        return params, init_state(theta, params, config.num_steps, loss_decays=decays)

    def step_fn(theta, inner, unroll_key, t):
        params, state = inner
        data_key = jax.random.split(unroll_key)[1]
        loss, grads = jax.value_and_grad(task.loss)(params, task.batch(data_key, t))
        updates, state, _ = velo_step(theta, state, grads, params, loss)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        return (params, state), loss

    return init_fn, step_fn


def pes_task_init(theta: Any, task: Any, key: jax.Array, config: ESConfig) -> PESState:
    """`pes_init` for VeLO training `task` (inner state: params, VeLO state)."""
    init_fn, _ = _velo_fns(task, config)
    return pes_init(theta, init_fn, key, config.num_pairs)


def pes_gradient(
    theta: Any,
    task: Any,
    state: PESState,
    key: jax.Array,
    config: ESConfig,
    *,
    sharding: Any = None,
) -> tuple[Any, jax.Array, PESState]:
    """PES estimate of the next truncation of VeLO training `task`
    (`config.truncation_length` > 0); see `pes_estimate`.

    Returns:
      (gradient like theta, mean training loss over the truncation, state).
    """
    if not config.truncation_length:
        raise ValueError("pes_gradient needs ESConfig.truncation_length > 0.")
    init_fn, step_fn = _velo_fns(task, config)
    return pes_estimate(
        theta,
        state,
        key,
        init_fn=init_fn,
        step_fn=step_fn,
        num_pairs=config.num_pairs,
        sigma=config.sigma,
        num_steps=config.num_steps,
        truncation_length=config.truncation_length,
        sharding=sharding,
    )
