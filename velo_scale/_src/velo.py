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

import functools
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from velo_scale._src import (
    accumulators,
    loss_features,
    param_net,
    reductions,
    tensor_net,
)
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


def _lazy_theta(weights: Any):
    """A function returning theta as jnp arrays, resolved on first call.

    Bad types and bad dicts fail at once; names and paths (`"auto"`,
    `"official"`, a file) are read at the first `init`/`update`, so building
    the transformation needs no file."""
    if not (
        weights is None
        or isinstance(weights, (str, os.PathLike, Mapping))
    ):
        raise TypeError(
            "weights must be None or 'official' (the official file), 'auto' "
            "(official if present, else the project's weights), 'project', a "
            "path or URL of a VeLO 'params' file, or a theta dict from "
            f"velo_scale.load_weights; got {type(weights).__name__}."
        )
    if isinstance(weights, Mapping):
        weights_lib.validate(weights)
    cache: list = []

    def theta() -> Mapping[str, Any]:
        if not cache:
            with jax.ensure_compile_time_eval():
                cache.append(
                    jax.tree_util.tree_map(jnp.asarray, weights_lib.resolve(weights))
                )
        return cache[0]

    return theta


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


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)


def is_trained(x: Any) -> bool:
    """Whether VeLO trains a leaf: a real floating dtype and at least one
    element. Other leaves (ints, bools, zero-size arrays) get zero updates,
    have None accumulators and no per-tensor LSTM row."""
    return bool(jnp.issubdtype(_dtype(x), jnp.floating)) and math.prod(_shape(x)) > 0


def check_leaves(grads: Any, params: Any) -> None:
    """Rejects leaves VeLO cannot update, naming the leaf.

    Raises:
      ValueError: complex params, or a gradient whose shape differs from its
        parameter's, or a `float0`/non-numeric gradient for a float param.
    """
    _check_structure(grads, params)
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    for (path, p), g in zip(path_leaves, treedef.flatten_up_to(grads)):
        name = jax.tree_util.keystr(path) or "<root>"
        p_dtype = _dtype(p)
        if jnp.issubdtype(p_dtype, jnp.complexfloating):
            raise ValueError(
                f"VeLO does not support complex parameters: {name} has dtype "
                f"{p_dtype}. Store its real and imaginary parts as two float "
                "leaves (e.g. `{'re': x.real, 'im': x.imag}`)."
            )
        if not is_trained(p):
            continue  # Left unchanged whatever its gradient.
        g_shape, p_shape = _shape(g), _shape(p)
        if g_shape != p_shape:
            raise ValueError(
                f"VeLO's gradient for {name} has shape {g_shape} but the "
                f"parameter has shape {p_shape}; gradients must match their "
                "parameters exactly (no implicit reshape)."
            )
        g_dtype = _dtype(g)
        if not (
            jnp.issubdtype(g_dtype, jnp.floating) or jnp.issubdtype(g_dtype, jnp.integer)
        ):
            raise ValueError(
                f"VeLO's gradient for {name} has dtype {g_dtype}, parameter dtype "
                f"{p_dtype}: a float parameter needs a numeric gradient "
                "(float0 comes from differentiating an integer input)."
            )


def _all_finite(tree: Any) -> jax.Array:
    """bool[], whether every element of every floating leaf is finite."""
    leaves = [
        x
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(_dtype(x), jnp.inexact)
    ]
    if not leaves:
        return jnp.asarray(True)
    return jax.lax.platform_dependent(
        *leaves,
        cuda=_all_finite_summed,
        rocm=_all_finite_summed,
        default=_all_finite_each,
    )


def _all_finite_each(*leaves: jax.Array) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite_summed(*leaves: jax.Array) -> jax.Array:
    # XLA:GPU launches one or two kernels per leaf for `_all_finite_each`.
    # `x * 0` is 0 where x is finite and NaN where it is not, so a sum of
    # them is finite exactly when every element is; the sums of leaves of
    # one shape are one reduction (`reductions.stacked_sums`). The product
    # is taken in the leaf's own dtype (a finite f64 may overflow f32).
    by_shape: dict[tuple, list[jax.Array]] = {}
    for x in leaves:
        zero = x * 0
        if jnp.iscomplexobj(zero):
            zero = zero.real + zero.imag
        by_shape.setdefault(x.shape, []).append(zero.astype(jnp.float32))
    totals = [reductions.stacked_sums(xs) for xs in by_shape.values()]
    return jnp.all(jnp.isfinite(jnp.concatenate(totals)))


def init_state(
    theta: Mapping[str, Any],
    params: Any,
    num_steps: int,
    accumulate: int = 1,
    loss_decays: Any = None,
    state_dtype: Any = jnp.float32,
) -> VeLOState:
    """Fresh VeLO state for params and horizon num_steps.

    Args:
      theta: meta-parameters.
      params: a pytree of arrays, `jax.ShapeDtypeStruct`s or Python floats.
        Accumulators are built from `zeros_like` of each parameter, so under
        an explicit-axes mesh they carry the parameter's sharding, the same
        types `update` returns.
      num_steps: the horizon N.
      accumulate: calls per VeLO step (> 1 adds `AccumulationState`).
      loss_decays: f32[10], default `loss_features.compiled_decays(N)`.
      state_dtype: storage dtype of the per-parameter accumulators.
    """
    if loss_decays is None:
        loss_decays = loss_features.compiled_decays(num_steps)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    init = theta["lstm_init_state"]
    hidden_size = np.shape(init["hidden"])[-1]
    n = sum(is_trained(x) for x in leaves)
    # Quirk kept for the pretrained weights: the LSTM starts from the
    # checkpoint's (learned) initial state, tiled over tensors.
    hidden = jnp.broadcast_to(
        jnp.asarray(init["hidden"], jnp.float32), (n, hidden_size)
    )
    cell = jnp.broadcast_to(jnp.asarray(init["cell"], jnp.float32), (n, hidden_size))

    per_leaf = [
        accumulators.init_all(jnp.zeros_like(x, state_dtype)) if is_trained(x) else None
        for x in leaves
    ]

    def field(i):
        return treedef.unflatten([None if a is None else a[i] for a in per_leaf])

    accumulation = None
    if accumulate > 1:
        accumulation = AccumulationState(
            grad_sum=jax.tree_util.tree_map(
                lambda p: jnp.zeros_like(p, jnp.float32) if is_trained(p) else None,
                params,
            ),
            loss_sum=jnp.zeros((), jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )
    return VeLOState(
        iteration=jnp.zeros((), jnp.int32),
        num_steps=jnp.asarray(num_steps, jnp.int32),
        momentum=field(0),
        rms=field(1),
        factored=FactoredState(v_row=field(2), v_col=field(3), v_diag=field(4)),
        lstm_hidden=hidden,
        lstm_cell=cell,
        loss_buffer=loss_features.init(loss_decays),
        accumulation=accumulation,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def velo_step(
    theta: Mapping[str, Any],
    state: VeLOState,
    grads: Any,
    params: Any,
    loss: jax.Array,
    *,
    implementation: str = "xla",
    interpret: bool | None = None,
    mesh: Any = None,
    param_specs: Any = None,
) -> tuple[Any, VeLOState, VeLOIntermediates]:
    """One VeLO step as a pure function of arrays.

    Args:
      theta: meta-parameters (official structure).
      state: `VeLOState` (its `accumulation` field is passed through).
      grads: pytree like params, any float dtype.
      params: current params.
      loss: f32 scalar.
      implementation: "xla" (default) or "pallas": the per-parameter passes
        of every tensor the kernels take (`kernels.velo_pallas.supported`)
        run as Pallas TPU kernels, the rest on the XLA path.
      interpret: Pallas only: run the kernels in Pallas' interpreter (any
        backend); None: unless the default backend is a TPU.
      mesh, param_specs: Pallas only: the `jax.sharding.Mesh` and a tree like
        params of `PartitionSpec`s (the state sharded as `state_shardings`
        gives): the kernels then run inside `jax.shard_map`, each device on
        its block. None: one device (or replicated).

    Returns:
      (updates f32 pytree like params, new state, intermediates).
    """
    if implementation not in ("xla", "pallas"):
        raise ValueError(
            f"implementation must be 'xla' or 'pallas'; got {implementation!r}."
        )
    if implementation == "pallas":
        return _velo_step_pallas(
            theta, state, grads, params, loss, interpret,
            mesh=mesh, param_specs=param_specs,
        )  # fmt: skip
    path_leaves, treedef, all_p, all_g, active, shapes, lift = _trained_leaves(
        params, grads
    )
    state_leaves, old = _state_fields(treedef, state, active)

    def inputs(i, raw_p, raw_g, raw_acc):
        return _lifted_inputs(raw_p, raw_g, raw_acc, lift[i], shapes[i] == ())

    lifted = [inputs(k, all_p[i], all_g[i], old[k]) for k, i in enumerate(active)]
    p_leaves, g_leaves, acc_leaves = ([x[j] for x in lifted] for j in range(3))

    loss_buffer = loss_features.update(state.loss_buffer, loss)
    loss_feats = loss_features.features(loss_buffer)
    fraction = state.iteration / jnp.asarray(state.num_steps, jnp.float32)
    groups = tensor_groups(
        [jax.tree_util.keystr(path_leaves[i][0]) for i in active], lift
    )
    n = len(shapes)

    # Phase A, per group of like tensors (vmapped): statistics of the previous
    # state (LSTM inputs), the accumulator update and the mean squares of the
    # 30 MLP input channels.
    def phase_a(p, g, acc):
        new = param_net.update_accumulators(g, acc)
        stats, mean_sq = jax.lax.platform_dependent(
            p,
            g,
            acc,
            new,
            cpu=_phase_a_sums_merged,
            cuda=_phase_a_sums_merged,
            rocm=_phase_a_sums_merged,
            default=_phase_a_sums,
        )
        return stats, new, mean_sq

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
    b = _phase_b(
        theta, state, jnp.stack(stats), jnp.stack(mean_sq), shapes, fraction, loss_feats
    )
    mlps, w0, scale = b.mlps, b.w0, b.scale

    # Phase C, per group (vmapped): one elementwise pass of the MLP.
    updates = [None] * n
    for idx in groups:
        if len(idx) == 1:
            i = idx[0]
            mlp = {k: w[i] for k, w in mlps.items()}
            raw = _cpu_barrier((all_p[active[i]], all_g[active[i]], old[i]))
            p, g, acc = inputs(i, *raw)
            update = param_net.apply(
                mlp, w0[i], scale[i], p, g, param_net.update_accumulators(g, acc)
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

    full_updates, new_state = finish_step(
        state, treedef, all_p, active, state_leaves, old, shapes, updates, new, b,
        loss_buffer,
    )  # fmt: skip
    return full_updates, new_state, b.intermediates(fraction, loss_feats)


def finish_step(
    state, treedef, all_p, active, state_leaves, old, shapes, updates, new, b,
    loss_buffer,
):  # fmt: skip
    """(updates pytree like params, new `VeLOState`) of an XLA-path step.

    From the trained tensors' updates and f32 accumulators `new` (in
    `active` order, lifted), phase B's outputs `b` (the new LSTM state) and
    the new loss buffer; untrained leaves get zero updates and keep their
    state.
    """
    new = [_lower_accumulators(a, s == (), o) for a, s, o in zip(new, shapes, old)]
    full_updates, (new_m, new_v, new_row, new_col, new_diag) = _scatter(
        treedef, all_p, active, state_leaves, updates, new
    )
    new_state = state._replace(
        iteration=state.iteration + 1,
        momentum=new_m,
        rms=new_v,
        factored=FactoredState(v_row=new_row, v_col=new_col, v_diag=new_diag),
        lstm_hidden=b.hidden,
        lstm_cell=b.cell,
        loss_buffer=loss_buffer,
    )
    return full_updates, new_state


def _phase_a_sums(p, g, acc, new):
    """Phase A's tensor-wide sums of one tensor: (f32[7] the LSTM statistics
    of the previous state, f32[30] the MLP channels' mean squares)."""
    return (
        tensor_net.tensor_statistics(p, acc.m, acc.v),
        param_net.channel_mean_squares(p, g, new),
    )


def _phase_a_sums_merged(p, g, acc, new):
    """`_phase_a_sums` in two passes over the tensor (XLA:CPU), not three:
    the statistics' first sums (of p**2 and m), then the rest of their sums
    together with the channels' sums of squares, as one reduction (the same
    sums, each summed in the same order)."""
    totals = tensor_net.statistics_totals(p, acc.m)
    mean_sq, second = param_net.mean_squares_and_sums(
        param_net.feature_channels(p, g, new),
        tensor_net.second_pass_terms(p, acc.m, acc.v, totals),
    )
    return tensor_net.statistics_from_sums(p, acc.m, totals, second), mean_sq


def _cpu_barrier(x):
    """`x` behind an optimization barrier on CPU, `x` elsewhere.

    Phase C recomputes its inputs and the new accumulators from the step's
    inputs: on XLA:CPU, behind a barrier, so that XLA neither shares them
    with phase A's reductions nor keeps them between the phases. Each phase
    is then one fused pass with no parameter-sized temporaries (with
    `reductions.sums`; 4 instead of 48 B/param). XLA:TPU fuses the phases
    well without it: with it and the one-pass statistics, the `10m` tree
    moved 17 HBM B/param more on v5e 2x2, so both are CPU only.
    """
    return jax.lax.platform_dependent(x, cpu=_barrier, default=lambda y: y)


def _barrier(x):
    """`jax.lax.optimization_barrier(x)`; `x` in a jax without it (the Pax
    lane's 0.4.30: the step is the same there, with more temp)."""
    barrier = getattr(jax.lax, "optimization_barrier", None)
    return x if barrier is None else barrier(x)


class _PhaseB(NamedTuple):
    """Phase B's per-tensor outputs (rows in the order of the trained tensors)."""

    features: jax.Array  # f32[n, 30] LSTM inputs
    controls: jax.Array  # f32[n, K]
    lr_mult: jax.Array  # f32[n]
    hidden: jax.Array  # f32[n, H] new LSTM state
    cell: jax.Array
    mlps: dict[str, jax.Array]  # per-tensor MLP weights (`mix_bank`)
    w0: jax.Array  # f32[n, 30, F] first layer with the normalisers folded in
    scale: jax.Array  # f32[n] `step_scale`

    def intermediates(
        self, fraction: jax.Array, loss_feats: jax.Array
    ) -> VeLOIntermediates:
        return VeLOIntermediates(
            fraction_trained=fraction,
            loss_features=loss_feats,
            rnn_inputs=self.features,
            control_params=self.controls,
            lr_mult=self.lr_mult,
        )


def _phase_b(
    theta: Mapping[str, Any],
    state: VeLOState,
    stats: jax.Array,
    mean_sq: jax.Array,
    shapes: list[tuple[int, ...]],
    fraction: jax.Array,
    loss_feats: jax.Array,
) -> _PhaseB:
    """Phase B, batched over tensors: the per-tensor LSTM, the MLP bank mix and
    every per-tensor scalar of the per-parameter MLP, from the tensors'
    statistics f32[n, 7] and channel mean squares f32[n, 30]."""
    ranks = np.stack([tensor_net.rank_one_hot(s) for s in shapes])
    features = tensor_net.assemble_features(
        stats, ranks, fraction, loss_feats
    )
    controls, lr_mult, hidden, cell = tensor_net.apply(
        theta["rnn_params"], features, state.lstm_hidden, state.lstm_cell
    )
    mlps = param_net.mix_bank(theta["ff_mod_stack"]["~"], controls)
    w0 = param_net.first_layer(mlps, mean_sq)
    scale = param_net.step_scale(lr_mult, mean_sq)
    return _PhaseB(features, controls, lr_mult, hidden, cell, mlps, w0, scale)


def _trained_leaves(params: Any, grads: Any):
    """The leaves of params and grads, and which of them VeLO trains.

    Returns (path_leaves, treedef, all params leaves, all grads leaves, the
    indices of trained leaves, their shapes, those shapes with a scalar as
    (1,)).
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    all_p = treedef.flatten_up_to(params)
    # Only trained leaves (float, non-empty) take part; the others keep zero
    # updates and never touch the per-tensor statistics of the rest.
    active = [i for i, p in enumerate(all_p) if is_trained(p)]
    all_g = treedef.flatten_up_to(grads)
    shapes = [_shape(all_p[i]) for i in active]
    # Quirk kept for the pretrained weights: scalars act as shape (1,) (their
    # per-tensor statistics are the same either way).
    lift = [(1,) if s == () else s for s in shapes]
    return path_leaves, treedef, all_p, all_g, active, shapes, lift


def _state_fields(treedef, state: VeLOState, active: list[int]):
    """The 5 per-parameter state fields flattened like the params, and the
    trained tensors' `Accumulators` (in `active` order)."""
    fields = [
        treedef.flatten_up_to(x)
        for x in (
            state.momentum,
            state.rms,
            state.factored.v_row,
            state.factored.v_col,
            state.factored.v_diag,
        )
    ]
    return fields, [param_net.Accumulators(*(f[i] for f in fields)) for i in active]


def _scatter(treedef, all_p, active, state_leaves, updates, new):
    """The trained tensors' updates and accumulators put back among all leaves.

    Returns (updates pytree like params with zeros for untrained leaves,
    the 5 per-parameter state fields as pytrees).
    """
    full_updates = [jnp.zeros_like(p) for p in all_p]
    for k, i in enumerate(active):
        full_updates[i] = updates[k]
    return treedef.unflatten(full_updates), _scatter_fields(
        treedef, active, state_leaves, new
    )


def _scatter_fields(treedef, active, state_leaves, new):
    """The 5 per-parameter state fields as pytrees, the trained tensors'
    accumulators `new` (in `active` order) put back among all leaves."""
    fields = [list(f) for f in state_leaves]
    for k, i in enumerate(active):
        for f, value in zip(fields, new[k]):
            f[i] = value
    return tuple(treedef.unflatten(f) for f in fields)


def _lifted_inputs(raw_p, raw_g, raw_acc, lift, scalar):
    """One trained tensor's f32 p and clipped g reshaped to `lift`, and its
    f32 (lifted) accumulators."""
    p = jnp.asarray(raw_p, jnp.float32).reshape(lift)
    g = jnp.asarray(raw_g, jnp.float32).reshape(lift)
    g = jnp.clip(g, -GRADIENT_CLIP, GRADIENT_CLIP)
    return p, g, _lift_accumulators(raw_acc, scalar)


def updated_accumulators(state: VeLOState, grads: Any, params: Any):
    """`(momentum, rms, factored)` of the state after one VeLO step on
    `grads`, computed from the gradients and `state` alone.

    The same values `velo_step` puts in its new state (the accumulators do
    not depend on the per-tensor LSTM or the MLP). The CPU non-finite skip
    (`skip_materialised`) recomputes them here, where it selects them, so
    that they are written once, straight into the new state.
    """
    _, treedef, all_p, all_g, active, shapes, lift = _trained_leaves(params, grads)
    state_leaves, old = _state_fields(treedef, state, active)
    new = []
    for k, i in enumerate(active):
        scalar = shapes[k] == ()
        _, g, acc = _lifted_inputs(all_p[i], all_g[i], old[k], lift[k], scalar)
        new.append(
            _lower_accumulators(param_net.update_accumulators(g, acc), scalar, old[k])
        )
    m, v, row, col, diag = _scatter_fields(treedef, active, state_leaves, new)
    return m, v, FactoredState(v_row=row, v_col=col, v_diag=diag)


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
    weights: Any = "auto",
    weight_decay: float = 0.0,
    decoupled_weight_decay: float = 0.0,
    max_training_steps: int = DEFAULT_MAX_TRAINING_STEPS,
    state_dtype: Any = jnp.float32,
    skip_nonfinite: bool = True,
    implementation: str = "xla",
    pallas_interpret: bool | None = None,
    mesh: Any = None,
    param_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """VeLO, the versatile learned optimizer, as an optax transformation.

    The update needs the params and the scalar training loss:
    `updates, state = tx.update(grads, state, params, loss=loss)`. Updates are
    the full step (no learning rate to set): apply them with
    `optax.apply_updates`.

    Args:
      num_steps: the number of optimizer steps the run will take (VeLO
        conditions on the fraction of training done).
      weights: meta-parameters. `"auto"` (default): the official file when
        `$VELO_SCALE_WEIGHTS` or the cache has it, else the small VeLO that
        velo_scale meta-trained itself (shipped, with a notice on stderr), so
        it works offline; `"official"` or None: `$VELO_SCALE_WEIGHTS`, the
        cache, else a download of the official file; `"project"`; a path or
        URL; or a theta dict. Names and paths are read at the first `init` or
        `update`, not here.
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
      skip_nonfinite: a call whose loss, gradients or resulting update has a
        NaN or inf is a no-op: zero updates and the state unchanged except
        `state.nonfinite_steps`, so a run with a bad step k continues exactly
        as the run without step k. False gives the reference's behaviour (one
        NaN element then spreads into every tensor's state for ever).
      implementation: "xla" (default): the per-parameter passes as XLA
        fusions; "pallas" (experimental): as Pallas TPU (Mosaic) kernels, three
        passes per tensor plus, with `skip_nonfinite`, a fourth that writes
        the accumulators once the step is known finite
        (`velo_scale._src.kernels.velo_pallas`), tensors the kernels
        do not take on the XLA path. On a sharded mesh the kernels run inside
        `jax.shard_map`. Same numbers within float32 reassociation.
      pallas_interpret: "pallas" only: run the kernels in Pallas' interpreter
        (CPU, for tests); None: interpret unless the default backend is a TPU
        (set False to compile for a TPU ahead of time from a CPU host).
      mesh, param_specs: "pallas" on a sharded mesh: the `Mesh` and a tree
        like params of `PartitionSpec`s (mesh axes), the state sharded as
        `state_shardings(tx, params, mesh, param_specs)` gives. The kernels
        then run inside `jax.shard_map`, per tensor, each device on its
        block, and only per-tensor sums are all-reduced. (Mosaic kernels are
        not partitioned automatically: without these a sharded tensor is
        gathered.) Ignored by "xla", which XLA partitions itself.

    Leaves: float leaves of any float dtype are trained (a Python float is a
    float32 scalar). Leaves VeLO does not train get zero updates in their own
    dtype and never affect the others: integer and bool leaves (any gradient,
    e.g. float0, is ignored) and zero-size arrays. Complex params and
    gradients whose shape differs from their parameter's raise `ValueError`
    naming the leaf.

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
    if hasattr(num_steps, "shape") and not isinstance(num_steps, np.integer):
        raise TypeError(
            "velo's num_steps must be a Python int, not an array: VeLO has no "
            "learning rate or other hyperparameter to inject (it learned its "
            "step sizes), so optax.inject_hyperparams(velo) does not apply. "
            "Use velo(num_steps) directly."
        )
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
    if implementation not in ("xla", "pallas"):
        raise ValueError(
            f"implementation must be 'xla' or 'pallas'; got {implementation!r}."
        )
    theta = _lazy_theta(weights)
    accumulate = _num_accumulate(int(num_steps), int(max_training_steps))
    horizon = int(num_steps) // accumulate
    loss_decays = loss_features.compiled_decays(horizon)

    def init_fn(params):
        return init_state(
            theta(), params, horizon, accumulate, loss_decays, state_dtype
        )

    def step_fn(state, grads, params, loss):
        if not any(is_trained(p) for p in jax.tree_util.tree_leaves(params)):
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            return zeros, state._replace(iteration=state.iteration + 1)
        updates, state, _ = velo_step(
            theta(), state, grads, params, loss,
            implementation=implementation, interpret=pallas_interpret,
            mesh=mesh, param_specs=param_specs,
        )  # fmt: skip
        return updates, state

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(MISSING_PARAMS_MSG)
        loss = _check_loss(loss)
        grads = updates
        check_leaves(grads, params)
        old_state = state
        if weight_decay:
            grads = jax.tree_util.tree_map(
                lambda g, p: (
                    g.astype(jnp.float32) + weight_decay * p.astype(jnp.float32)
                    if is_trained(p)
                    else g
                ),
                grads,
                params,
            )
            loss = loss + weight_decay * sum(
                jnp.sum(jnp.square(p.astype(jnp.float32)))
                for p in jax.tree_util.tree_leaves(params)
                if is_trained(p)
            )
        if (
            implementation == "pallas"
            and skip_nonfinite
            and accumulate == 1
            and any(is_trained(p) for p in jax.tree_util.tree_leaves(params))
        ):
            # The kernels do the decoupled decay, the cast and the skip.
            new_updates, state, _ = _velo_step_pallas(
                theta(), state, grads, params, loss, pallas_interpret,
                skip_nonfinite=True, decoupled_weight_decay=decoupled_weight_decay,
                mesh=mesh, param_specs=param_specs,
            )  # fmt: skip
            return new_updates, state
        if accumulate > 1:
            new_updates, state = _accumulating_step(
                step_fn, accumulate, state, grads, params, loss
            )
        else:
            new_updates, state = step_fn(state, grads, params, loss)
        if decoupled_weight_decay:
            new_updates = jax.tree_util.tree_map(
                lambda u, p: (
                    u - decoupled_weight_decay * p.astype(jnp.float32)
                    if is_trained(p)
                    else u
                ),
                new_updates,
                params,
            )
        new_updates = jax.tree_util.tree_map(
            lambda u, p: jnp.asarray(u).astype(_dtype(p)), new_updates, params
        )
        if skip_nonfinite:
            trained_grads = [
                g
                for g, p in zip(
                    jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params)
                )
                if is_trained(p)
            ]
            inputs_finite = jnp.isfinite(loss) & _all_finite(trained_grads)
            # Stepping every call, the CPU skip recomputes the accumulators
            # where it selects them (written once); with accumulation, the
            # step ran inside a cond, and those of `state` are selected.
            recompute = None
            if accumulate == 1:
                recompute = functools.partial(
                    updated_accumulators, grads=grads, params=params
                )
            new_updates, state = _skip_unless_finite(
                inputs_finite, new_updates, state, old_state, recompute
            )
        return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _skip_unless_finite(
    inputs_finite: jax.Array,
    updates: Any,
    state: VeLOState,
    old: VeLOState,
    recompute: Any = None,
) -> tuple[Any, VeLOState]:
    """`updates, state` if `inputs_finite` and every update is finite, else
    zero updates and the old state with one more `nonfinite_steps`.

    Written per backend (`lax.platform_dependent`, resolved when lowering):
    XLA:TPU (and GPU) fuse plain `jnp.where`s with the update and the
    accumulators' update (`skip_fused`). XLA:CPU instead fuses the
    per-parameter MLP into each consumer of the updates (the finite check and
    the select) and computes it three times per step, and it writes the new
    accumulators to a buffer of their own before selecting them: so on CPU
    the updates' check runs inside a `lax.cond`, whose operand XLA
    materialises once, and the accumulators are recomputed where they are
    selected (`skip_materialised`). Both give the same result.

    Args:
      recompute: None, or `updated_accumulators` bound to the step's
        gradients and params: a function of the old state giving the new
        `(momentum, rms, factored)` (the same values `state` holds).
    """
    return jax.lax.platform_dependent(
        inputs_finite, updates, state, old,
        cpu=functools.partial(skip_materialised, recompute=recompute),
        default=skip_fused,
    )  # fmt: skip


def _zero_unless(finite, updates):
    return jax.tree_util.tree_map(
        lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates
    )


def _keep_unless(finite, state, old):
    """The old state (one more `nonfinite_steps`) unless `finite`: a
    non-finite step changes nothing else."""
    kept = jax.tree_util.tree_map(
        lambda new, prev: jnp.where(finite, new, prev), state, old
    )
    return kept._replace(
        nonfinite_steps=old.nonfinite_steps + (~finite).astype(jnp.int32)
    )


def skip_fused(inputs_finite, updates, state, old):
    """`_skip_unless_finite` as plain selects (TPU, GPU)."""
    finite = inputs_finite & _all_finite(updates)
    return _zero_unless(finite, updates), _keep_unless(finite, state, old)


def skip_materialised(inputs_finite, updates, state, old, recompute=None):
    """`_skip_unless_finite` with the updates' check in a `lax.cond` (CPU).

    The cond checks the updates (its operand, materialised once) and zeroes
    them unless finite. With `recompute`, the accumulators are recomputed
    from the gradients and the old state and selected in the same pass
    (read once, written once); without, those of `state` are selected.
    """

    def check(updates):
        finite = _all_finite(updates)
        return _zero_unless(finite, updates), finite

    def skip(updates):
        return jax.tree_util.tree_map(jnp.zeros_like, updates), jnp.zeros((), bool)

    updates, finite = jax.lax.cond(inputs_finite, check, skip, updates)
    if recompute is not None:
        # Recomputed from the old state behind a barrier, the accumulators
        # are not phase A's (which XLA would then write to a buffer of their
        # own, for the select to read back): each field is one fused pass,
        # the update and the select together.
        momentum, rms, factored = recompute(_barrier(old))
        state = state._replace(momentum=momentum, rms=rms, factored=factored)
    return updates, _keep_unless(finite, state, old)


def _accumulating_step(step_fn, accumulate, state, grads, params, loss):
    """Sums grads/loss; every `accumulate`-th call runs a VeLO step on the mean.

    Untrained leaves (see `is_trained`) have None sums and zero updates.
    """
    acc = state.accumulation
    treedef = jax.tree_util.tree_structure(params)
    sums = treedef.flatten_up_to(acc.grad_sum)
    grad_sum = treedef.unflatten(
        [
            None if s is None else s + jnp.asarray(g, jnp.float32)
            for s, g in zip(sums, treedef.flatten_up_to(grads))
        ]
    )
    loss_sum = acc.loss_sum + loss
    count = acc.count + 1
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

    def apply(_):
        mean_grads = jax.tree_util.tree_map(lambda s: s / accumulate, grad_sum)
        updates, new_state = step_fn(state, mean_grads, params, loss_sum / accumulate)
        reset = AccumulationState(
            jax.tree_util.tree_map(jnp.zeros_like, grad_sum),
            jnp.zeros_like(loss_sum),
            jnp.zeros_like(count),
        )
        return updates, new_state._replace(accumulation=reset)

    def wait(_):
        return zeros, state._replace(
            accumulation=AccumulationState(grad_sum, loss_sum, count)
        )

    return jax.lax.cond(count >= accumulate, apply, wait, None)


def _velo_step_pallas(
    theta: Mapping[str, Any],
    state: VeLOState,
    grads: Any,
    params: Any,
    loss: jax.Array,
    interpret: bool | None,
    skip_nonfinite: bool = False,
    decoupled_weight_decay: float = 0.0,
    mesh: Any = None,
    param_specs: Any = None,
    fast_commit: bool = True,
) -> tuple[Any, VeLOState, VeLOIntermediates]:
    """`velo_step` with the per-parameter passes as Pallas kernels.

    Same inputs and outputs as `velo_step`. Tensors the kernels take
    (`velo_pallas.supported`) run phase A as two reduction kernels and
    phase C as one kernel that writes the update and the new accumulators;
    the others take the XLA path (not grouped). Phase B is the same code.

    With `skip_nonfinite` (used by `velo`'s update when it steps every
    call) the step also does what `velo`'s update does after `velo_step`:
    the decoupled weight decay and the cast to the params' dtypes (inside
    the kernel), and the non-finite skip: the kernels count non-finite
    gradient and update elements and bound each update from the maxima of
    its MLP's input channels (`param_net.update_bound`). When the loss and
    the gradients are finite and every bound is below the update dtype's
    range (the usual step: the update is then provably finite), phase C
    writes the new accumulators in place: three passes. Otherwise phase C
    writes the old ones back and, only if the updates then turn out finite,
    a last kernel per tensor (`write_accumulators`, which moves no data
    otherwise) writes the new ones. The returned updates are final (zero on
    a skipped step) and `state.nonfinite_steps` is counted.
    `fast_commit=False` (for tests) always takes the second way.
    """
    from velo_scale._src.kernels import velo_pallas

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    path_leaves, treedef, all_p, all_g, active, shapes, lift = _trained_leaves(
        params, grads
    )
    if mesh is not None:
        if param_specs is None:
            raise ValueError("implementation='pallas' with a mesh needs param_specs.")
        from velo_scale._src import sharding as sharding_lib

        all_specs = treedef.flatten_up_to(
            sharding_lib.mesh_param_specs(params, param_specs, mesh)
        )
        tsh = [
            velo_pallas.tensor_sharding(mesh, all_specs[i], len(s))
            for i, s in zip(active, lift)
        ]
    else:
        tsh = [None] * len(active)
    use = [
        velo_pallas.supported(t.local_shape(s) if t else s, s) for s, t in zip(lift, tsh)
    ]
    raw_p = [jnp.asarray(all_p[i]).reshape(s) for i, s in zip(active, lift)]
    raw_g = [jnp.asarray(all_g[i]).reshape(s) for i, s in zip(active, lift)]
    state_leaves, old = _state_fields(treedef, state, active)
    lifted = [
        _lift_accumulators_keep_dtype(a, s == ()) for a, s in zip(old, shapes)
    ]

    loss_buffer = loss_features.update(state.loss_buffer, loss)
    loss_feats = loss_features.features(loss_buffer)
    fraction = state.iteration / jnp.asarray(state.num_steps, jnp.float32)
    n = len(shapes)

    dtypes = [
        _dtype(all_p[active[i]]) if skip_nonfinite else jnp.float32 for i in range(n)
    ]
    # The tensors the kernels take, in groups of one shape, sharding and
    # dtypes: each group's small arrays are combined once (vmapped), so a
    # deeper model adds kernel calls but few XLA ops (the compile time).
    by_key: dict[Any, list[int]] = {}
    for i in range(n):
        if use[i]:
            acc_dtypes = tuple(None if a is None else _dtype(a) for a in lifted[i])
            key = (lift[i], tsh[i], _dtype(raw_p[i]), _dtype(raw_g[i]), acc_dtypes,
                   np.dtype(dtypes[i]))  # fmt: skip
            by_key.setdefault(key, []).append(i)
    groups = list(by_key.values())
    kernel = [i for idx in groups for i in idx]  # the kernel tensors, by group
    where = {i: (gi, k) for gi, idx in enumerate(groups) for k, i in enumerate(idx)}
    xla_path = [i for i in range(n) if not use[i]]

    stats, mean_sq, new = [None] * n, [None] * n, [None] * n
    aux = [
        velo_pallas.sharded_phase_a(
            [raw_p[i] for i in idx], [raw_g[i] for i in idx],
            [lifted[i] for i in idx], tsh[idx[0]], interpret=interpret,
        )  # fmt: skip
        for idx in groups
    ]  # stacked per group
    for i in xla_path:
        p = raw_p[i].astype(jnp.float32)
        g = jnp.clip(raw_g[i].astype(jnp.float32), -GRADIENT_CLIP, GRADIENT_CLIP)
        acc = _lift_accumulators(old[i], shapes[i] == ())
        stats[i] = tensor_net.tensor_statistics(p, acc.m, acc.v)
        new[i] = param_net.update_accumulators(g, acc)
        mean_sq[i] = param_net.channel_mean_squares(p, g, new[i])

    def in_tensor_order(field, xla_rows):
        # The groups' stacked rows, then the XLA-path tensors', in the
        # tensors' order (one gather).
        parts = [getattr(a, field) for a in aux]
        if xla_path:
            parts.append(jnp.stack(xla_rows))
        rows = jnp.concatenate(parts)
        order = np.argsort(np.asarray(kernel + xla_path))
        return rows if (order == np.arange(n)).all() else rows[order]

    b = _phase_b(
        theta, state,
        in_tensor_order("stats", [stats[i] for i in xla_path]),
        in_tensor_order("mean_sq", [mean_sq[i] for i in xla_path]),
        shapes, fraction, loss_feats,
    )  # fmt: skip
    mlps, w0, scale = b.mlps, b.w0, b.scale

    updates = [None] * n
    bad = []  # non-finite flags (bool[])
    wd = decoupled_weight_decay if skip_nonfinite else 0.0
    # The XLA-path tensors first: with the skip, their updates' finiteness
    # is part of the fast commit's condition.
    for i in xla_path:
        mlp = {k: w[i] for k, w in mlps.items()}
        p = raw_p[i].astype(jnp.float32)
        g = jnp.clip(raw_g[i].astype(jnp.float32), -GRADIENT_CLIP, GRADIENT_CLIP)
        update = param_net.apply(mlp, w0[i], scale[i], p, g, new[i])
        new[i] = _lower_accumulators(new[i], shapes[i] == (), old[i])
        if skip_nonfinite:
            if wd:
                update = update - wd * p
            update = update.astype(dtypes[i])
            bad += [~_all_finite([raw_g[i]]), ~_all_finite([update])]
        updates[i] = update.reshape(shapes[i])

    commit = True
    if skip_nonfinite:
        # The fast commit: when the loss and gradients are finite and every
        # kernel tensor's update is bounded below its dtype's range (so
        # provably finite), phase C writes the new accumulators in place and
        # the step needs no 4th pass. Otherwise phase C writes the old ones
        # back and `write_accumulators` commits them once the updates are
        # known to be finite.
        fast = [jnp.isfinite(loss), ~jnp.any(jnp.stack(bad)) if bad else True]
        if kernel:
            # All kernel tensors' bounds at once (one computation per step).
            rows = np.asarray(kernel)
            bounds = jax.vmap(param_net.update_bound, in_axes=(0, 0, 0, 0, None))(
                {k: w[rows] for k, w in mlps.items()}, w0[rows], scale[rows],
                jnp.concatenate([a.max_abs for a in aux]), wd,
            )  # fmt: skip
            limits = np.asarray([_commit_limit(dtypes[i]) for i in kernel], np.float32)
            grad_bad = jnp.concatenate([a.grad_nonfinite for a in aux])
            fast += [jnp.all(bounds < limits), jnp.all(grad_bad == 0)]
        commit = jnp.all(jnp.stack([jnp.asarray(x) for x in fast]))
        if not fast_commit:
            commit = jnp.zeros((), bool)
    packed = velo_pallas.pack_weights(mlps, w0, scale, commit)
    hidden, layers = w0.shape[-1], param_net.num_hidden_layers(mlps)
    for idx, a in zip(groups, aux):
        rows = np.asarray(idx)
        got, accs, upd_bad = velo_pallas.sharded_phase_c(
            packed[rows], w0[rows], [raw_p[i] for i in idx], [raw_g[i] for i in idx],
            [lifted[i] for i in idx], a, tsh[idx[0]],
            interpret=interpret, update_dtype=dtypes[idx[0]], hidden=hidden,
            layers=layers, decoupled_weight_decay=wd,
        )  # fmt: skip
        for i, update, acc in zip(idx, got, accs):
            if skip_nonfinite:  # m, v (and the diagonal); the vectors below.
                acc = acc._replace(v_row=lifted[i].v_row, v_col=lifted[i].v_col)
            new[i] = acc
            updates[i] = update.reshape(shapes[i])
        bad += [jnp.any(a.grad_nonfinite > 0), jnp.any(upd_bad > 0)]

    finite = None
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & ~jnp.any(jnp.stack(bad))
        # Needed only when the fast commit was not taken and the step is
        # finite; otherwise these kernels move no data.
        late = finite & ~commit
        for i in kernel:
            new[i] = velo_pallas.sharded_write_accumulators(
                late, raw_g[i], new[i], tsh[i], interpret=interpret
            )
        for i in range(n):
            if use[i]:
                gi, k = where[i]
                a = aux[gi]
                new[i] = new[i]._replace(
                    v_row=_where_or_none(finite, _row(a.v_row, k), old[i].v_row),
                    v_col=_where_or_none(finite, _row(a.v_col, k), old[i].v_col),
                )
            else:
                new[i] = param_net.Accumulators(
                    *(
                        None if a is None else jnp.where(finite, a, b)
                        for a, b in zip(new[i], old[i])
                    )
                )
            updates[i] = jnp.where(finite, updates[i], jnp.zeros_like(updates[i]))
    for i in kernel:
        new[i] = _lower_accumulators(new[i], shapes[i] == (), old[i])

    full_updates, (new_m, new_v, new_row, new_col, new_diag) = _scatter(
        treedef, all_p, active, state_leaves, updates, new
    )
    small = dict(
        iteration=state.iteration + 1,
        lstm_hidden=b.hidden,
        lstm_cell=b.cell,
        loss_buffer=loss_buffer,
    )
    if finite is not None:
        small = {
            k: jax.tree_util.tree_map(
                lambda a, b: jnp.where(finite, a, b), v, getattr(state, k)
            )
            for k, v in small.items()
        }
        small["nonfinite_steps"] = state.nonfinite_steps + (~finite).astype(jnp.int32)
    new_state = state._replace(
        momentum=new_m,
        rms=new_v,
        factored=FactoredState(v_row=new_row, v_col=new_col, v_diag=new_diag),
        **small,
    )
    return full_updates, new_state, b.intermediates(fraction, loss_feats)


def _commit_limit(dtype) -> float:
    """The bound below which an update of this dtype is taken as finite: the
    dtype's largest value with a 16x margin (for the rounding of the bound
    and of the cast)."""
    return float(jnp.finfo(dtype).max) / 16


def _row(stacked, k):
    """Row k of a group's stacked array (None passes through)."""
    return None if stacked is None else stacked[k]


def _where_or_none(cond, a, b):
    return None if a is None else jnp.where(cond, a.astype(b.dtype), b)


def _lift_accumulators_keep_dtype(
    acc: param_net.Accumulators, scalar: bool
) -> param_net.Accumulators:
    """`_lift_accumulators` without the cast (the kernels cast inside)."""
    if scalar:
        acc = acc._replace(m=acc.m[None], v=acc.v[None], v_diag=acc.v_diag[None])
    return acc
