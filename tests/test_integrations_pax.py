"""velo_scale.integrations.pax without praxis: the loss hook, MaskedNode slots,
repeated-layer specs. (The same against real praxis/paxml: tests/pax, run by
.ci/pax_lane.sh.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import velo_scale
from velo_scale.integrations import pax

NUM_STEPS = 100


def _params():
    return {
        "dense": {"kernel": jnp.ones((4, 8)) * 0.1, "bias": jnp.zeros((8,))},
        "scale": jnp.ones(()),
    }


def _grads(params, seed=0):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape) * 0.1 for k, x in zip(keys, leaves)]
    )


def _chain_like_praxis(tx):
    """What praxis' sharded_chain does to a state: None -> MaskedNode."""

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return updates, pax.mask_empty_slots(state)

    return pax.ShardedGradientTransformation(
        init=tx.init, update=update, init_partition_spec=tx.init_partition_spec
    )


def test_training_loss_reaches_update_and_matches_explicit_loss(theta):
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta)
    params, grads = _params(), _grads(_params())
    state = sharded.init(params)
    want = jax.jit(lambda g, s, p: sharded.update(g, s, p, loss=0.7))(
        grads, state, params
    )

    def step(g, s, p, loss):
        with pax.training_loss(loss):
            return sharded.update(g, s, p)

    got = jax.jit(step)(grads, state, params, 0.7)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    assert pax.current_training_loss() is None


def test_update_without_any_loss_names_the_hooks(theta):
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta)
    params = _params()
    with pytest.raises(ValueError, match="VeLOLearner"):
        sharded.update(_grads(params), sharded.init(params), params)


def test_training_loss_nests_innermost_wins():
    with pax.training_loss(1.0):
        with pax.training_loss(2.0):
            assert pax.current_training_loss() == 2.0
        assert pax.current_training_loss() == 1.0


def test_masked_empty_slots_keep_one_structure_through_a_praxis_like_chain(theta):
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta, masked_empty_slots=True)
    params = _params()
    state0 = sharded.init(params)
    # The factored slots of vectors/scalars and `accumulation` are MaskedNode.
    assert isinstance(state0.factored.v_row["dense"]["bias"], optax.MaskedNode)
    assert isinstance(state0.accumulation, optax.MaskedNode)
    chained = _chain_like_praxis(sharded)
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(1)
        with pax.training_loss(1.0):
            return chained.update(g, s, p)

    state = state0
    for seed in range(3):
        _, state = step(_grads(params, seed), state, params)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(state0)
    assert len(traces) == 1

    # Same numbers as plain VeLO (None slots), step by step.
    tx = velo_scale.velo(NUM_STEPS, weights=theta)
    ref = tx.init(params)
    for seed in range(3):
        _, ref = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=1.0))(
            _grads(params, seed), ref, params
        )
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(a, b)


def test_update_accepts_a_state_whose_none_slots_became_masked_nodes(theta):
    # Without masked_empty_slots, a praxis chain hands back MaskedNode where
    # VeLO had None (the 'MaskedNode' object has no attribute 'astype' crash).
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta)
    params = _params()
    state = pax.mask_empty_slots(sharded.init(params))
    updates, new_state = sharded.update(_grads(params), state, params, loss=1.0)
    assert new_state.accumulation is None  # VeLO's own form again
    with pytest.raises(ValueError, match="arrays"):
        sharded.update(_grads(params), state.momentum, params, loss=1.0)


def _all_repeated_specs():
    return {
        "layers": {
            "w": pax.WeightSpec(
                (4, 8),
                tensor_split_dims_mapping=("data", "model"),
                repeat_prefix=(3,),
                repeat_prefix_split_dims_mapping=(-1,),
            ),
            "b": pax.WeightSpec(
                (8,), tensor_split_dims_mapping=("model",), repeat_prefix=(3,)
            ),
        }
    }


def test_specs_of_repeated_variables_cover_the_prefix(theta):
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta)
    state_vars = sharded.init_partition_spec(_all_repeated_specs())
    w = state_vars.momentum["layers"]["w"]
    assert tuple(w.shape) == (3, 4, 8, 3)
    assert tuple(w.tensor_split_dims_mapping) == (-1, "data", "model", -1)
    assert w.repeat_prefix is None
    params = {"layers": {"w": jnp.zeros((3, 4, 8)), "b": jnp.zeros((3, 8))}}
    state = jax.eval_shape(sharded.init, params)
    is_var = lambda x: isinstance(x, pax.WeightSpec)  # noqa: E731
    assert jax.tree_util.tree_structure(
        state_vars, is_leaf=is_var
    ) == jax.tree_util.tree_structure(state)


def test_specs_of_a_group_without_variables(theta):
    # praxis' repeat-prefix grouping hands each group the whole tree with
    # MaskedNode for other groups' variables; a model made only of repeated
    # layers leaves the 'no_prefix' group with no variable at all.
    sharded = pax.sharded_velo(NUM_STEPS, weights=theta, masked_empty_slots=True)
    empty = {"layers": {"w": optax.MaskedNode(), "b": optax.MaskedNode()}}
    state_vars = sharded.init_partition_spec(empty)
    state = sharded.init(empty)
    is_var = lambda x: isinstance(x, pax.WeightSpec)  # noqa: E731
    assert jax.tree_util.tree_structure(
        state_vars, is_leaf=is_var
    ) == jax.tree_util.tree_structure(state)
    assert tuple(state_vars.lstm_hidden.shape) == state.lstm_hidden.shape
    # and the update of that empty group runs
    with pax.training_loss(1.0):
        updates, new_state = sharded.update(empty, state, empty)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(
        state
    )
