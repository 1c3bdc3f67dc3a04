"""VeLO in paxml: a praxis optimizer and a `Learner` that hands VeLO the loss.

A Pax experiment switches to VeLO by configuration alone:

    from velo_scale.integrations import pax_learner
    pax_learner.configure_velo(task_p)  # in the experiment's task()

which is the same as

    task_p.train.learner = pax_fiddle.Config(
        pax_learner.VeLOLearner, name="learner", loss_name="total_loss",
        optimizer=pax_fiddle.Config(
            pax_learner.VeLO, num_steps=task_p.train.num_train_steps,
            weights="auto"))

How the loss reaches VeLO: paxml's train step
(`trainer_lib.train_step_single_learner`) computes the loss and gradients
with the learner's `stochastic_gradient.grad_fn`, then calls
`learner.update_states(grads, states, vars, var_weight_hparams)`, which runs
the optimizer's chain (`sharded_chain` of regularizers, VeLO, decoupled
weight decay; vectorized over repeat prefixes) with no loss. `VeLOLearner`
records the loss its gradient function returns (the loss the gradients are
of) and wraps `update_states` in `velo_scale.integrations.pax.training_loss`,
which every VeLO update traced inside it reads. Both happen in the same trace
of the train step, so nothing else in paxml changes. Under `pmap` the loss is
averaged over replicas, as the gradients are summed.

Needs praxis and paxml (imported here); `velo_scale.integrations.pax` has the
pieces that work without them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from paxml import learners, sgf
from praxis import base_layer, optimizers, pax_fiddle, schedules

from velo_scale._src import weights as weights_lib
from velo_scale.integrations import pax

NO_STEPS_MSG = (
    "VeLO.num_steps must be the run's number of optimizer steps (VeLO conditions "
    "on the fraction of training done); got {!r}. Set it to "
    "task_p.train.num_train_steps, or use pax_learner.configure_velo(task_p)."
)
NO_LR_MSG = (
    "VeLO takes no learning rate; got learning_rate={!r}, lr_schedule={!r}. "
    "Leave both at their defaults (1.0 and None)."
)
NO_RECORDED_LOSS_MSG = (
    "VeLOLearner.update_states found no loss: it records the loss of its "
    "stochastic_gradient.grad_fn, which paxml's train step calls first. A train "
    "step with its own grad_fn must call the learner's "
    "stochastic_gradient.grad_fn, or wrap update_states in "
    "`velo_scale.integrations.pax.training_loss(loss)` and call "
    "learners.Learner.update_states."
)


def resolve_weights(weights: Any) -> Any:
    """`VeLO.weights` for `velo_scale.velo`.

    Args:
      weights: None (velo's default: `$VELO_SCALE_WEIGHTS`, the cache, else a
        download of the official file); `"auto"` (the official file when
        `$VELO_SCALE_WEIGHTS` or the cache has it, else velo_scale's own
        meta-trained weights, with a notice: works offline); `"project"` (those
        weights); or a path or URL.

    Returns:
      A theta dict (`velo_scale._src.weights.resolve`, shared with the
      library and the trainer).
    """
    return weights_lib.resolve(weights)


class VeLO(optimizers.BaseOptimizer):
    """VeLO as a praxis optimizer (`learner.optimizer`).

    Its raw transformation is `pax.sharded_velo(..., masked_empty_slots=True)`:
    state sharded like the variables (praxis `init_partition_spec`), one state
    structure through updates. The loss comes from `pax.training_loss`, which
    `VeLOLearner` sets; use that learner.

    VeLO has no learning rate: `get_learning_rate` is 1, so praxis'
    `decoupled_weight_decay` adds `-decoupled_weight_decay * var` to each update
    (VeLO's own decoupled form) and the learner's `lr` summary reads 1. The
    base class's `l1/l2_regularizer_weight`, `clip_gradient_norm_to_value`
    (applied by the learner) and `ema_decay` work as for any praxis optimizer.

    Attributes:
      num_steps: the run's number of optimizer steps (required).
      weights: see `resolve_weights`: None, "auto", "project", a path or URL.
      weight_decay: VeLO's coupled weight decay (`weight_decay * var` added to
        the gradient, `weight_decay * sum(var**2)` to the loss VeLO sees).
      max_training_steps: as `velo_scale.velo` (None keeps its default).
    """

    num_steps: int = 0
    weights: Any = None
    weight_decay: float = 0.0
    max_training_steps: int | None = None
    # VeLO's step has no learning rate (the base class wants one; 1 below).
    learning_rate: float = 1.0
    _theta: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps <= 0:
            raise ValueError(NO_STEPS_MSG.format(self.num_steps))
        if self.learning_rate != 1.0 or self.lr_schedule is not None:
            raise ValueError(NO_LR_MSG.format(self.learning_rate, self.lr_schedule))
        self.lr_schedule = pax_fiddle.Config(schedules.Constant)
        super().__post_init__()
        # Read once: the learner asks for the transformation at every trace.
        self._theta = resolve_weights(self.weights)

    def get_learning_rate(self, step_count: Any) -> jax.Array:
        del step_count
        return jnp.ones([], jnp.float32)

    def _get_raw_grad_transformation(self, lr: Any) -> Any:
        del lr
        return pax.sharded_velo(
            self.num_steps,
            weights=self._theta,
            weight_decay=self.weight_decay,
            max_training_steps=self.max_training_steps,
            masked_empty_slots=True,
        )


class VeLOLearner(learners.Learner):
    """A paxml `Learner` whose optimizer updates see the training loss.

    Same attributes as `paxml.learners.Learner`. It records the loss returned
    by `stochastic_gradient.grad_fn` (a `StandardGradient` when none is set;
    a configured one, e.g. DP-SGD, is kept and its loss recorded) and runs
    `update_states` inside `pax.training_loss(loss)`, so `VeLO` (or any
    `pax.sharded_velo` in the chain) gets it. Other optimizers ignore it.
    """

    _recorded_losses: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        self._recorded_losses = []
        if self.stochastic_gradient is None:
            self.stochastic_gradient = sgf.StandardGradient()
        inner = self.stochastic_gradient.grad_fn
        recorded = self._recorded_losses

        def grad_fn(loss_fn, *args, **kwargs):
            (loss, aux), grads = inner(loss_fn, *args, **kwargs)
            recorded[:] = [loss]
            return (loss, aux), grads

        # An instance attribute, so the gradient object keeps its class (paxml
        # checks it for DP-SGD summaries).
        object.__setattr__(self.stochastic_gradient, "grad_fn", grad_fn)

    def update_states(self, grads, states, old_vars, var_weight_hparams):
        if not self._recorded_losses:
            raise ValueError(NO_RECORDED_LOSS_MSG)
        loss = self._recorded_losses.pop()
        if base_layer.is_running_under_pmap():
            loss = jax.lax.pmean(loss, axis_name=base_layer.PMAP_PARALLEL_AXIS_NAME)
        with pax.training_loss(jnp.asarray(loss, jnp.float32)):
            return super().update_states(grads, states, old_vars, var_weight_hparams)


def configure_velo(
    task_p: Any,
    *,
    num_steps: int | None = None,
    weights: Any = "auto",
    weight_decay: float = 0.0,
    decoupled_weight_decay: float | None = None,
    clip_gradient_norm_to_value: float = 0.0,
) -> Any:
    """Switches a paxml task config to VeLO (in place; also returned).

    The learner becomes a `VeLOLearner` with the old learner's settings
    (name, `loss_name`, summaries, repeat-prefix vectorization, bprop
    exclusions, ...) and `optimizer = VeLO(...)`.

    Args:
      task_p: a `pax_fiddle.Config` of `paxml.tasks_lib.SingleTask` with
        `train.learner` set.
      num_steps: VeLO's horizon; None takes `task_p.train.num_train_steps`.
      weights, weight_decay: as `VeLO`.
      decoupled_weight_decay: praxis' decoupled weight decay per step (VeLO's
        `-wd * var`), or None.
      clip_gradient_norm_to_value: the optimizer's global-norm clipping (0: off).

    Returns:
      `task_p`.

    Example:
      >>> task_p = super().task()  # doctest: +SKIP
      >>> pax_learner.configure_velo(task_p)
    """
    old = task_p.train.learner
    learner_p = pax_fiddle.Config(VeLOLearner)
    if old is not None:
        for name, value in old.__arguments__.items():
            if name != "optimizer":
                setattr(learner_p, name, value)
    if not learner_p.name:
        learner_p.name = "learner"
    if learner_p.loss_name is None:
        learner_p.loss_name = "total_loss"
    learner_p.optimizer = pax_fiddle.Config(
        VeLO,
        num_steps=int(num_steps or task_p.train.num_train_steps),
        weights=weights,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        clip_gradient_norm_to_value=clip_gradient_norm_to_value,
    )
    task_p.train.learner = learner_p
    return task_p


__all__ = [
    "VeLO",
    "VeLOLearner",
    "configure_velo",
    "resolve_weights",
]
