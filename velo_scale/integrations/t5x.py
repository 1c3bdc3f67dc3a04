"""VeLO in T5X: the loss plumbed through and the state partitioned.

T5X (github.com/google-research/t5x) runs optax optimizers through
`t5x.optimizers.OptaxWrapper`, whose `apply_gradient` calls
`update(grads, state, params)` without the loss; `FlaxOptimTrainState` forwards
only `learning_rate` to the optimizer; `trainer.accumulate_grads_microbatched`
drops the loss of `value_and_grad`; and `OptaxStatePartitionRules` raises
"unregistered optax state type" for `VeLOState`. This module supplies the
missing pieces:

* `velo_optimizer(num_steps, ...)` / `VeLOOptaxWrapper`: an `OptaxWrapper` whose
  hyper-params (`VeLOHyperParams`) carry the loss to `tx.update(..., loss=)`.
* `VeLOTrainer`: a `t5x.trainer.Trainer` whose train step keeps the loss (the
  sum over microbatches when `num_microbatches > 1`, like T5X's gradients and
  its logged loss) and hands it to the optimizer every step.
* `register_partition_rules()`: registers `VeLOState` with T5X's
  `OptaxStatePartitionRules` (done by `VeLOOptaxWrapper`), so T5X's partitioner
  shards every per-parameter accumulator like its parameter and replicates the
  LSTM state, the loss buffer and the counters.

The logic lives in pure functions that need no t5x (`velo_logical_axes`,
`step_loss_over_microbatches`, `loss_carrying_update`, `VeLOHyperParams`); the
T5X classes are built on first access (`velo_scale.integrations.t5x.VeLOTrainer`
imports t5x then), so this module imports without t5x installed.

gin: include `gin_configs/t5x/velo.gin` (pre-training) or
`gin_configs/t5x/velo_finetune.gin` after the usual T5X run and model configs.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from velo_scale._src.sharding import state_partition_specs
from velo_scale._src.state import VeLOState

P = PartitionSpec

#: Name of the metric (a `clu.metrics.Average`) holding the loss VeLO sees.
LOSS_METRIC = "velo/loss"
#: Prefix of the schedule metrics, e.g. "velo/lr_mult/kernel" (`schedule_summaries`).
SCHEDULE_PREFIX = "velo/"

MISSING_LOSS_MSG = (
    "VeLO in T5X needs the loss at every step, but the optimizer's hyper-params "
    "carry loss=None. Train with `train.trainer_cls = @velo_t5x.VeLOTrainer` "
    "(gin_configs/t5x/velo.gin does this), or call "
    "`optimizer.apply_gradient(grads, learning_rate=lr, loss=loss)`."
)
NO_VELO_STATE_MSG = (
    "velo_logical_axes: found no VeLOState in the optimizer state (a {}); pass "
    "the state of `velo_scale.velo(...)` or of an optax chain containing it."
)
T5X_MISSING_MSG = (
    "velo_scale.integrations.t5x's T5X classes (VeLOOptaxWrapper, VeLOTrainer) "
    "need t5x (github.com/google-research/t5x), which is not importable here: {}"
)
_T5X_NAMES = ("VeLOOptaxWrapper", "VeLOTrainer", "train_with_loss")


@flax.struct.dataclass
class VeLOHyperParams:
    """Hyper-params of the VeLO optimizer definition in T5X.

    T5X's `Optimizer.apply_gradient(grads, **overrides)` replaces these fields
    with the overrides of the step (`learning_rate=`, and `loss=` from
    `VeLOTrainer`), then passes them to `VeLOOptaxWrapper.apply_gradient`.

    Attributes:
      learning_rate: set by T5X's trainer every step; VeLO has no learning rate
        and ignores it.
      loss: f32[], the training loss of the step's batch (with microbatches:
        their sum, `step_loss_over_microbatches`).
    """

    learning_rate: Any = None
    loss: Any = None


def loss_carrying_update(
    tx: optax.GradientTransformation,
    grads: Any,
    state: Any,
    params: Any,
    loss: Any,
) -> tuple[Any, Any]:
    """`tx.update(grads, state, params, loss=loss)`, refusing a missing loss.

    What `VeLOOptaxWrapper.apply_gradient` runs with `loss` taken from its
    hyper-params. `tx` may be `velo_scale.velo(...)` or an optax chain holding
    it (the keyword reaches VeLO through the chain).

    Args:
      tx: the optax transformation.
      grads: gradients, a pytree like params.
      state: `tx`'s state.
      params: the current params.
      loss: f32[], the loss of the batch the gradients came from.

    Returns:
      (updates, new state), as `tx.update`.

    Raises:
      ValueError: `loss` is None (the message says how to pass it in T5X).

    Example:
      >>> updates, state = loss_carrying_update(tx, grads, state, params, 2.3)  # doctest: +SKIP
    """
    if loss is None:
        raise ValueError(MISSING_LOSS_MSG)
    tx = optax.with_extra_args_support(tx)
    return tx.update(grads, state, params, loss=loss)


def step_loss_over_microbatches(losses: Any) -> jax.Array:
    """The loss of a microbatched step: the sum of the microbatch losses.

    T5X sums the gradients of the microbatches
    (`trainer.accumulate_grads_microbatched`) and logs the step's loss as
    `metrics.AveragePerStep(total=loss)`, i.e. also the sum. With T5X's usual
    constant `loss_normalizing_factor` every microbatch loss is normalised by
    the whole batch's factor, so the sum is exactly the loss of the
    un-microbatched step and the summed gradient is its gradient. VeLO gets
    this sum: the loss whose gradient it receives, equal to what the same run
    without microbatching would give it (a mean would shrink VeLO's loss by
    the number of microbatches while the gradient stays a sum).

    Args:
      losses: f32[n_microbatches], the scalar loss of each microbatch.

    Returns:
      f32[], their sum.

    Raises:
      ValueError: `losses` is not a vector.

    Example:
      >>> float(step_loss_over_microbatches(jnp.array([1.0, 3.0])))
      4.0
    """
    losses = jnp.asarray(losses, jnp.float32)
    if losses.ndim != 1:
        raise ValueError(
            f"losses must be a vector with one loss per microbatch; got {losses.shape=}."
        )
    return jnp.sum(losses)


def drop_none_leaves(state_dict: Any) -> Any:
    """The state dict without its `None` leaves (for T5X's checkpointer).

    `VeLOState` keeps `None` where a slot is unused (the factored accumulators
    of non-matrix tensors, `accumulation` when `num_steps` fits VeLO's
    horizon). T5X's checkpointer would try to save and restore those leaves as
    arrays; `VeLOOptaxWrapper.state_dict` drops them and `restore_state` puts
    them back with `restore_none_leaves`.

    Args:
      state_dict: nested dicts (`flax.serialization.to_state_dict` output).

    Returns:
      The same nesting without `None` leaves (dicts left empty are removed).
    """
    from flax import traverse_util

    flat = traverse_util.flatten_dict(state_dict, sep="/")
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if v is not None}, sep="/"
    )


def restore_none_leaves(state_dict: Any, reference: Any) -> Any:
    """`state_dict` with the `None` leaves of `reference` put back.

    Args:
      state_dict: a state dict saved without its `None` leaves.
      reference: the state dict of a freshly initialised state (the template).

    Returns:
      `state_dict` with every path that is `None` in `reference` (and absent
      from `state_dict`) set to `None`.
    """
    from flax import traverse_util

    flat = dict(traverse_util.flatten_dict(state_dict, sep="/"))
    for key, value in traverse_util.flatten_dict(reference, sep="/").items():
        if value is None and key not in flat:
            flat[key] = None
    return traverse_util.unflatten_dict(flat, sep="/")


def schedule_summaries(
    params: Any, new_params: Any, opt_state: Any, weights: Any
) -> dict[str, jax.Array]:
    """VeLO's implicit schedule as T5X scalars, one per tensor role.

    `"velo/step_size/<role>"`: the mean over the tensors of that role
    (`kernel`, `scale`, `embedding`, ...) of `rms(new - old) / rms(old)`;
    `"velo/lr_mult/<role>"`: their mean `lr_mult` (`velo_scale.lr_mult`).
    Per-tensor reductions only. Needs no t5x.

    Args:
      params, new_params: the params before and after the step.
      opt_state: the optax state after the step (holds the `VeLOState`).
      weights: VeLO's meta-parameters (theta dict, or as `velo(weights=)`).
    """
    from velo_scale._src import schedule

    updates = jax.tree_util.tree_map(
        lambda new, old: jnp.asarray(new, jnp.float32) - jnp.asarray(old, jnp.float32),
        new_params,
        params,
    )
    metrics = schedule.schedule_metrics(updates, params, opt_state, weights)
    return {SCHEDULE_PREFIX + name: value for name, value in metrics.items()}


def check_restored_horizon(
    param_states: Any,
    num_steps: int,
    continuation: str | None = None,
    max_training_steps: int | None = None,
) -> Any:
    """The restored optimizer state, continued to `num_steps` if asked.

    T5X restores VeLO's state, horizon included, from the checkpoint, so a run
    restarted with a larger `TRAIN_STEPS` would silently keep the old one.
    Here each restored `VeLOState` whose horizon is not that of `num_steps`
    is an error, unless `continuation` says how to go on: 'increase' (the new
    total, keeping the iteration; applied once, later restores match) or
    'naive' (keep the old horizon). 'reset' needs to know whether it was
    applied already, which a T5X checkpoint does not record: apply
    `velo_scale.extend_horizon(state, n, 'reset')` yourself, or start fresh.
    Abstract states (shape evaluation) pass through unchecked.

    Args:
      param_states: the optax state T5X restored (may hold several VeLO states).
      num_steps, max_training_steps: as given to `velo_optimizer`.
      continuation: None, 'increase' or 'naive' (gin:
        `velo_optimizer.continuation`).

    Raises:
      ValueError: the horizons differ and no continuation is set, or 'reset'.
    """
    from velo_scale._src.horizon import calls_per_step, extend_horizon
    from velo_scale._src.velo import DEFAULT_MAX_TRAINING_STEPS

    if continuation not in (None, "naive", "increase"):
        raise ValueError(
            f"velo_optimizer.continuation must be None, 'increase' or 'naive' in "
            f"T5X; got {continuation!r}. ('reset' is not recorded in a T5X "
            "checkpoint, so a restart cannot tell whether it was applied: call "
            "velo_scale.extend_horizon(state, num_steps, 'reset') on the restored "
            "state yourself, or start a fresh run.)"
        )
    max_steps = max_training_steps or DEFAULT_MAX_TRAINING_STEPS
    horizon = int(num_steps) // calls_per_step(int(num_steps), int(max_steps))

    def check(state):
        if not isinstance(state, VeLOState):
            return state
        try:
            saved = int(state.num_steps)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return state  # abstract (eval_shape): nothing to compare yet
        if saved == horizon:
            return state
        if continuation is None:
            raise ValueError(
                f"the restored VeLO state has a horizon of {saved} VeLO steps, but "
                f"velo_optimizer.num_steps={num_steps} means {horizon}: resuming "
                "would silently keep the old horizon. Set TRAIN_STEPS back to "
                "finish that run, start a fresh run, or continue past the horizon "
                "with velo_optimizer.continuation = 'increase' (or 'naive'), the "
                "VeLO paper's Increase Steps / Naive Continue."
            )
        return extend_horizon(
            state, int(num_steps), continuation, max_training_steps=int(max_steps)
        )

    return jax.tree_util.tree_map(
        check, param_states, is_leaf=lambda x: isinstance(x, VeLOState)
    )


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


class _Fixed:
    """A stand-in transformation whose `init` rebuilds a given state's shapes."""

    def __init__(self, state: Any):
        self._state = state

    def init(self, _params: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda x: jnp.zeros(np.shape(x), getattr(x, "dtype", jnp.result_type(x))),
            self._state,
        )


def velo_logical_axes(state: Any, param_logical_axes: Any) -> Any:
    """Logical axes of VeLO's state, derived from the parameters' logical axes.

    The rules of `velo_scale.state_partition_specs`, applied to logical axis
    names (T5X's `PartitionSpec`s of names such as `('embed', 'mlp')`):
    momentum and rms keep the parameter's axes plus an unnamed decay axis
    (None); the factored `v_row` drops the parameter's largest axis d0 and
    `v_col` its second largest axis d1 (`accumulators.factored_dims`), each
    plus the decay axis; `v_diag` (scalars, vectors) keeps the axes plus the
    decay axis; the LSTM state, the loss buffer and the counters are
    replicated (`PartitionSpec()`). Masked-out parameters (`optax.masked`)
    keep their `optax.MaskedNode`.

    Args:
      state: a `VeLOState`, or an optax state holding one (a chain's tuple);
        arrays or `jax.ShapeDtypeStruct`s. Parameter shapes are read from its
        momentum (`p.shape + (3,)`).
      param_logical_axes: a tree like the params of `PartitionSpec`s of logical
        axis names (None for a replicated parameter), e.g. T5X's
        `flax_partitioning.get_axis_names(params_axes)`.

    Returns:
      A tree like `state` with a `PartitionSpec` per leaf (other param-shaped
      optax states in a chain take the params' axes, the rest is replicated).

    Raises:
      ValueError: no `VeLOState` in `state`, or the axes tree does not match the
        params.
      velo_scale.ShardingError: a parameter's axes name more axes than it has
        (the message names the parameter).

    Example:
      >>> axes = velo_logical_axes(jax.eval_shape(tx.init, params),
      ...                          {"kernel": P("embed", "mlp")})  # doctest: +SKIP
      >>> axes.momentum["kernel"]
      PartitionSpec('embed', 'mlp', None)
    """
    found = [
        x
        for x in jax.tree_util.tree_leaves(
            state, is_leaf=lambda x: isinstance(x, VeLOState)
        )
        if isinstance(x, VeLOState)
    ]
    if not found:
        raise ValueError(NO_VELO_STATE_MSG.format(type(state).__name__))
    path_moments, treedef = jax.tree_util.tree_flatten_with_path(
        found[0].momentum, is_leaf=_is_masked
    )
    path_axes = jax.tree_util.tree_flatten_with_path(
        param_logical_axes, is_leaf=_is_spec
    )[0]
    moment_keys = [jax.tree_util.keystr(p) for p, _ in path_moments]
    axes_keys = [jax.tree_util.keystr(p) for p, _ in path_axes]
    if moment_keys != axes_keys:
        raise ValueError(
            "param_logical_axes must have one PartitionSpec (or None) per "
            f"parameter, like the params; the params are {moment_keys}, the axes "
            f"are given for {axes_keys}."
        )
    specs, shapes = [], []
    for (_, moment), (_, spec) in zip(path_moments, path_axes):
        spec = P() if spec is None else spec
        specs.append(spec)
        # A masked-out parameter has no state; any shape of the spec's rank
        # passes the checks, and its MaskedNode is kept.
        masked = _is_masked(moment)
        shapes.append((1,) * len(spec) if masked else tuple(np.shape(moment)[:-1]))
    params = treedef.unflatten([jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
    return state_partition_specs(_Fixed(state), params, treedef.unflatten(specs))


def register_partition_rules() -> None:
    """Registers `VeLOState` with `t5x.optimizers.OptaxStatePartitionRules`.

    After this, `OptaxWrapper.derive_logical_axes` (and so T5X's partitioner
    and checkpointer) maps VeLO's state to logical axes with
    `velo_logical_axes`, also inside `optax.chain`/`masked`/`MultiSteps`.
    `VeLOOptaxWrapper` calls it; calling it again is harmless.

    Raises:
      ImportError: t5x is not importable.
    """
    from t5x import optimizers

    optimizers.OptaxStatePartitionRules._RULES[VeLOState] = velo_logical_axes


def velo_optimizer(
    num_steps: int,
    *,
    weights: Any = None,
    weight_decay: float = 0.0,
    decoupled_weight_decay: float = 0.0,
    max_training_steps: int | None = None,
    clip_norm: float | None = None,
    log_schedule: bool = True,
    continuation: str | None = None,
) -> Any:
    """T5X optimizer definition for VeLO (gin: `OPTIMIZER = @velo_optimizer()`).

    Args:
      num_steps: the run's number of optimizer steps (gin: `%TRAIN_STEPS`; for
        fine-tuning, the fine-tuning steps only).
      weights, weight_decay, decoupled_weight_decay, max_training_steps: as
        `velo_scale.velo` (None keeps its default `max_training_steps`).
      clip_norm: if set, `optax.clip_by_global_norm(clip_norm)` runs first.
      log_schedule: `VeLOTrainer` adds `schedule_summaries` (VeLO's per-role
        `lr_mult` and step sizes) to the train metrics (TensorBoard).
      continuation: how a restored VeLO state of another horizon goes on
        (`check_restored_horizon`): None (an error), 'increase' or 'naive'.

    Returns:
      A `VeLOOptaxWrapper` (a `t5x.optimizers.OptaxWrapper`).

    Raises:
      ImportError: t5x is not importable.
    """
    import velo_scale

    kwargs = (
        {} if max_training_steps is None else {"max_training_steps": max_training_steps}
    )
    tx = velo_scale.velo(
        num_steps,
        weights=weights,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        **kwargs,
    )
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    check_restored_horizon(None, num_steps, continuation)  # bad values fail now
    wrapper = _t5x_classes()["VeLOOptaxWrapper"](tx)
    wrapper.horizon = (num_steps, continuation, max_training_steps)
    if log_schedule:
        from velo_scale._src.velo import _lazy_theta

        wrapper.schedule_weights = _lazy_theta(weights)  # read at the first step
    return wrapper


@functools.cache
def _t5x_classes() -> dict[str, Any]:
    """Builds the classes that subclass t5x's (imports t5x)."""
    try:
        import clu.metrics
        from t5x import metrics as t5x_metrics
        from t5x import optimizers
        from t5x import train_state as train_state_lib
        from t5x import trainer as trainer_lib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(T5X_MISSING_MSG.format(e)) from e

    class VeLOOptaxWrapper(optimizers.OptaxWrapper):
        """`OptaxWrapper` whose `apply_gradient` passes `loss=` to the update.

        `tx` is `velo_scale.velo(...)` or an optax chain holding it. The loss
        comes from the hyper-params (`VeLOHyperParams.loss`), which
        `VeLOTrainer` sets every step. Constructing it registers `VeLOState`
        with T5X's partition rules. Its state dict leaves out VeLO's unused
        (`None`) slots, which T5X's checkpointer cannot store, and restoring
        puts them back.
        """

        def __init__(self, optax_optimizer: optax.GradientTransformation):
            super().__init__(optax_optimizer)
            self.hyper_params = VeLOHyperParams()
            # A function returning VeLO's theta for the schedule metrics
            # (set by `velo_optimizer(log_schedule=True)`), or None.
            self.schedule_weights = None
            # (num_steps, continuation, max_training_steps) that restored
            # states are checked against (`check_restored_horizon`), or None.
            self.horizon = None
            register_partition_rules()

        # Only inside `param_states` does None mean "no slot": elsewhere (the
        # step, the params) a None leaf of an axes tree means "replicated",
        # and VeLO's replicated leaves have `PartitionSpec()`.
        def state_dict(self, target, state):
            out = super().state_dict(target, state)
            slots = drop_none_leaves(out["state"]["param_states"])
            return {**out, "state": {**out["state"], "param_states": slots}}

        def restore_state(self, opt_target, opt_state, state_dict):
            reference = flax.serialization.to_state_dict(opt_state.param_states)
            slots = restore_none_leaves(
                state_dict["state"].get("param_states", {}), reference
            )
            state_dict = {
                **state_dict,
                "state": {**state_dict["state"], "param_states": slots},
            }
            target, state = super().restore_state(opt_target, opt_state, state_dict)
            if self.horizon is not None:
                state = state.replace(
                    param_states=check_restored_horizon(
                        state.param_states, *self.horizon
                    )
                )
            return target, state

        def apply_gradient(self, hyper_params, params, state, grads):
            updates, new_state = loss_carrying_update(
                self.optax_optimizer,
                grads,
                state.param_states,
                params,
                hyper_params.loss,
            )
            new_params = optax.apply_updates(params, updates)
            return new_params, optimizers.OptimizerState(
                step=state.step + 1, param_states=new_state
            )

    class _LossRecordingModel:
        """A model whose `loss_fn` also reports the loss as `LOSS_METRIC`.

        T5X's microbatch loop merges metrics across microbatches; a
        `t5x.metrics.Sum` of the per-microbatch losses merges to their sum
        (`step_loss_over_microbatches`), like the gradients.
        """

        def __init__(self, model):
            self._model = model

        def __getattr__(self, name):
            return getattr(self._model, name)

        def loss_fn(self, *args, **kwargs):
            loss, aux = self._model.loss_fn(*args, **kwargs)
            metrics, rest = (aux[0], aux[1:]) if isinstance(aux, tuple) else (aux, None)
            metrics = dict(metrics)
            metrics[LOSS_METRIC] = t5x_metrics.Sum.from_model_output(
                jnp.asarray(loss, jnp.float32)
            )
            return loss, metrics if rest is None else (metrics, *rest)

    def train_with_loss(
        train_state,
        batch,
        learning_rate,
        dropout_rng,
        model,
        num_microbatches,
        weight_metrics_computer=None,
        data_partition_spec=None,
    ):
        """`t5x.trainer.train_with_lr`, with the loss handed to the optimizer."""
        if data_partition_spec is None:
            data_partition_spec = P("data")
        optimizer = getattr(train_state, "_optimizer", None)
        if optimizer is None or not hasattr(
            optimizer.optimizer_def.hyper_params, "loss"
        ):
            raise TypeError(
                "VeLOTrainer needs a FlaxOptimTrainState whose optimizer is "
                "`velo_t5x.velo_optimizer()` (a VeLOOptaxWrapper); got "
                f"{type(train_state).__name__} with optimizer "
                f"{type(getattr(optimizer, 'optimizer_def', None)).__name__}."
            )
        grads, metrics, flax_mutables = trainer_lib.accumulate_grads_microbatched(
            _LossRecordingModel(model),
            train_state,
            batch,
            dropout_rng,
            num_microbatches,
            data_partition_spec,
        )
        loss = metrics[LOSS_METRIC].compute()
        new_optimizer = optimizer.apply_gradient(
            grads, learning_rate=learning_rate, loss=loss
        )
        new_train_state = train_state.replace(
            _optimizer=new_optimizer,
            flax_mutables=flax_mutables
            if flax_mutables
            else train_state_lib.EMPTY_DICT,
        )
        lr = jnp.asarray([learning_rate], jnp.float32)
        metrics["learning_rate"] = clu.metrics.Average.from_model_output(lr)
        metrics["learning_rate/current"] = clu.metrics.LastValue.from_model_output(lr)
        schedule_weights = getattr(optimizer.optimizer_def, "schedule_weights", None)
        if schedule_weights is not None:
            summaries = schedule_summaries(
                optimizer.target,
                new_optimizer.target,
                new_optimizer.state.param_states,
                schedule_weights(),
            )
            metrics.update(
                {
                    name: clu.metrics.LastValue.from_model_output(
                        jnp.reshape(value, (1,))
                    )
                    for name, value in summaries.items()
                }
            )
        if weight_metrics_computer is not None:
            metrics.update(
                weight_metrics_computer.compute_metrics(
                    grads, train_state, new_train_state
                )
            )
        return new_train_state, metrics

    class VeLOTrainer(trainer_lib.Trainer):
        """`t5x.trainer.Trainer` that gives VeLO the loss at every step.

        The train step is T5X's (microbatching, dropout RNG, flax mutables,
        partitioning), except that the loss of `value_and_grad` is kept (the
        sum over microbatches, like the gradients) and passed as `loss=` to the optimizer.
        `learning_rate_fn` is optional: VeLO has no learning rate (it is only
        logged).
        """

        def __init__(
            self,
            model,
            train_state,
            partitioner,
            eval_names,
            summary_dir,
            train_state_axes,
            rng,
            learning_rate_fn=None,
            num_microbatches=None,
            weight_metrics_computer=None,
        ):
            if learning_rate_fn is None:

                def learning_rate_fn(step):
                    del step
                    return jnp.zeros((), jnp.float32)

            super().__init__(
                model=model,
                train_state=train_state,
                partitioner=partitioner,
                eval_names=eval_names,
                summary_dir=summary_dir,
                train_state_axes=train_state_axes,
                rng=rng,
                learning_rate_fn=learning_rate_fn,
                num_microbatches=num_microbatches,
                weight_metrics_computer=weight_metrics_computer,
            )

        @functools.cached_property
        def _partitioned_train_step(self):
            def train_step(train_state, batch):
                return train_with_loss(
                    train_state,
                    batch,
                    learning_rate=self._learning_rate_fn(train_state.step),
                    dropout_rng=self._get_step_rng(train_state.step),
                    model=self._model,
                    num_microbatches=self._num_microbatches,
                    weight_metrics_computer=self._weight_metrics_computer,
                    data_partition_spec=self._partitioner.data_partition_spec,
                )

            return self._partitioner.partition(
                train_step,
                in_axis_resources=(
                    self._train_state_axes,
                    self._partitioner.data_partition_spec,
                ),
                out_axis_resources=(self._train_state_axes, None),
                donate_argnums=(0,),
            )

    classes = {
        "VeLOOptaxWrapper": VeLOOptaxWrapper,
        "VeLOTrainer": VeLOTrainer,
        "train_with_loss": train_with_loss,
    }
    for obj in classes.values():
        obj.__module__ = __name__
    return classes


def __getattr__(name: str) -> Any:
    # The T5X classes are built (and t5x imported) on first access.
    if name in _T5X_NAMES:
        return _t5x_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Also VeLOOptaxWrapper, VeLOTrainer and train_with_loss (built on first access,
# importing t5x; not in __all__ so that `import *` does not import t5x).
__all__ = [
    "LOSS_METRIC",
    "VeLOHyperParams",
    "drop_none_leaves",
    "restore_none_leaves",
    "loss_carrying_update",
    "step_loss_over_microbatches",
    "register_partition_rules",
    "velo_logical_axes",
    "velo_optimizer",
]
