"""VeLO for Pax/Praxis: a `ShardedGradientTransformation`, and the loss hook.

Praxis optimizers are `praxis.optimizers.ShardedGradientTransformation(init,
update, init_partition_spec)`: `init_partition_spec` maps the variables'
`WeightHParams` (shape, `tensor_split_dims_mapping` of mesh axis names, -1 for
a replicated axis) to `WeightHParams` of the optimizer state. `sharded_velo`
builds that triple around `velo_scale.velo`, with the state's sharding derived
by `velo_scale.state_partition_specs` (each accumulator on its parameter's
shards, the per-tensor LSTM state and the loss buffer replicated).

VeLO needs the loss: `update(grads, state, params, loss=loss)`. Pax learners
call `grad_tx.update(grads, state, params)` with no loss, through
`praxis.optimizers.sharded_chain`, which passes no extra arguments. Two hooks
reach VeLO through any chain:

* `training_loss(loss)`: a context manager; VeLO updates traced inside it that
  get no `loss=` use `loss`. `velo_scale.integrations.pax_learner.VeLOLearner`
  (a paxml `Learner`) records the loss of its gradient function and wraps its
  update in it, so a Pax experiment switches to VeLO by configuration alone;
* `bind_loss(tx, loss)`: `tx` with the loss bound, for a hand-written step.

`sharded_chain` turns `None` in a state into `optax.MaskedNode`. VeLO's state
has `None` slots (the factored row/column accumulators of vectors and scalars,
`accumulation` when every call is a VeLO step); with `masked_empty_slots=True`
(what `pax_learner.VeLO` uses) they are `MaskedNode` from `init` on, so the
state keeps one structure through updates and the train step compiles once.
`update` accepts either form.

praxis is optional: without it `sharded_velo` returns this module's
`ShardedGradientTransformation` NamedTuple and `init_partition_spec` accepts
any leaves with `shape` and `tensor_split_dims_mapping` (e.g. `WeightSpec`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from velo_scale._src.sharding import state_partition_specs
from velo_scale._src.velo import velo

P = PartitionSpec

NOT_A_VAR_SPEC_MSG = (
    "init_partition_spec expects a tree of praxis WeightHParams (or objects with "
    "`shape` and `tensor_split_dims_mapping`), one per variable; got a {}."
)
NO_LOSS_MSG = (
    "VeLO needs the training loss, and this update got none: Pax learners call "
    "`grad_tx.update(grads, states, vars)` without it. Use "
    "`velo_scale.integrations.pax_learner.VeLOLearner` as the task's learner "
    "(it hands the loss of its gradient function to VeLO), or call "
    "`update(..., loss=loss)`, or trace the update inside "
    "`with velo_scale.integrations.pax.training_loss(loss):`, or use "
    "`bind_loss(tx, loss)`."
)
STATE_MISMATCH_MSG = (
    "the VeLO state given to update has {got} arrays, but VeLO's state for these "
    "updates has {want}: the state does not belong to this parameter tree."
)


class ShardedGradientTransformation(NamedTuple):
    """Stand-in for `praxis.optimizers.ShardedGradientTransformation`.

    Used when praxis is not importable; same fields.
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    init_partition_spec: Callable[[Any], Any]


@dataclasses.dataclass
class WeightSpec:
    """Minimal stand-in for `praxis.base_layer.WeightHParams`.

    Attributes:
      shape: the variable's shape.
      dtype: its dtype (None: float32).
      mesh_shape: the logical mesh's shape, or None.
      tensor_split_dims_mapping: per axis, the mesh axis name(s) that shard it,
        or -1 for a replicated axis; None replicates every axis.
      repeat_prefix: leading axes of a repeated (stacked) layer, or None; the
        variable's full shape is `repeat_prefix + shape`.
      repeat_prefix_split_dims_mapping: the mapping of those leading axes.
    """

    shape: Sequence[int]
    dtype: Any = None
    mesh_shape: Sequence[int] | None = None
    tensor_split_dims_mapping: Sequence[Any] | None = None
    repeat_prefix: Sequence[int] | None = None
    repeat_prefix_split_dims_mapping: Sequence[Any] | None = None


# --- the loss -------------------------------------------------------------

_LOSSES = threading.local()


def _loss_stack() -> list:
    if not hasattr(_LOSSES, "stack"):
        _LOSSES.stack = []
    return _LOSSES.stack


@contextlib.contextmanager
def training_loss(loss: Any) -> Iterator[None]:
    """VeLO updates traced inside this block that get no `loss=` use `loss`.

    The hook that lets the loss pass through praxis' `sharded_chain`, the
    repeat-prefix vectorization and paxml's `Learner.update_states`, none of
    which forward extra arguments. Blocks nest (the innermost wins) and are
    per thread.

    Args:
      loss: f32[], the loss of the batch the gradients come from (a tracer
        inside a jitted train step).

    Example:
      >>> with training_loss(loss):  # doctest: +SKIP
      ...     updates, states = learner.update_states(grads, states, mdl_vars, hparams)
    """
    stack = _loss_stack()
    stack.append(loss)
    try:
        yield
    finally:
        stack.pop()


def current_training_loss() -> Any:
    """The loss of the innermost `training_loss` block, or None outside one."""
    stack = _loss_stack()
    return stack[-1] if stack else None


# --- None <-> MaskedNode ----------------------------------------------------


def _is_none(x: Any) -> bool:
    return x is None


def mask_empty_slots(state: Any) -> Any:
    """`state` with every `None` slot replaced by `optax.MaskedNode()`.

    The form `praxis.optimizers.sharded_chain` leaves a state in after an update.
    Both `None` and `MaskedNode` hold no arrays, so the leaves are unchanged.
    """
    return jax.tree_util.tree_map(
        lambda x: optax.MaskedNode() if x is None else x, state, is_leaf=_is_none
    )


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def _canonical_state(tx: optax.GradientTransformation, updates: Any, state: Any) -> Any:
    """`state` in the structure `tx.init` gives for `updates` (its `None` slots).

    The incoming state may hold `MaskedNode` where VeLO has `None` (praxis'
    chains convert them); both hold no arrays, so the state's leaves are
    re-attached to VeLO's own structure, derived abstractly from the updates.
    """
    want = jax.tree_util.tree_structure(jax.eval_shape(tx.init, _abstract(updates)))
    if jax.tree_util.tree_structure(state) == want:
        return state
    leaves = jax.tree_util.tree_leaves(state)
    if len(leaves) != want.num_leaves:
        raise ValueError(
            STATE_MISMATCH_MSG.format(got=len(leaves), want=want.num_leaves)
        )
    return want.unflatten(leaves)


# --- partition specs --------------------------------------------------------


def _sharded_cls() -> type:
    try:
        from praxis import optimizers
    except ImportError:
        return ShardedGradientTransformation
    return optimizers.ShardedGradientTransformation


def _default_var_template() -> Any:
    """A variable spec to copy state specs from when there is no variable."""
    try:
        from praxis import base_layer
    except ImportError:
        return WeightSpec(shape=())
    return base_layer.WeightHParams(shape=[])


def _is_var_spec(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "tensor_split_dims_mapping")


def _full_shape_and_spec(var: Any) -> tuple[tuple[int, ...], PartitionSpec]:
    """A variable's full shape (repeat prefix included) and its PartitionSpec."""
    shape = tuple(var.shape)
    mapping = var.tensor_split_dims_mapping or (-1,) * len(shape)
    prefix = tuple(getattr(var, "repeat_prefix", None) or ())
    if prefix:
        # Praxis shards optimizer state over the repeat prefix with
        # repeat_optimizer_dims_mapping when it is set.
        prefix_mapping = (
            getattr(var, "repeat_optimizer_dims_mapping", None)
            or getattr(var, "repeat_prefix_split_dims_mapping", None)
            or (-1,) * len(prefix)
        )
        shape, mapping = prefix + shape, tuple(prefix_mapping) + tuple(mapping)
    entries = [None if e == -1 or e is None else e for e in mapping]
    return shape, P(*entries)


def _state_var(template: Any, shape: tuple[int, ...], dtype: Any, spec: Any) -> Any:
    """A WeightHParams-like spec of one state array, made from a variable's."""
    entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    values = {
        "shape": list(shape),
        "dtype": dtype,
        "init": None,
        "collections": None,
        "tensor_split_dims_mapping": tuple(-1 if e is None else e for e in entries),
        "repeat_prefix": None,
        "repeat_prefix_split_dims_mapping": None,
        "repeat_optimizer_dims_mapping": None,
        "fan_in_axes": None,
        "fan_out_axes": None,
    }
    names = {f.name for f in dataclasses.fields(template)}
    return dataclasses.replace(
        template, **{k: v for k, v in values.items() if k in names}
    )


def state_var_specs(
    tx: optax.GradientTransformation,
    var_hparams: Any,
    *,
    masked_empty_slots: bool = False,
) -> Any:
    """`WeightHParams` of `tx.init(vars)`, derived from the variables'.

    Args:
      tx: `velo_scale.velo(...)` or an optax chain holding it.
      var_hparams: a tree of praxis `WeightHParams` (or `WeightSpec`), one per
        variable; subtrees without variables (`optax.MaskedNode`, as praxis'
        repeat-prefix grouping leaves them) are allowed, also everywhere.
        A variable with a `repeat_prefix` is one tensor of shape
        `repeat_prefix + shape` (praxis' learners vectorize over the prefix
        themselves unless `vectorize_on_repeat_prefix=False`).
      masked_empty_slots: give the state's `None` slots as `optax.MaskedNode`
        (the form of `sharded_velo(..., masked_empty_slots=True).init`).

    Returns:
      A tree like `tx.init(vars)`: per state array, a copy of the first
      variable's hparams (a praxis `WeightHParams` when there is no variable and
      praxis is importable) with the array's shape and dtype, `init=None`, no
      repeat prefix, and the `tensor_split_dims_mapping` of
      `velo_scale.state_partition_specs`.

    Raises:
      TypeError: a leaf of `var_hparams` has no shape or split mapping.
      velo_scale.ShardingError: a mapping names more axes than its variable has,
        or a mesh axis twice (names the variable).
    """
    leaves, treedef = jax.tree_util.tree_flatten(var_hparams, is_leaf=_is_var_spec)
    for leaf in leaves:
        if not _is_var_spec(leaf):
            raise TypeError(NOT_A_VAR_SPEC_MSG.format(type(leaf).__name__))
    shapes_specs = [_full_shape_and_spec(v) for v in leaves]
    params = treedef.unflatten(
        [
            jax.ShapeDtypeStruct(shape, getattr(v, "dtype", None) or jnp.float32)
            for v, (shape, _) in zip(leaves, shapes_specs)
        ]
    )
    specs = treedef.unflatten([spec for _, spec in shapes_specs])
    state_specs = state_partition_specs(tx, params, specs)
    abstract = jax.eval_shape(tx.init, params)
    template = leaves[0] if leaves else _default_var_template()
    out = jax.tree_util.tree_map(
        lambda spec, x: _state_var(template, tuple(x.shape), x.dtype, spec),
        state_specs,
        abstract,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return mask_empty_slots(out) if masked_empty_slots else out


# --- the transformation -----------------------------------------------------


def sharded_velo(
    num_steps: int,
    *,
    weights: Any = None,
    weight_decay: float = 0.0,
    decoupled_weight_decay: float = 0.0,
    max_training_steps: int | None = None,
    state_dtype: Any = jnp.float32,
    masked_empty_slots: bool = False,
) -> Any:
    """VeLO as a Praxis `ShardedGradientTransformation`.

    Args:
      num_steps: the run's number of optimizer steps.
      weights, weight_decay, decoupled_weight_decay, max_training_steps,
        state_dtype: as `velo_scale.velo` (None keeps its default
        `max_training_steps`).
      masked_empty_slots: the state's empty slots (`None` in `VeLOState`) are
        `optax.MaskedNode` from `init` on, the form praxis'
        `sharded_chain` leaves after an update, so the state keeps one pytree
        structure (one compile of the train step). Use it inside praxis
        chains; `pax_learner.VeLO` does.

    Returns:
      `ShardedGradientTransformation(init, update, init_partition_spec)` (the
      praxis class when praxis is importable): `init(vars)` is VeLO's init,
      `update(updates, state, params=None, *, loss=None)` VeLO's update (the
      loss of the innermost `training_loss` block when `loss` is None; a state
      with `MaskedNode` or `None` in its empty slots), and
      `init_partition_spec(var_hparams)` is `state_var_specs`.

    Raises:
      ValueError (from `update`): no loss was given nor set by
        `training_loss`.

    Example:
      >>> tx = sharded_velo(10_000)  # doctest: +SKIP
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grads, state, params, loss=loss)
      >>> state_hparams = tx.init_partition_spec(var_weight_hparams)
    """
    kwargs = (
        {} if max_training_steps is None else {"max_training_steps": max_training_steps}
    )
    tx = velo(
        num_steps,
        weights=weights,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        state_dtype=state_dtype,
        **kwargs,
    )

    def init_fn(params):
        state = tx.init(params)
        return mask_empty_slots(state) if masked_empty_slots else state

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        if loss is None:
            loss = current_training_loss()
        if loss is None:
            raise ValueError(NO_LOSS_MSG)
        state = _canonical_state(tx, updates, state)
        updates, state = tx.update(updates, state, params, loss=loss, **extra_args)
        return updates, mask_empty_slots(state) if masked_empty_slots else state

    return _sharded_cls()(
        init=init_fn,
        update=update_fn,
        init_partition_spec=lambda var_hparams: state_var_specs(
            tx, var_hparams, masked_empty_slots=masked_empty_slots
        ),
    )


def bind_loss(tx: Any, loss: Any) -> Any:
    """The learner-side hook: `tx` with `loss` passed to every `update`.

    Pax learners call `grad_tx.update(grads, states, old_vars)` with no loss;
    in a hand-written train step, where the loss is known, give the learner
    `bind_loss(tx, loss)` instead of `tx` (or wrap the call in
    `training_loss(loss)`, which also reaches VeLO inside praxis chains).

    Args:
      tx: the result of `sharded_velo` (or anything with the same fields).
      loss: f32[], the loss of the batch the gradients come from.

    Returns:
      A transformation of the same type whose `update(updates, state,
      params=None, **extra_args)` calls `tx.update(..., loss=loss)`.

    Example:
      >>> updates, state = bind_loss(tx, loss).update(grads, state, params)  # doctest: +SKIP
    """

    def update_fn(updates, state, params=None, **extra_args):
        return tx.update(updates, state, params, loss=loss, **extra_args)

    return type(tx)(
        init=tx.init, update=update_fn, init_partition_spec=tx.init_partition_spec
    )


__all__ = [
    "NO_LOSS_MSG",
    "ShardedGradientTransformation",
    "WeightSpec",
    "bind_loss",
    "current_training_loss",
    "mask_empty_slots",
    "sharded_velo",
    "state_var_specs",
    "training_loss",
]
