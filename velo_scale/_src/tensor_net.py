"""Per-tensor network of VeLO: per-tensor features, mixing layer, LSTM, heads.

Each parameter tensor contributes one row of 30 features (paper App. B.3):
the tanh embedding of the fraction of training done (9), the loss features (9),
log-scaled statistics of the previous momentum and rms (7) and a one-hot of
the tensor's rank (5). The rows pass a mixing layer (a per-tensor projection
plus the max over all tensors of a relu projection) and a per-tensor LSTM
whose new hidden state is read by two linear heads: 256 control weights that
mix the per-parameter MLP bank, and a step-size multiplier `lr_mult`.

The per-tensor statistics are means over whole tensors, so on a sharded
parameter they cost one small all-reduce; everything after them runs on an
`[n_tensors, 30]` matrix, replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from velo_scale._src import reductions

NUM_TENSOR_FEATURES = 30
_TIME_EMBED_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
_RANK_ONE_HOT = 5
# Full float32 matmuls so that GPU/TPU agree with the CPU reference.
_HIGHEST = jax.lax.Precision.HIGHEST


def fraction_embedding(fraction_trained: jax.Array) -> jax.Array:
    """f32[9], `tanh(10 * (x - t))` for the 9 timescales t."""
    t = jnp.asarray(_TIME_EMBED_TIMESCALES, jnp.float32)
    return jnp.tanh((fraction_trained - t) * 10)


def _clip_log_abs(v: jax.Array) -> jax.Array:
    return jnp.clip(jnp.log(1e-8 + jnp.abs(v * 10.0)), -5, 5) * 0.5


def rank_one_hot(shape: Sequence[int]) -> np.ndarray:
    """f32[5], one-hot of the number of axes of size > 1 (zeros for >= 5)."""
    rank = int(np.sum(np.asarray(shape) > 1))
    return (
        np.eye(_RANK_ONE_HOT, dtype=np.float32)[rank]
        if rank < 5
        else np.zeros(_RANK_ONE_HOT, np.float32)
    )


def tensor_statistics(p: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
    """f32[7] log-scaled statistics of one tensor's previous state.

    Args:
      p: f32[*s], previous parameter value.
      m: f32[*s, 3], previous momentum.
      v: f32[*s, 1], previous rms.

    Returns:
      `[mean_rms (1), var_m (3), var_rms (3)]`, each `0.5 * clip(log(1e-8 +
      |10 x|), -5, 5)` of the statistic of p, m, v scaled by
      `rsqrt(max(1e-9, mean(p**2)))`. Means are over all axes of the tensor.
    """
    return jax.lax.platform_dependent(
        p,
        m,
        v,
        cpu=_statistics_one_pass,
        cuda=_statistics_one_pass,
        rocm=_statistics_one_pass,
        default=_statistics,
    )


def _log_statistics(mean_rms, var_m, var_rms) -> jax.Array:
    """f32[7], the statistics log-scaled (`_clip_log_abs`), in feature order."""
    return jnp.concatenate(
        [_clip_log_abs(mean_rms), _clip_log_abs(var_m), _clip_log_abs(var_rms)]
    )


def _statistics(p: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
    """`tensor_statistics` as the reference spells it (XLA fuses the sums)."""
    norm = jax.lax.rsqrt(jnp.maximum(1e-9, jnp.mean(p * p)))
    m = m * norm
    v = v * norm
    axes = tuple(range(p.ndim))
    mean_m = jnp.mean(m, axis=axes, keepdims=True)
    var_m = jnp.mean(jnp.square(m - mean_m), axis=axes)
    mean_rms = jnp.mean(v, axis=axes)
    # Quirk kept for the pretrained weights: var_rms is centred on the momentum
    # mean (3 channels), which also makes the feature 3 wide instead of 1.
    var_rms = jnp.mean(jnp.square(v - mean_m), axis=axes)
    return _log_statistics(mean_rms, var_m, var_rms)


def _statistics_one_pass(p: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
    """`_statistics` in two passes over the tensor (XLA:CPU): the sums p and
    m need, then the centred sums of squares and the sum of v, each one
    reduction (`reductions.stacked_sums`). The per-tensor arithmetic stays
    on vectors (one small kernel, not one per statistic)."""
    totals = statistics_totals(p, m)
    second = reductions.stacked_sums(second_pass_terms(p, m, v, totals))
    return statistics_from_sums(p, m, totals, second)


def statistics_totals(p: jax.Array, m: jax.Array) -> jax.Array:
    """f32[k + 1], the first pass of `tensor_statistics` (CPU form): the sums
    of p**2 and of each of the k momentum channels, as one reduction (what
    the centring of the second pass needs)."""
    k = m.shape[-1]
    return reductions.stacked_sums([p * p] + [m[..., i] for i in range(k)])


def _normalised_mean_m(p: jax.Array, totals: jax.Array):
    """(`rsqrt(max(1e-9, mean(p**2)))`, f32[k] the normalised momentum means)."""
    n = np.float32(p.size)
    norm = jax.lax.rsqrt(jnp.maximum(1e-9, totals[0] / n))
    return norm, totals[1:] / n * norm


def second_pass_terms(
    p: jax.Array, m: jax.Array, v: jax.Array, totals: jax.Array
) -> list[jax.Array]:
    """The 2k + 1 arrays whose sums are the second pass of
    `tensor_statistics`: the squared deviations of each normalised momentum
    channel, then of the normalised rms, from the momentum means (`totals`
    from `statistics_totals`), then v. Summed alone or with other
    same-shape sums."""
    norm, mean_m = _normalised_mean_m(p, totals)
    ms = [m[..., i] for i in range(m.shape[-1])]
    v = v[..., 0]
    centred = [jnp.square(mi * norm - mean_m[i]) for i, mi in enumerate(ms)]
    centred += [jnp.square(v * norm - mean_m[i]) for i in range(len(ms))]
    return centred + [v]


def statistics_from_sums(
    p: jax.Array, m: jax.Array, totals: jax.Array, second: jax.Array
) -> jax.Array:
    """f32[7] `tensor_statistics` from the two passes' sums (`totals`, and
    f32[2k + 1] the sums of `second_pass_terms`)."""
    k = m.shape[-1]
    norm, _ = _normalised_mean_m(p, totals)
    means = second / np.float32(p.size)
    mean_rms = means[2 * k :] * norm
    return _log_statistics(mean_rms, means[:k], means[k : 2 * k])


def assemble_features(
    stats: jax.Array,
    ranks: np.ndarray,
    fraction_trained: jax.Array,
    loss_features: jax.Array,
) -> jax.Array:
    """f32[n, 30] LSTM inputs, features concatenated in alphabetical order.

    Args:
      stats: f32[n, 7] from `tensor_statistics`.
      ranks: f32[n, 5] rank one-hots.
      fraction_trained: f32[] iteration / N (pre-increment iteration).
      loss_features: f32[9].
    """
    n = stats.shape[0]
    # fraction_left, loss_features, mean_rms, rank, var_m, var_rms.
    time = jnp.broadcast_to(fraction_embedding(fraction_trained), (n, 9))
    loss = jnp.broadcast_to(loss_features, (n, 9))
    return jnp.concatenate(
        [time, loss, stats[:, :1], jnp.asarray(ranks), stats[:, 1:4], stats[:, 4:7]],
        axis=1,
    )


def linear(params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    return jnp.dot(x, params["w"], precision=_HIGHEST) + params["b"]


def apply(
    rnn_params: Mapping[str, Any],
    features: jax.Array,
    hidden: jax.Array,
    cell: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Mixing layer, LSTM step and heads.

    Args:
      rnn_params: the checkpoint's `rnn_params` dict.
      features: f32[n, 30] per-tensor features.
      hidden, cell: f32[n, H] LSTM state.

    Returns:
      (control_params f32[n, K], lr_mult f32[n], hidden f32[n, H],
      cell f32[n, H]).
    """
    # Quirk kept for the pretrained weights: the reference computes
    # relu(linear(x)) and overwrites it, so `linear` has no effect; `linear_1`
    # is the mixing layer and `linear_2` the per-tensor projection.
    mixed = jnp.max(jax.nn.relu(linear(rnn_params["linear_1"], features)), axis=0)
    x = linear(rnn_params["linear_2"], features) + mixed[None, :]
    gates = linear(rnn_params["rnn/linear"], jnp.concatenate([x, hidden], axis=1))
    i, g, f, o = jnp.split(gates, 4, axis=1)
    cell = jax.nn.sigmoid(f + 1) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
    controls = linear(rnn_params["rnn_to_controls"], hidden)
    lr_mult = linear(rnn_params["step_size"], hidden)[:, 0]
    return controls, lr_mult, hidden, cell
