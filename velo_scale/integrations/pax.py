"""VeLO for Pax/Praxis: a `ShardedGradientTransformation`.

Praxis optimizers are `praxis.optimizers.ShardedGradientTransformation(init,
update, init_partition_spec)`: `init_partition_spec` maps the variables'
`WeightHParams` (shape, `tensor_split_dims_mapping` of mesh axis names, -1 for
a replicated axis) to `WeightHParams` of the optimizer state. `sharded_velo`
builds that triple around `velo_scale.velo`, with the state's sharding derived
by `velo_scale.state_partition_specs` (each accumulator on its parameter's
shards, the per-tensor LSTM state and the loss buffer replicated).

VeLO needs the loss: `update(grads, state, params, loss=loss)`. Pax learners
call `grad_tx.update(grads, state, params)`; `bind_loss(tx, loss)` is the
learner-side hook: a transformation whose `update` passes the given loss, to
hand to the learner (or call) in the train step where the loss is known.

praxis is optional: without it `sharded_velo` returns this module's
`ShardedGradientTransformation` NamedTuple and `init_partition_spec` accepts
any leaves with `shape` and `tensor_split_dims_mapping` (e.g. `WeightSpec`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
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
    """

    shape: Sequence[int]
    dtype: Any = None
    mesh_shape: Sequence[int] | None = None
    tensor_split_dims_mapping: Sequence[Any] | None = None


def _sharded_cls() -> type:
    try:
        from praxis import optimizers
    except ImportError:
        return ShardedGradientTransformation
    return optimizers.ShardedGradientTransformation


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


def state_var_specs(tx: optax.GradientTransformation, var_hparams: Any) -> Any:
    """`WeightHParams` of `tx.init(vars)`, derived from the variables'.

    Args:
      tx: `velo_scale.velo(...)` or an optax chain holding it.
      var_hparams: a tree of praxis `WeightHParams` (or `WeightSpec`), one per
        variable.

    Returns:
      A tree like `tx.init(vars)`: per state array, a copy of the first
      variable's hparams with the array's shape and dtype, `init=None`, and the
      `tensor_split_dims_mapping` of `velo_scale.state_partition_specs`.

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
    template = leaves[0] if leaves else WeightSpec(shape=())
    return jax.tree_util.tree_map(
        lambda spec, x: _state_var(template, tuple(x.shape), x.dtype, spec),
        state_specs,
        abstract,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def sharded_velo(
    num_steps: int,
    *,
    weights: Any = None,
    weight_decay: float = 0.0,
    decoupled_weight_decay: float = 0.0,
    max_training_steps: int | None = None,
    state_dtype: Any = jnp.float32,
) -> Any:
    """VeLO as a Praxis `ShardedGradientTransformation`.

    Args:
      num_steps: the run's number of optimizer steps.
      weights, weight_decay, decoupled_weight_decay, max_training_steps,
        state_dtype: as `velo_scale.velo` (None keeps its default
        `max_training_steps`).

    Returns:
      `ShardedGradientTransformation(init, update, init_partition_spec)` (the
      praxis class when praxis is importable): `init(vars)` is VeLO's init,
      `update(updates, state, params=None, *, loss)` VeLO's update, and
      `init_partition_spec(var_hparams)` is `state_var_specs`.

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

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        return tx.update(updates, state, params, loss=loss, **extra_args)

    return _sharded_cls()(
        init=tx.init,
        update=update_fn,
        init_partition_spec=lambda var_hparams: state_var_specs(tx, var_hparams),
    )


def bind_loss(tx: Any, loss: Any) -> Any:
    """The learner-side hook: `tx` with `loss` passed to every `update`.

    Pax learners call `grad_tx.update(grads, states, old_vars)` with no loss;
    in the train step, where the loss is known, give the learner
    `bind_loss(tx, loss)` instead of `tx`.

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
    "ShardedGradientTransformation",
    "WeightSpec",
    "bind_loss",
    "sharded_velo",
    "state_var_specs",
]
