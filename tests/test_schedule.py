"""VeLO's implicit schedule: per-tensor `lr_mult` read back from the state
equals the one the step used, the effective step size, roles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import velo_scale
from velo_scale._src import schedule
from velo_scale._src.velo import init_state, velo_step


def _params():
    return {
        "Dense_0": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
                    "bias": jnp.zeros((4,))},
        "Dense_1": {"kernel": jnp.linspace(0.5, -0.5, 8).reshape(4, 2),
                    "bias": jnp.full((2,), 0.1)},
        "count": jnp.zeros((), jnp.int32),  # not trained
    }  # fmt: skip


def _grads(params, k):
    return jax.tree_util.tree_map(
        lambda p: jnp.sin(jnp.asarray(p, jnp.float32) + k) * 0.1, params
    )


def test_lr_mult_from_the_state_is_the_one_the_step_used(theta):
    params = _params()
    state = init_state(theta, params, 10)
    for k in range(3):
        updates, state, inter = velo_step(
            theta, state, _grads(params, k), params, jnp.float32(1.0 / (k + 1))
        )
        params = jax.tree_util.tree_map(
            lambda p, u: p + u.astype(p.dtype), params, updates
        )
        got = velo_scale.lr_mult(state, theta)
        assert got["count"] is None
        rows = jax.tree_util.tree_leaves(got)  # tree order = LSTM row order
        np.testing.assert_array_equal(np.stack(rows), np.asarray(inter.lr_mult))
    # The values move with the LSTM state: not a constant read-out.
    fresh = np.stack(
        jax.tree_util.tree_leaves(
            velo_scale.lr_mult(init_state(theta, params, 10), theta)
        )
    )
    assert not np.allclose(fresh, np.stack(rows))


def test_lr_mult_needs_a_velo_state(theta):
    with pytest.raises(TypeError, match="VeLOState"):
        velo_scale.lr_mult(optax.adam(1e-3).init(_params()), theta)


def test_effective_step_size_is_rms_ratio_per_tensor():
    params = _params()
    updates = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.01, params)
    got = velo_scale.effective_step_size(updates, params)
    assert got["count"] is None
    p = np.asarray(params["Dense_0"]["kernel"], np.float64)
    expected = 0.01 / np.sqrt(np.mean(p**2) + 1e-9)
    np.testing.assert_allclose(float(got["Dense_0"]["kernel"]), expected, rtol=1e-6)
    # A zero bias: VeLO's own parameter scale keeps the ratio finite.
    np.testing.assert_allclose(
        float(got["Dense_0"]["bias"]), 0.01 / np.sqrt(1e-9), rtol=1e-5
    )


@pytest.mark.parametrize(
    "path, expected",
    [
        ("['params']['Dense_0']['kernel']", "kernel"),
        ("['encoder']['layers_3']['attention']['query']['kernel']", "kernel"),
        (".bias", "bias"),
        ("[0]['scale']", "scale"),
        ("[2][1]", "param"),
    ],
)
def test_role_is_the_last_name_of_the_path(path, expected):
    assert schedule.role(path) == expected


def test_schedule_metrics_average_by_role_inside_a_chain(theta):
    params = _params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), velo_scale.velo(10, weights=theta))
    state = tx.init(params)
    grads = _grads(params, 0)
    updates, state = tx.update(grads, state, params, loss=jnp.float32(1.0))
    metrics = velo_scale.schedule_metrics(updates, params, state, theta)
    assert sorted(metrics) == [
        "lr_mult/bias", "lr_mult/kernel", "step_size/bias", "step_size/kernel"
    ]  # fmt: skip
    (velo_state,) = schedule.find_velo_states(state)
    lr = velo_scale.lr_mult(velo_state, theta)
    np.testing.assert_allclose(
        float(metrics["lr_mult/kernel"]),
        (float(lr["Dense_0"]["kernel"]) + float(lr["Dense_1"]["kernel"])) / 2,
        rtol=1e-6,
    )
    steps = velo_scale.effective_step_size(updates, params)
    np.testing.assert_allclose(
        float(metrics["step_size/bias"]),
        (float(steps["Dense_0"]["bias"]) + float(steps["Dense_1"]["bias"])) / 2,
        rtol=1e-6,
    )
    # Without weights (or for another optimizer) only the step sizes remain.
    assert sorted(velo_scale.schedule_metrics(updates, params, state)) == [
        "step_size/bias", "step_size/kernel"
    ]  # fmt: skip


def test_schedule_metrics_trace_under_jit(theta):
    params = _params()
    tx = velo_scale.velo(10, weights=theta)
    state = tx.init(params)

    @jax.jit
    def step(state, params):
        updates, state = tx.update(
            _grads(params, 0), state, params, loss=jnp.float32(1.0)
        )
        return velo_scale.schedule_metrics(updates, params, state, theta)

    metrics = step(state, params)
    assert all(np.isfinite(float(v)) for v in metrics.values())


# ---------------------------------------------------------------------------
# In the trainer: metrics.jsonl (by role), schedule.jsonl (per tensor), plot.
# ---------------------------------------------------------------------------


def _train_digits(workdir, optimizer, **kw):
    from velo_scale.models import MLP
    from velo_scale.train import train

    args = dict(
        model=MLP(hidden=(16,)), optimizer=optimizer, num_steps=6, data="digits",
        batch_size=32, mesh_shape=(1, 1), workdir=workdir, progress=False,
    )  # fmt: skip
    return train(**{**args, **kw})


def _rows(workdir, filename):
    from velo_scale.train.metrics import read_metrics

    return [r for r in read_metrics(workdir, filename) if r["split"] == "train"]


def test_trainer_logs_velo_schedule_per_tensor_and_by_role(tmp_path, theta):
    from velo_scale.train import optimizers

    result = _train_digits(
        tmp_path, lambda num_steps: optimizers.velo(num_steps, weights=theta)
    )
    metrics = _rows(tmp_path, "metrics.jsonl")
    tensors = _rows(tmp_path, "schedule.jsonl")
    assert (
        [r["step"] for r in tensors]
        == [r["step"] for r in metrics]
        == list(range(1, 7))
    )
    names = {
        "['dense0']['kernel']",
        "['dense0']['bias']",
        "['head']['kernel']",
        "['head']['bias']",
    }
    for kind in ("lr_mult", "step_size"):
        assert {
            k.split(":", 1)[1] for k in tensors[0] if k.startswith(kind + ":")
        } == names
    for m, t in zip(metrics, tensors):
        for kind in ("lr_mult", "step_size"):
            for r in ("kernel", "bias"):
                mean = np.mean(
                    [t[f"{kind}:['{n}']['{r}']"] for n in ("dense0", "head")]
                )
                np.testing.assert_allclose(m[f"{kind}/{r}"], mean, rtol=1e-5)
    # The last row's lr_mult is the one the final state holds.
    (state,) = schedule.find_velo_states(result.state.opt_state)
    lr = velo_scale.lr_mult(state, theta)
    np.testing.assert_allclose(
        tensors[-1]["lr_mult:['head']['kernel']"],
        float(lr["head"]["kernel"]),
        rtol=1e-6,
    )
    assert all(t["step_size:['head']['kernel']"] > 0 for t in tensors)


def test_trainer_logs_step_sizes_for_adamw_and_zero_for_a_skipped_step(tmp_path):
    from velo_scale.data import load_dataset
    from velo_scale.train import optimizers

    data = dict(load_dataset("digits", "train"))
    data["image"] = np.array(data["image"], np.float32)
    data["image"][:] = np.nan  # every step is skipped (loss NaN)
    from velo_scale.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="consecutive"):
        _train_digits(
            tmp_path / "nan", optimizers.adamw, data=data, max_nonfinite_steps=2
        )
    skipped = _rows(tmp_path / "nan", "schedule.jsonl")
    assert skipped and all(v == 0 for r in skipped for k, v in r.items() if ":" in k)

    _train_digits(tmp_path / "adamw", optimizers.adamw)
    rows = _rows(tmp_path / "adamw", "metrics.jsonl")
    assert "step_size/kernel" in rows[0] and "lr_mult/kernel" not in rows[0]
    # AdamW's warm-up from 0 and cosine decay to 0 show in its step sizes.
    sizes = [r["step_size/kernel"] for r in rows]
    assert sizes[0] == 0 < sizes[-1] < max(sizes) == sizes[1]


def test_trainer_log_schedule_off_writes_no_schedule(tmp_path):
    from velo_scale.train import optimizers

    _train_digits(tmp_path, optimizers.adamw, log_schedule=False)
    assert not (tmp_path / "schedule.jsonl").exists()
    assert "step_size/kernel" not in _rows(tmp_path, "metrics.jsonl")[0]


def test_cli_plot_schedule(tmp_path, theta, capsys):
    from velo_scale import cli
    from velo_scale.train import optimizers

    _train_digits(
        tmp_path / "velo", lambda num_steps: optimizers.velo(num_steps, weights=theta)
    )
    _train_digits(tmp_path / "adamw", optimizers.adamw)
    out = tmp_path / "s.png"
    assert (
        cli.main(
            [
                "plot",
                "--schedule",
                str(tmp_path / "velo"),
                str(tmp_path / "adamw"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    # A workdir without schedule.jsonl: a clear error, exit 2.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert cli.main(["plot", "--schedule", str(tmp_path / "old")]) == 2
    assert "schedule.jsonl" in capsys.readouterr().err
