"""The rolling loss buffer and the 9 loss features fed to the per-tensor LSTM.

Ten exponential moving averages of the training loss with half-lives spaced
logarithmically from 10 to the training horizon N (paper App. B.2). Each
feature compares one average with the next-longer one, relative to the
running minimum, and is clipped to [-1, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from velo_scale._src.state import LossBufferState

NUM_LOSS_AVERAGES = 10
NUM_LOSS_FEATURES = NUM_LOSS_AVERAGES - 1
_RUNNING_MIN_INIT = 999999999999.0


def loss_buffer_decays(num_steps: int | jax.Array) -> jax.Array:
    """f32[10] decays `exp(-1 / h)` with `h = logspace(1, log10(N), 10)`.

    Computed with float32 jnp ops like the reference, so that e.g. N = 10 gives
    0.90483737 for the last decay (float32 `log10(10)` is 0.99999994).
    """
    n = jnp.asarray(num_steps, jnp.int32).astype(jnp.float32)
    # Quirk kept for the pretrained weights: log10 as log(n) / log(10) in
    # float32 (the reference's jax), which gives 0.99999994 for n = 10.
    log10_n = jnp.log(n) / jnp.log(jnp.float32(10))
    halflife = jnp.logspace(1, log10_n, NUM_LOSS_AVERAGES)
    return jnp.exp(-1.0 / halflife).astype(jnp.float32)


def compiled_decays(num_steps: int) -> np.ndarray:
    """`loss_buffer_decays` evaluated by XLA once, as the reference's jitted
    init does: eager and compiled float32 `log` differ in the last bit."""
    # Evaluated now even when called while tracing (e.g. inside a jitted
    # meta-training unroll); the compiled kernel still does the arithmetic.
    with jax.ensure_compile_time_eval():
        return np.asarray(jax.jit(loss_buffer_decays)(int(num_steps)))


def init(decays: jax.Array) -> LossBufferState:
    """Empty loss buffer with the given f32[10] decays."""
    return LossBufferState(
        means=jnp.zeros((NUM_LOSS_AVERAGES,), jnp.float32),
        running_min=jnp.full((NUM_LOSS_AVERAGES,), _RUNNING_MIN_INIT, jnp.float32),
        decays=jnp.asarray(decays, jnp.float32),
        iteration=jnp.zeros((), jnp.int32),
    )


def update(state: LossBufferState, loss: jax.Array) -> LossBufferState:
    """Adds one loss (f32 scalar) to the buffer.

    The loss is first clipped from above to twice the largest bias-corrected
    mean so that a single spike cannot dominate; at the first step nothing is
    clipped and negative losses pass unchanged.
    """
    d = state.decays
    it = state.iteration
    corrected = state.means / (1 - d ** (it + 1))
    approx_max = jnp.where(it == 0, loss, jnp.max(corrected))
    loss = jnp.minimum(jnp.abs(approx_max) * 2, loss)
    means = state.means * d + loss * (1.0 - d)
    corrected = means / (1 - d ** (it + 1))
    return LossBufferState(
        means=means,
        running_min=jnp.minimum(state.running_min, corrected),
        decays=d,
        iteration=it + 1,
    )


def features(state: LossBufferState) -> jax.Array:
    """f32[9] loss features of an (already updated) buffer.

    `clip((c_j - r_j) / max(1e-8, c_{j+1} - r_j) - 1, -1, 1)` with `c` the
    bias-corrected means and `r` the running minimum.
    """
    corrected = state.means / (1 - state.decays**state.iteration)
    longer = corrected[1:]
    running_min = state.running_min[:-1]
    ratio = (corrected[:-1] - running_min) / jnp.maximum(1e-8, longer - running_min)
    feats = jnp.clip(ratio - 1.0, -1, 1)
    # Quirk kept for the pretrained weights: the first two updates see zeros.
    return jnp.where(state.iteration <= 2, feats * 0, feats)
