"""The Pallas kernels (`velo(..., implementation="pallas")`) against the XLA path.

The kernels run in Pallas' interpreter on CPU (`pallas_interpret=True`); the
tolerances are the parity tests' (tests/test_parity.py), applied to the XLA
path's results.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import velo_scale
from tests.test_parity import TOL
from velo_scale._src.kernels import velo_pallas

# 2-D both ways round (d0 the column / the row axis; the tall one in two row
# blocks), a vector, a scalar, a 3-D tensor (factored axes 1, 2; axis 0
# batch), 3-D tensors with the batch axis between and after the factored
# axes, a 4-D one with batch axes before and between; no size is a multiple
# of the (8, 128) tile, so the views transpose (as XLA:TPU's layouts do).
SHAPES = {
    "wide": (12, 40),
    "tall": (1024, 40),
    "bias": (40,),
    "scalar": (),
    "cube": (3, 5, 7),
    "mixed": (6, 2, 9),
    "trailing": (9, 6, 2),
    "four": (2, 7, 3, 5),
}


SMALL = {k: SHAPES[k] for k in ("wide", "bias")}


# The compiles dominate this file's time: XLA:CPU's backend at -O0 takes a
# third less (float semantics are the same: no fast math at either level).
_FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _tree(seed, scale=1.0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in shapes.items()
    }


def _run(theta, implementation, steps=2, grads=None, shapes=SHAPES, **kw):
    tx = velo_scale.velo(
        100, weights=theta, implementation=implementation, pallas_interpret=True, **kw
    )
    params = _tree(0, shapes=shapes)
    state = tx.init(params)
    update = jax.jit(
        lambda g, s, p, loss: tx.update(g, s, p, loss=loss),
        compiler_options=_FAST_COMPILE,
    )
    out = []
    for k in range(steps):
        g = grads[k] if grads is not None else _tree(k + 1, 0.1, shapes)
        u, state = update(g, state, params, jnp.float32(1.0 / (k + 1)))
        params = jax.tree_util.tree_map(lambda a, b: a + b, params, u)
        out.append((u, state, params))
    return out


def _close(a, b, tol, what):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), **tol, err_msg=what)


def _compare(ref, got):
    for k, ((_, s0, p0), (_, s1, p1)) in enumerate(zip(ref, got)):
        for name in p0:
            _close(p0[name], p1[name], TOL["params"], f"step {k} params {name}")
            _close(s0.momentum[name], s1.momentum[name], TOL["mom"], f"mom {name}")
            _close(s0.rms[name], s1.rms[name], TOL["rms"], f"rms {name}")
        for field in ("v_row", "v_col", "v_diag"):
            a = jax.tree_util.tree_leaves(getattr(s0.factored, field))
            b = jax.tree_util.tree_leaves(getattr(s1.factored, field))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                _close(x, y, TOL["fac"], f"step {k} {field}")
        _close(s0.lstm_hidden, s1.lstm_hidden, TOL["lstm"], "lstm hidden")
        _close(s0.lstm_cell, s1.lstm_cell, TOL["lstm"], "lstm cell")
        assert int(s0.iteration) == int(s1.iteration)
        assert int(s0.nonfinite_steps) == int(s1.nonfinite_steps)


def test_every_shape_takes_the_kernels():
    for shape in SHAPES.values():
        assert velo_pallas.supported((1,) if shape == () else shape), shape
    # Several row blocks for the large one.
    lay = velo_pallas.layout((1024, 40))  # viewed as [40, 1024]: 5 blocks
    assert (lay.x, lay.y, lay.x // lay.bx) == (40, 1024, 5)


@pytest.mark.parametrize(
    "shape, minor",
    [
        ((512, 512), (0, 1)),
        ((2048, 768), (0, 1)),  # no padding either way: the default
        ((640, 160), (1, 0)),  # f32[640,160]{0,1}
        ((160, 5, 64), (2, 0)),  # {0,2,1}
        ((5, 64, 160), (1, 2)),  # {2,1,0}
        ((160, 5, 64, 3), (2, 0)),  # the momentum: {0,2,3,1}
    ],
)
def test_views_follow_the_tpu_layout(shape, minor):
    """The kernels' views are the physical orders XLA:TPU gives these arrays
    (read from compiled v5e HLO), so passing them to Mosaic is a bitcast."""
    assert velo_pallas.tpu_minor_axes(shape) == minor
    if len(shape) == 4:
        return
    lay = velo_pallas.layout(shape)
    assert lay.perm[-2:] == minor
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    m = jnp.stack([x, -x, 2 * x], axis=-1)
    v = x[..., None]
    np.testing.assert_array_equal(velo_pallas._from_view(velo_pallas._to_view(x, lay), lay), x)
    np.testing.assert_array_equal(
        velo_pallas._decayed_from_view(velo_pallas._decayed_to_view(m, lay), lay), m
    )
    np.testing.assert_array_equal(
        velo_pallas._rms_from_view(velo_pallas._rms_to_view(v, lay), lay), v
    )
    # [B, 3, X, Y]: batch axes first, then the decays, then X, Y.
    mv = velo_pallas._decayed_to_view(m, lay)
    np.testing.assert_array_equal(mv[:, 1], -velo_pallas._to_view(x, lay))


def test_pallas_matches_xla_and_skips_a_nonfinite_step(theta):
    """Every shape, three steps; the second has a NaN gradient element, so
    the whole step is skipped (zero updates, state kept, counted)."""
    bad = _tree(2, 0.1)
    bad["mixed"] = bad["mixed"].at[1, 1, 3].set(jnp.nan)
    grads = [_tree(1, 0.1), bad, _tree(3, 0.1)]
    ref = _run(theta, "xla", 3, grads)
    got = _run(theta, "pallas", 3, grads)
    _compare(ref, got)
    assert [int(s.nonfinite_steps) for _, s, _ in got] == [0, 1, 1]
    for name in SHAPES:
        np.testing.assert_array_equal(np.asarray(got[1][0][name]), 0.0)
        np.testing.assert_array_equal(
            np.asarray(got[1][1].momentum[name]), np.asarray(got[0][1].momentum[name])
        )


# Like tensors (one shape and dtype) share one group's combination code.
GROUPED = {
    "wide": (12, 40),
    "wide_b": (12, 40),
    "bias": (40,),
    "long": (40_000,),  # too long for a block: the XLA path, between groups
    "bias_b": (40,),
    "cube": (3, 5, 7),
    "cube_b": (3, 5, 7),
    "cube_c": (3, 5, 7),
}


def test_pallas_groups_like_tensors(theta):
    """Tensors of one shape run as a group (their small arrays stacked and
    combined once); each still gets its own statistics, LSTM row and update,
    and a NaN in one tensor of a group skips the whole step."""
    assert not velo_pallas.supported(GROUPED["long"])
    bad = _tree(2, 0.1, GROUPED)
    bad["cube_b"] = bad["cube_b"].at[2, 4, 6].set(jnp.nan)
    grads = [_tree(1, 0.1, GROUPED), bad, _tree(3, 0.1, GROUPED)]
    ref = _run(theta, "xla", 3, grads, shapes=GROUPED)
    got = _run(theta, "pallas", 3, grads, shapes=GROUPED)
    _compare(ref, got)
    assert [int(s.nonfinite_steps) for _, s, _ in got] == [0, 1, 1]
    # Like tensors with different data get different updates.
    u = got[2][0]
    assert not np.allclose(np.asarray(u["cube"]), np.asarray(u["cube_b"]))


def test_pallas_matches_xla_without_skip_and_with_decay(theta):
    """skip_nonfinite=False: the update kernel also writes the accumulators
    (a factored 2-D tensor, a vector)."""
    kw = dict(skip_nonfinite=False, decoupled_weight_decay=1e-2, weight_decay=1e-3)
    _compare(
        _run(theta, "xla", shapes=SMALL, **kw), _run(theta, "pallas", shapes=SMALL, **kw)
    )


def test_unknown_implementation():
    with pytest.raises(ValueError, match="implementation"):
        velo_scale.velo(10, implementation="triton")


def test_late_commit_matches_the_fast_commit(theta, monkeypatch):
    """With the fast commit off (`write_accumulators`, its flag set,
    commits every finite step), the results are the XLA path's, the NaN step
    skipped as before."""
    import functools

    from velo_scale._src import velo as velo_lib

    monkeypatch.setattr(
        velo_lib,
        "_velo_step_pallas",
        functools.partial(velo_lib._velo_step_pallas, fast_commit=False),
    )
    shapes = {k: SHAPES[k] for k in ("wide", "bias", "cube")}
    bad = _tree(2, 0.1, shapes)
    bad["cube"] = bad["cube"].at[1, 1, 3].set(jnp.nan)
    grads = [_tree(1, 0.1, shapes), bad, _tree(3, 0.1, shapes)]
    got = _run(theta, "pallas", 3, grads, shapes=shapes)
    _compare(_run(theta, "xla", 3, grads, shapes=shapes), got)
    assert [int(s.nonfinite_steps) for _, s, _ in got] == [0, 1, 1]


def test_pallas_skips_a_nonfinite_update_of_finite_inputs(theta):
    """|w| = 1e20: every input finite, the update not (its step size
    overflows); the bound is then infinite, so the step takes the late
    commit, which finds the update non-finite and keeps the old state."""
    shapes = SMALL
    params = _tree(0, shapes=shapes)
    params["wide"] = params["wide"] * 1e20
    tx = velo_scale.velo(100, weights=theta, implementation="pallas", pallas_interpret=True)
    state = tx.init(params)
    u, new = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=1.0))(
        _tree(1, 0.1, shapes), state, params
    )
    assert int(new.nonfinite_steps) == 1
    for x in jax.tree_util.tree_leaves(u):
        np.testing.assert_array_equal(np.asarray(x), 0.0)
    for a, b in zip(
        jax.tree_util.tree_leaves(new._replace(nonfinite_steps=state.nonfinite_steps)),
        jax.tree_util.tree_leaves(state),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("tail", ["normal", "heavy", "sparse"])
def test_update_bound_bounds_the_update(theta, tail):
    """`param_net.update_bound` from the channels' maxima is at least the
    largest |update| (XLA path's MLP), for gradients with normal, Cauchy and
    mostly-zero elements, and finite there, far below float32's range (so the
    usual step takes the fast commit)."""
    from velo_scale._src import param_net, tensor_net
    from velo_scale._src import velo as velo_lib

    rng = np.random.default_rng(7)
    shape = (48, 200)
    p = jnp.asarray(0.05 * rng.normal(size=shape), jnp.float32)
    g = {
        "normal": rng.normal(size=shape),
        "heavy": rng.standard_cauchy(size=shape),
        "sparse": rng.normal(size=shape) * (rng.random(shape) < 0.01),
    }[tail]
    g = jnp.clip(jnp.asarray(g, jnp.float32), -1000, 1000)
    tx = velo_scale.velo(100, weights=theta)
    state = tx.init({"w": p})
    acc = param_net.Accumulators(
        state.momentum["w"], state.rms["w"], state.factored.v_row["w"],
        state.factored.v_col["w"], None,
    )  # fmt: skip
    new = param_net.update_accumulators(g, acc)
    chans = param_net.feature_channels(p, g, new)
    max_abs = jnp.stack([jnp.max(jnp.abs(x)) for x in chans])
    mean_sq = param_net.channel_mean_squares(p, g, new)[None]
    stats = tensor_net.tensor_statistics(p, acc.m, acc.v)
    b = velo_lib._phase_b(
        theta_arrays(theta), state, stats[None], mean_sq, [shape],
        jnp.float32(0.3), jnp.zeros((9,), jnp.float32),
    )  # fmt: skip
    mlp = {k: w[0] for k, w in b.mlps.items()}
    update = param_net.apply(mlp, b.w0[0], b.scale[0], p, g, new)
    bound = param_net.update_bound(mlp, b.w0[0], b.scale[0], max_abs, 1e-2)
    assert float(jnp.max(jnp.abs(update))) <= float(bound)
    assert np.isfinite(float(bound))
    assert float(bound) < velo_lib._commit_limit(jnp.float32) * 1e-20


def theta_arrays(theta):
    return jax.tree_util.tree_map(jnp.asarray, theta)
