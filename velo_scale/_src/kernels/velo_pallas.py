"""Pallas TPU (Mosaic) kernels for VeLO's per-parameter passes of one tensor.

Opt-in through `velo(..., implementation="pallas")`; the XLA path of
`velo.velo_step` stays the default and the fallback. Per tensor there are
three passes over the parameter-sized arrays (the per-tensor LSTM runs, as in
the XLA path, between the 2nd and the 3rd):

1. `_reduce_kernel` reads p, g, the 3 momenta and rms once and gives every
   tensor-wide sum that needs no factored accumulator: the LSTM statistics of
   the previous state (block means and centred sums of squares, combined with
   Chan's formula, so the variances stay centred like the XLA path's), the
   elementwise channels' sums of squares and maxima of |x| (for the update's
   bound) of the updated accumulators, the row and column sums of g**2 (the
   factored accumulators' input) and a count of non-finite gradient
   elements.
2. `_factored_kernel` (factored tensors only) reads g and the momenta once
   more for the 6 channels that need the new row/column factors.
3. `_apply_kernel` recomputes the channels, runs the per-parameter MLP,
   writes the update and counts its non-finite elements, and writes the new
   momenta, rms (and diagonal accumulators) in place where its commit flag
   is set, else the old ones again.
4. With the non-finite skip (`velo`'s default) the commit flag is set when
   the loss and gradients are finite and every update is provably finite
   (`param_net.update_bound` from the channels' maxima): the usual step.
   Otherwise `_state_kernel` (`write_accumulators`: refs in HBM, blocks
   copied by hand under its flag) writes the new accumulators in place once
   the step is known finite, or the step keeps the old ones: the exact skip
   without a select pass over the state, and in the usual step without a
   4th pass (the kernel then moves no data).

Every tensor is seen as `[B, X, Y]`: Y the axis XLA:TPU lays out minor-most
(lanes), X the second-minor one (sublanes), both of them the factored axes,
and the batch axes first, in their order (vectors and scalars as `[1, 1,
n]`); the momentum `[*s, 3]` as `[B, 3, X, Y]` and rms `[*s, 1]` as `[B, X,
1, Y]`. These are the physical orders of the layouts XLA:TPU gives such
arrays (it puts the pair of axes that pads least in the (8, 128) tiles
minor, e.g. `f32[640,160]{0,1}`, `f32[160,5,64]{0,2,1}`, the momentum
`f32[160,5,64,3]{0,2,3,1}`, rms `{0,3,2,1:T(1,128)}`), so the views are
bitcasts and no copy is made; `layout` predicts that choice
(`tpu_minor_axes`). The kernels
run on the TPU; `interpret=True` runs them on any backend (tests on CPU).
Mosaic custom calls are not auto-partitioned: on a sharded mesh
`velo_step` runs them inside `jax.shard_map`, with the partial sums
`psum`'d over the mesh axes the tensor is sharded on.

Compile time. XLA:TPU compiles every fusion and every Mosaic call on its
own (identical kernels are not shared), so the per-tensor cost is what a
deep model multiplies. `phase_a` and `phase_c` therefore take a group of
like tensors (one shape, sharding and dtypes): one kernel call per tensor,
but the small arrays between the kernels combined once for the group
(vmapped), with one `shard_map` and one psum per group. The apply kernel
loops over (8, 512) pieces of its block (`_chunks`), so its code is a few
vregs wide instead of the MLP unrolled over the whole block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from velo_scale._src import accumulators, param_net

GRADIENT_CLIP = 1000.0
_LANES = 128
# Elements of one [bx, Y] block: the apply kernel holds ~11 parameter-sized
# blocks, each double buffered, and ~30 block-sized temporaries in VMEM.
_BLOCK_ELEMENTS = 32 * 1024
_VMEM_LIMIT_BYTES = 48 * 1024 * 1024

# Rows of the per-block scalars output of the reduction kernels (one (8, 128)
# tile: the scalars lie in the lanes of row 0).
_SUMS_ROWS = 8


def _sum(x):
    return jnp.sum(x, keepdims=True).reshape(1, 1)


def _max_abs(x):
    return jnp.max(jnp.abs(x), keepdims=True).reshape(1, 1)


def _put(ref, scalars: list) -> None:
    """Writes up to 128 scalars (each [1, 1]) into the lanes of row 0 of
    `ref` [8, 128] (the other rows zero)."""
    assert len(scalars) <= _LANES, len(scalars)
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, _LANES), 1)
    row = jnp.zeros((1, _LANES), jnp.float32)
    for k, s in enumerate(scalars):
        row = jnp.where(lane == k, s, row)
    ref[0:1, :] = row
    ref[1:, :] = jnp.zeros((ref.shape[0] - 1, _LANES), jnp.float32)


class Layout(NamedTuple):
    """How one tensor is viewed by the kernels."""

    shape: tuple[int, ...]  # the tensor's (lifted) shape, rank >= 1
    factored: bool
    perm: tuple[int, ...]  # tensor axes in view order: batch..., X, Y
    b: int
    x: int
    y: int
    bx: int  # rows of X per block
    d0_is_y: bool  # factored: whether the reduced axis d0 is Y


def supported(shape: tuple[int, ...], global_shape: tuple[int, ...] | None = None) -> bool:
    """Whether the kernels take a tensor of this (lifted, local) shape: its
    blocks must fit the VMEM budget (else `velo_step` uses the XLA path)."""
    lay = layout(shape, global_shape)
    return lay.bx * lay.y <= _BLOCK_ELEMENTS


def tpu_minor_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """(second-minor, minor) axes of the layout XLA:TPU gives a 32-bit array
    of this shape (rank >= 2): the pair whose (8, 128) tiles pad least, the
    default (last two axes) on ties; the other axes major, in their order."""
    n = len(shape)

    def padded(a, b):
        rest = math.prod(d for i, d in enumerate(shape) if i not in (a, b))
        return rest * (-(-shape[a] // 8) * 8) * (-(-shape[b] // _LANES) * _LANES)

    pairs = [(n - 2, n - 1)] + [
        (a, b) for a in range(n) for b in range(n) if a != b and (a, b) != (n - 2, n - 1)
    ]
    return min(pairs, key=lambda ab: padded(*ab))


def layout(shape: tuple[int, ...], global_shape: tuple[int, ...] | None = None) -> Layout:
    """The view of a (local) block `shape` of a tensor of `global_shape`: the
    factored axes are the global tensor's (a shard's largest axis may be
    another one); X and Y are ordered as XLA:TPU lays out the block, else
    (minor axes that are not the factored ones) as (d1, d0), with a copy."""
    dims = accumulators.factored_dims(global_shape or shape)
    if dims is None:
        n = int(np.prod(shape))
        return Layout(tuple(shape), False, tuple(range(len(shape))), 1, 1, n, 1, True)
    d1, d0 = dims
    x_axis, y_axis = tpu_minor_axes(tuple(shape))
    if {x_axis, y_axis} != {d0, d1}:
        x_axis, y_axis = d1, d0
    batch = [a for a in range(len(shape)) if a not in (d0, d1)]
    perm = tuple(batch + [x_axis, y_axis])
    b = int(np.prod([shape[a] for a in batch])) if batch else 1
    x, y = shape[x_axis], shape[y_axis]
    bx = x
    if x * y > _BLOCK_ELEMENTS:
        for cand in range(min(x, max(8, _BLOCK_ELEMENTS // max(y, 1))), 7, -1):
            if x % cand == 0 and cand % 8 == 0:
                bx = cand
                break
    return Layout(tuple(shape), True, perm, b, x, y, bx, d0 == y_axis)


def _transposed(a: jax.Array, order, inverse: bool = False) -> jax.Array:
    """`a` with its axes in `order` (or back from it); no-op for the identity."""
    order = tuple(int(i) for i in order)
    if order == tuple(range(len(order))):
        return a
    return jnp.transpose(a, np.argsort(order) if inverse else order)


def _to_view(a: jax.Array, lay: Layout) -> jax.Array:
    """[*s] -> [B, X, Y]."""
    return _transposed(a, lay.perm).reshape(lay.b, lay.x, lay.y)


def _from_view(a: jax.Array, lay: Layout) -> jax.Array:
    """[B, X, Y] -> [*s]."""
    permuted = tuple(lay.shape[i] for i in lay.perm)
    return _transposed(a.reshape(permuted), lay.perm, inverse=True)


def _decayed_order(lay: Layout) -> tuple[int, ...]:
    """[*s, k] axes in the order of the [B, k, X, Y] view."""
    return lay.perm[:-2] + (len(lay.shape),) + lay.perm[-2:]


def _decayed_to_view(a: jax.Array, lay: Layout) -> jax.Array:
    """[*s, k] -> [B, k, X, Y]."""
    k = a.shape[-1]
    if not lay.factored:
        return jnp.moveaxis(a, -1, 0).reshape(1, k, 1, lay.y)
    return _transposed(a, _decayed_order(lay)).reshape(lay.b, k, lay.x, lay.y)


def _decayed_from_view(a: jax.Array, lay: Layout) -> jax.Array:
    k = a.shape[1]
    if not lay.factored:
        return jnp.moveaxis(a.reshape(k, lay.y), 0, -1).reshape(lay.shape + (k,))
    a = a.reshape(tuple(lay.shape[i] for i in lay.perm[:-2]) + (k, lay.x, lay.y))
    return _transposed(a, _decayed_order(lay), inverse=True)


def _rms_order(lay: Layout) -> tuple[int, ...]:
    """[*s, 1] axes in the order of the [B, X, 1, Y] view."""
    return lay.perm[:-1] + (len(lay.shape),) + lay.perm[-1:]


def _rms_to_view(v: jax.Array, lay: Layout) -> jax.Array:
    """[*s, 1] -> [B, X, 1, Y]."""
    if not lay.factored:
        return v.reshape(1, 1, 1, lay.y)
    return _transposed(v, _rms_order(lay)).reshape(lay.b, lay.x, 1, lay.y)


def _rms_from_view(v: jax.Array, lay: Layout) -> jax.Array:
    if not lay.factored:
        return v.reshape(lay.shape + (1,))
    v = v.reshape(tuple(lay.shape[i] for i in lay.perm[:-1]) + (1, lay.y))
    return _transposed(v, _rms_order(lay), inverse=True)


# --------------------------------------------------------------------------
# Kernels. Blocks: p, g [bx, Y]; m [3, bx, Y]; v [bx, Y] (rms squeezed).


def _momentum_decays():
    return [float(d) for d in np.asarray(accumulators.MOMENTUM_DECAYS, np.float32)]


def _clip_decays(values):
    return [float(d) for d in np.clip(np.asarray(values, np.float32), 0.0, 1.0)]


def _new_accumulators(g, m_ref, v_ref, vd_ref=None):
    """Updated momenta, rms (and diagonal) of a block, f32, as in
    `accumulators.update_*`."""
    md = _momentum_decays()
    (rd,) = _clip_decays(accumulators.RMS_DECAYS)
    m_new = [
        np.float32(d) * m_ref[k].astype(jnp.float32) + np.float32(1 - np.float32(d)) * g
        for k, d in enumerate(md)
    ]
    v_new = np.float32(rd) * v_ref[...].astype(jnp.float32) + np.float32(
        1 - np.float32(rd)
    ) * (g * g)
    vd_new = None
    if vd_ref is not None:
        ad = _clip_decays(accumulators.ADAFACTOR_DECAYS)
        grad_sqr = g * g + np.float32(accumulators.ADAFACTOR_EPSILON)
        vd_new = [
            np.float32(d) * vd_ref[k].astype(jnp.float32)
            + np.float32(1 - np.float32(d)) * grad_sqr
            for k, d in enumerate(ad)
        ]
    return m_new, v_new, vd_new


def _elementwise_channels(p, g, m_new, v_new, vd_new):
    """The full-size channels, by channel index (see `feature_channels`)."""
    rsqrt_v = jax.lax.rsqrt(v_new + np.float32(1e-6))
    ch = {0: g, 1: jnp.clip(g, -0.1, 0.1), 2: p, 6: v_new, 10: rsqrt_v, 14: g * rsqrt_v}
    for k in range(3):
        ch[3 + k] = m_new[k]
        ch[7 + k] = m_new[k] * rsqrt_v
    if vd_new is not None:
        for k, di in enumerate(vd_new):
            ch[11 + k] = g * jax.lax.rsqrt(jnp.maximum(di + np.float32(1e-9), 1e-9))
            ch[15 + k] = di
            ch[18 + k] = di
            r = jax.lax.rsqrt(di + np.float32(1e-8))
            ch[21 + k] = r
            ch[24 + k] = r
            ch[27 + k] = m_new[k] * jax.lax.rsqrt(di)
    return ch


def _reduce_kernel(*refs, factored: bool):
    if factored:
        p_ref, g_ref, m_ref, v_ref, s_ref, row_ref, col_ref = refs
        vd_ref = None
    else:
        p_ref, g_ref, m_ref, v_ref, vd_ref, s_ref = refs
    p = p_ref[...].astype(jnp.float32)
    g_raw = g_ref[...].astype(jnp.float32)
    bad = _sum(jnp.where(jnp.isfinite(g_raw), 0.0, 1.0))
    g = jnp.clip(g_raw, -GRADIENT_CLIP, GRADIENT_CLIP)
    n = np.float32(p.size)
    # Statistics of the previous state: block means and centred sums.
    stats = []
    for k in range(3):
        mk = m_ref[k].astype(jnp.float32)
        mean = _sum(mk) / n
        stats += [mean, _sum(jnp.square(mk - mean))]
    v_old = v_ref[...].astype(jnp.float32)
    mean_v = _sum(v_old) / n
    stats += [mean_v, _sum(jnp.square(v_old - mean_v))]
    m_new, v_new, vd_new = _new_accumulators(g, m_ref, v_ref, vd_ref)
    ch = _elementwise_channels(p, g, m_new, v_new, vd_new)
    sums = [_sum(jnp.square(ch[c])) for c in sorted(ch)]
    maxima = [_max_abs(ch[c]) for c in sorted(ch)]
    _put(s_ref, stats + sums + [bad] + maxima)
    if factored:
        grad_sqr = g * g + np.float32(accumulators.ADAFACTOR_EPSILON)
        row_ref[...] = jnp.sum(grad_sqr, axis=1, keepdims=True)
        col_ref[...] = jnp.sum(grad_sqr, axis=0, keepdims=True)


def _factored_kernel(g_ref, m_ref, xf_ref, yf_ref, s_ref):
    g = jnp.clip(g_ref[...].astype(jnp.float32), -GRADIENT_CLIP, GRADIENT_CLIP)
    md = _momentum_decays()
    sums_g, sums_m, max_g, max_m = [], [], [], []
    for k, d in enumerate(md):
        factor = xf_ref[k] * yf_ref[k]
        mk = np.float32(d) * m_ref[k].astype(jnp.float32) + np.float32(
            1 - np.float32(d)
        ) * g
        sums_g.append(_sum(jnp.square(g * factor)))
        sums_m.append(_sum(jnp.square(mk * factor)))
        max_g.append(_max_abs(g * factor))
        max_m.append(_max_abs(mk * factor))
    _put(s_ref, sums_g + sums_m + max_g + max_m)


def _chunks(rows: int, lanes: int) -> tuple[int, int]:
    """(rows, lanes) of the pieces the apply kernel computes at a time: an
    (8, 512) tile where the block divides into them, so its code is a loop
    over a few vregs, not the MLP unrolled over the whole block (which
    made Mosaic's compile per call grow with the block)."""
    rc = 8 if rows % 8 == 0 else rows
    cc = next((c for c in (512, 256, 128) if lanes % c == 0), lanes)
    return rc, cc


def _apply_kernel(
    *refs,
    factored: bool,
    n_full: int,
    hidden: int,
    layers: int,
    decoupled_weight_decay: float,
):
    refs = list(refs)
    w_ref, p_ref, g_ref, m_ref, v_ref = refs[:5]
    del refs[:5]
    vd_ref = None if factored else refs.pop(0)
    if factored:
        xf_ref, yf_ref, xt_ref, yt_ref = refs[:4]
        del refs[:4]
    u_ref, mo_ref, vo_ref = refs[:3]
    del refs[:3]
    vdo_ref = None if factored else refs.pop(0)
    (bad_ref,) = refs
    rows, lanes = p_ref.shape
    rc, cc = _chunks(rows, lanes)
    nc = lanes // cc
    n_chunks = (rows // rc) * nc

    def piece(t, bad):
        # One (rc, cc) piece of the block: its update and accumulators.
        if n_chunks == 1:
            r, c = slice(None), slice(None)
        else:
            # lax.div/rem, not // and %: t >= 0, and their sign handling
            # lowers through a query of the local TPU (AOT compiles have none).
            r = pl.ds(pl.multiple_of(jax.lax.div(t, nc) * rc, rc), rc)
            c = pl.ds(pl.multiple_of(jax.lax.rem(t, nc) * cc, cc), cc)
        p = p_ref[r, c].astype(jnp.float32)
        g = jnp.clip(g_ref[r, c].astype(jnp.float32), -GRADIENT_CLIP, GRADIENT_CLIP)
        m_old = [m_ref[k, r, c] for k in range(3)]
        v_old = v_ref[r, c]
        vd_old = None if vd_ref is None else [vd_ref[k, r, c] for k in range(3)]
        m_new, v_new, vd_new = _new_accumulators(g, m_old, v_old, vd_old)
        ch = _elementwise_channels(p, g, m_new, v_new, vd_new)
        if factored:
            for k in range(3):
                factor = xf_ref[k, r, :] * yf_ref[k, :, c]
                ch[11 + k] = g * factor
                ch[27 + k] = m_new[k] * factor
        full = sorted(ch)
        assert len(full) == n_full
        # Scalars (SMEM, `pack_weights`): w0 [30, F], b0 [F], then per
        # hidden layer w [F, F'] and b [F'], then the step scale and the
        # commit flag.
        off = 0

        def take(n):
            nonlocal off
            vals = [w_ref[off + i] for i in range(n)]
            off += n
            return vals

        w0 = take(param_net.NUM_PARAM_FEATURES * hidden)
        b0 = take(hidden)
        h = []
        for j in range(hidden):
            total = None
            for ci in full:
                term = ch[ci] * w0[ci * hidden + j]
                total = term if total is None else total + term
            if factored:
                total = total + (xt_ref[j, r, :] + yt_ref[j, :, c])
            h.append(total + b0[j])
        for layer in range(1, layers + 1):
            width_in = len(h)
            width = hidden if layer < layers else 2
            w = take(width_in * width)
            b = take(width)
            h = [jnp.maximum(x, 0.0) for x in h]
            out = []
            for j in range(width):
                total = None
                for i in range(width_in):
                    term = h[i] * w[i * width + j]
                    total = term if total is None else total + term
                out.append(total + b[j])
            h = out
        (scale,) = take(1)
        direction, magnitude = h[0], h[1]
        u = -(scale * (direction * jnp.exp(magnitude * np.float32(param_net.EXP_MULT))))
        if decoupled_weight_decay:
            u = u - np.float32(decoupled_weight_decay) * p
        u = u.astype(u_ref.dtype)
        u_ref[r, c] = u
        # The new accumulators where the commit flag is set, else the old
        # ones again (the outputs alias the inputs).
        (commit,) = take(1)
        ok = commit != 0
        for k in range(3):
            mo_ref[k, r, c] = jnp.where(ok, m_new[k].astype(mo_ref.dtype), m_old[k])
        vo_ref[r, c] = jnp.where(ok, v_new.astype(vo_ref.dtype), v_old)
        if vdo_ref is not None:
            for k in range(3):
                vdo_ref[k, r, c] = jnp.where(
                    ok, vd_new[k].astype(vdo_ref.dtype), vd_old[k]
                )
        return bad + _sum(jnp.where(jnp.isfinite(u.astype(jnp.float32)), 0.0, 1.0))

    zero = jnp.zeros((1, 1), jnp.float32)
    if n_chunks == 1:
        bad = piece(0, zero)
    else:
        bad = jax.lax.fori_loop(0, n_chunks, piece, zero)
    bad_ref[...] = jnp.broadcast_to(bad, bad_ref.shape)


def _state_kernel(ok_ref, g_hbm, m_hbm, v_hbm, *refs, factored: bool, bx: int):
    """The new accumulators of one block, written in place, if `ok_ref[0]`;
    else nothing: the refs are in HBM and the block is copied in and out by
    hand, so an unset flag moves no data."""
    vd_hbm = None if factored else refs[0]
    refs = refs[0 if factored else 1 :]
    n_out = 2 if factored else 3
    outs, bufs = refs[:n_out], refs[n_out:]
    g_buf, m_buf, v_buf = bufs[:3]
    vd_buf = None if factored else bufs[3]
    b, i = pl.program_id(0), pl.program_id(1)

    @pl.when(ok_ref[0] != 0)
    def _():
        rows = pl.ds(pl.multiple_of(i * bx, bx), bx)
        pltpu.sync_copy(g_hbm.at[b, rows, :], g_buf)
        pltpu.sync_copy(m_hbm.at[b, :, rows, :], m_buf)
        pltpu.sync_copy(v_hbm.at[b, rows, 0, :], v_buf)
        if vd_buf is not None:
            pltpu.sync_copy(vd_hbm.at[b, :, rows, :], vd_buf)
        g = jnp.clip(g_buf[...].astype(jnp.float32), -GRADIENT_CLIP, GRADIENT_CLIP)
        m_new, v_new, vd_new = _new_accumulators(g, m_buf, v_buf, vd_buf)
        for k in range(3):
            m_buf[k] = m_new[k].astype(m_buf.dtype)
        v_buf[...] = v_new.astype(v_buf.dtype)
        pltpu.sync_copy(m_buf, outs[0].at[b, :, rows, :])
        pltpu.sync_copy(v_buf, outs[1].at[b, rows, 0, :])
        if vd_buf is not None:
            for k in range(3):
                vd_buf[k] = vd_new[k].astype(vd_buf.dtype)
            pltpu.sync_copy(vd_buf, outs[2].at[b, :, rows, :])


# --------------------------------------------------------------------------
# BlockSpecs over the views, grid (B, X // bx).


def _specs(lay: Layout):
    bx, y = lay.bx, lay.y
    return dict(
        full=pl.BlockSpec((None, bx, y), lambda b, i: (b, i, 0)),
        dec=pl.BlockSpec((None, 3, bx, y), lambda b, i: (b, 0, i, 0)),
        rms=pl.BlockSpec((None, bx, None, y), lambda b, i: (b, i, 0, 0)),
        sums=lambda s: pl.BlockSpec((None, None, s, _LANES), lambda b, i: (b, i, 0, 0)),
        xvec=lambda k: pl.BlockSpec((k, None, bx, 1), lambda b, i: (0, b, i, 0)),
        yvec=lambda k: pl.BlockSpec((k, None, 1, y), lambda b, i: (0, b, 0, 0)),
    )


def _compiler_params(n_axes: int = 2):
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(
        dimension_semantics=("parallel",) * n_axes, vmem_limit_bytes=_VMEM_LIMIT_BYTES
    )


class PhaseA(NamedTuple):
    """Phase A of one tensor from the kernels."""

    stats: jax.Array  # f32[7], `tensor_statistics`
    mean_sq: jax.Array  # f32[30], `channel_mean_squares`
    v_row: Any
    v_col: Any
    row_factor: Any  # f32[*s with d0 of size 1, 3] (factored)
    col_factor: Any  # f32[*s with d1 of size 1, 3]
    grad_nonfinite: jax.Array  # f32[], count of non-finite gradient elements
    # f32[30], max |x_c| of each MLP input channel over the tensor (of the
    # values the apply kernel computes), for `param_net.update_bound`.
    max_abs: jax.Array


def _identity_psum(x, _axes):
    return x


_identity_pmax = _identity_psum


def _stack(xs):
    """The group's per-tensor arrays stacked on a new leading axis (None
    passes through)."""
    return None if xs[0] is None else jnp.stack(xs)


def phase_a(
    ps: list[jax.Array],
    gs: list[jax.Array],
    accs: list[param_net.Accumulators],
    *,
    interpret: bool = False,
    psum=None,
    pmax=None,
    global_shape: tuple[int, ...] | None = None,
) -> PhaseA:
    """Statistics, channel mean squares and factored accumulators of a group
    of tensors of one shape (and dtypes).

    The kernels run per tensor; the small arrays between and after them are
    stacked and combined once for the group (vmapped), so a deeper model
    adds kernel calls (each the same Mosaic kernel) and the stacks (XLA:TPU
    makes each one dynamic-update-slice per tensor), not the combination.

    Args:
      ps, gs: the K (lifted, rank >= 1) parameters and raw gradients, any
        float dtype (g is clipped inside, as `velo_step` clips it).
      accs: their previous accumulators (lifted).
      interpret: run the kernels in Pallas' interpreter (any backend).
      psum: `psum(x, tensor_axes)` sums over the mesh axes that shard the given
        tensor axes (inside `shard_map`); None on one device.
      pmax: likewise, the maximum over those mesh axes.
      global_shape: the unsharded shape (for the means); default the shape.

    Returns:
      `PhaseA`, every field with a leading axis of size K.
    """
    psum = psum or _identity_psum
    pmax = pmax or _identity_pmax
    shape = tuple(ps[0].shape)
    global_shape = tuple(global_shape or shape)
    lay = layout(shape, global_shape)
    n_global = np.float32(math.prod(global_shape))
    nb = lay.x // lay.bx
    grid = (lay.b, nb)
    sp = _specs(lay)
    g_v = [_to_view(g, lay) for g in gs]
    m_v = [_decayed_to_view(acc.m, lay) for acc in accs]
    all_axes = tuple(range(len(shape)))
    sums_shape = jax.ShapeDtypeStruct((lay.b, nb, _SUMS_ROWS, _LANES), jnp.float32)
    if lay.factored:
        in_specs = [sp["full"], sp["full"], sp["dec"], sp["rms"]]
        out_shape = (
            sums_shape,
            jax.ShapeDtypeStruct((lay.b, lay.x, 1), jnp.float32),
            jax.ShapeDtypeStruct((lay.b, nb, 1, lay.y), jnp.float32),
        )
        out_specs = (
            sp["sums"](_SUMS_ROWS),
            pl.BlockSpec((None, lay.bx, 1), lambda b, i: (b, i, 0)),
            pl.BlockSpec((None, None, 1, lay.y), lambda b, i: (b, i, 0, 0)),
        )
    else:
        in_specs = [sp["full"], sp["full"], sp["dec"], sp["rms"], sp["dec"]]
        out_shape = (sums_shape,)
        out_specs = (sp["sums"](_SUMS_ROWS),)
    reduce = pl.pallas_call(
        functools.partial(_reduce_kernel, factored=lay.factored),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(),
    )
    outs = []
    for p, g, m, acc in zip(ps, g_v, m_v, accs):
        args = [_to_view(p, lay), g, m, _rms_to_view(acc.v, lay)]
        if not lay.factored:
            args.append(_decayed_to_view(acc.v_diag, lay))
        outs.append(reduce(*args))
    outs = [_stack(list(o)) for o in zip(*outs)]  # [K, ...] each
    v_rows = _stack([acc.v_row for acc in accs])
    v_cols = _stack([acc.v_col for acc in accs])

    n_full = 12 if lay.factored else 30  # elementwise channels summed
    full = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14) if lay.factored else tuple(range(30))

    def combine(sums, rows, cols, v_row, v_col):
        # One tensor's kernel sums -> its statistics, the elementwise
        # channels' mean squares and maxima, and (factored) the new row /
        # column accumulators and factors (vmapped over the group).
        blocks = sums[:, :, 0, :].reshape(lay.b * nb, _LANES)
        # Previous-state statistics: Chan's combination of equal-size blocks
        # (then over devices: local sums of n_b * mean and of M2 + n_b *
        # mean**2 deviations need the global mean first: two psums).
        n_b = np.float32(lay.bx * lay.y)
        means = blocks[:, 0:8:2]  # [nblk, 4] m0, m1, m2, v
        m2s = blocks[:, 1:8:2]
        mean = psum(jnp.sum(means, axis=0) * n_b, all_axes) / n_global
        m2 = psum(
            jnp.sum(m2s, axis=0) + n_b * jnp.sum(jnp.square(means - mean), axis=0),
            all_axes,
        )
        chan = psum(jnp.sum(blocks[:, 8 : 9 + n_full], axis=0), all_axes)
        chan_sums, grad_bad = chan[:n_full], chan[n_full]
        chan_max = pmax(jnp.max(blocks[:, 9 + n_full : 9 + 2 * n_full], axis=0), all_axes)
        norm = jax.lax.rsqrt(jnp.maximum(1e-9, chan_sums[2] / n_global))
        mean_m = mean[:3] * norm
        var_m = m2[:3] / n_global * (norm * norm)
        mean_rms = mean[3:4] * norm
        var_v = m2[3] / n_global * (norm * norm)
        var_rms = var_v + jnp.square(mean_rms - mean_m)
        stats = jnp.concatenate(
            [_clip_log_abs(mean_rms), _clip_log_abs(var_m), _clip_log_abs(var_rms)]
        )
        out = dict(stats=stats, mean_sq=chan_sums / n_global, max_abs=chan_max,
                   grad_bad=grad_bad)  # fmt: skip
        if not lay.factored:
            return out
        # Factored accumulators, in the tensor's own axes (as update_factored).
        d1, d0 = accumulators.factored_dims(global_shape)
        y_axis, x_axis = lay.perm[-1], lay.perm[-2]
        rows = psum(rows[:, :, 0], (y_axis,))  # [B, X]: sums over Y
        cols = psum(jnp.sum(cols[:, :, 0, :], axis=1), (x_axis,))  # [B, Y]
        batch_shape = tuple(shape[a] for a in lay.perm[:-2])
        # over d0 / over d1, as arrays of shape s without that axis.
        sum_y = rows.reshape(batch_shape + (lay.x,))
        sum_x = cols.reshape(batch_shape + (lay.y,))
        over_d0, over_d1 = (sum_y, sum_x) if lay.d0_is_y else (sum_x, sum_y)
        n_d0, n_d1 = np.float32(global_shape[d0]), np.float32(global_shape[d1])
        batch_axes = list(lay.perm[:-2])

        def to_tensor_order(a, kept_axis):
            # a: [batch..., kept] -> the tensor's axes without the reduced one.
            order = batch_axes + [kept_axis]
            target = sorted(order)
            return jnp.transpose(a, [order.index(t) for t in target])

        mean_d0 = to_tensor_order(over_d0 / n_d0, d1)
        mean_d1 = to_tensor_order(over_d1 / n_d1, d0)
        ad = jnp.clip(jnp.asarray(accumulators.ADAFACTOR_DECAYS, jnp.float32), 0.0, 1.0)
        v_row = ad * v_row.astype(jnp.float32) + (1 - ad) * mean_d0[..., None]
        v_col = ad * v_col.astype(jnp.float32) + (1 - ad) * mean_d1[..., None]
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        row_col_mean = psum(jnp.sum(v_row, axis=reduced_d1, keepdims=True), (d1,)) / n_d1
        rf = jnp.expand_dims(accumulators.safe_rsqrt(v_row / (row_col_mean + 1e-9)), d0)
        cf = jnp.expand_dims(accumulators.safe_rsqrt(v_col), d1)
        xfac, yfac = _factor_views(rf, cf, lay, d1)
        return out | dict(v_row=v_row, v_col=v_col, rf=rf, cf=cf, xfac=xfac, yfac=yfac)

    if lay.factored:
        first = jax.vmap(combine)(outs[0], outs[1], outs[2], v_rows, v_cols)
    else:
        first = jax.vmap(lambda s: combine(s, None, None, None, None))(outs[0])
    mean_sq = [None] * 30
    max_abs = [None] * 30
    for i, c in enumerate(full):
        mean_sq[c], max_abs[c] = first["mean_sq"][:, i], first["max_abs"][:, i]
    if not lay.factored:
        return PhaseA(first["stats"], jnp.stack(mean_sq, -1), v_rows, v_cols, None,
                      None, first["grad_bad"], jnp.stack(max_abs, -1))  # fmt: skip

    factored = pl.pallas_call(
        _factored_kernel,
        out_shape=jax.ShapeDtypeStruct((lay.b, nb, _SUMS_ROWS, _LANES), jnp.float32),
        grid=grid,
        in_specs=[sp["full"], sp["dec"], sp["xvec"](3), sp["yvec"](3)],
        out_specs=sp["sums"](_SUMS_ROWS),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(),
    )
    s2 = _stack([
        factored(g, m, first["xfac"][k], first["yfac"][k])
        for k, (g, m) in enumerate(zip(g_v, m_v))
    ])  # fmt: skip
    d1, d0 = accumulators.factored_dims(global_shape)

    def finish(s2, v_row, v_col):
        # The 6 channels that need the new factors, and the row/column
        # channels: mean squares and maxima of the small vectors themselves,
        # 6 channels per vector in one reduction (each shard holds its
        # slice; psum / pmax over the axes that shard it).
        s2 = s2[:, :, 0, :12].reshape(-1, 12)
        top = [pmax(jnp.max(s2[:, 6:], axis=0), all_axes)]
        sq = [psum(jnp.sum(s2[:, :6], axis=0), all_axes) / n_global]
        for vec, axis in ((v_row, d0), (v_col, d1)):
            chans = _vector_channels(vec)
            n_vec = np.float32(math.prod(global_shape) / global_shape[axis])
            axes = tuple(a for a in all_axes if a != axis)
            lead = tuple(range(chans.ndim - 1))
            sq.append(psum(jnp.sum(jnp.square(chans), axis=lead), axes) / n_vec)
            top.append(pmax(jnp.max(jnp.abs(chans), axis=lead), axes))
        return jnp.concatenate(sq), jnp.concatenate(top)

    sq, top = jax.vmap(finish)(s2, first["v_row"], first["v_col"])
    late = (11, 12, 13, 27, 28, 29) + _ROW_CHANNELS + _COL_CHANNELS
    for i, c in enumerate(late):
        mean_sq[c], max_abs[c] = sq[:, i], top[:, i]
    return PhaseA(first["stats"], jnp.stack(mean_sq, -1), first["v_row"],
                  first["v_col"], first["rf"], first["cf"], first["grad_bad"],
                  jnp.stack(max_abs, -1))  # fmt: skip


def _factor_views(rf, cf, lay: Layout, d1: int):
    """Row/column factors [*s with a size-1 axis, 3] -> the kernels' views
    xfac [3, B, X, 1] and yfac [3, B, 1, Y]."""

    def factor_view(f, axis):
        f = jnp.moveaxis(f, -1, 0)
        f = jnp.transpose(f, (0,) + tuple(a + 1 for a in lay.perm))
        return f.reshape(3, lay.b, lay.x if axis == "x" else 1, 1 if axis == "x" else lay.y)

    # The row factor varies along d1, the column factor along d0.
    rf_on = "x" if d1 == lay.perm[-2] else "y"
    rf_v, cf_v = factor_view(rf, rf_on), factor_view(cf, "y" if rf_on == "x" else "x")
    return (rf_v, cf_v) if rf_on == "x" else (cf_v, rf_v)


def _clip_log_abs(v):
    return jnp.clip(jnp.log(1e-8 + jnp.abs(v * 10.0)), -5, 5) * 0.5


# Channels whose first-layer terms are per-row / per-column vectors, in the
# order of `_vector_channels`.
_ROW_CHANNELS = (15, 16, 17, 21, 22, 23)
_COL_CHANNELS = (18, 19, 20, 24, 25, 26)


def _vector_channels(vec: jax.Array) -> jax.Array:
    """A factored accumulator [..., 3] -> its 6 channels [..., 6]: the 3
    decays and `rsqrt(. + 1e-8)` of each (see `param_net.feature_channels`)."""
    return jnp.concatenate([vec, jax.lax.rsqrt(vec + 1e-8)], axis=-1)


def pack_weights(
    mlps: Mapping[str, jax.Array], w0: jax.Array, scale: jax.Array, commit: Any
) -> jax.Array:
    """f32[n, L], per tensor the apply kernel's scalars (SMEM): w0 [30, F]
    (normalisers folded in), b0 [F], per hidden layer w [F, F'] and b [F']
    (the last layer's first 2 outputs), the step scale and the commit flag.
    Built for all tensors at once (`mix_bank`'s rows, `first_layer`,
    `step_scale`), so the step has one such computation, not one per tensor.
    """
    n = w0.shape[0]
    layers = param_net.num_hidden_layers(mlps)
    parts = [w0, mlps["b0"]]
    for layer in range(1, layers + 1):
        w, b = mlps[f"w{layer}"], mlps[f"b{layer}"]
        if layer == layers:
            w, b = w[..., :2], b[..., :2]
        parts += [w, b]
    parts += [scale, jnp.broadcast_to(jnp.asarray(commit, jnp.float32), (n,))]
    return jnp.concatenate(
        [jnp.asarray(x, jnp.float32).reshape(n, -1) for x in parts], axis=1
    )


def phase_c(
    weights: jax.Array,
    w0: jax.Array,
    ps: list[jax.Array],
    gs: list[jax.Array],
    accs: list[param_net.Accumulators],
    a: PhaseA,
    *,
    interpret: bool = False,
    update_dtype: Any = jnp.float32,
    hidden: int,
    layers: int,
    decoupled_weight_decay: float = 0.0,
    global_shape: tuple[int, ...] | None = None,
) -> tuple[list[jax.Array], list[param_net.Accumulators], jax.Array]:
    """The updates and the new accumulators of a group of tensors of one
    shape (phase C): one kernel call per tensor, the row/column terms of the
    whole group computed once (vmapped).

    Args:
      weights: f32[K, L], the group's rows of `pack_weights`. The commit
        flag set: the new accumulators are written in place, else the old
        ones again (the step's commit is then left to `write_accumulators`).
      w0: f32[K, 30, F], the group's rows of `param_net.first_layer` (for the
        row/column channels' terms, summed here at their own size).
      ps, gs, accs: as `phase_a`'s; a: its result.
      hidden, layers: the MLP's hidden width F and its number of hidden
        layers.
      decoupled_weight_decay: `update -= decoupled_weight_decay * p` inside
        the kernel, before the cast to `update_dtype` and the finite count.
      global_shape: the unsharded shape (inside `shard_map`); default the shape.

    Returns:
      (the K updates [*s] in update_dtype, the accumulators as written (new
      where `commit`) in the old ones' dtypes, f32[K] counts of non-finite
      update elements).
    """
    shape = tuple(ps[0].shape)
    global_shape = tuple(global_shape or shape)
    lay = layout(shape, global_shape)
    nb = lay.x // lay.bx
    sp = _specs(lay)
    dtypes = param_net.Accumulators(*(None if x is None else x.dtype for x in accs[0]))
    if lay.factored:
        full = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 27, 28, 29]
    else:
        full = list(range(30))

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    out_shape = [
        jax.ShapeDtypeStruct((lay.b, lay.x, lay.y), update_dtype),
        jax.ShapeDtypeStruct((lay.b, 3, lay.x, lay.y), dtypes.m),
        jax.ShapeDtypeStruct((lay.b, lay.x, 1, lay.y), dtypes.v),
    ]
    out_specs = [sp["full"], sp["dec"], sp["rms"]]
    if lay.factored:
        # Row / column channels summed at their own size, per hidden unit.
        d1, d0 = accumulators.factored_dims(global_shape)
        x_axis = lay.perm[-2]
        row_on_x = d1 == x_axis

        def term_view(t, on_x):
            t = jnp.moveaxis(t, -1, 0)
            t = jnp.transpose(t, (0,) + tuple(q + 1 for q in lay.perm))
            return t.reshape(hidden, lay.b, lay.x if on_x else 1, 1 if on_x else lay.y)

        def views(w0, v_row, v_col, rf, cf):
            def terms(vec, idx):
                # [*s without an axis, 6] x [6, F] as elementwise f32 products
                # and a sum (no matmul: its precision differs by backend).
                w = w0[np.asarray(idx)]
                return jnp.sum(_vector_channels(vec)[..., :, None] * w, axis=-2)

            t_row = jnp.expand_dims(terms(v_row, _ROW_CHANNELS), d0)
            t_col = jnp.expand_dims(terms(v_col, _COL_CHANNELS), d1)
            t_row_v, t_col_v = term_view(t_row, row_on_x), term_view(t_col, not row_on_x)
            xt, yt = (t_row_v, t_col_v) if row_on_x else (t_col_v, t_row_v)
            return (*_factor_views(rf, cf, lay, d1), xt, yt)

        extra = jax.vmap(views)(w0, a.v_row, a.v_col, a.row_factor, a.col_factor)
        in_specs = [smem, sp["full"], sp["full"], sp["dec"], sp["rms"],
                    sp["xvec"](3), sp["yvec"](3), sp["xvec"](hidden), sp["yvec"](hidden)]  # fmt: skip
        aliases = {3: 1, 4: 2}
    else:
        out_shape.append(jax.ShapeDtypeStruct((1, 3, 1, lay.y), dtypes.v_diag))
        out_specs.append(sp["dec"])
        in_specs = [smem, sp["full"], sp["full"], sp["dec"], sp["rms"], sp["dec"]]
        aliases = {3: 1, 4: 2, 5: 3}
    out_shape.append(jax.ShapeDtypeStruct((lay.b, nb, 8, _LANES), jnp.float32))
    out_specs.append(sp["sums"](8))
    apply = pl.pallas_call(
        functools.partial(
            _apply_kernel,
            factored=lay.factored,
            n_full=len(full),
            hidden=hidden,
            layers=layers,
            decoupled_weight_decay=float(decoupled_weight_decay),
        ),
        out_shape=tuple(out_shape),
        grid=(lay.b, nb),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(),
    )
    updates, new, bad = [], [], []
    for k, (p, g, acc) in enumerate(zip(ps, gs, accs)):
        args = [weights[k], _to_view(p, lay), _to_view(g, lay),
                _decayed_to_view(acc.m, lay), _rms_to_view(acc.v, lay)]  # fmt: skip
        if lay.factored:
            args += [x[k] for x in extra]
        else:
            args.append(_decayed_to_view(acc.v_diag, lay))
        outs = apply(*args)
        updates.append(_from_view(outs[0], lay))
        bad.append(outs[-1])
        m_new = _decayed_from_view(outs[1], lay)
        v_new = _rms_from_view(outs[2], lay)
        if lay.factored:
            new.append(param_net.Accumulators(
                m_new, v_new, a.v_row[k].astype(dtypes.v_row),
                a.v_col[k].astype(dtypes.v_col), None,
            ))  # fmt: skip
        else:
            new.append(param_net.Accumulators(
                m_new, v_new, None, None, _decayed_from_view(outs[3], lay)
            ))  # fmt: skip
    bad = jnp.sum(_stack(bad)[:, :, :, 0, 0], axis=(1, 2))
    return updates, new, bad


LATE_COMMIT_SCOPE = "velo_late_commit"


def write_accumulators(
    ok: jax.Array,
    g: jax.Array,
    acc: param_net.Accumulators,
    *,
    interpret: bool = False,
    global_shape: tuple[int, ...] | None = None,
) -> param_net.Accumulators:
    """The new momenta, rms (and diagonal accumulators) written in place
    (aliased) where `ok`, else the old ones left as they are. The factored
    vectors (small, from `phase_a`) pass through.

    The kernel's refs are in HBM (`pltpu.HBM`: with `pl.ANY` XLA stages
    them in VMEM, copies made every step) and each grid step copies its
    block in and out by hand under `pl.when(ok)`, so a step that does not
    need it moves no data, without a `lax.cond` (whose pass-through branch XLA feeds with
    a copy of the in-place operands). It runs under the named scope
    `LATE_COMMIT_SCOPE`, by which `benchmarks/tpu_aot.py` finds it in the HLO
    (its traffic depends on `ok`).
    """
    lay = layout(tuple(g.shape), global_shape)
    nb = lay.x // lay.bx
    bx, y = lay.bx, lay.y
    g_v = _to_view(g, lay)
    m_v = _decayed_to_view(acc.m, lay)
    v_v = _rms_to_view(acc.v, lay)
    args = [jnp.reshape(ok, (1,)).astype(jnp.int32), g_v, m_v, v_v]
    out_shape = [jax.ShapeDtypeStruct(m_v.shape, m_v.dtype),
                 jax.ShapeDtypeStruct(v_v.shape, v_v.dtype)]  # fmt: skip
    scratch = [
        pltpu.VMEM((bx, y), g_v.dtype),
        pltpu.VMEM((3, bx, y), m_v.dtype),
        pltpu.VMEM((bx, y), v_v.dtype),
    ]
    aliases = {2: 0, 3: 1}
    if not lay.factored:
        vd_v = _decayed_to_view(acc.v_diag, lay)
        args.append(vd_v)
        out_shape.append(jax.ShapeDtypeStruct(vd_v.shape, vd_v.dtype))
        scratch.append(pltpu.VMEM((3, bx, y), vd_v.dtype))
        aliases[4] = 2
    hbm = pl.BlockSpec(memory_space=pltpu.HBM)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(lay.b, nb),
        in_specs=[hbm] * (len(args) - 1),
        out_specs=tuple(hbm for _ in out_shape),
        scratch_shapes=scratch,
    )
    with jax.named_scope(LATE_COMMIT_SCOPE):
        outs = pl.pallas_call(
            functools.partial(_state_kernel, factored=lay.factored, bx=bx),
            out_shape=tuple(out_shape),
            grid_spec=grid_spec,
            input_output_aliases=aliases,
            interpret=interpret,
            compiler_params=None if interpret else _compiler_params(),
        )(*args)
    m_new = _decayed_from_view(outs[0], lay)
    v_new = _rms_from_view(outs[1], lay)
    if lay.factored:
        return acc._replace(m=m_new, v=v_new)
    return acc._replace(m=m_new, v=v_new, v_diag=_decayed_from_view(outs[2], lay))


# --------------------------------------------------------------------------
# On a sharded mesh: the passes inside `jax.shard_map`, per group of like
# tensors (`write_accumulators` per tensor).


class TensorSharding(NamedTuple):
    """How one (lifted) tensor is sharded: per tensor axis, the mesh axes."""

    mesh: Any
    axes: tuple[tuple[str, ...], ...]

    def names(self, tensor_axes) -> tuple[str, ...]:
        return tuple(n for a in tensor_axes for n in self.axes[a])

    def spec(self, drop: int | None = None, extra: int = 0):
        """PartitionSpec of the tensor (axis `drop` replicated, e.g. a
        size-1 or removed axis), plus `extra` replicated trailing axes."""
        from jax.sharding import PartitionSpec as P

        entries = [
            None if (a == drop or not n) else (n[0] if len(n) == 1 else n)
            for a, n in enumerate(self.axes)
        ]
        return P(*entries, *([None] * extra))

    def spec_without(self, axis: int, extra: int = 1):
        from jax.sharding import PartitionSpec as P

        full = self.spec(extra=extra)
        return P(*(e for a, e in enumerate(full) if a != axis))

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            s // math.prod(self.mesh.shape[n] for n in names)
            for s, names in zip(shape, self.axes)
        )

    def psum(self, x, tensor_axes):
        names = self.names(tensor_axes)
        return jax.lax.psum(x, names) if names else x

    def pmax(self, x, tensor_axes):
        names = self.names(tensor_axes)
        return jax.lax.pmax(x, names) if names else x


def tensor_sharding(mesh, spec, ndim: int) -> TensorSharding | None:
    """None when `mesh` is None; `spec` a PartitionSpec of the tensor, or of
    a scalar lifted to shape (1,) (then `P()`)."""
    if mesh is None:
        return None
    entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    axes = tuple(
        () if e is None else (tuple(e) if isinstance(e, tuple) else (e,))
        for e in entries
    )
    return TensorSharding(mesh, axes)


def _acc_specs(sh: TensorSharding, shape, acc: param_net.Accumulators):
    from jax.sharding import PartitionSpec as P

    dims = accumulators.factored_dims(shape)
    full = sh.spec(extra=1)
    return param_net.Accumulators(
        full,
        full,
        None if acc.v_row is None else sh.spec_without(dims[1]),
        None if acc.v_col is None else sh.spec_without(dims[0]),
        None if acc.v_diag is None else full,
    ), P()


def _stacked(spec):
    """The spec of a group's stacked arrays (a leading, replicated axis)."""
    from jax.sharding import PartitionSpec as P

    return None if spec is None else P(None, *spec)


def _phase_a_specs(sh: TensorSharding, shape, acc):
    """Specs of a group's stacked `PhaseA` (see `phase_a`)."""
    specs, rep = _acc_specs(sh, shape, acc)
    dims = accumulators.factored_dims(shape)
    if dims is None:
        return PhaseA(rep, rep, None, None, None, None, rep, rep)
    d1, d0 = dims
    return PhaseA(
        rep, rep, _stacked(specs.v_row), _stacked(specs.v_col),
        _stacked(sh.spec(drop=d0, extra=1)), _stacked(sh.spec(drop=d1, extra=1)),
        rep, rep,
    )  # fmt: skip


def sharded_phase_a(ps, gs, accs, sh: TensorSharding | None, *, interpret=False) -> PhaseA:
    """`phase_a` of a group, inside `shard_map` over `sh.mesh` when `sh` is
    given (each device on its blocks, the partial sums psum'd)."""
    if sh is None:
        return phase_a(ps, gs, accs, interpret=interpret)
    shape = tuple(ps[0].shape)

    def fn(ps, gs, accs):
        return phase_a(
            ps, gs, accs, interpret=interpret, psum=sh.psum, pmax=sh.pmax,
            global_shape=shape,
        )

    acc_specs, _ = _acc_specs(sh, shape, accs[0])
    k = len(ps)
    return jax.shard_map(
        fn,
        mesh=sh.mesh,
        in_specs=([sh.spec()] * k, [sh.spec()] * k, [acc_specs] * k),
        out_specs=_phase_a_specs(sh, shape, accs[0]),
        check_vma=False,
    )(ps, gs, accs)


def sharded_phase_c(
    weights, w0, ps, gs, accs, a: PhaseA, sh: TensorSharding | None, **kw
):
    """`phase_c` of a group, inside `shard_map` when `sh` is given; the
    non-finite counts are summed over the devices."""
    if sh is None:
        return phase_c(weights, w0, ps, gs, accs, a, **kw)
    from jax.sharding import PartitionSpec as P

    shape = tuple(ps[0].shape)

    def fn(weights, w0, ps, gs, accs, a):
        updates, new, bad = phase_c(
            weights, w0, ps, gs, accs, a, global_shape=shape, **kw
        )
        return updates, new, sh.psum(bad, tuple(range(len(shape))))

    acc_specs, rep = _acc_specs(sh, shape, accs[0])
    a_specs = _phase_a_specs(sh, shape, accs[0])
    k = len(ps)
    return jax.shard_map(
        fn,
        mesh=sh.mesh,
        in_specs=(P(), P(), [sh.spec()] * k, [sh.spec()] * k, [acc_specs] * k, a_specs),
        out_specs=([sh.spec()] * k, [acc_specs] * k, rep),
        check_vma=False,
    )(weights, w0, ps, gs, accs, a)


def sharded_write_accumulators(ok, g, acc, sh: TensorSharding | None, **kw):
    """`write_accumulators`, inside `shard_map` when `sh` is given."""
    if sh is None:
        return write_accumulators(ok, g, acc, **kw)
    from jax.sharding import PartitionSpec as P

    shape = tuple(g.shape)

    def fn(ok, g, acc):
        return write_accumulators(ok, g, acc, global_shape=shape, **kw)

    acc_specs, _ = _acc_specs(sh, shape, acc)
    return jax.shard_map(
        fn,
        mesh=sh.mesh,
        in_specs=(P(), sh.spec(), acc_specs),
        out_specs=acc_specs,
        check_vma=False,
    )(ok, g, acc)
