"""Per-parameter accumulators of VeLO: momentum, rms and factored second moments.

All functions act on one parameter tensor and keep the decay axis last, so an
accumulator of a parameter with shape `s` has shape `s + (n_decays,)` and is
partitioned exactly like its parameter (with the decay axis replicated).
No bias correction is applied anywhere (paper App. B).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
# Added to g**2 inside the factored accumulators, as in Adafactor.
ADAFACTOR_EPSILON = 1e-30


def factored_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """Axes (d1, d0) over which a tensor's second moment is factored.

    d0 is the largest axis and d1 the second largest. Every tensor of rank >= 2
    is factored, even when an axis has size 1 (e.g. `(1, 9)`).

    Args:
      shape: the parameter's shape.

    Returns:
      None for scalars and vectors, else `(d1, d0)`.
    """
    if len(shape) < 2:
        return None
    # Quirk kept for the pretrained weights: ties go by (stable) argsort order,
    # so for equal sizes the later axis counts as the larger one.
    order = np.argsort(np.asarray(shape), kind="stable")
    return int(order[-2]), int(order[-1])


def _decays(values: Sequence[float]) -> jax.Array:
    # float32, clipped to [0, 1] like the reference before forming 1 - decay.
    return jnp.clip(jnp.asarray(values, dtype=jnp.float32), 0.0, 1.0)


def init_all(zeros: jax.Array) -> tuple[jax.Array | None, ...]:
    """Zero accumulators (m, v, v_row, v_col, v_diag) of one parameter.

    Args:
      zeros: `zeros_like(p)` in the storage dtype. Every accumulator is formed
        from it by the same broadcasts and reductions that `update_*` apply to
        the gradient, so its type (shape, dtype, sharding under an
        explicit-axes mesh) is the one the update returns.

    Returns:
      m [*s, 3], v [*s, 1], and the factored slots (see `factored_shapes`;
      the unused ones are None).
    """
    z = zeros[..., None]
    three = jnp.zeros((len(ADAFACTOR_DECAYS),), zeros.dtype)
    dims = factored_dims(zeros.shape)
    m = z + jnp.zeros((len(MOMENTUM_DECAYS),), zeros.dtype)
    v = z + jnp.zeros((len(RMS_DECAYS),), zeros.dtype)
    if dims is None:
        return m, v, None, None, z + three
    d1, d0 = dims
    row = jnp.sum(zeros, axis=d0)[..., None] + three
    col = jnp.sum(zeros, axis=d1)[..., None] + three
    return m, v, row, col, None


def update_momentum(m: jax.Array, g: jax.Array) -> jax.Array:
    """`m <- d * m + (1 - d) * g` for every decay d (trailing axis)."""
    d = jnp.asarray(MOMENTUM_DECAYS, dtype=jnp.float32)
    return d * m + (1 - d) * g[..., None]


def update_rms(v: jax.Array, g: jax.Array) -> jax.Array:
    """`v <- d * v + (1 - d) * g**2` for every decay d (trailing axis)."""
    d = _decays(RMS_DECAYS)
    return d * v + (1 - d) * (g * g)[..., None]


def safe_rsqrt(x: jax.Array) -> jax.Array:
    """`rsqrt(max(x, 1e-9))`."""
    return jax.lax.rsqrt(jnp.maximum(x, 1e-9))


def factored_factors(
    v_row: jax.Array, v_col: jax.Array, dims: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """Row and column preconditioning factors, broadcastable to `p.shape + (3,)`.

    `row_factor = rsqrt(v_row / (mean of v_row over its remaining factored
    axis + 1e-9))` and `col_factor = rsqrt(v_col)`, both floored at 1e-9 inside
    the rsqrt, expanded back over the axis each one was reduced over.
    """
    d1, d0 = dims
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_col_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
    row_factor = safe_rsqrt(v_row / (row_col_mean + 1e-9))
    col_factor = safe_rsqrt(v_col)
    return jnp.expand_dims(row_factor, d0), jnp.expand_dims(col_factor, d1)


def update_factored(
    v_row: jax.Array, v_col: jax.Array, v_diag: jax.Array, g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Updates the adafactor accumulators (v_row, v_col, v_diag) with g.

    Args:
      v_row, v_col, v_diag: accumulators from `init_all`.
      g: f32 gradient (already clipped), rank >= 1.

    Returns:
      The updated (v_row, v_col, v_diag); the unused ones pass through.
    """
    d = _decays(ADAFACTOR_DECAYS)
    grad_sqr = g * g + ADAFACTOR_EPSILON
    dims = factored_dims(g.shape)
    if dims is None:
        return v_row, v_col, d * v_diag + (1 - d) * grad_sqr[..., None]
    d1, d0 = dims
    v_row = d * v_row + (1 - d) * jnp.mean(grad_sqr, axis=d0)[..., None]
    v_col = d * v_col + (1 - d) * jnp.mean(grad_sqr, axis=d1)[..., None]
    return v_row, v_col, v_diag
