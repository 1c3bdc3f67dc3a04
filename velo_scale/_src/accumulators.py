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


def init_momentum(p: jax.Array) -> jax.Array:
    """Zero momentum, f32[*p.shape, 3]."""
    return jnp.zeros(p.shape + (len(MOMENTUM_DECAYS),), jnp.float32)


def init_rms(p: jax.Array) -> jax.Array:
    """Zero second moment, f32[*p.shape, 1]."""
    return jnp.zeros(p.shape + (len(RMS_DECAYS),), jnp.float32)


def update_momentum(m: jax.Array, g: jax.Array) -> jax.Array:
    """`m <- d * m + (1 - d) * g` for every decay d (trailing axis)."""
    d = jnp.asarray(MOMENTUM_DECAYS, dtype=jnp.float32)
    return d * m + (1 - d) * g[..., None]


def update_rms(v: jax.Array, g: jax.Array) -> jax.Array:
    """`v <- d * v + (1 - d) * g**2` for every decay d (trailing axis)."""
    d = _decays(RMS_DECAYS)
    return d * v + (1 - d) * (g * g)[..., None]


def factored_shapes(
    shape: Sequence[int],
) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None, tuple[int, ...] | None]:
    """Shapes (v_row, v_col, v_diag) of the factored accumulators of a tensor;
    None for the slots a tensor does not use (the reference keeps empty
    `[0, 3]` arrays there, which checkpointers cannot store)."""
    n = len(ADAFACTOR_DECAYS)
    dims = factored_dims(shape)
    if dims is None:
        return None, None, tuple(shape) + (n,)
    d1, d0 = dims
    row = tuple(s for i, s in enumerate(shape) if i != d0) + (n,)
    col = tuple(s for i, s in enumerate(shape) if i != d1) + (n,)
    return row, col, None


def init_factored(p: jax.Array) -> tuple[jax.Array | None, ...]:
    """Zero factored accumulators (v_row, v_col, v_diag); see `factored_shapes`."""
    return tuple(
        None if s is None else jnp.zeros(s, jnp.float32)
        for s in factored_shapes(p.shape)
    )


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
      v_row, v_col, v_diag: accumulators from `init_factored`.
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
