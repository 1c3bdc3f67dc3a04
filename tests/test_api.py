"""optax conformance of velo_scale.velo: pytrees, dtypes, jit, chain, MultiSteps,
eval_shape, weight decay, and the errors a user sees."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import velo_scale

N = 50


def _params(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "dense": {
            "kernel": (0.1 * jax.random.normal(k1, (8, 6))).astype(dtype),
            "bias": jnp.zeros((6,), dtype),
        },
        "conv": (0.1 * jax.random.normal(k2, (3, 3, 2, 4))).astype(dtype),
        "scale": jnp.asarray(1.5, dtype),
        "row": (0.1 * jax.random.normal(k3, (1, 5))).astype(dtype),
    }


def _grads(params, seed=1):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape).astype(x.dtype) for k, x in zip(keys, leaves)]
    )


@pytest.fixture(scope="module")
def tx(theta):
    return velo_scale.velo(N, weights=theta)


def _run(tx, params, steps=3, jit=True):
    def update(g, s, p, loss):
        return tx.update(g, s, p, loss=loss)

    if jit:
        update = jax.jit(update)
    state = tx.init(params)
    for k in range(steps):
        updates, state = update(
            _grads(params, k), state, params, jnp.float32(2.0 - 0.1 * k)
        )
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_close(a, b, **tol):
    ja, jb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert ja == jb, (ja, jb)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), **tol
        )


def test_is_gradient_transformation_extra_args(tx):
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_jit_equals_no_jit(tx):
    a, sa = _run(tx, _params(), jit=True)
    b, sb = _run(tx, _params(), jit=False)
    _assert_trees_close(a, b, rtol=1e-5, atol=1e-6)
    _assert_trees_close(sa.momentum, sb.momentum, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_stability(tx, dtype):
    params = _params(dtype)
    state = tx.init(params)
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=1.0))(
        _grads(params), state, params
    )
    for u, p in zip(
        jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params)
    ):
        assert u.dtype == p.dtype and u.shape == p.shape
        assert np.isfinite(np.asarray(u, np.float32)).all()
    for leaf in jax.tree_util.tree_leaves(state.momentum):
        assert leaf.dtype == jnp.float32  # accumulators stay float32
    # A low-precision run tracks the float32 run.
    lo, _ = _run(tx, _params(dtype), steps=2)
    hi, _ = _run(tx, _params(jnp.float32), steps=2)
    _assert_trees_close(lo, hi, rtol=0.05, atol=0.02)


def test_updates_dtype_follow_params_not_grads(tx):
    params = _params(jnp.float32)
    grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.bfloat16), _grads(params))
    updates, _ = tx.update(grads, tx.init(params), params, loss=1.0)
    assert all(u.dtype == jnp.float32 for u in jax.tree_util.tree_leaves(updates))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: flax.core.freeze(p),
        lambda p: (p["dense"]["kernel"], [p["conv"], p["scale"]], p["row"]),
        lambda p: jnp.ones((4, 3)) * 0.1,  # a bare array
        lambda p: p["scale"],  # a bare scalar
    ],
    ids=["frozendict", "tuple_list", "array", "scalar"],
)
def test_pytree_kinds(tx, make):
    params = make(_params())
    new, state = _run(tx, params, steps=2)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    n = len(jax.tree_util.tree_leaves(params))
    assert state.lstm_hidden.shape == (n, 512)


def test_nnx_state(tx):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    new, _ = _run(tx, params, steps=2)
    nnx.update(model, new)
    assert model.kernel.get_value().shape == (4, 3)


def test_empty_tree(tx):
    state = tx.init({})
    updates, state = tx.update({}, state, {}, loss=1.0)
    assert updates == {}
    assert int(state.iteration) == 1


def test_chain_passes_loss(tx):
    chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
    params = _params()
    grads = _grads(params)
    state = chained.init(params)
    updates, _ = jax.jit(lambda g, s, p: chained.update(g, s, p, loss=1.0))(
        grads, state, params
    )
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    direct, _ = tx.update(clipped, tx.init(params), params, loss=1.0)
    _assert_trees_close(updates, direct, rtol=1e-5, atol=1e-7)


def test_masked(tx):
    params = _params()
    mask = {
        "dense": {"kernel": True, "bias": False},
        "conv": True,
        "scale": False,
        "row": True,
    }
    masked = optax.masked(tx, mask)
    state = masked.init(params)
    updates, _ = masked.update(_grads(params), state, params, loss=1.0)
    assert np.all(
        np.asarray(updates["dense"]["bias"])
        == np.asarray(_grads(params)["dense"]["bias"])
    )
    assert state.inner_state.lstm_hidden.shape == (3, 512)


def test_multisteps(tx):
    ms = optax.MultiSteps(tx, every_k_schedule=2)
    params = _params()
    state = ms.init(params)
    step = jax.jit(lambda g, s, p: ms.update(g, s, p, loss=1.0))
    updates, state = step(_grads(params, 0), state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))
    updates, state = step(_grads(params, 0), state, params)
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree_util.tree_leaves(updates))
    assert int(state.inner_opt_state.iteration) == 1


def test_eval_shape_init(tx):
    params = _params()
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
    )
    shapes = jax.eval_shape(tx.init, abstract)
    real = tx.init(params)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(real)
    for a, b in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(real)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_params_not_in_state(tx):
    params = _params()
    state = tx.init(params)
    n_param = sum(x.size for x in jax.tree_util.tree_leaves(params))
    # Momentum (3) + rms (1) + factored vectors: no copy of params in the state.
    mom = sum(x.size for x in jax.tree_util.tree_leaves(state.momentum))
    assert mom == 3 * n_param


def test_weight_decay_is_coupled_l2(theta):
    params, grads = _params(), _grads(_params())
    wd = 1e-2
    a = velo_scale.velo(N, weights=theta, weight_decay=wd)
    b = velo_scale.velo(N, weights=theta)
    ua, _ = a.update(grads, a.init(params), params, loss=1.0)
    g2 = jax.tree_util.tree_map(lambda g, p: g + wd * p, grads, params)
    l2 = 1.0 + wd * sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))
    ub, _ = b.update(g2, b.init(params), params, loss=l2)
    _assert_trees_close(ua, ub, rtol=1e-6, atol=1e-8)
    uc, _ = b.update(grads, b.init(params), params, loss=1.0)
    assert not np.allclose(np.asarray(ua["conv"]), np.asarray(uc["conv"]))


def test_decoupled_weight_decay(theta):
    params, grads = _params(), _grads(_params())
    a = velo_scale.velo(N, weights=theta, decoupled_weight_decay=0.1)
    b = velo_scale.velo(N, weights=theta)
    ua, _ = a.update(grads, a.init(params), params, loss=1.0)
    ub, _ = b.update(grads, b.init(params), params, loss=1.0)
    expected = jax.tree_util.tree_map(lambda u, p: u - 0.1 * p, ub, params)
    _assert_trees_close(ua, expected, rtol=1e-6, atol=1e-8)


def test_accumulation_horizon(theta):
    tx = velo_scale.velo(1000, weights=theta, max_training_steps=300)
    state = tx.init(_params())
    assert int(state.num_steps) == 1000 // 4
    assert state.accumulation is not None
    assert (
        velo_scale.velo(300, weights=theta, max_training_steps=300)
        .init(_params())
        .accumulation
        is None
    )


# --- errors -------------------------------------------------------------------


def test_missing_loss_names_the_keyword(tx):
    params = _params()
    with pytest.raises(
        ValueError, match=r"tx.update\(grads, state, params, loss=loss\)"
    ):
        tx.update(_grads(params), tx.init(params), params)


def test_non_scalar_loss(tx):
    params = _params()
    with pytest.raises(ValueError, match=r"scalar.*shape=\(4,\)"):
        tx.update(_grads(params), tx.init(params), params, loss=jnp.ones(4))


def test_missing_params(tx):
    params = _params()
    with pytest.raises(ValueError, match="params"):
        tx.update(_grads(params), tx.init(params), None, loss=1.0)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10"])
def test_bad_num_steps(theta, bad):
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        velo_scale.velo(bad, weights=theta)


def test_negative_weight_decay(theta):
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        velo_scale.velo(10, weights=theta, weight_decay=-1.0)


def test_bad_weights_type():
    with pytest.raises(TypeError, match="weights must be None"):
        velo_scale.velo(10, weights=42)


def test_default_weights_work_offline_and_resolve_lazily(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("VELO_SCALE_WEIGHTS", raising=False)
    monkeypatch.delenv("VELO_SCALE_PROJECT_WEIGHTS", raising=False)
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path))
    missing = velo_scale.velo(10, weights=str(tmp_path / "nowhere"))  # no file yet
    with pytest.raises(velo_scale.WeightsError, match="does not exist"):
        missing.init({"w": jnp.ones((2,))})
    tx = velo_scale.velo(10)  # the Quick start, offline: the project weights
    params = {"w": jnp.ones((3, 2))}
    updates, _ = tx.update(params, tx.init(params), params, loss=1.0)
    assert bool(jnp.all(jnp.isfinite(updates["w"])))
    assert "own meta-trained weights" in capsys.readouterr().err


def test_inject_hyperparams_says_there_is_no_learning_rate():
    with pytest.raises(TypeError, match="no learning rate"):
        optax.inject_hyperparams(velo_scale.velo)(num_steps=10).init(
            {"w": jnp.ones((2,))}
        )


def test_mismatched_grads_structure(tx):
    params = _params()
    with pytest.raises(ValueError, match="same tree structure"):
        tx.update({"a": jnp.ones(3)}, tx.init(params), params, loss=1.0)


def test_bfloat16_state(theta):
    params = _params()
    tx16 = velo_scale.velo(N, weights=theta, state_dtype=jnp.bfloat16)
    new16, state16 = _run(tx16, params, steps=3)
    for tree in (state16.momentum, state16.rms, state16.factored):
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(tree))
    assert state16.lstm_hidden.dtype == jnp.float32
    new32, _ = _run(velo_scale.velo(N, weights=theta), params, steps=3)
    for a, b, p in zip(
        jax.tree_util.tree_leaves(new16),
        jax.tree_util.tree_leaves(new32),
        jax.tree_util.tree_leaves(params),
    ):
        moved = np.max(np.abs(np.asarray(b) - np.asarray(p)))
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 0.1 * moved + 1e-7
