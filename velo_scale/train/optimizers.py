"""Optimizers the trainer can use, each a factory of the run's length.

Every factory takes `num_steps` (filled in by `train`) and returns an
`Optimizer`: the optax transformation and whether its update takes the loss.
Gin selects one with `train.optimizer = @velo` (or `@adamw`, ...).

* `velo`: velo_scale's VeLO; no learning rate.
* `adamw`, `nadamw`: linear warm-up + cosine decay (the AlgoPerf baseline).
* `sgd_momentum`: piecewise-constant schedule.
* `adafactor`: optax's Adafactor.

All take optional `clip_norm` (global-norm clipping) and `weight_decay`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import optax

from velo_scale._src import weights as weights_lib
from velo_scale._src.velo import velo as _velo


class Optimizer(NamedTuple):
    """An optax transformation and whether `update` needs `loss=`.

    `velo_weights`: VeLO's theta dict, so that the trainer can read each
    tensor's `lr_mult` from the state (`velo_scale.lr_mult`); None otherwise.
    """

    tx: optax.GradientTransformation
    takes_loss: bool
    name: str
    velo_weights: Any = None


# One meaning of `weights` for the library and the trainer (see
# `velo_scale._src.weights.resolve`).
PROJECT_WEIGHTS_ENV = weights_lib.PROJECT_WEIGHTS_ENV
packaged_project_weights = weights_lib.packaged_project_weights
resolve_velo_weights = weights_lib.resolve


def _clipped(tx: optax.GradientTransformation, clip_norm: float | None):
    """Prepends global-norm clipping when `clip_norm` is set."""
    if not clip_norm:
        return tx
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx)


def velo(
    num_steps: int,
    *,
    weights: Any = "auto",
    weight_decay: float = 0.0,
    decoupled_weight_decay: float = 0.0,
    clip_norm: float | None = None,
    max_training_steps: int = 150_000,
) -> Optimizer:
    """VeLO for a run of `num_steps` steps (see `velo_scale.velo`)."""
    theta = resolve_velo_weights(weights)
    tx = _velo(
        num_steps,
        weights=theta,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        max_training_steps=max_training_steps,
    )
    return Optimizer(_clipped(tx, clip_norm), True, "velo", theta)


def warmup_cosine(num_steps: int, learning_rate: float, warmup_steps: int | float):
    """Linear warm-up to `learning_rate`, then cosine decay to 0 at num_steps.

    `warmup_steps` < 1 is a fraction of num_steps."""
    warmup = int(warmup_steps * num_steps) if warmup_steps < 1 else int(warmup_steps)
    warmup = max(1, min(warmup, num_steps - 1)) if num_steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(num_steps, warmup + 1), end_value=0.0
    )


def _adam_family(
    make, name, num_steps, learning_rate, warmup_steps, b1, b2, weight_decay, clip_norm
) -> Optimizer:
    """An Adam-type optax alias under a warm-up + cosine schedule."""
    schedule = warmup_cosine(num_steps, learning_rate, warmup_steps)
    tx = make(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    return Optimizer(_clipped(tx, clip_norm), False, name)


def adamw(
    num_steps: int,
    *,
    learning_rate: float = 1e-3,
    warmup_steps: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: float = 1e-4,
    clip_norm: float | None = None,
) -> Optimizer:
    """AdamW with linear warm-up and cosine decay."""
    return _adam_family(
        optax.adamw, "adamw", num_steps, learning_rate, warmup_steps, b1, b2,
        weight_decay, clip_norm,
    )  # fmt: skip


def nadamw(
    num_steps: int,
    *,
    learning_rate: float = 1e-3,
    warmup_steps: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: float = 1e-4,
    clip_norm: float | None = None,
) -> Optimizer:
    """NAdamW (AlgoPerf baseline) with linear warm-up and cosine decay."""
    return _adam_family(
        optax.nadamw, "nadamw", num_steps, learning_rate, warmup_steps, b1, b2,
        weight_decay, clip_norm,
    )  # fmt: skip


def sgd_momentum(
    num_steps: int,
    *,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    boundaries: Sequence[float] = (0.5, 0.75),
    decay: float = 0.1,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> Optimizer:
    """SGD with momentum; the learning rate is multiplied by `decay` at each
    boundary (fractions of num_steps)."""
    schedule = optax.piecewise_constant_schedule(
        learning_rate, {int(b * num_steps): decay for b in boundaries}
    )
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(schedule, momentum=momentum))
    return Optimizer(_clipped(optax.chain(*parts), clip_norm), False, "sgd")


def adafactor(
    num_steps: int,
    *,
    learning_rate: float = 1e-2,
    warmup_steps: float = 0.05,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> Optimizer:
    """optax Adafactor with warm-up + cosine decay."""
    schedule = warmup_cosine(num_steps, learning_rate, warmup_steps)
    tx = optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
    return Optimizer(_clipped(tx, clip_norm), False, "adafactor")


OPTIMIZERS = {
    "velo": velo,
    "adamw": adamw,
    "nadamw": nadamw,
    "sgd_momentum": sgd_momentum,
    "adafactor": adafactor,
}
