"""Partition specs of VeLO's state, derived from the parameters' specs.

Rules (paper-agnostic, they follow from what each accumulator is):

* momentum, rms, `v_diag` (shape `p.shape + (n_decays,)`): the parameter's
  spec with the decay axis replicated;
* factored `v_row` (the parameter without its largest axis d0) and `v_col`
  (without its second-largest axis d1): the parameter's spec with that axis
  removed, so each device keeps the factor entries of its own shard;
* gradient-accumulation buffers: exactly the parameter's spec;
* the per-tensor LSTM state, loss buffer and counters: replicated.

With these specs, `jax.jit(tx.update)` runs every per-parameter computation on
the shard that owns the parameter; only per-tensor means (a few floats per
tensor) and the factored row/column sums cross devices.

Multi-host: the specs only name mesh axes, so the same code serves a mesh that
spans processes (`jax.distributed.initialize()` then `jax.make_mesh` over
`jax.devices()`): each process holds the shards of its local devices, and the
replicated per-tensor LSTM runs identically everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from velo_scale._src import accumulators
from velo_scale._src.state import AccumulationState, FactoredState, VeLOState

P = PartitionSpec


class ShardingError(ValueError):
    """A parameter's partition spec cannot be used (names the parameter)."""


def _path_str(path) -> str:
    return (
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) or "<root>"
    )


def _padded(spec: PartitionSpec | None, ndim: int, name: str) -> tuple:
    spec = P() if spec is None else spec
    if not isinstance(spec, PartitionSpec):
        raise ShardingError(
            f"parameter {name}: expected a jax.sharding.PartitionSpec, got "
            f"{type(spec).__name__} {spec!r}."
        )
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ShardingError(
            f"parameter {name} has {ndim} axes but its partition spec {spec} names "
            f"{len(entries)}; give at most one entry per axis."
        )
    seen: set[str] = set()
    for entry in entries:
        for axis in entry if isinstance(entry, tuple) else (entry,):
            if axis is None:
                continue
            if axis in seen:
                raise ShardingError(
                    f"parameter {name}: mesh axis {axis!r} is used twice in {spec}; "
                    "a mesh axis can shard at most one array axis."
                )
            seen.add(axis)
    return entries + (None,) * (ndim - len(entries))


def _velo_specs(
    state: VeLOState,
    shapes: list[tuple[int, ...]],
    specs: list,
    names: list[str],
    treedef,
) -> VeLOState:
    padded = [_padded(s, len(shape), n) for s, shape, n in zip(specs, shapes, names)]

    def per_leaf(tree: Any, fn: Callable[[tuple, tuple[int, ...]], PartitionSpec]):
        # Masked-out parameters (optax.MaskedNode) keep their placeholder.
        leaves = treedef.flatten_up_to(tree)
        out = [
            leaf
            if leaf is None or isinstance(leaf, optax.MaskedNode)
            else fn(spec, shape)
            for leaf, spec, shape in zip(leaves, padded, shapes)
        ]
        return treedef.unflatten(out)

    def with_decay(spec, shape):
        return P(*spec, None)

    # Unused slots are None (see accumulators.init_all) and stay None.
    def row(spec, shape):
        d0 = accumulators.factored_dims(shape)[1]
        return P(*(s for i, s in enumerate(spec) if i != d0), None)

    def col(spec, shape):
        d1 = accumulators.factored_dims(shape)[0]
        return P(*(s for i, s in enumerate(spec) if i != d1), None)

    accumulation = state.accumulation
    if accumulation is not None:
        accumulation = AccumulationState(
            grad_sum=per_leaf(accumulation.grad_sum, lambda s, _: P(*s)),
            loss_sum=P(),
            count=P(),
        )
    replicated = jax.tree_util.tree_map(lambda _: P(), state)
    return replicated._replace(
        momentum=per_leaf(state.momentum, with_decay),
        rms=per_leaf(state.rms, with_decay),
        factored=FactoredState(
            # v_row drops d0 (the largest axis), v_col drops d1.
            v_row=per_leaf(state.factored.v_row, row),
            v_col=per_leaf(state.factored.v_col, col),
            v_diag=per_leaf(state.factored.v_diag, with_decay),
        ),
        accumulation=accumulation,
    )


def state_partition_specs(
    tx: optax.GradientTransformation,
    params: Any,
    param_specs: Any = None,
    *,
    logical_axis_rules: Any = None,
) -> Any:
    """Partition specs for `tx.init(params)`, derived from the params' specs.

    Works for `velo_scale.velo(...)` alone or inside `optax.chain`/`masked`/
    `MultiSteps`: VeLO's state follows the rules in this module's docstring;
    other param-shaped optax states (e.g. Adam moments in a chain) take the
    params' specs, and everything else is replicated.

    Args:
      tx: the optimizer.
      params: arrays, `jax.ShapeDtypeStruct`s, or flax boxed params
        (`nn.LogicallyPartitioned`/`nn.Partitioned`).
      param_specs: a tree like params of `PartitionSpec` (mesh axes). None
        takes them from the boxed params' metadata or the arrays' own
        `NamedSharding`s.
      logical_axis_rules: flax logical axis rules (`(("embed", "model"), ...)`)
        to turn logical axis names into mesh axes.

    Returns:
      A tree like `tx.init(params)` with a `PartitionSpec` per leaf.

    Raises:
      ShardingError: a spec names more axes than its parameter has, or uses a
        mesh axis twice; the message names the parameter's path.
    """
    params, param_specs = _resolve_param_specs(params, param_specs, logical_axis_rules)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
    )
    state = jax.eval_shape(tx.init, abstract)
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [_path_str(p) for p, _ in path_leaves]
    shapes = [tuple(x.shape) for _, x in path_leaves]
    specs = treedef.flatten_up_to(param_specs)
    for spec, shape, name in zip(specs, shapes, names):
        _padded(spec, len(shape), name)

    def is_param_like(x) -> bool:
        if jax.tree_util.tree_structure(x) != treedef or not shapes:
            return False
        return [tuple(a.shape) for a in jax.tree_util.tree_leaves(x)] == shapes

    def is_node(x) -> bool:
        return isinstance(x, VeLOState) or is_param_like(x)

    leaves, state_def = jax.tree_util.tree_flatten(state, is_leaf=is_node)
    out = []
    for leaf in leaves:
        if isinstance(leaf, VeLOState):
            out.append(_velo_specs(leaf, shapes, specs, names, treedef))
        elif is_param_like(leaf):
            padded = [_padded(s, len(sh), n) for s, sh, n in zip(specs, shapes, names)]
            out.append(treedef.unflatten([P(*s) for s in padded]))
        else:
            out.append(P())
    return state_def.unflatten(out)


def state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    mesh: Mesh,
    param_specs: Any = None,
    *,
    logical_axis_rules: Any = None,
    replicate_indivisible: bool = False,
) -> Any:
    """`NamedSharding`s on `mesh` for `tx.init(params)`; see
    `state_partition_specs`.

    jax requires every sharded axis to divide evenly by its mesh axes. A
    parameter axis that does not raises `ShardingError` naming the parameter,
    unless `replicate_indivisible=True`, which replicates such axes in the
    state (the parameter itself must then be sharded the same way by the
    caller).

    Example:
      >>> shardings = velo_scale.state_shardings(tx, params, mesh)  # doctest: +SKIP
      >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
    """
    params, param_specs = _resolve_param_specs(params, param_specs, logical_axis_rules)
    checked = mesh_param_specs(params, param_specs, mesh, replicate_indivisible)
    specs = state_partition_specs(tx, params, checked)
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def mesh_param_specs(
    params: Any, param_specs: Any, mesh: Mesh, replicate_indivisible: bool = False
) -> Any:
    """Checks param specs against a mesh (axis names, even division).

    Returns the specs padded to each parameter's rank; with
    `replicate_indivisible`, axes that do not divide evenly are replicated
    instead of raising `ShardingError` (the error names the parameter).
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    specs = treedef.flatten_up_to(param_specs)
    checked = []
    for (path, x), spec in zip(path_leaves, specs):
        name = _path_str(path)
        entries = list(_padded(spec, len(x.shape), name))
        for axis, (size, entry) in enumerate(zip(x.shape, entries)):
            names = entry if isinstance(entry, tuple) else (entry,)
            ways = 1
            for mesh_axis in names:
                if mesh_axis is None:
                    continue
                if mesh_axis not in mesh.shape:
                    raise ShardingError(
                        f"parameter {name}: partition spec {spec} names mesh axis "
                        f"{mesh_axis!r}, but the mesh has axes {tuple(mesh.shape)}."
                    )
                ways *= mesh.shape[mesh_axis]
            if size % ways:
                if not replicate_indivisible:
                    raise ShardingError(
                        f"parameter {name} (shape {tuple(x.shape)}): axis {axis} of "
                        f"size {size} cannot be split {ways} ways by {entry!r}. "
                        "Replicate that axis (None in its spec) or pass "
                        "replicate_indivisible=True."
                    )
                entries[axis] = None
        checked.append(P(*entries))
    return treedef.unflatten(checked)


def _resolve_param_specs(params: Any, param_specs: Any, rules: Any) -> tuple[Any, Any]:
    """Unboxes flax params and finds their specs (mesh axes)."""
    try:
        import flax.linen as nn
    except ImportError:  # The lean install: no flax, so no boxed params.
        nn = None
    if nn is None:
        if rules is not None:
            raise ImportError(
                "logical_axis_rules need flax: pip install 'velo-scale[train]' "
                "(or flax)."
            )
        if param_specs is None:
            param_specs = jax.tree_util.tree_map(_spec_of_array, params)
        return params, param_specs
    boxed = any(
        isinstance(x, nn.meta.AxisMetadata)
        for x in jax.tree_util.tree_leaves(
            params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
        )
    )
    if boxed:
        if param_specs is None:
            param_specs = nn.get_partition_spec(params)
        params = nn.meta.unbox(params)
    if param_specs is None:
        param_specs = jax.tree_util.tree_map(_spec_of_array, params)
    if rules is not None:
        param_specs = nn.logical_to_mesh(param_specs, rules)
    return params, param_specs


def _spec_of_array(x: Any) -> PartitionSpec:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.spec
    return P()


__all__ = [
    "ShardingError",
    "mesh_param_specs",
    "state_partition_specs",
    "state_shardings",
]
