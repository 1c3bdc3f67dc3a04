"""T5X and Pax adapters: the pure pieces in CI, the real systems when importable.

t5x and praxis are not installable from the package registries, so the logic
(logical axes of the state, the microbatch loss, the loss-carrying update,
`sharded_velo`) is tested here without them; the tests that need them skip
with a reason.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import velo_scale
from tests.reference_data import CHECKPOINT
from velo_scale.integrations import pax
from velo_scale.integrations import t5x as velo_t5x

NUM_STEPS = 100

# Logical axes of a small model: a dense kernel, its bias, a scalar and a
# rank-3 attention kernel.
PARAM_AXES = {
    "attn": P("heads", "embed", "kv"),
    "dense": {"bias": P("mlp"), "kernel": P("embed", "mlp")},
    "scale": P(),
}


def _params():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "attn": jax.random.normal(keys[0], (2, 6, 4)),
        "dense": {
            "bias": jnp.zeros((8,)),
            "kernel": jax.random.normal(keys[1], (4, 8)),
        },
        "scale": jnp.ones(()),
    }


def _grads(params, seed=1):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


@pytest.fixture(scope="module")
def theta():
    return velo_scale.load_weights(CHECKPOINT)


@pytest.fixture(scope="module")
def tx(theta):
    return velo_scale.velo(NUM_STEPS, weights=theta)


def _is_spec(x):
    return isinstance(x, P)


def _tree_equal(a, b):
    la, da = jax.tree_util.tree_flatten(a, is_leaf=_is_spec)
    lb, db = jax.tree_util.tree_flatten(b, is_leaf=_is_spec)
    return da == db and la == lb


# --- logical axes ----------------------------------------------------------


def test_logical_axes_follow_each_accumulator(tx):
    state = jax.eval_shape(tx.init, _params())
    axes = velo_t5x.velo_logical_axes(state, PARAM_AXES)

    assert isinstance(axes, velo_scale.VeLOState)
    # momentum / rms / v_diag: the parameter's axes plus the decay axis.
    for field in (axes.momentum, axes.rms):
        assert field["dense"]["kernel"] == P("embed", "mlp", None)
        assert field["dense"]["bias"] == P("mlp", None)
        assert field["attn"] == P("heads", "embed", "kv", None)
        assert field["scale"] == P(None)
    # (4, 8): d0 = 1 (size 8), d1 = 0. v_row drops d0, v_col drops d1.
    assert axes.factored.v_row["dense"]["kernel"] == P("embed", None)
    assert axes.factored.v_col["dense"]["kernel"] == P("mlp", None)
    # (2, 6, 4): d0 = 1 (size 6), d1 = 2 (size 4).
    assert axes.factored.v_row["attn"] == P("heads", "kv", None)
    assert axes.factored.v_col["attn"] == P("heads", "embed", None)
    assert axes.factored.v_diag["dense"]["bias"] == P("mlp", None)
    assert axes.factored.v_diag["scale"] == P(None)
    assert axes.factored.v_row["dense"]["bias"] is None
    assert axes.factored.v_diag["dense"]["kernel"] is None
    # The per-tensor LSTM state, the loss buffer and the counters: replicated.
    for spec in (axes.lstm_hidden, axes.lstm_cell, axes.iteration, axes.num_steps):
        assert spec == P()
    assert all(s == P() for s in axes.loss_buffer)


def test_logical_axes_equal_state_partition_specs(tx):
    params = _params()
    state = tx.init(params)  # concrete arrays work as well as shapes
    axes = velo_t5x.velo_logical_axes(state, PARAM_AXES)
    assert _tree_equal(axes, velo_scale.state_partition_specs(tx, params, PARAM_AXES))


def test_logical_axes_accept_frozen_dict_and_none(tx):
    params = flax.core.freeze(_params())
    state = jax.eval_shape(tx.init, params)
    param_axes = dict(PARAM_AXES, scale=None)  # a plain dict, None = replicated
    axes = velo_t5x.velo_logical_axes(state, param_axes)
    assert axes.momentum["scale"] == P(None)
    assert axes.momentum["dense"]["kernel"] == P("embed", "mlp", None)


def test_logical_axes_inside_chain_and_masked(theta):
    params = _params()
    chained = optax.chain(
        optax.clip_by_global_norm(1.0), velo_scale.velo(10, weights=theta)
    )
    axes = velo_t5x.velo_logical_axes(jax.eval_shape(chained.init, params), PARAM_AXES)
    assert axes[1].momentum["dense"]["kernel"] == P("embed", "mlp", None)
    assert _tree_equal(
        axes, velo_scale.state_partition_specs(chained, params, PARAM_AXES)
    )

    mask = {"attn": True, "dense": {"bias": False, "kernel": True}, "scale": True}
    masked = optax.masked(velo_scale.velo(10, weights=theta), mask)
    axes = velo_t5x.velo_logical_axes(jax.eval_shape(masked.init, params), PARAM_AXES)
    inner = axes.inner_state
    assert isinstance(inner.momentum["dense"]["bias"], optax.MaskedNode)
    assert inner.factored.v_col["dense"]["kernel"] == P("mlp", None)


def test_logical_axes_errors(tx):
    state = jax.eval_shape(tx.init, _params())
    with pytest.raises(ValueError, match="found no VeLOState"):
        velo_t5x.velo_logical_axes(optax.EmptyState(), PARAM_AXES)
    with pytest.raises(ValueError, match="one PartitionSpec"):
        velo_t5x.velo_logical_axes(state, {"dense": PARAM_AXES["dense"]})
    too_many = dict(PARAM_AXES, scale=P("embed"))
    with pytest.raises(velo_scale.ShardingError, match="scale"):
        velo_t5x.velo_logical_axes(state, too_many)


# --- microbatch loss -------------------------------------------------------


def test_step_loss_over_microbatches_is_the_sum_like_the_gradients():
    # T5X sums microbatch gradients; with a loss normalised by the whole
    # batch, the summed loss and gradient equal the un-microbatched ones.
    w = jnp.array([0.5, -1.0])
    x = jnp.arange(12.0).reshape(6, 2)
    full = lambda w, x: jnp.sum((x @ w) ** 2) / 6.0  # noqa: E731
    micro = [x[:2], x[2:4], x[4:]]
    losses = jnp.stack([full(w, m) for m in micro])
    grads = sum(jax.grad(full)(w, m) for m in micro)
    step_loss = velo_t5x.step_loss_over_microbatches(losses)
    assert float(step_loss) == pytest.approx(float(full(w, x)), rel=1e-6)
    np.testing.assert_allclose(grads, jax.grad(full)(w, x), rtol=1e-6)
    assert float(
        jax.jit(velo_t5x.step_loss_over_microbatches)(losses)
    ) == pytest.approx(float(step_loss))
    with pytest.raises(ValueError, match="one loss per microbatch"):
        velo_t5x.step_loss_over_microbatches(jnp.ones((2, 2)))


# --- loss-carrying update --------------------------------------------------


def test_hyper_params_carry_the_loss():
    hp = velo_t5x.VeLOHyperParams()
    assert hp.loss is None and hp.learning_rate is None
    hp = hp.replace(learning_rate=0.1, loss=jnp.float32(2.5))
    assert float(hp.loss) == 2.5


def test_loss_carrying_update_equals_direct_update(tx):
    params = _params()
    grads = _grads(params)
    state = tx.init(params)
    loss = jnp.float32(1.7)
    got = velo_t5x.loss_carrying_update(tx, grads, state, params, loss)
    want = tx.update(grads, state, params, loss=loss)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match="VeLOTrainer"):
        velo_t5x.loss_carrying_update(tx, grads, state, params, None)


def test_loss_carrying_update_through_a_chain(theta):
    params = _params()
    grads = _grads(params)
    chained = optax.chain(
        optax.clip_by_global_norm(1.0), velo_scale.velo(10, weights=theta)
    )
    state = chained.init(params)
    got = velo_t5x.loss_carrying_update(chained, grads, state, params, 0.5)
    want = chained.update(grads, state, params, loss=0.5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_schedule_summaries_are_the_step_and_lr_mult_per_role(theta, tx):
    """The T5X train metrics of VeLO's schedule (`VeLOTrainer`): per role,
    from the params before/after the step and the new optimizer state."""
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_grads(params), state, params, loss=jnp.float32(1.0))
    new_params = optax.apply_updates(params, updates)
    got = velo_t5x.schedule_summaries(params, new_params, state, theta)
    # Roles: the last name of each path ("attn" and "scale" are leaves here).
    assert sorted(got) == [
        f"velo/{kind}/{role}"
        for kind in ("lr_mult", "step_size")
        for role in ("attn", "bias", "kernel", "scale")
    ]
    lr = velo_scale.lr_mult(state, theta)
    np.testing.assert_allclose(
        float(got["velo/lr_mult/kernel"]), float(lr["dense"]["kernel"]), rtol=1e-6
    )
    kernel, new_kernel = params["dense"]["kernel"], new_params["dense"]["kernel"]
    want = np.sqrt(np.mean((new_kernel - kernel) ** 2)) / np.sqrt(
        np.mean(kernel**2) + 1e-9
    )
    np.testing.assert_allclose(float(got["velo/step_size/kernel"]), want, rtol=1e-4)


def test_restored_state_of_another_horizon_needs_a_continuation(theta, tx):
    """T5X restores VeLO's horizon with its state: a restart with a larger
    TRAIN_STEPS is an error unless velo_optimizer.continuation says how."""
    params = _params()
    state = tx.init(params)  # horizon NUM_STEPS
    chained = (optax.EmptyState(), state)  # as inside an optax chain
    # Same horizon (an ordinary restart, or a fresh fine-tuning state): as is.
    same = velo_t5x.check_restored_horizon(chained, NUM_STEPS)
    assert same[1] is state
    with pytest.raises(ValueError, match="silently keep the old horizon") as e:
        velo_t5x.check_restored_horizon(chained, 2 * NUM_STEPS)
    assert "continuation = 'increase'" in str(e.value)
    longer = velo_t5x.check_restored_horizon(chained, 2 * NUM_STEPS, "increase")
    assert int(longer[1].num_steps) == 2 * NUM_STEPS
    assert int(longer[1].iteration) == int(state.iteration)
    # Applied once: the next restart's state matches the new horizon.
    again = velo_t5x.check_restored_horizon(longer, 2 * NUM_STEPS, "increase")
    assert again[1] is longer[1]
    naive = velo_t5x.check_restored_horizon(chained, 2 * NUM_STEPS, "naive")
    assert int(naive[1].num_steps) == NUM_STEPS
    # Abstract states (T5X evaluates shapes) pass through.
    abstract = jax.eval_shape(lambda: state)
    assert velo_t5x.check_restored_horizon(abstract, 2 * NUM_STEPS) is abstract
    with pytest.raises(ValueError, match="extend_horizon"):
        velo_t5x.check_restored_horizon(chained, 2 * NUM_STEPS, "reset")


def test_module_imports_without_t5x():
    try:
        import t5x  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="need t5x"):
            velo_t5x.VeLOTrainer  # noqa: B018
    else:
        pytest.skip("t5x is importable here; the error path is not reachable")
    with pytest.raises(AttributeError):
        velo_t5x.NoSuchThing  # noqa: B018


# --- Pax / Praxis ----------------------------------------------------------


def _var_specs():
    return {
        "attn": pax.WeightSpec((2, 6, 4), tensor_split_dims_mapping=("data", -1, -1)),
        "dense": {
            "bias": pax.WeightSpec((8,), tensor_split_dims_mapping=("model",)),
            "kernel": pax.WeightSpec(
                (4, 8), tensor_split_dims_mapping=("data", "model")
            ),
        },
        "scale": pax.WeightSpec(()),
    }


def test_sharded_velo_matches_velo(theta, tx):
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta)
    assert {"init", "update", "init_partition_spec"} <= set(dir(sharded))
    params = _params()
    grads = _grads(params)
    state = sharded.init(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, tx.init(params))

    # Under jit (both sides jitted: eager and jitted VeLO differ in the last
    # float bits).
    got = jax.jit(lambda g, s, p, loss: sharded.update(g, s, p, loss=loss))(
        grads, state, params, 0.9
    )
    want = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))(
        grads, state, params, 0.9
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    # The learner-side hook, eagerly.
    bound = pax.bind_loss(sharded, 0.9)
    assert type(bound) is type(sharded)
    again = bound.update(grads, state, params)
    direct = tx.update(grads, state, params, loss=0.9)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, direct)


def test_init_partition_spec_matches_state_partition_specs(theta, tx):
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta)
    var_specs = _var_specs()
    state_vars = sharded.init_partition_spec(var_specs)

    params = _params()
    mesh_specs = {
        "attn": P("data", None, None),
        "dense": {"bias": P("model"), "kernel": P("data", "model")},
        "scale": P(),
    }
    want = velo_scale.state_partition_specs(tx, params, mesh_specs)
    state = jax.eval_shape(sharded.init, params)

    def is_var(x):
        return isinstance(x, pax.WeightSpec)

    got_vars, got_def = jax.tree_util.tree_flatten(state_vars, is_leaf=is_var)
    want_specs, want_def = jax.tree_util.tree_flatten(want, is_leaf=_is_spec)
    arrays, arrays_def = jax.tree_util.tree_flatten(state)
    assert got_def == want_def == arrays_def
    for var, spec, array in zip(got_vars, want_specs, arrays):
        assert tuple(var.shape) == array.shape
        assert var.dtype == array.dtype
        padded = tuple(spec) + (None,) * (array.ndim - len(tuple(spec)))
        assert var.tensor_split_dims_mapping == tuple(
            -1 if e is None else e for e in padded
        )
    # The state's sharding works on a 2x4 mesh of the 8 fake devices.
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model")
    )
    shardings = jax.tree_util.tree_map(
        lambda s: jax.sharding.NamedSharding(mesh, s), want, is_leaf=_is_spec
    )
    sharded_state = jax.jit(sharded.init, out_shardings=shardings)(params)
    assert sharded_state.momentum["dense"]["kernel"].sharding.spec == P(
        "data", "model", None
    )


def test_init_partition_spec_rejects_other_leaves(theta):
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta)
    with pytest.raises(TypeError, match="WeightHParams"):
        sharded.init_partition_spec({"w": P("model")})


def test_init_partition_spec_with_praxis(theta):
    base_layer = pytest.importorskip(
        "praxis.base_layer", reason="praxis is not installable from the registries"
    )
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta)
    var = base_layer.WeightHParams(
        shape=[4, 8], mesh_shape=[2, 4], tensor_split_dims_mapping=("data", "model")
    )
    state_vars = sharded.init_partition_spec({"w": var})
    assert state_vars.momentum["w"].tensor_split_dims_mapping == ("data", "model", -1)
    assert isinstance(state_vars.lstm_hidden, base_layer.WeightHParams)


# --- real T5X --------------------------------------------------------------


def test_t5x_optax_wrapper_derives_logical_axes_and_passes_loss(theta):
    pytest.importorskip(
        "t5x", reason="t5x needs GitHub-only packages, not installable in CI"
    )
    from t5x import optimizers

    opt_def = velo_t5x.velo_optimizer(NUM_STEPS, weights=theta)
    assert isinstance(opt_def, optimizers.OptaxWrapper)
    params = flax.core.freeze(_params())
    optimizer = opt_def.create(params)
    axes = opt_def.derive_logical_axes(
        jax.eval_shape(lambda: optimizer), flax.core.freeze(PARAM_AXES)
    )
    assert axes.state.param_states.momentum["dense"]["kernel"] == P(
        "embed", "mlp", None
    )
    assert axes.state.param_states.lstm_hidden == P()

    grads = _grads(params)
    new = optimizer.apply_gradient(grads, learning_rate=0.0, loss=jnp.float32(1.3))
    updates, _ = opt_def.optax_optimizer.update(
        grads, optimizer.state.param_states, params, loss=jnp.float32(1.3)
    )
    jax.tree_util.tree_map(
        np.testing.assert_allclose, new.target, optax.apply_updates(params, updates)
    )
    with pytest.raises(ValueError, match="VeLOTrainer"):
        optimizer.apply_gradient(grads, learning_rate=0.0)


def test_state_dict_without_none_slots_round_trips():
    # T5X's checkpointer cannot store VeLO's unused (None) slots: the wrapper
    # saves the state dict without them and restores them from the template.
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    state = velo_scale.velo(100, weights=str(CHECKPOINT)).init(params)
    state_dict = flax.serialization.to_state_dict(state)
    leaves = jax.tree_util.tree_leaves(state_dict, is_leaf=lambda x: x is None)
    assert any(x is None for x in leaves), "the case must have None slots"
    saved = velo_t5x.drop_none_leaves(state_dict)
    assert all(
        x is not None
        for x in jax.tree_util.tree_leaves(saved, is_leaf=lambda x: x is None)
    )
    restored = flax.serialization.from_state_dict(
        state, velo_t5x.restore_none_leaves(saved, state_dict)
    )
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)
    ):
        np.testing.assert_array_equal(a, b)
