"""Typed optimizer state of VeLO.

Every per-parameter field is a pytree with the structure of the parameters and
one leaf per parameter tensor; the leaf's leading axes are the parameter's
axes and its trailing axis indexes the accumulator decay. The per-tensor LSTM
state has one row per parameter tensor, in `jax.tree_util.tree_leaves` order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

PyTree = Any


class LossBufferState(NamedTuple):
    """Rolling loss accumulators behind the 9 loss features (paper App. B).

    Attributes:
      means: f32[10], exponential moving averages of the (clipped) loss.
      running_min: f32[10], running minimum of the bias-corrected means.
      decays: f32[10], decays `exp(-1 / h)`, `h = logspace(1, log10(N), 10)`.
      iteration: i32[], number of losses seen.
    """

    means: jax.Array
    running_min: jax.Array
    decays: jax.Array
    iteration: jax.Array


class FactoredState(NamedTuple):
    """Adafactor-style second-moment accumulators, one set per decay.

    For a tensor of rank >= 2 factored over axes (d1, d0) (second largest,
    largest), `v_row` has the tensor's shape without axis d0, `v_col` the shape
    without axis d1, each with a trailing axis of 3 decays, and `v_diag` is
    None. For scalars and vectors `v_diag` has `shape + (3,)` and
    `v_row`/`v_col` are None (the reference's empty `[0, 3]` arrays).
    """

    v_row: PyTree
    v_col: PyTree
    v_diag: PyTree


class AccumulationState(NamedTuple):
    """Gradient accumulation used when `num_steps > max_training_steps`.

    Attributes:
      grad_sum: like params, f32 sum of the gradients since the last VeLO step.
      loss_sum: f32[], sum of the losses since the last VeLO step.
      count: i32[], number of calls since the last VeLO step.
    """

    grad_sum: PyTree
    loss_sum: jax.Array
    count: jax.Array


class VeLOState(NamedTuple):
    """State of `velo_scale.velo`.

    Attributes:
      iteration: i32[], VeLO steps taken (pre-increment value drives the
        fraction of training done).
      num_steps: i32[], horizon N the optimizer was told (after accumulation).
      momentum: like params, leaves f32[*p.shape, 3] (decays 0.9/0.99/0.999).
      rms: like params, leaves f32[*p.shape, 1] (decay 0.999).
      factored: `FactoredState` of adafactor accumulators (decays
        0.9/0.99/0.999).
      lstm_hidden: f32[n_tensors, lstm_hidden_size], per-tensor LSTM h.
      lstm_cell: f32[n_tensors, lstm_hidden_size], per-tensor LSTM c.
      loss_buffer: `LossBufferState`.
      accumulation: `AccumulationState`, or None when every call is a VeLO step.
      nonfinite_steps: i32[], calls skipped because the loss, a gradient or
        the resulting update was not finite (those calls changed nothing
        else in the state and returned zero updates).

    Leaves that VeLO does not train (non-float dtypes, zero-size arrays) have
    None in every per-parameter field and no row in the LSTM state.
    """

    iteration: jax.Array
    num_steps: jax.Array
    momentum: PyTree
    rms: PyTree
    factored: FactoredState
    lstm_hidden: jax.Array
    lstm_cell: jax.Array
    loss_buffer: LossBufferState
    accumulation: AccumulationState | None
    nonfinite_steps: jax.Array
