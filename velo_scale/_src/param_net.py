"""Per-parameter MLP of VeLO and the step it produces (paper App. B.4).

For every parameter tensor the MLP weights are the control-weighted mix of a
bank of K stacked MLPs (`ff_mod_stack`): `W = 100 * mean_k(c_k * W_k)` with
`c` the tensor's row of `control_params`. The MLP reads 30 per-parameter
feature channels in 14 groups (see `feature_channels`), each channel
normalised by its root mean square over the tensor, has relu hidden layers,
and outputs a direction d and a magnitude a per parameter:

    step = d * exp(0.001 * a) * 0.001 * lr_mult * sqrt(mean(p**2) + 1e-9)

The update returned is `-step`.

Written for memory bandwidth, not for reading like the reference: the
normaliser of each channel is folded into the first layer's weights (a [30, F]
matrix per tensor), and the MLP is spelled as scalar-weighted sums of
parameter-shaped arrays, so XLA fuses feature computation, all layers and the
step into one elementwise pass without materialising the 30 channels. The
row/column channels are normalised from their (small) factored vectors. The
only cross-element work is a handful of per-tensor means, which on a sharded
tensor are small all-reduces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from velo_scale._src import accumulators, reductions

# Channels of the 14 input groups, in the order of `w0__0 ... w0__13`.
INPUT_GROUP_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
NUM_PARAM_FEATURES = sum(INPUT_GROUP_WIDTHS)
NUM_OUTPUTS = 3
EXP_MULT = 0.001
STEP_MULT = 0.001
_BANK_SCALE = 100.0
_NORMALISER_EPS = 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST


def num_hidden_layers(ff_stack: Mapping[str, jax.Array]) -> int:
    """Number of hidden layers of the MLP bank (2 for the official weights)."""
    return sum(1 for k in ff_stack if k.startswith("b")) - 1


def mix_bank(
    ff_stack: Mapping[str, jax.Array], controls: jax.Array
) -> dict[str, jax.Array]:
    """Per-tensor MLP weights from the bank.

    Args:
      ff_stack: the checkpoint's `ff_mod_stack/~` dict, leaves f32[K, ...].
      controls: f32[n, K] control weights, one row per tensor.

    Returns:
      Dict with the bank's keys, leaves f32[n, ...]:
      `100 * mean_k(controls[:, k] * ff_stack[key][k])`.
    """
    k = controls.shape[1]
    out = {}
    for name, w in ff_stack.items():
        flat = w.reshape(k, -1)
        mixed = jnp.dot(controls, flat, precision=_HIGHEST) * (_BANK_SCALE / k)
        out[name] = mixed.reshape((controls.shape[0],) + w.shape[1:])
    return out


class Accumulators(NamedTuple):
    """One tensor's accumulators (see `state.VeLOState`)."""

    m: jax.Array  # f32[*s, 3]
    v: jax.Array  # f32[*s, 1]
    v_row: jax.Array
    v_col: jax.Array
    v_diag: jax.Array


def mean_squares(xs: list[jax.Array]) -> jax.Array:
    """f32[len(xs)], `mean(x**2)` of each channel over the tensor.

    A channel broadcast along some axes (the factored row/column channels) has
    the mean square of its own smaller array, so it is reduced at that size.
    The full-size channels are summed together (`reductions.stacked_sums`:
    one pass on CPU). On CPU and GPU the small channels of one shape are
    reduced as one stacked array; on TPU each alone (XLA:TPU fuses them).
    """
    return jax.lax.platform_dependent(
        *xs,
        cpu=_mean_squares_stacked,
        cuda=_mean_squares_stacked,
        rocm=_mean_squares_stacked,
        default=_mean_squares_each,
    )


def _mean_squares_each(*xs: jax.Array) -> jax.Array:
    # XLA:TPU and XLA:GPU fuse these sibling reductions themselves.
    size = max(x.size for x in xs)
    full = [i for i, x in enumerate(xs) if x.size == size]
    out = [None if x.size == size else jnp.mean(jnp.square(x)) for x in xs]
    for i, total in zip(full, reductions.sums([jnp.square(xs[i]) for i in full])):
        out[i] = total / np.float32(size)
    return jnp.stack(out)


def _mean_squares_stacked(*xs: jax.Array) -> jax.Array:
    # XLA:CPU compiles a kernel for every small reduction and every scalar
    # used alone (~60 per factored tensor with `_mean_squares_each`), and
    # XLA:GPU launches one for each small reduction: the small channels of
    # one shape are reduced as one stacked array and the result is
    # assembled as one vector (~10 kernels).
    return mean_squares_and_sums(list(xs), [])[0]


def mean_squares_and_sums(
    xs: list[jax.Array], extra: list[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """(f32[len(xs)] `mean_squares(xs)` in its CPU form, f32[len(extra)] the
    sums of `extra`, arrays of the channels' full size summed in the same
    one-pass reduction as the full-size channels' squares)."""
    size = max(x.size for x in xs)
    full = [i for i, x in enumerate(xs) if x.size == size]
    if any(x.size != size for x in extra):
        raise ValueError("extra sums must have the channels' full size")
    sums = reductions.stacked_sums(
        [jnp.square(xs[i]) for i in full]
        + [x.reshape(xs[full[0]].shape) for x in extra]
    )
    extra_sums = sums[len(full) :]
    parts = [sums[: len(full)] / size]
    order = list(full)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        if x.size != size:
            by_shape.setdefault(x.shape, []).append(i)
    for idx in by_shape.values():
        stacked = jnp.stack([xs[i] for i in idx])
        parts.append(jnp.mean(jnp.square(stacked), axis=tuple(range(1, stacked.ndim))))
        order += idx
    out = jnp.concatenate(parts)
    if order != sorted(order):
        out = out[np.argsort(order)]
    return out, extra_sums


def feature_channels(p: jax.Array, g: jax.Array, acc: Accumulators) -> list[jax.Array]:
    """The 30 input channels of the MLP.

    Channel order (group: channels): 0 g; 1 clip(g, +-0.1); 2 p; 3 m (3);
    4 v; 5 m * rsqrt(v + 1e-6) (3); 6 rsqrt(v + 1e-6); 7 adafactor-
    preconditioned g (3); 8 g * rsqrt(v + 1e-6); 9 row accumulator (3);
    10 column accumulator (3); 11 rsqrt(row + 1e-8) (3); 12 rsqrt(col + 1e-8)
    (3); 13 m times the adafactor factors (3). For scalars and vectors, 9/10
    are both the diagonal accumulator, 11/12 its rsqrt(. + 1e-8) and 13
    `m * diag**-0.5`.

    Args:
      p: f32[*s] previous params, g: f32[*s] clipped gradient (rank >= 1).
      acc: the *updated* accumulators.

    Returns:
      30 arrays broadcastable to `s` (the row/column channels stay vectors).
    """
    m = [acc.m[..., i] for i in range(acc.m.shape[-1])]
    v = acc.v[..., 0]
    rsqrt_v = jax.lax.rsqrt(v + 1e-6)
    chans = [g, jnp.clip(g, -0.1, 0.1), p, *m, v]
    chans += [mi * rsqrt_v for mi in m]
    chans += [rsqrt_v]
    dims = accumulators.factored_dims(p.shape)
    if dims is None:
        diag = [acc.v_diag[..., i] for i in range(acc.v_diag.shape[-1])]
        chans += [g * accumulators.safe_rsqrt(di + 1e-9) for di in diag]
        chans += [g * rsqrt_v]
        diag_rsqrt = [jax.lax.rsqrt(di + 1e-8) for di in diag]
        # Quirk kept for the pretrained weights: vectors feed the diagonal
        # accumulator to both the row and column slots, and no epsilon in **-0.5.
        chans += diag + diag + diag_rsqrt + diag_rsqrt
        chans += [mi * di**-0.5 for mi, di in zip(m, diag)]
        return chans

    d1, d0 = dims
    row_factor, col_factor = accumulators.factored_factors(acc.v_row, acc.v_col, dims)
    factor = [row_factor[..., i] * col_factor[..., i] for i in range(len(m))]
    chans += [g * f for f in factor]
    chans += [g * rsqrt_v]
    rows = [jnp.expand_dims(acc.v_row[..., i], d0) for i in range(len(m))]
    cols = [jnp.expand_dims(acc.v_col[..., i], d1) for i in range(len(m))]
    vectors = rows + cols + [jax.lax.rsqrt(r + 1e-8) for r in rows]
    vectors += [jax.lax.rsqrt(c + 1e-8) for c in cols]
    chans += vectors
    chans += [mi * f for mi, f in zip(m, factor)]
    return chans


def update_accumulators(g: jax.Array, acc: Accumulators) -> Accumulators:
    """One tensor's updated accumulators (g: f32[*s] clipped, rank >= 1)."""
    v_row, v_col, v_diag = accumulators.update_factored(
        acc.v_row, acc.v_col, acc.v_diag, g
    )
    return Accumulators(
        m=accumulators.update_momentum(acc.m, g),
        v=accumulators.update_rms(acc.v, g),
        v_row=v_row,
        v_col=v_col,
        v_diag=v_diag,
    )


def channel_mean_squares(p: jax.Array, g: jax.Array, acc: Accumulators) -> jax.Array:
    """f32[30], the mean square of each MLP input channel over the tensor.

    Args:
      p: f32[*s] previous params, g: f32[*s] clipped gradient (rank >= 1).
      acc: the *updated* accumulators.
    """
    return mean_squares(feature_channels(p, g, acc))


def first_layer(mlps: Mapping[str, jax.Array], mean_sq: jax.Array) -> jax.Array:
    """f32[n, 30, F] first-layer weights with the channel normaliser folded in.

    `x_c * rsqrt(1e-5 + mean(x_c**2))` followed by `@ W` equals `x_c @ W'`
    with `W'[c] = W[c] * rsqrt(1e-5 + mean(x_c**2))`.

    Args:
      mlps: `mix_bank` output (leaves f32[n, ...]).
      mean_sq: f32[n, 30] per-tensor channel mean squares.
    """
    w0 = jnp.concatenate(
        [mlps[f"w0__{i}"] for i in range(len(INPUT_GROUP_WIDTHS))], axis=1
    )
    return w0 * jax.lax.rsqrt(_NORMALISER_EPS + mean_sq)[:, :, None]


def step_scale(lr_mult: jax.Array, mean_sq: jax.Array) -> jax.Array:
    """f32[n] `lr_mult * 0.001 * sqrt(mean(p**2) + 1e-9)` per tensor."""
    # Channel 2 is p itself, so its mean square is mean(p**2).
    return lr_mult * (jnp.sqrt(mean_sq[:, 2] + 1e-9) * STEP_MULT)


def apply(
    mlp: Mapping[str, jax.Array],
    w0: jax.Array,
    scale: jax.Array,
    p: jax.Array,
    g: jax.Array,
    acc: Accumulators,
) -> jax.Array:
    """The update `-step` of one tensor (phase C), f32[*p.shape].

    The channels are recomputed from (p, g, acc) inside the same elementwise
    pass rather than kept from `channel_mean_squares`.

    Args:
      mlp: this tensor's MLP weights (one row of `mix_bank`; w0 is replaced).
      w0: f32[30, F] this tensor's row of `first_layer`.
      scale: f32[] this tensor's `step_scale`.
      p, g: f32[*s] previous params and clipped gradient (rank >= 1).
      acc: the updated accumulators.
    """
    chans = feature_channels(p, g, acc)
    hidden = jax.lax.platform_dependent(
        chans,
        w0,
        mlp["b0"],
        cuda=_dense_last_axis,
        rocm=_dense_last_axis,
        default=_dense,
    )
    layers = num_hidden_layers(mlp)
    for layer in range(1, layers + 1):
        hidden = [jax.nn.relu(h) for h in hidden]
        w, b = mlp[f"w{layer}"], mlp[f"b{layer}"]
        if layer == layers:
            w, b = w[:, :2], b[:2]  # the third output is unused
        hidden = _dense(hidden, w, b)
    direction, magnitude = hidden[0], hidden[1]
    return -(scale * (direction * jnp.exp(magnitude * EXP_MULT)))


def update_bound(
    mlp: Mapping[str, jax.Array],
    w0: jax.Array,
    scale: jax.Array,
    max_abs: jax.Array,
    decoupled_weight_decay: float = 0.0,
) -> jax.Array:
    """f32[], an upper bound on `max |update|` of one tensor (`apply`'s
    update, minus `decoupled_weight_decay * p`).

    From `M_c = max |x_c|`, the largest magnitude of each input channel over
    the tensor, by the triangle inequality layer by layer: the first layer's
    outputs are at most `|b0| + sum_c M_c |w0[c]|`, a relu keeps a bound, the
    next layers map bounds through `|w|` and `|b|`, and the step is at most
    `|scale| * D * exp(0.001 * A)` for the bounds D, A of the direction and
    the magnitude. It is computed with elementwise f32 products and sums (no
    matmul, whose precision differs by backend); its own rounding is far
    below the margin `velo` leaves against the dtype's largest value. A NaN
    or infinite `M_c` gives a NaN or infinite bound.

    Args:
      mlp, w0, scale: as for `apply` (w0 f32[30, F], normalisers folded in).
      max_abs: f32[30] the channels' maxima of `|x_c|`.
    """
    h = jnp.abs(mlp["b0"]) + jnp.sum(max_abs[:, None] * jnp.abs(w0), axis=0)
    layers = num_hidden_layers(mlp)
    for layer in range(1, layers + 1):
        w, b = mlp[f"w{layer}"], mlp[f"b{layer}"]
        if layer == layers:
            w, b = w[:, :2], b[:2]
        h = jnp.abs(b) + jnp.sum(h[:, None] * jnp.abs(w), axis=0)
    direction, magnitude = h[0], h[1]
    step = jnp.abs(scale) * (direction * jnp.exp(magnitude * EXP_MULT))
    return step + decoupled_weight_decay * max_abs[2]


def _dense_last_axis(
    xs: list[jax.Array], w: jax.Array, b: jax.Array
) -> list[jax.Array]:
    """`_dense` (the same products, summed in the same order) with the F
    outputs on a last axis of size F: one multiply-add per input, not F.

    XLA:GPU's fusion pass is slow on the F-fold larger graph (for the first
    layer of every tensor: 30 x F scalar weights, each sliced, broadcast,
    multiplied and added), about half of its compile time.
    """
    out = _sum_by_shape(xs, lambda i: xs[i][..., None] * w[i]) + b
    return [out[..., j] for j in range(w.shape[1])]


def _dense(xs: list[jax.Array], w: jax.Array, b: jax.Array) -> list[jax.Array]:
    """`[b_j + sum_i xs[i] * w[i, j] for j]`: a dense layer over channel lists.

    Channels that are broadcast vectors (the factored row/column channels) are
    summed among themselves first, at their own small size, so the full-size
    pass only adds one term per vector shape.
    """
    return [
        _sum_by_shape(xs, lambda i, j=j: xs[i] * w[i, j]) + b[j]
        for j in range(w.shape[1])
    ]


def _sum_by_shape(xs: list[jax.Array], term) -> jax.Array:
    """`sum_i term(i)`, the terms of channels of one shape summed first (in
    index order), the shapes' partial sums then added largest first."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    total = None
    for shape in sorted(by_shape, key=lambda s: -int(np.prod(s))):
        part = None
        for i in by_shape[shape]:
            part = term(i) if part is None else part + term(i)
        total = part if total is None else total + part
    return total
