"""Per-parameter MLP of VeLO and the step it produces (paper App. B.4).

For every parameter tensor the MLP weights are the control-weighted mix of a
bank of K stacked MLPs (`ff_mod_stack`): `W = 100 * mean_k(c_k * W_k)` with
`c` the tensor's row of `control_params`. The MLP reads 14 groups of
per-parameter features (30 channels), each normalised by its second moment
over the tensor, has relu hidden layers, and outputs a direction d and a
magnitude a per parameter:

    step = d * exp(0.001 * a) * 0.001 * lr_mult * sqrt(mean(p**2) + 1e-9)

The update returned is `-step`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from velo_scale._src import accumulators

# Channels of the 14 input groups, in the order of `w0__0 ... w0__13`.
INPUT_GROUP_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
NUM_PARAM_FEATURES = sum(INPUT_GROUP_WIDTHS)
NUM_OUTPUTS = 3
EXP_MULT = 0.001
STEP_MULT = 0.001
_BANK_SCALE = 100.0
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


def _normalise(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return x * jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def input_groups(
    p: jax.Array,
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    fac_g: jax.Array,
    v_row: jax.Array,
    v_col: jax.Array,
    v_diag: jax.Array,
    factored: tuple[int, int] | None,
) -> list[jax.Array]:
    """The 14 feature groups, each f32[*p.shape, c_i], before normalisation.

    Args:
      p: f32[*s] previous params; g: f32[*s] clipped gradient.
      m, v, fac_g, v_row, v_col, v_diag: the updated accumulators and the
        adafactor-preconditioned gradient (see `accumulators`).
      factored: `factored_dims(s)` or None.
    """
    rsqrt_v = jax.lax.rsqrt(v + 1e-6)
    g1 = g[..., None]
    groups = [
        g1,
        jnp.clip(g1, -0.1, 0.1),
        p[..., None],
        m,
        v,
        m * rsqrt_v,
        rsqrt_v,
        fac_g,
        g1 * rsqrt_v,
    ]
    full = p.shape + (m.shape[-1],)
    if factored is None:
        diag_rsqrt = jax.lax.rsqrt(v_diag + 1e-8)
        # Quirk kept for the pretrained weights: vectors feed the diagonal
        # accumulator to both the row and column slots, and no epsilon in **-0.5.
        groups += [v_diag, v_diag, diag_rsqrt, diag_rsqrt, m * v_diag**-0.5]
        return groups
    d1, d0 = factored
    row = jnp.broadcast_to(jnp.expand_dims(v_row, d0), full)
    col = jnp.broadcast_to(jnp.expand_dims(v_col, d1), full)
    row_factor, col_factor = accumulators.factored_factors(v_row, v_col, factored)
    groups += [
        row,
        col,
        jax.lax.rsqrt(row + 1e-8),
        jax.lax.rsqrt(col + 1e-8),
        m * row_factor * col_factor,
    ]
    return groups


def apply_mlp(
    mlp: Mapping[str, jax.Array], groups: list[jax.Array], axes: tuple[int, ...]
) -> jax.Array:
    """Runs one tensor's MLP; returns f32[*s, 3] raw outputs.

    Args:
      mlp: weights of this tensor's MLP (`mix_bank` output, one row).
      groups: the 14 groups from `input_groups`.
      axes: the tensor's axes, over which each group is normalised.
    """
    num_hidden = sum(1 for k in mlp if k.startswith("b")) - 1
    h = mlp["b0"]
    for i, x in enumerate(groups):
        h = h + jnp.einsum(
            "...c,ch->...h", _normalise(x, axes), mlp[f"w0__{i}"], precision=_HIGHEST
        )
    for layer in range(1, num_hidden + 1):
        h = jax.nn.relu(h)
        h = jnp.einsum("...c,ch->...h", h, mlp[f"w{layer}"], precision=_HIGHEST)
        h = h + mlp[f"b{layer}"]
    return h


def step(outputs: jax.Array, p: jax.Array, lr_mult: jax.Array) -> jax.Array:
    """The parameter step (to be subtracted) from the MLP outputs.

    Args:
      outputs: f32[*s, 3], MLP outputs (direction, magnitude, unused).
      p: f32[*s] previous params.
      lr_mult: f32[] the tensor's step-size multiplier from the LSTM.
    """
    direction = outputs[..., 0]
    magnitude = jnp.exp(outputs[..., 1] * EXP_MULT)
    param_scale = jnp.sqrt(jnp.mean(jnp.square(p)) + 1e-9)
    return lr_mult * (direction * (param_scale * magnitude) * STEP_MULT)


def tensor_update(
    mlp: Mapping[str, Any],
    lr_mult: jax.Array,
    p: jax.Array,
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    fac_g: jax.Array,
    v_row: jax.Array,
    v_col: jax.Array,
    v_diag: jax.Array,
) -> jax.Array:
    """f32 update (`-step`) of one tensor, same shape as p."""
    shape = p.shape
    if p.ndim == 0:
        # Quirk kept for the pretrained weights: scalars act as shape (1,).
        p, g, m, v, fac_g, v_diag = (x[None] for x in (p, g, m, v, fac_g, v_diag))
    factored = accumulators.factored_dims(p.shape)
    groups = input_groups(p, g, m, v, fac_g, v_row, v_col, v_diag, factored)
    outputs = apply_mlp(mlp, groups, tuple(range(p.ndim)))
    return -step(outputs, p, lr_mult).reshape(shape)
