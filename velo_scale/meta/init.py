"""A hand-designed starting point for meta-training.

Random meta-parameters give a VeLO that barely moves the parameters, so ES
starting there spends its budget finding descent at all. This sets theta so
that VeLO starts as a known optimizer, normalised momentum: every MLP of the
bank maps the input channel `m_0.9 * rsqrt(v + 1e-6)` (channel 7, normalised
over the tensor) through a pair of relus to the direction output, with zero
magnitude; the per-tensor LSTM's heads start constant (controls 1, lr_mult
`lr_mult`), so the step is

    step = lr_mult * 0.001 * sqrt(mean(p**2)) * m / (sqrt(v) rms(m / sqrt(v)))

ES then perturbs every part, the LSTM included, away from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from velo_scale._src import weights as weights_lib

# Index of `m * rsqrt(v + 1e-6)` with the 0.9 momentum among the 30 channels
# (groups 0-4 take channels 0-6).
MOMENTUM_OVER_RMS_CHANNEL = 7


def normalised_momentum_theta(
    key: jax.Array,
    architecture: weights_lib.Architecture,
    *,
    lr_mult: float = 10.0,
    noise: float = 1e-3,
    schedule: str = "constant",
    final_fraction: float = 0.05,
) -> dict:
    """theta whose VeLO is normalised momentum (see module docstring).

    Args:
      key: PRNG key for the small random parts (LSTM weights, noise).
      architecture: sizes (ff_hidden_size must be >= 2).
      lr_mult: the step-size multiplier (the peak with a schedule).
      schedule: "constant", or "cosine": the per-tensor LSTM is wired so that
        lr_mult follows `lr_mult * (f + (1 - f) * (1 + cos(pi x)) / 2)` over
        the fraction of training x, f = `final_fraction`
        (`wire_lstm_schedule`).
      noise: scale of random weights added to every MLP of the bank and the
        heads' input weights, so that perturbations have something to steer.
    """
    if architecture.ff_hidden_size < 2:
        raise ValueError("normalised_momentum_theta needs ff_hidden_size >= 2.")
    theta = weights_lib.init_weights(key, architecture)
    k = architecture.param_inits
    f = architecture.ff_hidden_size
    bank = dict(theta["ff_mod_stack"]["~"])
    keys = iter(jax.random.split(jax.random.fold_in(key, 1), len(bank)))

    def small(shape):
        return noise * jax.random.normal(next(keys), shape)

    # The bank is mixed as 100 * mean_k(controls_k * W_k) with controls = 1.
    scale = 1.0 / 100.0
    widths = [1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3]
    offset = 0
    for i, width in enumerate(widths):
        w = small((k, width, f))
        if offset <= MOMENTUM_OVER_RMS_CHANNEL < offset + width:
            c = MOMENTUM_OVER_RMS_CHANNEL - offset
            w = w.at[:, c, 0].add(scale).at[:, c, 1].add(-scale)
        bank[f"w0__{i}"] = w
        offset += width
    # Hidden layers pass the two relu units (x+, x-) on unchanged; the output
    # layer forms direction = x+ - x- = x and magnitude 0.
    for layer in range(1, architecture.ff_hidden_layers + 1):
        last = layer == architecture.ff_hidden_layers
        w = small((k, f, 3 if last else f))
        if last:
            w = w.at[:, 0, 0].add(scale).at[:, 1, 0].add(-scale)
        else:
            w = w.at[:, 0, 0].add(scale).at[:, 1, 1].add(scale)
        bank[f"w{layer}"] = w
        bank[f"b{layer}"] = jnp.zeros((k, 3 if last else f))
    bank["b0"] = jnp.zeros((k, f))
    theta["ff_mod_stack"] = {"~": bank}
    rnn = dict(theta["rnn_params"])
    rnn["rnn_to_controls"] = {
        "w": small(rnn["rnn_to_controls"]["w"].shape),
        "b": jnp.ones((k,)),
    }
    rnn["step_size"] = {
        "w": small(rnn["step_size"]["w"].shape),
        "b": jnp.full((1,), lr_mult),
    }
    theta["rnn_params"] = rnn
    if schedule == "cosine":
        theta = wire_lstm_schedule(
            theta,
            lambda x: (
                lr_mult
                * (
                    final_fraction
                    + (1 - final_fraction) * 0.5 * (1 + np.cos(np.pi * x))
                )
            ),
        )
    elif schedule != "constant":
        raise ValueError(f"schedule must be 'constant' or 'cosine'; got {schedule!r}.")
    return theta


def wire_lstm_schedule(theta: dict, target: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Sets the per-tensor LSTM so that lr_mult(x) ~= target(x) over the
    fraction of training x in [0, 1] (x = step / num_steps).

    The first 9 LSTM units copy the 9 fraction-of-training features
    (tanh(10 (x - t)), `tensor_net.fraction_embedding`): the per-tensor
    projection passes feature k to unit k, the unit's input and output gates
    are open (bias +10) and its forget gate shut (bias -20), so its hidden
    state is a fixed monotone function h_k(x) with no memory. The step-size
    head is then the least-squares fit of `target` by b + sum_k c_k h_k(x) on
    201 points. Every other weight keeps its value, so ES can perturb all of
    them.
    """
    from velo_scale._src import tensor_net

    rnn = {k: dict(v) for k, v in theta["rnn_params"].items()}
    hidden = rnn["rnn/linear"]["w"].shape[1] // 4
    k = len(tensor_net._TIME_EMBED_TIMESCALES)  # noqa: SLF001
    if hidden < k:
        raise ValueError(f"wire_lstm_schedule needs lstm_hidden_size >= {k}.")
    idx = jnp.arange(k)
    rnn["linear_2"]["w"] = rnn["linear_2"]["w"].at[:, :k].set(0.0).at[idx, idx].set(1.0)
    rnn["linear_2"]["b"] = rnn["linear_2"]["b"].at[:k].set(0.0)
    # ... and the mixing layer adds nothing to them.
    rnn["linear_1"]["w"] = rnn["linear_1"]["w"].at[:, :k].set(0.0)
    rnn["linear_1"]["b"] = rnn["linear_1"]["b"].at[:k].set(0.0)
    w, b = rnn["rnn/linear"]["w"], rnn["rnn/linear"]["b"]
    for gate in range(4):  # i, g, f, o: zero the wired units' weights
        w = w.at[:, gate * hidden + idx].set(0.0)
    w = w.at[idx, hidden + idx].set(1.0)  # g = x_k
    b = b.at[idx].set(10.0).at[hidden + idx].set(0.0)
    b = b.at[2 * hidden + idx].set(-20.0).at[3 * hidden + idx].set(10.0)
    rnn["rnn/linear"] = {"w": w, "b": b}
    # h_k(x) from the network itself (one tensor, zero state), then the fit.
    xs = np.linspace(0.0, 1.0, 201)
    feats = np.zeros((len(xs), tensor_net.NUM_TENSOR_FEATURES), np.float32)
    feats[:, :k] = np.asarray(jax.vmap(tensor_net.fraction_embedding)(jnp.asarray(xs)))
    zeros = jnp.zeros((1, hidden))
    h = np.stack([
        np.asarray(tensor_net.apply(rnn, jnp.asarray(f)[None], zeros, zeros)[2][0, :k])
        for f in feats
    ])  # fmt: skip
    design = np.concatenate([h, np.ones((len(xs), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, target(xs), rcond=None)
    step = rnn["step_size"]["w"].at[:k, 0].set(jnp.asarray(coef[:k], jnp.float32))
    step = step.at[k:, 0].set(step[k:, 0] * 0.0)
    rnn["step_size"] = {"w": step, "b": jnp.asarray(coef[k:], jnp.float32)}
    return {**theta, "rnn_params": rnn}


def search_lr_mult(
    tasks: Sequence[Any],
    *,
    architecture: weights_lib.Architecture,
    candidates: Sequence[float] = (3.0, 10.0, 30.0, 100.0, 300.0),
    num_steps: int = 100,
    last_k: int = 5,
    key: jax.Array,
    schedule: str = "constant",
    log: Callable[[str], None] | None = print,
) -> tuple[float, dict[float, list[float]]]:
    """Picks the start's `lr_mult` by meta-loss on the meta-training tasks.

    ES moves theta in small steps; the start's constant step-size multiplier
    sets how far VeLO moves the parameters at all, and no single value suits
    every horizon. This trains each task for `num_steps` with
    `normalised_momentum_theta(key, lr_mult=c)` for every candidate c (same
    initialisation and batches for all) and keeps the c with the lowest mean
    log meta-loss over the tasks (scale-free across tasks; a diverged run
    counts as meta-loss 1e3).

    Returns:
      (the chosen lr_mult, {candidate: [meta-loss per task]}).
    """
    from velo_scale.meta.es import ESConfig, meta_loss

    if not candidates or not tasks:
        raise ValueError("search_lr_mult needs at least one candidate and one task.")
    config = ESConfig(num_steps=num_steps, last_k=min(last_k, num_steps))
    theta_key, task_key = jax.random.split(key)
    losses: dict[float, list[float]] = {float(c): [] for c in candidates}
    for i, task in enumerate(tasks):
        run = jax.jit(lambda theta, k, task=task: meta_loss(theta, task, k, config))
        k = jax.random.fold_in(task_key, i)
        for c in candidates:
            theta = normalised_momentum_theta(
                theta_key, architecture, lr_mult=c, schedule=schedule
            )
            losses[float(c)].append(float(run(theta, k)))
    scores = {c: float(np.mean(np.log(v))) for c, v in losses.items()}
    best = min(scores, key=scores.get)
    if log:
        table = ", ".join(f"{c:g}: {s:.3f}" for c, s in scores.items())
        log(f"lr_mult search (mean log meta-loss over {len(tasks)} tasks): {table}"
            f" -> {best:g}")  # fmt: skip
    return best, losses
