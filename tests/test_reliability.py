"""Nothing lost, nothing silently wrong (issue 14): each fault as a test.

Trainer level: non-finite updates and state are never committed or
checkpointed, one run per workdir (lock, stale lock taken over), checkpoints
verified by checksums with fallback to the newest intact one, SIGTERM writes a
checkpoint and resumes bit-identically, kill -9 at random points resumes
bit-identically, a changed config is an error, a finished run says so.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# =============================================================================
# Trainer level (velo_scale.train): helpers are prefixed `_tr_`.
# =============================================================================

# One tiny run, driven through the CLI in subprocesses: AdamW on digits, one
# device, a checkpoint every step (which also slows the loop down enough to
# signal it mid-run). `_TR_STOP` is where every compared run ends.
_TR_NUM_STEPS = 1000
_TR_STOP = 25


def _tr_cli_args(workdir, stop_after=_TR_STOP):
    return [
        sys.executable, "-m", "velo_scale", "train",
        "--gin_file", "recipes/digits_mlp.gin",
        "--gin_file", "gin_configs/optimizers/adamw.gin",
        "--gin_param", "MLP.hidden=(16,)",
        "--gin_param", f"train.num_steps={_TR_NUM_STEPS}",
        "--gin_param", f"train.stop_after={stop_after}",
        "--gin_param", "train.checkpoint_every=1",
        "--gin_param", "train.eval_every=None",
        "--gin_param", "train.mesh_shape=(1, 1)",
        "--gin_param", "train.progress=False",
        "--workdir", str(workdir),
    ]  # fmt: skip


def _tr_env():
    return dict(os.environ, PYTHONPATH=str(REPO))


def _tr_run(workdir, stop_after=_TR_STOP):
    out = subprocess.run(
        _tr_cli_args(workdir, stop_after), cwd=REPO, env=_tr_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _tr_popen(workdir, log, stop_after=_TR_STOP):
    return subprocess.Popen(
        _tr_cli_args(workdir, stop_after), cwd=REPO, env=_tr_env(), stdout=log,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _tr_train_rows(workdir) -> int:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"split": "train"' in line for line in path.read_text().splitlines())


def _tr_wait(proc, condition, timeout=300):
    """Waits until `condition()` holds while `proc` runs."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before it was interrupted"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _tr_final(workdir):
    """(step, leaves) of the newest checkpoint, read with plain orbax."""
    manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints")
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def _tr_assert_identical(a, b):
    assert len(a) == len(b) > 5
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _tr_all_steps_verify(workdir):
    from velo_scale.train import manifest

    ckpts = pathlib.Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps
    for s in steps:
        assert manifest.verify_manifest(ckpts / str(s)) is None, s
    return steps


@pytest.fixture(scope="module")
def tr_straight(tmp_path_factory):
    """The uninterrupted run to `_TR_STOP`: (step, leaves)."""
    workdir = tmp_path_factory.mktemp("straight")
    _tr_run(workdir)
    return _tr_final(workdir)


# In-process runs: an MLP on digits, one device.
def _tr_train(workdir, **kw):
    from velo_scale.models import MLP
    from velo_scale.train import optimizers, train

    args = dict(
        model=MLP(hidden=(16,)),
        optimizer=optimizers.adamw,
        num_steps=6,
        data="digits",
        batch_size=32,
        mesh_shape=(1, 1),
        workdir=workdir,
        progress=False,
    )
    args.update(kw)
    return train(**args)


def _tr_optimizer(tx, name):
    from velo_scale.train.optimizers import Optimizer

    return lambda num_steps: Optimizer(tx, False, name)


def _tr_nan_at(step, *, where):
    """SGD whose update (where="update") or state (where="state") turns
    non-finite on its `step`-th call (0-based), and stays so while skipped."""

    def init(params):
        return {
            "count": jnp.zeros((), jnp.int32),
            "acc": jax.tree_util.tree_map(jnp.zeros_like, params),
        }

    def update(updates, state, params=None):
        bad = state["count"] == step
        poison = jnp.where(bad, jnp.nan, 0.0)
        acc = jax.tree_util.tree_map(
            lambda a, u: a + u + (poison if where == "state" else 0.0),
            state["acc"],
            updates,
        )
        updates = jax.tree_util.tree_map(
            lambda u: -0.1 * u + (poison if where == "update" else 0.0), updates
        )
        return updates, {"count": state["count"] + 1, "acc": acc}

    return optax.GradientTransformation(init, update)


def _tr_restore_all(workdir):
    ckpts = pathlib.Path(workdir) / "checkpoints"
    manager = ocp.CheckpointManager(ckpts)
    out = {
        s: manager.restore(s, args=ocp.args.StandardRestore())
        for s in manager.all_steps()
    }
    manager.close()
    return out


@pytest.mark.parametrize("where", ["update", "state"])
def test_trainer_nonfinite_update_or_state_is_never_committed(tmp_path, where):
    """A NaN update (or optimizer state) with finite loss and gradients is
    skipped like a NaN loss: no NaN params or state in memory or in any
    checkpoint, and the stop message names the last (finite) checkpoint."""
    from velo_scale.train import NonFiniteLossError

    opt = _tr_optimizer(_tr_nan_at(2, where=where), f"nan_{where}")
    with pytest.raises(NonFiniteLossError, match="last checkpoint, step 4") as e:
        _tr_train(
            tmp_path, optimizer=opt, num_steps=20, checkpoint_every=1,
            keep_checkpoints=10, max_nonfinite_steps=3,
        )  # fmt: skip
    assert "consecutive steps (up to step 5)" in str(e.value)
    states = _tr_restore_all(tmp_path)
    assert sorted(states) == [1, 2, 3, 4]
    for step, state in states.items():
        for leaf in jax.tree_util.tree_leaves(state):
            assert np.isfinite(np.asarray(leaf, np.float64)).all(), step
    # Steps 3 and 4 were skipped: params and optimizer state as after step 2.
    for s in (3, 4):
        for key in ("params", "opt_state"):
            _tr_assert_identical_tree(states[2][key], states[s][key])
        assert int(states[s]["nonfinite_total"]) == s - 2
    _tr_all_steps_verify(tmp_path)


def _tr_assert_identical_tree(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_trainer_nan_loss_at_one_step_is_skipped_and_the_run_goes_on(tmp_path):
    """A workload whose loss is NaN at step 3 (its whole batch poisoned):
    step 3 is skipped, the run finishes, every checkpoint is finite and
    verified, step 3's checkpoint equals step 2's in params and state."""
    from velo_scale.data import BatchIterator, load_dataset

    data = dict(load_dataset("digits", "train"))
    data["image"] = np.array(data["image"], np.float32)
    n = len(data["image"])
    data["image"].reshape(n, -1)[:, 0] = np.arange(n)  # tag each example
    it = BatchIterator(data, 32, seed=0)
    for _ in range(3):
        batch = next(it)
    poisoned = batch["image"].reshape(32, -1)[:, 0].astype(int)
    data["image"][poisoned] = np.nan
    result = _tr_train(
        tmp_path, data=data, eval_data=None, num_steps=6, checkpoint_every=1,
        keep_checkpoints=10,
    )  # fmt: skip
    rows = [
        json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["skipped"] for r in rows if r["split"] == "train"] == [0, 0, 1, 0, 0, 0]
    assert int(result.state.nonfinite_total) == 1
    states = _tr_restore_all(tmp_path)
    _tr_assert_identical_tree(states[2]["params"], states[3]["params"])
    _tr_assert_identical_tree(states[2]["opt_state"], states[3]["opt_state"])
    assert _tr_all_steps_verify(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_trainer_second_run_on_a_workdir_is_refused_and_a_stale_lock_taken_over(
    tmp_path,
):
    """While a run trains, a second one on its workdir refuses, naming it (pid,
    host, start time). After kill -9 the next run takes the stale lock over
    with a warning and resumes."""
    from velo_scale.train.lock import WorkdirLockedError

    workdir = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        # No stop_after: the run must still hold its lock when it is killed (a
        # run that ends releases the lock cleanly, leaving nothing stale).
        proc = _tr_popen(workdir, log, stop_after=_TR_NUM_STEPS)
        try:
            _tr_wait(proc, lambda: _tr_train_rows(workdir) >= 2)
            info = json.loads((workdir / "run.lock.json").read_text())
            assert info["pid"] == proc.pid
            with pytest.raises(WorkdirLockedError) as e:
                _tr_train_like_cli(workdir)
            assert f"pid {proc.pid}" in str(e.value)
            assert info["host"] in str(e.value) and info["started"] in str(e.value)
            # The CLI says the same and exits 2.
            out = subprocess.run(
                _tr_cli_args(workdir), cwd=REPO, env=_tr_env(),
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert out.returncode == 2 and f"pid {proc.pid}" in out.stderr
            assert proc.poll() is None, "the run ended before it was killed"
        finally:
            proc.kill()
            proc.wait()
    rows_before = _tr_train_rows(workdir)
    with pytest.warns(RuntimeWarning, match=f"lock left by pid {proc.pid}"):
        _tr_train_like_cli(workdir, stop_after=rows_before + 1)
    assert not (workdir / "run.lock.json").exists()  # released at the end


def _tr_train_like_cli(workdir, stop_after=_TR_STOP):
    """The run of `_tr_cli_args`, in this process (errors raised, not printed)."""
    import gin

    from velo_scale import cli

    args = _tr_cli_args(workdir, stop_after)[4:]
    files = [v for k, v in zip(args, args[1:]) if k == "--gin_file"]
    params = [v for k, v in zip(args, args[1:]) if k == "--gin_param"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cli.parse_gin(files, params)
        return gin.get_configurable("train")(
            workdir=str(workdir), config={"gin": gin.config_str()}
        )
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    "signum",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"],
)
def test_trainer_signal_checkpoints_the_step_and_resumes_bit_identically(
    tmp_path, tr_straight, signum
):
    """SIGTERM (preemption) or SIGINT mid-run: the step in progress finishes
    and is checkpointed, the CLI exits 128 + signum, and the resumed run ends
    bit-identical to one never interrupted."""
    workdir = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        proc = _tr_popen(workdir, log)
        try:
            _tr_wait(proc, lambda: _tr_train_rows(workdir) >= 3)
            proc.send_signal(signum)
            proc.wait(timeout=300)
        finally:
            proc.kill()
    text = (tmp_path / "log").read_text()
    assert proc.returncode == 128 + signum, text[-3000:]
    m = re.search(
        rf"stopped by {signal.Signals(signum).name} after step (\d+): checkpoint step (\d+) is on disk",
        text,
    )
    assert m and m[1] == m[2], text[-3000:]
    step = int(m[1])
    assert 3 <= step < _TR_STOP
    assert _tr_final(workdir)[0] == step
    assert _tr_all_steps_verify(workdir)[-1] == step
    assert not (workdir / "run.lock.json").exists()
    _tr_run(workdir)
    final_step, leaves = _tr_final(workdir)
    assert final_step == tr_straight[0] == _TR_STOP
    _tr_assert_identical(leaves, tr_straight[1])


def _tr_kill_and_resume(tmp_path, tr_straight, kill_points):
    """kill -9 the run after each number of metric rows in `kill_points`
    (counted from its start), resuming in between; returns the resumed runs'
    outputs."""
    workdir = tmp_path / "run"
    for i, rows in enumerate(kill_points):
        with open(tmp_path / f"log{i}", "w") as log:
            proc = _tr_popen(workdir, log)
            start = _tr_train_rows(workdir)
            try:
                _tr_wait(proc, lambda: _tr_train_rows(workdir) >= start + rows)
            finally:
                proc.kill()
                proc.wait()
    out = _tr_run(workdir)
    final_step, leaves = _tr_final(workdir)
    assert final_step == _TR_STOP
    _tr_assert_identical(leaves, tr_straight[1])
    return out


def test_trainer_kill_9_resumes_bit_identically_with_verified_checkpoints(
    tmp_path, tr_straight
):
    out = _tr_kill_and_resume(tmp_path, tr_straight, [7])
    assert "taking over the lock left by pid" in out.stderr
    _tr_all_steps_verify(tmp_path / "run")


@pytest.mark.slow
def test_trainer_kill_9_at_many_random_points(tmp_path, tr_straight):
    """12 kills at random points (some while compiling, most while saving:
    every step checkpoints), each resumed; the end is bit-identical."""
    rng = np.random.default_rng(14)
    _tr_kill_and_resume(tmp_path, tr_straight, list(rng.integers(0, 5, size=12)))
    _tr_all_steps_verify(tmp_path / "run")


def _tr_kind(rel: str) -> str:
    """A checkpoint file's kind: its path with content-hash names as `*`."""
    return re.sub(r"/[0-9a-f]{16,}$", "/*", rel)


def _tr_mutate(path: pathlib.Path, how: str, rng) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        i = int(rng.integers(len(data)))
        data[i] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    elif how == "unreadable":  # (chmod does not stop root) a directory instead
        path.unlink()
        path.mkdir()
    else:
        raise ValueError(how)


_TR_MUTATIONS = ("flip", "truncate", "delete", "unreadable")


@pytest.fixture(scope="module")
def tr_two_checkpoints(tmp_path_factory):
    """A run stopped at step 4 with checkpoints 2 and 4: (workdir, leaves at 4)."""
    workdir = tmp_path_factory.mktemp("two_checkpoints")
    result = _tr_train(workdir, stop_after=4, checkpoint_every=2)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4]  # fmt: skip
    return workdir, [np.asarray(x) for x in jax.tree_util.tree_leaves(result.state)]


def test_trainer_corruption_of_every_checkpoint_file_kind_is_detected(
    tmp_path, tr_two_checkpoints
):
    """Every file of a checkpoint, each flipped (one random bit), truncated,
    deleted or made unreadable, fails verification; the untouched copy
    passes."""
    from velo_scale.train import manifest

    workdir, _ = tr_two_checkpoints
    step_dir = workdir / "checkpoints" / "4"
    files = sorted(
        p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()
    )
    kinds = {_tr_kind(f) for f in files}
    assert {
        "_CHECKPOINT_METADATA", "velo_scale_manifest.json", "default/_METADATA",
        "default/manifest.ocdbt", "default/ocdbt.process_0/d/*",
    } <= kinds, kinds  # fmt: skip
    rng = np.random.default_rng(0)
    scratch = tmp_path / "4"
    shutil.copytree(step_dir, scratch)
    assert manifest.verify_manifest(scratch) is None  # the control
    tried = 0
    for rel in files:
        for how in _TR_MUTATIONS:
            shutil.rmtree(scratch)
            shutil.copytree(step_dir, scratch)
            _tr_mutate(scratch / rel, how, rng)
            assert manifest.verify_manifest(scratch) is not None, (rel, how)
            tried += 1
    assert tried == 4 * len(files) >= 40


def test_trainer_falls_back_from_a_corrupt_checkpoint_to_the_newest_intact(
    tmp_path, tr_two_checkpoints
):
    """One flipped bit in a data file of the newest checkpoint: a warning
    names step 4, the run resumes from step 2 and reaches the same step 4."""
    pristine, leaves = tr_two_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(pristine, workdir)
    data_file = sorted((workdir / "checkpoints/4/default/ocdbt.process_0/d").iterdir())[
        0
    ]
    _tr_mutate(data_file, "flip", np.random.default_rng(1))
    with pytest.warns(RuntimeWarning, match="checkpoint step 4 .* not usable"):
        result = _tr_train(workdir, stop_after=4, checkpoint_every=2)
    _tr_assert_identical(
        [np.asarray(x) for x in jax.tree_util.tree_leaves(result.state)], leaves
    )
    assert [
        p.name.split(".")[0] for p in (workdir / "checkpoints/corrupt").iterdir()
    ] == ["4"]
    assert _tr_all_steps_verify(workdir) == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("how", _TR_MUTATIONS)
def test_trainer_falls_back_for_every_file_kind(tmp_path, tr_two_checkpoints, how):
    """Each file kind of the newest checkpoint damaged in turn (end to end):
    always a warning naming step 4 and a bit-identical step 4 from step 2."""
    pristine, leaves = tr_two_checkpoints
    step_dir = pristine / "checkpoints" / "4"
    by_kind = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file():
            by_kind.setdefault(_tr_kind(p.relative_to(step_dir).as_posix()), p)
    rng = np.random.default_rng(2)
    for i, (kind, path) in enumerate(sorted(by_kind.items())):
        print(kind)  # shown when it fails
        workdir = tmp_path / f"run{i}"
        shutil.copytree(pristine, workdir)
        _tr_mutate(workdir / path.relative_to(pristine), how, rng)
        with pytest.warns(RuntimeWarning, match="checkpoint step 4 .* not usable"):
            result = _tr_train(workdir, stop_after=4, checkpoint_every=2)
        _tr_assert_identical(
            [np.asarray(x) for x in jax.tree_util.tree_leaves(result.state)], leaves
        )


def test_trainer_init_from_skips_a_corrupt_checkpoint(tmp_path, tr_two_checkpoints):
    """`init_from` reads the newest checkpoint that verifies (step 2 here, step
    4 being damaged), with a warning, and leaves the directory as it is."""
    from velo_scale.train.checkpoint import restore_params

    pristine, _ = tr_two_checkpoints
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(pristine / "checkpoints", ckpts)
    data_file = sorted((ckpts / "4/default/ocdbt.process_0/d").iterdir())[0]
    _tr_mutate(data_file, "flip", np.random.default_rng(3))
    want = _tr_restore_all(pristine)[2]["params"]
    with pytest.warns(RuntimeWarning, match="skipping checkpoint step 4"):
        got = restore_params(ckpts, jax.tree_util.tree_map(jnp.asarray, want))
    _tr_assert_identical_tree(got, want)
    assert (ckpts / "4").is_dir()


def test_trainer_restores_checkpoints_of_older_versions_unverified_with_a_warning(
    tmp_path, tr_two_checkpoints
):
    """A checkpoint directory written before manifests existed still resumes
    (with a warning that it is unverified), instead of being discarded."""
    pristine, leaves = tr_two_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(pristine, workdir)
    for p in (workdir / "checkpoints").rglob("velo_scale_*"):
        p.unlink()
    with pytest.warns(RuntimeWarning, match="step 4 .* no checksum manifest"):
        result = _tr_train(workdir, stop_after=4)
    _tr_assert_identical(
        [np.asarray(x) for x in jax.tree_util.tree_leaves(result.state)], leaves
    )


def test_trainer_never_resumes_from_a_nan_checkpoint(tmp_path, tr_two_checkpoints):
    """A checkpoint holding NaN params (as older versions wrote them) is set
    aside with a warning; the run resumes from the finite one before it."""
    pristine, leaves = tr_two_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(pristine, workdir)
    ckpts = workdir / "checkpoints"
    for p in ckpts.rglob("velo_scale_*"):
        p.unlink()  # an older version's directory: no manifests
    manager = ocp.CheckpointManager(ckpts)
    state = manager.restore(4, args=ocp.args.StandardRestore())
    manager.close()
    shutil.rmtree(ckpts / "4")
    state["params"] = jax.tree_util.tree_map(
        lambda x: np.full_like(np.asarray(x), np.nan), state["params"]
    )
    manager = ocp.CheckpointManager(ckpts)
    manager.save(4, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    with pytest.warns(RuntimeWarning, match=r"step 4 .* non-finite values"):
        result = _tr_train(workdir, stop_after=4, checkpoint_every=2)
    _tr_assert_identical(
        [np.asarray(x) for x in jax.tree_util.tree_leaves(result.state)], leaves
    )


def test_trainer_nonfinite_initial_state_is_refused_before_training(tmp_path):
    from velo_scale.train import NonFiniteLossError

    tx = optax.GradientTransformation(
        lambda p: {"acc": jnp.full((3,), jnp.nan)}, lambda u, s, p=None: (u, s)
    )
    with pytest.raises(NonFiniteLossError, match=r"initial train state .*opt_state"):
        _tr_train(tmp_path, optimizer=_tr_optimizer(tx, "nan_init"))
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_trainer_resume_with_a_changed_config_is_an_error(tmp_path):
    """num_steps, seed, batch size, optimizer, its settings and the model are
    the run's identity: changing one on resume is an error naming it and the
    ways out; config.json stays as written. The mesh may change."""
    import functools

    from velo_scale.models import MLP
    from velo_scale.train import optimizers
    from velo_scale.train.run_config import ConfigMismatchError

    _tr_train(tmp_path, stop_after=2)
    before = (tmp_path / "config.json").read_bytes()
    cases = [
        (dict(num_steps=12), ["train.num_steps", "6 in the workdir, 12 requested",
                              "'naive' | 'increase' | 'reset'", "new --workdir"]),
        (dict(seed=1), ["train.seed", "0 in the workdir, 1 requested"]),
        (dict(batch_size=16), ["train.batch_size", "32 in the workdir, 16"]),
        (dict(optimizer=optimizers.sgd_momentum), ["the optimizer", "'adamw' in the workdir, 'sgd'"]),
        (dict(optimizer=functools.partial(optimizers.adamw, clip_norm=1.0)),
         ["the optimizer state's layout", "clip_norm"]),
        (dict(model=MLP(hidden=(8,))), ["the model's parameters",
                                        "['dense0']['kernel']: float32[64, 16] -> float32[64, 8]"]),
    ]  # fmt: skip
    for change, needles in cases:
        with pytest.raises(ConfigMismatchError) as e:
            _tr_train(tmp_path, **change)
        for needle in needles:
            assert needle in str(e.value), (change, str(e.value))
    assert (tmp_path / "config.json").read_bytes() == before
    result = _tr_train(tmp_path, mesh_shape=(2, 1), checkpoint_every=3)
    assert int(result.state.step) == 6
    assert (tmp_path / "config.json").read_bytes() == before


def test_trainer_resume_check_is_a_hook_for_continuation():
    """`check_resume(..., allow=("num_steps",))` (for train.continuation)
    returns the change instead of raising."""
    from velo_scale.train import run_config

    saved = {"num_steps": 300, "seed": 0, "config": {}}
    with pytest.raises(run_config.ConfigMismatchError, match="train.continuation"):
        run_config.check_resume(saved, {**saved, "num_steps": 600}, workdir="w")
    (change,) = run_config.check_resume(
        saved, {**saved, "num_steps": 600}, workdir="w", allow=("num_steps",)
    )
    assert (change.field, change.saved, change.requested) == ("num_steps", 300, 600)


def test_trainer_rerunning_a_finished_run_says_complete_and_exits_0(
    tmp_path, capsys, monkeypatch
):
    from velo_scale import cli

    monkeypatch.chdir(REPO)
    args = [
        "train", "--gin_file", "recipes/digits_mlp.gin",
        "--gin_file", "gin_configs/optimizers/adamw.gin",
        "--gin_param", "MLP.hidden=(16,)", "--gin_param", "train.num_steps=3",
        "--gin_param", "train.mesh_shape=(1, 1)", "--gin_param", "train.progress=False",
        "--workdir", str(tmp_path),
    ]  # fmt: skip
    assert cli.main(args) == 0
    rows = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "is complete (step 3 of 3)" in out
    assert "nan" not in out and "steps/s" not in out
    assert (tmp_path / "metrics.jsonl").read_text() == rows
