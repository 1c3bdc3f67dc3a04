"""VeLO as an optax `GradientTransformationExtraArgs`.

One VeLO step (paper App. B, reference: learned_optimization `HyperV2`):

1. clip gradients element-wise to +-1000;
2. update the loss buffer with the loss and compute the 9 loss features;
3. per tensor, from the *previous* state, compute 30 features and run the
   per-tensor LSTM, giving 256 control weights and `lr_mult` per tensor;
4. update momentum (3 decays), rms and the factored accumulators;
5. per parameter, run the MLP mixed from the bank by the control weights and
   take the step `d * exp(0.001 a) * 0.001 * lr_mult * param_scale`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from velo_scale._src import accumulators, loss_features, param_net, tensor_net
from velo_scale._src import weights as weights_lib
from velo_scale._src.state import (
    AccumulationState,
    FactoredState,
    VeLOState,
)

GRADIENT_CLIP = 1000.0
DEFAULT_MAX_TRAINING_STEPS = 150_000

MISSING_LOSS_MSG = (
    "VeLO needs the training loss at every step: call "
    "`tx.update(grads, state, params, loss=loss)` with `loss` the scalar loss of "
    "the batch the gradients came from (keyword-only)."
)
MISSING_PARAMS_MSG = (
    "VeLO needs the current parameters: call `tx.update(grads, state, params, "
    "loss=loss)`; `params` was None."
)


class VeLOIntermediates(NamedTuple):
    """Values computed inside one VeLO step (for tests and summaries).

    Attributes:
      fraction_trained: f32[], iteration / N with the pre-increment iteration.
      loss_features: f32[9].
      rnn_inputs: f32[n_tensors, 30] per-tensor LSTM inputs.
      control_params: f32[n_tensors, K] weights that mix the MLP bank.
      lr_mult: f32[n_tensors] per-tensor step-size multiplier.
    """

    fraction_trained: jax.Array
    loss_features: jax.Array
    rnn_inputs: jax.Array
    control_params: jax.Array
    lr_mult: jax.Array


def _as_theta(weights: Any) -> Mapping[str, Any]:
    if weights is None or isinstance(weights, (str, os.PathLike)):
        return weights_lib.load_weights(weights)
    if isinstance(weights, Mapping):
        weights_lib.validate(weights)
        return weights
    raise TypeError(
        "weights must be None (default resolution), a path or URL of a VeLO "
        f"'params' file, or a theta dict from velo_scale.load_weights; got "
        f"{type(weights).__name__}."
    )


def _check_loss(loss: Any) -> jax.Array:
    if loss is None:
        raise ValueError(MISSING_LOSS_MSG)
    loss = jnp.asarray(loss)
    if loss.ndim != 0:
        raise ValueError(
            f"VeLO's `loss` must be a scalar (the mean loss of the batch); got "
            f"{loss.shape=}. Reduce it first, e.g. `loss=jnp.mean(per_example_loss)`."
        )
    return loss.astype(jnp.float32)


def _check_structure(grads: Any, params: Any) -> None:
    g, p = jax.tree_util.tree_structure(grads), jax.tree_util.tree_structure(params)
    if g != p:
        raise ValueError(
            "VeLO's gradients and params must have the same tree structure; got "
            f"grads {g} and params {p}."
        )


def init_state(
    theta: Mapping[str, Any],
    params: Any,
    num_steps: int,
    accumulate: int = 1,
    loss_decays: Any = None,
    state_dtype: Any = jnp.float32,
) -> VeLOState:
    """Fresh VeLO state for params (a pytree of arrays) and horizon num_steps.

    `loss_decays` (f32[10]) defaults to `loss_features.compiled_decays`;
    `state_dtype` is the storage dtype of the per-parameter accumulators.
    """
    if loss_decays is None:
        loss_decays = loss_features.compiled_decays(num_steps)
    leaves = jax.tree_util.tree_leaves(params)
    init = theta["lstm_init_state"]
    hidden_size = np.shape(init["hidden"])[-1]
    n = len(leaves)
    # Quirk kept for the pretrained weights: the LSTM starts from the
    # checkpoint's (learned) initial state, tiled over tensors.
    hidden = jnp.broadcast_to(
        jnp.asarray(init["hidden"], jnp.float32), (n, hidden_size)
    )
    cell = jnp.broadcast_to(jnp.asarray(init["cell"], jnp.float32), (n, hidden_size))

    def tmap(fn, tree):
        return jax.tree_util.tree_map(
            lambda x: jax.tree_util.tree_map(lambda a: a.astype(state_dtype), fn(x)),
            tree,
        )

    factored = tmap(accumulators.init_factored, params)
    treedef = jax.tree_util.tree_structure(params)
    fac_leaves = treedef.flatten_up_to(factored) if n else []
    row, col, diag = (treedef.unflatten([f[i] for f in fac_leaves]) for i in range(3))
    accumulation = None
    if accumulate > 1:
        accumulation = AccumulationState(
            grad_sum=jax.tree_util.tree_map(
                lambda p: jnp.zeros(p.shape, jnp.float32), params
            ),
            loss_sum=jnp.zeros((), jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )
    return VeLOState(
        iteration=jnp.zeros((), jnp.int32),
        num_steps=jnp.asarray(num_steps, jnp.int32),
        momentum=tmap(accumulators.init_momentum, params),
        rms=tmap(accumulators.init_rms, params),
        factored=FactoredState(v_row=row, v_col=col, v_diag=diag),
        lstm_hidden=hidden,
        lstm_cell=cell,
        loss_buffer=loss_features.init(loss_decays),
        accumulation=accumulation,
    )


def velo_step(
    theta: Mapping[str, Any],
    state: VeLOState,
    grads: Any,
    params: Any,
    loss: jax.Array,
) -> tuple[Any, VeLOState, VeLOIntermediates]:
    """One VeLO step as a pure function of arrays.

    Args:
      theta: meta-parameters (official structure).
      state: `VeLOState` (its `accumulation` field is passed through).
      grads: pytree like params, any float dtype.
      params: current params.
      loss: f32 scalar.

    Returns:
      (updates f32 pytree like params, new state, intermediates).
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    shapes = [tuple(np.shape(x)) for _, x in path_leaves]
    # Quirk kept for the pretrained weights: scalars act as shape (1,) (their
    # per-tensor statistics are the same either way).
    lift = [(1,) if s == () else s for s in shapes]
    p_leaves = [
        jnp.asarray(p, jnp.float32).reshape(s)
        for p, s in zip(treedef.flatten_up_to(params), lift)
    ]
    g_leaves = [
        jnp.clip(jnp.asarray(g, jnp.float32), -GRADIENT_CLIP, GRADIENT_CLIP).reshape(s)
        for g, s in zip(treedef.flatten_up_to(grads), lift)
    ]
    old = [
        param_net.Accumulators(*acc)
        for acc in zip(
            treedef.flatten_up_to(state.momentum),
            treedef.flatten_up_to(state.rms),
            treedef.flatten_up_to(state.factored.v_row),
            treedef.flatten_up_to(state.factored.v_col),
            treedef.flatten_up_to(state.factored.v_diag),
        )
    ]
    acc_leaves = [_lift_accumulators(a, s == ()) for a, s in zip(old, shapes)]

    loss_buffer = loss_features.update(state.loss_buffer, loss)
    loss_feats = loss_features.features(loss_buffer)
    fraction = state.iteration / jnp.asarray(state.num_steps, jnp.float32)
    groups = tensor_groups([jax.tree_util.keystr(p) for p, _ in path_leaves], lift)
    n = len(shapes)

    # Phase A, per group of like tensors (vmapped): statistics of the previous
    # state (LSTM inputs), the accumulator update and the mean squares of the
    # 30 MLP input channels.
    def phase_a(p, g, acc):
        stats = tensor_net.tensor_statistics(p, acc.m, acc.v)
        new = param_net.update_accumulators(g, acc)
        return stats, new, param_net.channel_mean_squares(p, g, new)

    stats, mean_sq, new = [None] * n, [None] * n, [None] * n
    for idx in groups:
        if len(idx) == 1:
            i = idx[0]
            stats[i], new[i], mean_sq[i] = phase_a(
                p_leaves[i], g_leaves[i], acc_leaves[i]
            )
            continue
        out = jax.vmap(phase_a)(*_stack([p_leaves, g_leaves, acc_leaves], idx))
        for k, i in enumerate(idx):
            stats[i], new[i], mean_sq[i] = jax.tree_util.tree_map(lambda x: x[k], out)

    # Phase B, batched over tensors: the per-tensor LSTM, the MLP bank mix and
    # every per-tensor scalar of the per-parameter MLP.
    ranks = np.stack([tensor_net.rank_one_hot(s) for s in shapes])
    features = tensor_net.assemble_features(
        jnp.stack(stats), ranks, fraction, loss_feats
    )
    controls, lr_mult, hidden, cell = tensor_net.apply(
        theta["rnn_params"], features, state.lstm_hidden, state.lstm_cell
    )
    mlps = param_net.mix_bank(theta["ff_mod_stack"]["~"], controls)
    mean_sq = jnp.stack(mean_sq)
    w0 = param_net.first_layer(mlps, mean_sq)
    scale = param_net.step_scale(lr_mult, mean_sq)

    # Phase C, per group (vmapped): one elementwise pass of the MLP.
    updates = [None] * n
    for idx in groups:
        if len(idx) == 1:
            i = idx[0]
            mlp = {k: w[i] for k, w in mlps.items()}
            update = param_net.apply(
                mlp, w0[i], scale[i], p_leaves[i], g_leaves[i], new[i]
            )
            updates[i] = update.reshape(shapes[i])
            continue
        rows = np.asarray(idx)
        mlp = {k: w[rows] for k, w in mlps.items()}
        out = jax.vmap(param_net.apply)(
            mlp, w0[rows], scale[rows], *_stack([p_leaves, g_leaves, new], idx)
        )
        for k, i in enumerate(idx):
            updates[i] = out[k].reshape(shapes[i])

    new = [_lower_accumulators(a, s == (), o) for a, s, o in zip(new, shapes, old)]
    new_m, new_v, new_row, new_col, new_diag = (list(x) for x in zip(*new))

    new_state = state._replace(
        iteration=state.iteration + 1,
        momentum=treedef.unflatten(new_m),
        rms=treedef.unflatten(new_v),
        factored=FactoredState(
            v_row=treedef.unflatten(new_row),
            v_col=treedef.unflatten(new_col),
            v_diag=treedef.unflatten(new_diag),
        ),
        lstm_hidden=hidden,
        lstm_cell=cell,
        loss_buffer=loss_buffer,
    )
    intermediates = VeLOIntermediates(
        fraction_trained=fraction,
        loss_features=loss_feats,
        rnn_inputs=features,
        control_params=controls,
        lr_mult=lr_mult,
    )
    return treedef.unflatten(updates), new_state, intermediates


def _lift_accumulators(
    acc: param_net.Accumulators, scalar: bool
) -> param_net.Accumulators:
    """float32 accumulators; a scalar's get the leading axis of shape (1,)."""
    acc = param_net.Accumulators(
        *(None if x is None else x.astype(jnp.float32) for x in acc)
    )
    if scalar:
        acc = acc._replace(m=acc.m[None], v=acc.v[None], v_diag=acc.v_diag[None])
    return acc


def _lower_accumulators(
    acc: param_net.Accumulators, scalar: bool, like: param_net.Accumulators
) -> param_net.Accumulators:
    """Inverse of `_lift_accumulators`, back to the state's own dtypes."""
    if scalar:
        acc = acc._replace(m=acc.m[0], v=acc.v[0], v_diag=acc.v_diag[0])
    return param_net.Accumulators(
        *(None if x is None else x.astype(y.dtype) for x, y in zip(acc, like))
    )


def tensor_groups(
    paths: list[str], shapes: list[tuple[int, ...]], max_stacked_size: int = 1 << 16
) -> list[list[int]]:
    """Indices of tensors that share one vmapped computation.

    Small tensors (at most `max_stacked_size` elements: biases, norms, small
    kernels) group when they have the same shape and the same path up to the
    numbers in it (`layers_3/mlp/bias` ~ `layers_7/mlp/bias`): the same role
    in different layers, which partitioning schemes shard alike, so stacking
    them moves no data between devices. Compile time then grows with the
    number of roles, not with depth. Larger tensors run alone: stacking would
    copy them, and their compile cost is the same either way.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (path, shape) in enumerate(zip(paths, shapes)):
        if int(np.prod(shape)) > max_stacked_size:
            key: tuple = (i,)
        else:
            key = (re.sub(r"\d+", "#", path), shape)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _stack(trees_by_tensor: list[list[Any]], idx: list[int]) -> list[Any]:
    """For each per-tensor list, the members `idx` stacked on a new axis 0."""
    return [
        jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[leaves[i] for i in idx])
        for leaves in trees_by_tensor
    ]


def _num_accumulate(num_steps: int, max_training_steps: int) -> int:
    if num_steps > max_training_steps:
        return int(math.ceil(num_steps / max_training_steps))
    return 1


def velo(
    num_steps: int,
    *,
    weights: Any = None,
    weight_decay: float = 0.0,
    decoupled_weight_decay: float = 0.0,
    max_training_steps: int = DEFAULT_MAX_TRAINING_STEPS,
    state_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    """VeLO, the versatile learned optimizer, as an optax transformation.

    The update needs the params and the scalar training loss:
    `updates, state = tx.update(grads, state, params, loss=loss)`. Updates are
    the full step (no learning rate to set): apply them with
    `optax.apply_updates`.

    Args:
      num_steps: the number of optimizer steps the run will take (VeLO
        conditions on the fraction of training done).
      weights: meta-parameters: None resolves `$VELO_SCALE_WEIGHTS`, the user
        cache, then a download of the official file (see
        `velo_scale.load_weights`); or a path/URL; or a theta dict.
      weight_decay: coupled L2, as the reference's prefab: `weight_decay * p`
        is added to the gradient and `weight_decay * sum(p**2)` to the loss
        VeLO sees, before accumulation.
      decoupled_weight_decay: `-decoupled_weight_decay * p` is added to the
        update (AdamW-style, independent of VeLO's step size).
      max_training_steps: longest horizon VeLO was meta-trained for. When
        `num_steps` exceeds it, gradients and losses of
        `k = ceil(num_steps / max_training_steps)` consecutive calls are
        averaged and VeLO steps once every k calls with a horizon of
        `num_steps // k` (zero updates in between), as the reference does.
      state_dtype: storage dtype of the per-parameter accumulators (momentum,
        rms, factored). `jnp.bfloat16` halves the state's memory; arithmetic
        stays float32 (see BENCHMARKS.md for its effect on the golden cases).
        The per-tensor LSTM state and the loss buffer stay float32.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is `VeLOState`.

    Example:
      >>> tx = velo_scale.velo(1000)  # doctest: +SKIP
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grads, state, params, loss=loss)
      >>> params = optax.apply_updates(params, updates)

    References:
      Metz et al., "VeLO: Training Versatile Learned Optimizers by Scaling Up",
      2022, App. B.
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(
            f"num_steps must be a positive int (the run's number of optimizer "
            f"steps); got {num_steps!r}."
        )
    if max_training_steps < 1:
        raise ValueError(
            f"max_training_steps must be >= 1; got {max_training_steps!r}."
        )
    for name, value in (
        ("weight_decay", weight_decay),
        ("decoupled_weight_decay", decoupled_weight_decay),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value!r}.")
    theta = jax.tree_util.tree_map(jnp.asarray, _as_theta(weights))
    accumulate = _num_accumulate(int(num_steps), int(max_training_steps))
    horizon = int(num_steps) // accumulate
    loss_decays = loss_features.compiled_decays(horizon)

    def init_fn(params):
        return init_state(theta, params, horizon, accumulate, loss_decays, state_dtype)

    def step_fn(state, grads, params, loss):
        if not jax.tree_util.tree_leaves(params):
            return grads, state._replace(iteration=state.iteration + 1)
        updates, state, _ = velo_step(theta, state, grads, params, loss)
        return updates, state

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(MISSING_PARAMS_MSG)
        loss = _check_loss(loss)
        grads = updates
        _check_structure(grads, params)
        if weight_decay:
            grads = jax.tree_util.tree_map(
                lambda g, p: (
                    g.astype(jnp.float32) + weight_decay * p.astype(jnp.float32)
                ),
                grads,
                params,
            )
            loss = loss + weight_decay * sum(
                jnp.sum(jnp.square(p.astype(jnp.float32)))
                for p in jax.tree_util.tree_leaves(params)
            )
        if accumulate > 1:
            new_updates, state = _accumulating_step(
                step_fn, accumulate, state, grads, params, loss
            )
        else:
            new_updates, state = step_fn(state, grads, params, loss)
        if decoupled_weight_decay:
            new_updates = jax.tree_util.tree_map(
                lambda u, p: u - decoupled_weight_decay * p.astype(jnp.float32),
                new_updates,
                params,
            )
        new_updates = jax.tree_util.tree_map(
            lambda u, p: jnp.asarray(u).astype(jnp.asarray(p).dtype),
            new_updates,
            params,
        )
        return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _accumulating_step(step_fn, accumulate, state, grads, params, loss):
    """Sums grads/loss; every `accumulate`-th call runs a VeLO step on the mean."""
    acc = state.accumulation
    grad_sum = jax.tree_util.tree_map(
        lambda s, g: s + jnp.asarray(g, jnp.float32), acc.grad_sum, grads
    )
    loss_sum = acc.loss_sum + loss
    count = acc.count + 1
    zeros = jax.tree_util.tree_map(jnp.zeros_like, grad_sum)

    def apply(_):
        mean_grads = jax.tree_util.tree_map(lambda s: s / accumulate, grad_sum)
        updates, new_state = step_fn(state, mean_grads, params, loss_sum / accumulate)
        reset = AccumulationState(
            zeros, jnp.zeros_like(loss_sum), jnp.zeros_like(count)
        )
        return updates, new_state._replace(accumulation=reset)

    def wait(_):
        return zeros, state._replace(
            accumulation=AccumulationState(grad_sum, loss_sum, count)
        )

    return jax.lax.cond(count >= accumulate, apply, wait, None)
