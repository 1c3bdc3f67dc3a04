"""Reliability of the optimizer itself (issue: nothing lost, nothing silently
wrong): non-finite steps are no-ops, odd leaves are handled or rejected by
name, state types are stable under explicit sharding, bad weights files fail
with `WeightsError`."""

import functools
import hashlib
import pathlib

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import velo_scale
from velo_scale._src import weights as weights_lib


@pytest.fixture(scope="module")
def tx(theta):
    return velo_scale.velo(20, weights=theta)


@pytest.fixture(params=["native", "gpu"])
def forms(request, monkeypatch):
    """The backend's own forms, or the XLA:GPU ones run here on CPU."""
    if request.param == "gpu":
        from tests.test_parity import _gpu_branch

        monkeypatch.setattr(jax.lax, "platform_dependent", _gpu_branch)
    return request.param


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "w": jax.random.normal(k1, (6, 8)) * 0.3,
        "b": jnp.zeros((8,)),
        "s": jnp.asarray(0.5),
        "v": jax.random.normal(k2, (3, 4, 2)),
    }


def _grads(params, step):
    key = jax.random.PRNGKey(100 + step)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, jnp.shape(x)) * 0.1 for k, x in zip(keys, leaves)]
    )


def _run(tx, params, grads_and_losses):
    """Applies each (grads, loss); returns params, state and all updates."""
    update = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))
    state = tx.init(params)
    history = []
    for grads, loss in grads_and_losses:
        updates, state = update(grads, state, params, loss)
        history.append(updates)
        params = optax.apply_updates(params, updates)
    return params, state, history


def _assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _poison(tree, value):
    """The same tree with one element of the first leaf set to `value`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves[0] = leaves[0].reshape(-1).at[1].set(value).reshape(leaves[0].shape)
    return treedef.unflatten(leaves)


# --- non-finite steps are no-ops -----------------------------------------------


@pytest.mark.parametrize(
    "fault", ["nan_loss", "inf_loss", "nan_grad", "inf_grad", "neg_inf_grad"]
)
def test_nonfinite_step_is_a_noop_and_run_continues_as_without_it(tx, fault, forms):
    params = _params()
    clean = [(_grads(params, k), 1.0 / (k + 1)) for k in range(5)]
    bad_grads, bad_loss = _grads(params, 99), 0.7
    if fault == "nan_loss":
        bad_loss = float("nan")
    elif fault == "inf_loss":
        bad_loss = float("inf")
    else:
        value = {"nan_grad": jnp.nan, "inf_grad": jnp.inf, "neg_inf_grad": -jnp.inf}
        bad_grads = _poison(bad_grads, value[fault])
    with_fault = clean[:2] + [(bad_grads, bad_loss)] + clean[2:]

    ref_params, ref_state, _ = _run(tx, params, clean)
    got_params, got_state, history = _run(tx, params, with_fault)

    for u in jax.tree_util.tree_leaves(history[2]):
        np.testing.assert_array_equal(np.asarray(u), 0.0)
    _assert_trees_equal(got_params, ref_params)
    assert int(got_state.nonfinite_steps) == 1
    assert int(ref_state.nonfinite_steps) == 0
    _assert_trees_equal(
        got_state._replace(nonfinite_steps=ref_state.nonfinite_steps), ref_state
    )


def test_nonfinite_update_is_a_noop(tx, theta, forms):
    # Finite params whose mean square overflows float32 (|w| = 1e20): the
    # step size, hence the update, is not finite although every input is.
    params = _params()
    params["w"] = params["w"] * 1e20
    raw = velo_scale.velo(20, weights=theta, skip_nonfinite=False)
    updates, _ = raw.update(_grads(params, 0), raw.init(params), params, loss=1.0)
    assert not np.all(np.isfinite(np.asarray(updates["w"])))

    out, state, history = _run(tx, params, [(_grads(params, k), 1.0) for k in range(3)])
    _assert_trees_equal(out, params)
    assert int(state.nonfinite_steps) == 3
    assert int(state.iteration) == 0
    fresh = tx.init(params)
    _assert_trees_equal(state._replace(nonfinite_steps=fresh.nonfinite_steps), fresh)
    for updates in history:
        for u in jax.tree_util.tree_leaves(updates):
            assert np.all(np.asarray(u) == 0)


@pytest.mark.parametrize("case", ["finite", "bad_input", "bad_update"])
def test_skip_variants_agree(tx, case):
    """The skip is written per backend (plain selects on TPU/GPU, a cond on
    CPU, `velo._skip_unless_finite`); tests run on CPU, so the TPU variant is
    checked here against the CPU one, on a finite and two skipped steps."""
    from velo_scale._src import velo as velo_lib

    params = _params()
    old = tx.init(params)
    _, new = tx.update(_grads(params, 0), old, params, loss=1.0)
    updates = _grads(params, 1)
    if case == "bad_update":
        updates = _poison(updates, jnp.inf)
    inputs_finite = jnp.asarray(case != "bad_input")
    # The CPU form as `velo` calls it: the accumulators recomputed from the
    # step's gradients and the old state (`velo.updated_accumulators`).
    recompute = functools.partial(
        velo_lib.updated_accumulators, grads=_grads(params, 0), params=params
    )
    got = [
        jax.jit(f)(inputs_finite, updates, new, old)
        for f in (
            velo_lib.skip_fused,
            velo_lib.skip_materialised,
            functools.partial(velo_lib.skip_materialised, recompute=recompute),
        )
    ]
    _assert_trees_equal(got[0], got[1])
    # Recomputed, the accumulators are the same expressions fused into other
    # kernels: XLA:CPU may sum a factored mean in another order (1 ulp).
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=0), *got[::2]
    )
    u, state = got[0]
    if case == "finite":
        _assert_trees_equal(u, updates)
        _assert_trees_equal(state, new)
    else:
        for x in jax.tree_util.tree_leaves(u):
            assert np.all(np.asarray(x) == 0)
        _assert_trees_equal(state._replace(nonfinite_steps=old.nonfinite_steps), old)
        assert int(state.nonfinite_steps) == int(old.nonfinite_steps) + 1


def test_opt_out_keeps_the_reference_behaviour(theta):
    # Documented reason for the default: one NaN element poisons every tensor.
    raw = velo_scale.velo(20, weights=theta, skip_nonfinite=False)
    params = _params()
    steps = [(_poison(_grads(params, 0), jnp.nan), 1.0), (_grads(params, 1), 1.0)]
    _, state, history = _run(raw, params, steps)
    assert np.all(np.isnan(np.asarray(history[1]["b"])))
    assert np.all(np.isnan(np.asarray(state.lstm_hidden)))


def test_nonfinite_skip_with_gradient_accumulation(theta):
    # num_steps > max_training_steps: a bad call must not enter the sums.
    tx = velo_scale.velo(8, weights=theta, max_training_steps=4)  # k = 2
    params = _params()
    clean = [(_grads(params, k), 1.0 + k) for k in range(4)]
    bad = (_poison(_grads(params, 7), jnp.nan), 3.0)
    ref_params, ref_state, _ = _run(tx, params, clean)
    got_params, got_state, _ = _run(tx, params, clean[:1] + [bad] + clean[1:])
    _assert_trees_equal(got_params, ref_params)
    _assert_trees_equal(got_state.accumulation, ref_state.accumulation)
    assert int(got_state.nonfinite_steps) == 1


def test_skip_inside_chain_and_apply_if_finite(tx):
    chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
    params = _params()
    state = chained.init(params)
    grads = _poison(_grads(params, 0), jnp.nan)
    updates, state = chained.update(grads, state, params, loss=1.0)
    for u in jax.tree_util.tree_leaves(updates):
        assert np.all(np.asarray(u) == 0)
    assert int(state[1].nonfinite_steps) == 1


# --- odd leaves ----------------------------------------------------------------


def test_zero_size_leaf_gets_zero_update_and_does_not_affect_others(tx):
    params = {"w": jnp.ones((3, 2)), "e": jnp.zeros((0,)), "f": jnp.zeros((2, 0))}
    alone = {"w": jnp.ones((3, 2))}
    grads = {"w": jnp.full((3, 2), 0.1), "e": jnp.zeros((0,)), "f": jnp.zeros((2, 0))}
    updates, state = tx.update(grads, tx.init(params), params, loss=1.0)
    ref, _ = tx.update({"w": grads["w"]}, tx.init(alone), alone, loss=1.0)
    assert np.all(np.isfinite(np.asarray(updates["w"])))
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(ref["w"]))
    assert updates["e"].shape == (0,) and updates["f"].shape == (2, 0)
    assert state.momentum["e"] is None and state.lstm_hidden.shape[0] == 1


@pytest.mark.parametrize(
    "leaf",
    [
        jnp.asarray([True, False]),
        jnp.asarray([3, -1], jnp.int32),
        jnp.asarray([7], jnp.uint8),
    ],
    ids=["bool", "int32", "uint8"],
)
def test_non_float_leaves_are_left_unchanged(tx, leaf):
    params = {"w": jnp.ones((3, 2)), "x": leaf}
    for grad in (jnp.zeros_like(leaf), np.zeros(leaf.shape, jax.dtypes.float0)):
        grads = {"w": jnp.full((3, 2), 0.1), "x": grad}
        state = tx.init(params)
        updates, state = tx.update(grads, state, params, loss=1.0)
        new = optax.apply_updates(params, updates)
        assert new["x"].dtype == leaf.dtype
        np.testing.assert_array_equal(np.asarray(new["x"]), np.asarray(leaf))
        assert state.momentum["x"] is None


def test_float0_gradients_from_jax_grad(tx):
    params = {"w": jnp.ones((4,)), "n": jnp.asarray(3, jnp.int32)}

    def loss_fn(p):
        return jnp.sum(p["w"] ** 2) * p["n"]

    loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(params)
    assert grads["n"].dtype == jax.dtypes.float0
    updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=loss))(
        grads, tx.init(params), params
    )
    assert int(optax.apply_updates(params, updates)["n"]) == 3


def test_python_float_leaf_is_a_float32_scalar(tx):
    as_float = {"w": jnp.ones((3, 2)), "t": 0.5}
    as_array = {"w": jnp.ones((3, 2)), "t": jnp.asarray(0.5, jnp.float32)}
    grads = {"w": jnp.full((3, 2), 0.1), "t": 0.2}
    u1, _ = tx.update(grads, tx.init(as_float), as_float, loss=1.0)
    u2, _ = tx.update(grads, tx.init(as_array), as_array, loss=1.0)
    np.testing.assert_array_equal(np.asarray(u1["t"]), np.asarray(u2["t"]))
    np.testing.assert_array_equal(np.asarray(u1["w"]), np.asarray(u2["w"]))


def test_shape_mismatched_gradient_names_the_leaf(tx):
    params = {"layer": {"kernel": jnp.ones((3, 2))}}
    grads = {"layer": {"kernel": jnp.ones((2, 3))}}  # same size, other shape
    with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\].*\(2, 3\).*\(3, 2\)"):
        tx.update(grads, tx.init(params), params, loss=1.0)


def test_complex_params_name_the_leaf(tx):
    params = {"z": jnp.ones((3,), jnp.complex64)}
    with pytest.raises(ValueError, match=r"complex.*\['z'\].*complex64"):
        tx.update(params, tx.init({"z": jnp.ones((3,))}), params, loss=1.0)


def test_float_param_with_float0_gradient_is_an_error(tx):
    params = {"w": jnp.ones((3,))}
    grads = {"w": np.zeros((3,), jax.dtypes.float0)}
    with pytest.raises(ValueError, match=r"\['w'\].*float0"):
        tx.update(grads, tx.init(params), params, loss=1.0)


# --- state types under explicit sharding -----------------------------------------


def _types(tree):
    return [
        (x.shape, x.dtype, x.weak_type, x.sharding.spec)
        for x in map(jax.typeof, jax.tree_util.tree_leaves(tree))
    ]


def test_state_types_stable_under_explicit_axes(tx):
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    specs = {"w": P("data", "model"), "b": P("model"), "s": P(), "v": P(None, "model")}
    params = _params()
    with jax.set_mesh(mesh):
        sharded = {
            k: jax.device_put(v, NamedSharding(mesh, specs[k]))
            for k, v in params.items()
        }
        grads = jax.tree_util.tree_map(lambda p: p * 0.1, sharded)
        eager = tx.init(sharded)
        jitted = jax.jit(tx.init)(sharded)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=1.0))
        _, after = step(grads, jitted, sharded)
        _, after_eager = tx.update(grads, eager, sharded, loss=1.0)
        _, after_two = step(grads, after, sharded)
    want = _types(eager)
    assert _types(jitted) == want
    assert _types(after) == want
    assert _types(after_eager) == want
    assert _types(after_two) == want
    assert jax.typeof(eager.momentum["w"]).sharding.spec == P("data", "model", None)


def test_init_takes_shape_dtype_structs(tx):
    params = _params()
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
    )
    state = tx.init(abstract)
    _assert_trees_equal(state, tx.init(params))
    assert jax.eval_shape(tx.init, abstract).momentum["w"].shape == (6, 8, 3)


# --- weights files ----------------------------------------------------------------


def _as_bytes(theta):
    return weights_lib.weights_to_bytes(theta)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_weights_with_nonfinite_values(theta, tmp_path, value):
    bad = jax.tree_util.tree_map(np.array, theta)
    bad["rnn_params"]["step_size"]["w"][3, 0] = value
    path = tmp_path / "params"
    path.write_bytes(
        msgpack.packb(
            {"params": weights_lib._canonical(bad, velo_scale.Architecture.of(bad))},
            default=weights_lib._default,
            use_bin_type=True,
        )
    )
    with pytest.raises(velo_scale.WeightsError, match=r"params.*step_size/w.*non-finite"):
        velo_scale.load_weights(path)
    with pytest.raises(velo_scale.WeightsError, match="non-finite"):
        velo_scale.velo(10, weights=bad)


def test_weights_with_unknown_dtype(theta, tmp_path):
    data = _as_bytes(theta)
    # The dtype names are plain msgpack strings inside each array record.
    corrupt = data.replace(b"float32", b"flort32", 1)
    assert corrupt != data
    path = tmp_path / "params"
    path.write_bytes(corrupt)
    with pytest.raises(velo_scale.WeightsError, match=r"params.*corrupt"):
        velo_scale.load_weights(path)


def test_truncated_cache_file_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path))
    monkeypatch.delenv("VELO_SCALE_WEIGHTS", raising=False)
    cached = velo_scale.default_cache_path()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"\x00" * 1000)  # an interrupted copy

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(weights_lib.urllib.request, "urlopen", offline)
    with pytest.raises(velo_scale.WeightsError) as e:
        velo_scale.load_weights()
    message = str(e.value)
    assert "truncated or corrupt" in message and "1,000 bytes" in message
    assert f"rm {str(cached)!r}" in message


def test_cached_download_checked_against_its_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path))
    monkeypatch.delenv("VELO_SCALE_WEIGHTS", raising=False)
    cached = velo_scale.default_cache_path()
    data = bytes(weights_lib.OFFICIAL_WEIGHTS_BYTES)

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return data

    monkeypatch.setattr(
        weights_lib.urllib.request, "urlopen", lambda *a, **k: Response()
    )
    got, where = weights_lib._resolve_default()
    assert got == data and where == str(cached)
    digest = pathlib.Path(str(cached) + ".sha256")
    assert digest.read_text() == hashlib.sha256(data).hexdigest()
    flipped = bytearray(data)
    flipped[4242] ^= 0x10
    cached.write_bytes(bytes(flipped))
    with pytest.raises(velo_scale.WeightsError, match=r"changed since it was downloaded"):
        weights_lib._resolve_default()
