"""Tensor-wide sums of several same-shape arrays in one pass over memory.

VeLO's phase A needs ~40 tensor-wide sums per parameter tensor (the
per-tensor LSTM's statistics and the mean squares of the MLP's 30 input
channels), all of them expressions of the same few arrays (p, g and the
accumulators). XLA:TPU and XLA:GPU fuse such sibling reductions into one
pass themselves. XLA:CPU runs one reduction per sum, reads the inputs again
for each, and materialises, as parameter-sized temporaries, the
expressions two of them share (24 B/param for the channels alone). On CPU
`sums` therefore runs them as one variadic reduction (`lax.reduce` with
many operands): the inputs are read once and nothing is kept.

* Rounding: the variadic reduction sums the last axis first (one
  sequential accumulation per row), then the rows. A sequential f32 sum of
  n terms rounds with a relative error that grows like n * 2**-24; the
  split keeps it near that of XLA's own reductions (~1e-5 relative on a
  [1024, 1024] tensor, against ~1e-2 unsplit).
* Sharding: XLA's SPMD partitioner all-gathers a variadic reduction over a
  sharded axis, so it is wrapped in `custom_partitioning`: each shard sums
  its block, then one psum over the mesh axes that shard it (the same
  all-reduce a plain `jnp.sum` gets).
* Under vmap (ES's perturbations, `velo_step`'s groups of small tensors)
  the plain sums are used.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# A vector longer than this is summed in rows of `row_length` elements.
_MAX_ROW = 4096


def row_length(n: int) -> int | None:
    """The rows a long vector of n elements is split into: the largest
    divisor of n in [128, 1024]; None if there is none."""
    return next((c for c in range(min(n, 1024), 127, -1) if n % c == 0), None)


def _rows(x: jax.Array) -> jax.Array:
    """x as rows for the variadic reduction (summed over the last axis): a
    matrix or higher keeps its own axes (a reshape across axes would make a
    sharded tensor's shards move), a long vector is split when it divides."""
    if x.ndim >= 2 or x.size <= _MAX_ROW:
        return x
    c = row_length(x.size)
    return x if c is None else x.reshape(x.size // c, c)


def sums_one_pass(xs: list[jax.Array]) -> jax.Array:
    """f32[k], `[jnp.sum(x) for x in xs]` (f32 arrays of one shape) as one
    variadic reduction over the last axis (`_rows`), then a sum of the row
    sums."""
    if len(xs) < 2:
        return jnp.stack([jnp.sum(x) for x in xs])
    rows = [_rows(x) for x in xs]
    zeros = [np.float32(0)] * len(rows)
    row_sums = jax.lax.reduce(
        rows, zeros, lambda a, b: [x + y for x, y in zip(a, b)], (rows[0].ndim - 1,)
    )
    # The row sums (small) stacked and summed as one reduction, not one each
    # (each a separate kernel for XLA:CPU to compile).
    stacked = jnp.stack(row_sums)
    return jnp.sum(stacked, axis=tuple(range(1, stacked.ndim)))


def _mesh_axes(spec) -> tuple[str, ...]:
    """The mesh axes a PartitionSpec shards on, in order."""
    axes = []
    for entry in spec:
        if entry is None:
            continue
        axes += list(entry) if isinstance(entry, tuple) else [entry]
    return tuple(axes)


def _stacked_sums(*xs) -> jax.Array:
    """f32[k], `sums_one_pass` of the k arrays."""
    return sums_one_pass(list(xs))


_sums_partitioned = custom_partitioning(_stacked_sums)


def _replicated(mesh, arg_shapes, result_shape):
    del arg_shapes, result_shape
    return NamedSharding(mesh, P())


def _partition(mesh, arg_shapes, result_shape):
    # Every operand as the first one is sharded; each shard sums its block
    # in one pass, then one psum over the axes that shard it.
    sharding = arg_shapes[0].sharding
    spec = sharding.spec if isinstance(sharding, NamedSharding) else P()
    axes = _mesh_axes(spec)
    arg = NamedSharding(mesh, spec)

    def lower(*xs):
        local = _stacked_sums(*xs)
        return jax.lax.psum(local, axes) if axes else local

    return (
        mesh,
        lower,
        _replicated(mesh, arg_shapes, result_shape),
        (arg,) * len(arg_shapes),
    )


def _rule(mesh, operand_types, result_types):
    # Shardy: every operand dimension is summed away (the result [k] is new).
    del mesh, result_types
    dims = " ".join(f"d{i}" for i in range(len(operand_types[0].shape)))
    return ", ".join([dims] * len(operand_types)) + " -> k"


# The one-pass sums need a jax whose custom_partitioning takes a Shardy rule
# (0.10 does). Older jax (the Pax lane's 0.4.30) hands `_partition`
# shardings without mesh axes, which would gather the tensor: there `sums`
# keeps the plain sums.
ONE_PASS_SUPPORTED = (
    "sharding_rule" in inspect.signature(custom_partitioning.def_partition).parameters
)
if ONE_PASS_SUPPORTED:
    _sums_partitioned.def_partition(
        partition=_partition,
        infer_sharding_from_operands=_replicated,
        sharding_rule=_rule,
    )


@jax.custom_batching.custom_vmap
def _sums_cpu(*xs):
    return _sums_partitioned(*xs)


@_sums_cpu.def_vmap
def _sums_cpu_vmap(axis_size, in_batched, *xs):
    # Under vmap (ES's perturbations, velo_step's groups of small tensors):
    # each array's sums over its own axes, f32[B, k] (custom_partitioning
    # has no batching rule).
    # An unbatched array is summed once, not once per batch row.
    out = [
        jnp.sum(x, axis=tuple(range(1, x.ndim)))
        if b
        else jnp.broadcast_to(jnp.sum(x), (axis_size,))
        for x, b in zip(xs, in_batched)
    ]
    return jnp.stack(out, axis=-1), True


# XLA:GPU launches a kernel for every reduction it does not fuse with a
# sibling. It splits a large reduction to a scalar in two (partial sums,
# then a small reduction of them) and fuses the first stages of sibling
# sums but not the second: k sums of a large tensor cost 1 + k kernels.
# Arrays of at most this many elements are summed as one stacked array.
GPU_STACKED_MAX_ELEMENTS = 1 << 16


def _sums_each(xs: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.sum(x) for x in xs])


def _sums_gpu(xs: list[jax.Array]) -> jax.Array:
    # Large arrays: the one-pass variadic reduction of the CPU path (reads
    # their common inputs once; two kernels for any k). Small arrays: one
    # row reduction of the k arrays stacked (the stack is fused into the
    # reduction's input, not copied).
    if xs[0].size > GPU_STACKED_MAX_ELEMENTS:
        return _sums_cpu(*xs) if ONE_PASS_SUPPORTED else _sums_each(xs)
    return jnp.sum(jnp.stack(xs), axis=tuple(range(1, xs[0].ndim + 1)))


def stacked_sums(xs: list[jax.Array]) -> jax.Array:
    """f32[k], the sum of each of the k same-shape f32 arrays: on CPU
    `sums_one_pass` (partitioned: per shard, then a psum; under vmap the
    plain sums), on GPU small arrays as one stacked reduction, elsewhere
    `jnp.sum` of each (resolved when lowering).

    Callers keep the result a vector: on XLA:CPU every scalar taken out of
    it and used alone becomes a kernel of its own to compile.
    """
    if len(xs) < 2:
        return _sums_each(xs)
    gpu = lambda: _sums_gpu(xs)  # noqa: E731
    cpu = (lambda: _sums_cpu(*xs)) if ONE_PASS_SUPPORTED else (lambda: _sums_each(xs))
    return jax.lax.platform_dependent(
        cpu=cpu, cuda=gpu, rocm=gpu, default=lambda: _sums_each(xs)
    )


def sums(xs: list[jax.Array]) -> list[jax.Array]:
    """`stacked_sums` as a list of f32 scalars."""
    return list(stacked_sums(xs))
