"""`velo_scale.extend_horizon`: the paper's continuation methods as state
transforms (iteration, horizon, loss buffer, accumulators)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import velo_scale
from velo_scale._src import loss_features


@pytest.fixture(scope="module")
def run(theta):
    """A 10-step VeLO run stopped after 6 steps."""
    tx = velo_scale.velo(10, weights=theta)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros((4,))}
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))
    for k in range(6):
        grads = jax.tree_util.tree_map(lambda p: jnp.sin(p + k) * 0.1 + 0.01, params)
        updates, state = update(grads, state, params, 1.0 / (k + 1))
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    return tx, params, state


def _same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_naive_changes_nothing(run):
    _, _, state = run
    _same(velo_scale.extend_horizon(state, 20, "naive"), state)


def test_increase_keeps_iteration_and_sets_the_new_horizon(run):
    _, _, state = run
    new = velo_scale.extend_horizon(state, 20, "increase")
    assert int(new.iteration) == 6 and int(new.num_steps) == 20
    np.testing.assert_array_equal(
        np.asarray(new.loss_buffer.decays), loss_features.compiled_decays(20)
    )
    _same(new.loss_buffer.means, state.loss_buffer.means)
    _same(new.loss_buffer.running_min, state.loss_buffer.running_min)
    _same((new.momentum, new.rms, new.factored), (state.momentum, state.rms, state.factored))
    _same((new.lstm_hidden, new.lstm_cell), (state.lstm_hidden, state.lstm_cell))


def test_reset_restarts_the_horizon_for_the_remaining_steps(run):
    _, _, state = run
    new = velo_scale.extend_horizon(state, 20, "reset")
    assert int(new.iteration) == 0 and int(new.num_steps) == 14
    fresh = loss_features.init(loss_features.compiled_decays(14))
    _same(new.loss_buffer, fresh)
    _same((new.momentum, new.rms, new.factored), (state.momentum, state.rms, state.factored))
    _same((new.lstm_hidden, new.lstm_cell), (state.lstm_hidden, state.lstm_cell))


def test_increase_changes_the_fraction_of_training_velo_sees(run, theta):
    tx, params, state = run
    grads = jax.tree_util.tree_map(lambda p: p * 0.1, params)
    step = lambda s: velo_scale.velo_step(  # noqa: E731
        jax.tree_util.tree_map(jnp.asarray, theta), s, grads, params, jnp.float32(0.1)
    )[2]
    assert float(step(state).fraction_trained) == pytest.approx(0.6)
    increased = velo_scale.extend_horizon(state, 20, "increase")
    assert float(step(increased).fraction_trained) == pytest.approx(0.3)
    # The continued state runs under the same transformation.
    updates, _ = tx.update(grads, increased, params, loss=0.1)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


@pytest.mark.parametrize("method", ["increase", "reset"])
def test_horizon_must_exceed_the_steps_taken(run, method):
    _, _, state = run
    with pytest.raises(ValueError, match="must exceed the 6 steps"):
        velo_scale.extend_horizon(state, 6, method)


def test_unknown_method(run):
    with pytest.raises(ValueError, match="naive.*increase.*reset"):
        velo_scale.extend_horizon(run[2], 20, "double")


def test_accumulation_cannot_be_switched_mid_run(run):
    with pytest.raises(ValueError, match="gradient accumulation cannot be switched"):
        velo_scale.extend_horizon(run[2], 400, "increase", max_training_steps=100)


def test_accumulated_horizon_is_in_velo_steps(theta):
    tx = velo_scale.velo(300, weights=theta, max_training_steps=100)  # k = 3
    state = tx.init({"w": jnp.ones((2, 2))})
    assert int(state.num_steps) == 100
    new = velo_scale.extend_horizon(state, 600, "increase", max_training_steps=100)
    assert int(new.num_steps) == 100  # k = 6: 600 calls are 100 VeLO steps
    new = velo_scale.extend_horizon(state, 450, "increase", max_training_steps=100)
    assert int(new.num_steps) == 90  # k = 5, 450 // 5


# --- the trainer's train.continuation --------------------------------------------


def _train_velo(workdir, num_steps, reference_dir, **kw):
    from velo_scale.models import MLP
    from velo_scale.train import optimizers, train

    weights = str(reference_dir / "theta_perturbed.msgpack")
    return train(
        model=MLP(hidden=(16,)),
        optimizer=lambda num_steps: optimizers.velo(num_steps, weights=weights),
        num_steps=num_steps,
        data="digits",
        batch_size=32,
        mesh_shape=(1, 1),
        workdir=workdir,
        progress=False,
        **kw,
    )


def _velo_state(result):
    return result.state.opt_state


def test_trainer_continuation(tmp_path, reference_dir):
    from velo_scale.train import ConfigMismatchError
    from velo_scale.train import run_config

    first = _train_velo(tmp_path / "inc", 4, reference_dir)
    assert int(_velo_state(first).num_steps) == 4
    # An unannounced horizon change is an error naming the three methods.
    with pytest.raises(ConfigMismatchError, match="'naive' \\| 'increase' \\| 'reset'"):
        _train_velo(tmp_path / "inc", 8, reference_dir)
    with pytest.raises(ValueError, match="train.continuation must be one of"):
        _train_velo(tmp_path / "inc", 8, reference_dir, continuation="double")
    out = _train_velo(tmp_path / "inc", 8, reference_dir, continuation="increase")
    state = _velo_state(out)
    assert int(out.state.step) == 8
    assert int(state.num_steps) == 8 and int(state.iteration) == 8
    assert run_config.read_continuations(tmp_path / "inc") == [
        {"at_step": 4, "num_steps": 8, "method": "increase"}
    ]
    # Re-running the continued run is complete; the continuation is not redone.
    again = _train_velo(tmp_path / "inc", 8, reference_dir, continuation="increase")
    assert int(again.state.step) == 8
    assert len(run_config.read_continuations(tmp_path / "inc")) == 1

    _train_velo(tmp_path / "reset", 4, reference_dir)
    out = _train_velo(tmp_path / "reset", 10, reference_dir, continuation="reset")
    state = _velo_state(out)
    # 6 remaining steps, all taken after the reset.
    assert int(state.num_steps) == 6 and int(state.iteration) == 6

    _train_velo(tmp_path / "naive", 4, reference_dir)
    out = _train_velo(tmp_path / "naive", 6, reference_dir, continuation="naive")
    state = _velo_state(out)
    assert int(state.num_steps) == 4 and int(state.iteration) == 6
