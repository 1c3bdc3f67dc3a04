"""The held-out (VeLOdrome-style) evaluation: metric, grid, suite, CLI."""

import math

import numpy as np
import pytest

from velo_scale.meta import evaluation as ev


def test_lr_grid_is_15_log_spaced_points():
    grid = ev.lr_grid(1e-5, 1e-1, 15)
    assert len(grid) == 15
    assert grid[0] == pytest.approx(1e-5) and grid[-1] == pytest.approx(1e-1)
    ratios = np.diff(np.log10(grid))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    assert ratios[0] == pytest.approx(4 / 14)


def test_heldout_gin_uses_15_point_grid_and_8_plus_tasks():
    text = open("gin_configs/eval/heldout.gin").read()
    assert "run_suite.lr_num = 15" in text
    assert len(ev.HELDOUT_TASKS) >= 8
    for name in ev.HELDOUT_TASKS:
        assert f"'{name}'" in text


def test_smooth_is_trailing_mean_skipping_nonfinite():
    s = ev.smooth([4.0, 2.0, math.nan, 0.0], window=2)
    np.testing.assert_allclose(s, [4.0, 3.0, 2.0, 0.0])
    assert np.isnan(ev.smooth([math.nan], 3)[0])


def test_steps_to_reach_hand_made_curves():
    steps = list(range(1, 11))
    baseline = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1.0]
    fast = [10, 5, 2, 1, 1, 1, 1, 1, 1, 1.0]
    slow = [10, 10, 10, 10, 10, 10, 10, 10, 10, 9.0]
    target = ev.final_loss(steps, baseline, window=1)
    assert target == 1.0
    assert ev.steps_to_reach(steps, baseline, target, window=1) == 10
    assert ev.steps_to_reach(steps, fast, target, window=1) == 4
    assert ev.steps_to_reach(steps, slow, target, window=1) == ev.NEVER
    assert ev.speedup(10, 4) == 2.5
    assert ev.speedup(10, ev.NEVER) == ev.NEVER
    # With smoothing the noisy dip at step 3 does not count as reaching it.
    noisy = [10, 10, 0.5, 10, 10, 1, 1, 1, 1, 1.0]
    assert ev.steps_to_reach(steps, noisy, 1.0, window=1) == 3
    assert ev.steps_to_reach(steps, noisy, 1.0, window=3) == 8
    # Only steps with a full window count: a lucky first batch is not enough.
    assert ev.steps_to_reach(steps, [0.5] + [10.0] * 9, 1.0, window=3) == ev.NEVER
    assert ev.steps_to_reach([1, 2], [5.0, 0.5], 3.0, window=3) == 2
    # A run that diverged from the start never reaches anything.
    assert ev.final_loss(steps, [math.nan] * 10, 3) == math.inf
    assert ev.steps_to_reach(steps, [math.nan] * 10, 1.0, 3) == ev.NEVER
    assert ev.steps_to_reach(steps, baseline, math.inf, 3) == ev.NEVER


def test_adamw_grid_point_matches_adamw():
    import jax
    import jax.numpy as jnp
    import optax

    from velo_scale.train import optimizers

    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    a = optimizers.adamw(20, learning_rate=3e-3).tx
    b = ev.adamw_grid_point(20, learning_rate=3e-3).tx
    sa, sb, pa, pb = a.init(params), b.init(params), params, params
    for i in range(20):
        g = jax.tree_util.tree_map(lambda x: jnp.sin(x + i), pa)
        u, sa = a.update(g, sa, pa)
        pa = optax.apply_updates(pa, u)
        g = jax.tree_util.tree_map(lambda x: jnp.sin(x + i), pb)
        u, sb = b.update(g, sb, pb)
        pb = optax.apply_updates(pb, u)
    for k in params:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-6)


def test_report_from_hand_made_runs(tmp_path):
    steps = list(range(1, 11))
    task = ev.HELDOUT_TASKS["mlp_deep_digits"]

    def run(opt, lr, losses, err=None):
        return ev.RunRecord(opt, lr, steps[: len(losses)], losses, {}, 0.0, err)

    adamw = [
        run("adamw", 1e-3, [10, 9, 8, 7, 6, 5, 4, 3, 2, 1.0]),
        run("adamw", 1e-1, [10, math.nan], "diverged"),
    ]
    velo = run("velo", None, [10, 5, 2, 1, 1, 1, 1, 1, 1, 1.0])
    nadamw = run("nadamw", 2e-3, [10.0] * 10)
    result = ev.TaskResult(task, adamw, nadamw, velo, window=1)
    s = result.summary()
    assert s["best_lr"] == 1e-3 and s["adamw_steps"] == 10
    assert s["velo_steps"] == 4 and s["velo_speedup"] == 2.5
    assert s["nadamw_steps"] == ev.NEVER
    out = tmp_path / "EVAL.md"
    ev.write_report([result], out, weights_desc="test", settings={"seed": 0})
    text = out.read_text()
    assert "| mlp_deep_digits |" in text and "2.50x" in text and "never" in text
    assert (tmp_path / "EVAL_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path):
    from velo_scale import cli

    out = tmp_path / "EVAL.md"
    rc = cli.main(
        ["eval", "--gin_file", "gin_configs/eval/quick.gin", "--weights", "auto",
         "--out", str(out), "--workdir", str(tmp_path / "runs")]
    )  # fmt: skip
    assert rc == 0
    text = out.read_text()
    assert "| mlp_deep_digits |" in text and "| mlp_adult |" in text
    assert "project weights" in text and "failed" not in text
    assert (tmp_path / "EVAL_curves.png").exists()
    # Every run left a record (a rerun resumes from them).
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 2 * (2 + 2)


def test_weights_digest_keys_velo_records_by_weights(tmp_path, monkeypatch):
    """'auto' and the file it resolves to share a digest; other weights get
    another, so a cached VeLO record is never reused for new weights."""
    import jax

    import velo_scale
    from velo_scale._src import weights as weights_lib
    from velo_scale.train import optimizers

    # No official file: 'auto' resolves to the packaged project weights.
    monkeypatch.delenv(weights_lib.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(optimizers.PROJECT_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(weights_lib, "default_cache_path", lambda: tmp_path / "none")
    packaged = optimizers.packaged_project_weights()
    assert ev.weights_digest("auto") == ev.weights_digest(str(packaged))
    other = tmp_path / "params"
    theta = velo_scale.init_weights(
        jax.random.PRNGKey(0), lstm_hidden_size=8, param_inits=4
    )
    velo_scale.save_weights(other, theta)
    assert ev.weights_digest(str(other)) != ev.weights_digest("auto")
    assert len(ev.weights_digest(str(other))) == 12
