"""The training engine: resume bit-identity, re-meshing, init_from, bad input,
gin files and the CLI. Runs on scikit-learn digits (real, tiny) and 8 fake
CPU devices."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.reference_data import CHECKPOINT
from velo_scale import cli
from velo_scale._src import weights as weights_lib
from velo_scale.data import load_dataset
from velo_scale.models import MLP
from velo_scale.train import NonFiniteLossError, optimizers, train
from velo_scale.train.checkpoint import CheckpointError

REPO = pathlib.Path(__file__).resolve().parent.parent
VELO_PARAMS = [
    "--gin_file", "recipes/digits_mlp.gin",
    "--gin_param", f"velo.weights='{CHECKPOINT}'",
    "--gin_param", "train.num_steps=20",
    "--gin_param", "train.eval_every=10",
    "--gin_param", "train.checkpoint_every=5",
]  # fmt: skip


def _velo(num_steps):
    return optimizers.velo(num_steps, weights=str(CHECKPOINT))


def _cli(args, workdir):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "velo_scale",
        "train",
        *args,
        "--workdir",
        str(workdir),
    ]
    out = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _final_state(workdir):
    manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints")
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    return step, state


def test_resume_is_bit_identical(tmp_path):
    """20 steps straight == 10 steps, process exit, resume for 10 more."""
    _cli(VELO_PARAMS, tmp_path / "straight")
    _cli([*VELO_PARAMS, "--gin_param", "train.stop_after=10"], tmp_path / "resumed")
    step, _ = _final_state(tmp_path / "resumed")
    assert step == 10
    _cli(VELO_PARAMS, tmp_path / "resumed")
    step_a, a = _final_state(tmp_path / "straight")
    step_b, b = _final_state(tmp_path / "resumed")
    assert step_a == step_b == 20
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 20
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The VeLO state is in there: LSTM state, loss buffer, accumulators.
    assert int(a["opt_state"]["iteration"]) == 20
    assert a["opt_state"]["lstm_hidden"].shape[1] == 512
    # Metrics of both halves were written, and the curves PNG.
    rows = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"split": "train"' in r]) == 20
    assert (tmp_path / "resumed" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _train_digits(workdir, mesh_shape, optimizer=None, num_steps=12, **kw):
    return train(
        model=MLP(hidden=(32,)),
        optimizer=optimizer or _velo,
        num_steps=num_steps,
        data="digits",
        batch_size=64,
        mesh_shape=mesh_shape,
        workdir=workdir,
        progress=False,
        **kw,
    )


def _assert_close(a, b, **tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_restore_onto_other_meshes_is_exact(tmp_path):
    """A checkpoint written on 8 devices (2x4) restores onto 4 and 1 devices
    with the target shardings and bit-identical values."""
    saved = _train_digits(tmp_path / "run", (2, 4), stop_after=4).state
    for mesh_shape in ((4, 1), (1, 1)):
        restored = _train_digits(tmp_path / "run", mesh_shape, stop_after=4).state
        assert int(restored.step) == 4
        n_devices = int(np.prod(mesh_shape))
        for x, y in zip(
            jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(restored)
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            assert len(y.sharding.device_set) == n_devices
    # ... and training continues from there on one device.
    final = _train_digits(tmp_path / "run", (1, 1))
    assert int(final.state.step) == 12


# On 8 devices the batch gradient is summed in another order (float rounding,
# ~1e-7 relative). AdamW passes that on unchanged. VeLO's loss features and
# per-parameter normalisers amplify it (here with the untrained test weights)
# to ~5e-4 relative after 3 steps; the optimizer itself, given identical
# inputs, matches to 1e-5 sharded or not (tests/test_sharding.py).
@pytest.mark.parametrize(
    "optimizer,steps,tol",
    [
        (optimizers.adamw, 12, dict(rtol=1e-5, atol=1e-6)),
        (None, 3, dict(rtol=2e-3, atol=5e-5)),
    ],
    ids=["adamw", "velo"],
)
def test_one_device_equals_eight(optimizer, steps, tol):
    single = _train_digits(None, (1, 1), optimizer, steps)
    sharded = _train_digits(None, (2, 4), optimizer, steps)
    _assert_close(single.state.params, sharded.state.params, **tol)
    _assert_close(single.state.opt_state, sharded.state.opt_state, **tol)


def test_init_from_fine_tunes_with_fresh_optimizer(tmp_path):
    base = _train_digits(tmp_path / "base", (1, 1))
    tuned = train(
        model=MLP(hidden=(32,)),
        optimizer=_velo,
        num_steps=1,
        data="digits",
        batch_size=64,
        mesh_shape=(1, 1),
        init_from=tmp_path / "base" / "checkpoints",
        progress=False,
    )
    assert int(tuned.state.opt_state.iteration) == 1  # fresh VeLO state
    moved = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree_util.tree_leaves(base.state.params),
            jax.tree_util.tree_leaves(tuned.state.params),
        )
    ]
    assert max(moved) < 0.1  # one step from the base params, not a fresh init


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    data = load_dataset("digits", "train")
    data = {"image": np.full_like(data["image"], np.nan), "label": data["label"]}
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(
            model=MLP(hidden=(16,)),
            optimizer=optimizers.adamw,
            num_steps=10,
            data=data,
            batch_size=50,
            mesh_shape=(1, 1),
            max_nonfinite_steps=3,
            workdir=tmp_path,
            checkpoint_every=1,
            progress=False,
        )
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all('"skipped": 1' in r for r in rows)


def test_checkpoint_dir_not_writable_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        _train_digits(None, (1, 1), checkpoint_dir=blocker / "ckpt")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    _train_digits(tmp_path / "run", (1, 1), stop_after=4, checkpoint_every=2)
    ckpts = tmp_path / "run" / "checkpoints"
    # A save that died half-way: orbax's temporary directory for a later step.
    partial = ckpts / "6.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "garbage").write_text("half written")
    resumed = _train_digits(tmp_path / "run", (1, 1), stop_after=5)
    assert int(resumed.state.step) == 5  # resumed from step 4, not the partial 6


def test_small_replicated_arrays_are_saved_whole_without_compiles(tmp_path):
    """orbax would cut each replicated array into one slice per device and
    compile a `jit(slice)` per (shape, device); small ones are written whole,
    in orbax's standard format (a plain `CheckpointManager` reads them)."""
    from jax._src import monitoring
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from velo_scale.train.checkpoint import Checkpointer

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    tree = {
        "sharded": put(np.arange(64.0).reshape(8, 8), PartitionSpec("data", "model")),
        **{
            f"replicated_{n}": put(np.arange(n * 8.0), PartitionSpec())
            for n in (1, 3, 5)
        },
    }
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event)  # noqa: E731
    monitoring.register_event_duration_secs_listener(listener)
    try:
        checkpointer = Checkpointer(tmp_path, asynchronous=False)
        checkpointer.save(1, tree)
        checkpointer.close()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/backend_compile_duration" not in compiles
    manager = ocp.CheckpointManager(tmp_path)
    restored = manager.restore(1, args=ocp.args.StandardRestore())
    manager.close()
    for key, value in tree.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))


def test_velo_auto_weights_order(monkeypatch, tmp_path, capsys):
    import velo_scale

    monkeypatch.delenv("VELO_SCALE_WEIGHTS", raising=False)
    monkeypatch.delenv(optimizers.PROJECT_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path))
    # No official file anywhere: the project's packaged weights, with a notice.
    theta = optimizers.resolve_velo_weights("auto")
    assert velo_scale.Architecture.of(theta).lstm_hidden_size == 32
    assert "own meta-trained weights" in capsys.readouterr().err
    # The official file (here: the reference checkpoint) wins when present.
    monkeypatch.setenv("VELO_SCALE_WEIGHTS", str(CHECKPOINT))
    assert velo_scale.Architecture.of(optimizers.resolve_velo_weights("auto")) == (
        velo_scale.Architecture()
    )
    # Nothing at all: a clear error.
    monkeypatch.delenv("VELO_SCALE_WEIGHTS")
    monkeypatch.setattr(weights_lib, "packaged_project_weights", lambda: None)
    with pytest.raises(Exception, match="VELO_SCALE_WEIGHTS"):
        optimizers.velo(10)


def test_project_weights_are_documented():
    import json

    info = json.loads(
        (REPO / "velo_scale" / "project_weights" / "params.json").read_text()
    )
    import velo_scale

    theta = velo_scale.load_weights(REPO / "velo_scale" / "project_weights" / "params")
    assert weights_lib.sha256(theta) == info["sha256"]
    assert info["architecture"] == {
        "lstm_hidden_size": 32, "param_inits": 16, "ff_hidden_size": 4, "ff_hidden_layers": 2
    }  # fmt: skip


@pytest.mark.parametrize("name", ["adamw", "nadamw", "sgd_momentum", "adafactor"])
def test_baseline_optimizers_train(name):
    result = train(
        model=MLP(hidden=(32,)),
        optimizer=optimizers.OPTIMIZERS[name],
        num_steps=200,
        data="digits",
        batch_size=64,
        mesh_shape=(1, 1),
        progress=False,
    )
    assert result.eval_metrics["accuracy"] > 0.6, result.eval_metrics  # chance: 0.1


# gin_configs/t5x/ binds T5X's own configurables (train_script.train, ...),
# which exist only where t5x is installed; CI cannot parse them.
GIN_FILES = sorted(
    [
        *REPO.glob("recipes/*.gin"),
        *(p for p in REPO.glob("gin_configs/**/*.gin") if p.parent.name != "t5x"),
    ]
) + [REPO / "velo_scale" / "recipes" / "default.gin"]


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_gin_file_parses_and_binds(path, monkeypatch):
    import gin

    monkeypatch.chdir(REPO)
    cli.parse_gin([str(path)], [])
    assert gin.config_str() is not None
    if path.parent.name == "recipes":
        # A recipe binds everything train needs.
        assert gin.query_parameter("train.num_steps") > 0
        bound = []
        for name in ("train.model", "train.workload"):
            try:
                bound.append(gin.query_parameter(name) is not None)
            except ValueError:  # not bound
                bound.append(False)
        assert sum(bound) == 1, "a recipe binds exactly one of model / workload"
        assert gin.query_parameter("train.optimizer") is not None


def test_unknown_gin_binding_lists_close_names(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=r"did you mean \['train'\]"):
        cli.parse_gin(["recipes/digits_mlp.gin"], ["trian.num_steps = 3"])
    with pytest.raises(ValueError, match="num_steps"):
        cli.parse_gin(["recipes/digits_mlp.gin"], ["train.num_step = 3"])


def test_cli_train_plot_compare(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for name in ("adamw", "sgd_momentum"):
        code = cli.main(
            [
                "train",
                "--gin_file", "recipes/digits_mlp.gin",
                "--gin_file", f"gin_configs/optimizers/{name}.gin",
                "--gin_param", "train.num_steps=30",
                "--gin_param", "train.progress=False",
                "--workdir", str(tmp_path / name),
            ]
        )  # fmt: skip
        assert code == 0
        assert (tmp_path / name / "metrics.jsonl").exists()
        assert list((tmp_path / name / "checkpoints").iterdir())
        assert list((tmp_path / name).glob("**/events.out.tfevents.*"))
    out = tmp_path / "both.png"
    assert (
        cli.main(
            [
                "plot",
                str(tmp_path / "adamw"),
                str(tmp_path / "sgd_momentum"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert (
        cli.main(["compare", str(tmp_path / "adamw"), str(tmp_path / "sgd_momentum")])
        == 0
    )
    table = capsys.readouterr().out
    assert "adamw" in table and "sgd" in table


def test_cli_missing_weights_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("VELO_SCALE_WEIGHTS", raising=False)
    monkeypatch.delenv(optimizers.PROJECT_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(weights_lib, "packaged_project_weights", lambda: None)
    assert (
        cli.main(
            [
                "train",
                "--gin_param",
                "train.num_steps=2",
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 2
    )
    assert "VELO_SCALE_WEIGHTS" in capsys.readouterr().err


def test_bfloat16_params_and_compute():
    result = train(
        model=MLP(hidden=(32,), dtype="bfloat16", param_dtype="bfloat16"),
        optimizer=_velo,
        num_steps=3,
        data="digits",
        batch_size=64,
        mesh_shape=(1, 1),
        progress=False,
    )
    for leaf in jax.tree_util.tree_leaves(result.state.params):
        assert leaf.dtype == np.dtype("bfloat16")
        assert np.isfinite(np.asarray(leaf, np.float32)).all()
    # VeLO's accumulators stay float32 for bfloat16 params.
    assert result.state.opt_state.momentum["head"]["kernel"].dtype == np.float32


def test_tfds_data_needs_data_dir():
    with pytest.raises(ValueError, match="train.data_dir"):
        train(
            model=MLP(),
            optimizer=optimizers.adamw,
            num_steps=1,
            data="tfds:mnist",
            progress=False,
        )
