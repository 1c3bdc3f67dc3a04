"""Multi-host runs with `jax.distributed`, as separate processes on this CPU.

Two processes with 2 CPU devices each (Gloo collectives, coordinator on
localhost) form one 4-device mesh; every process runs the same command, the
same way a TPU pod slice or SLURM job launches `velo-scale ... --multihost`.
The result must equal one process with 4 devices.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import velo_scale

REPO = pathlib.Path(__file__).resolve().parents[1]

META_GIN = """
meta_train.tasks = [@digits_mlp_task()]
digits_mlp_task.hidden = (8,)
digits_mlp_task.batch_size = 16
meta_train.architecture = @Architecture()
Architecture.lstm_hidden_size = 8
Architecture.param_inits = 4
meta_train.num_outer_steps = 2
meta_train.unroll_lengths = (4,)
meta_train.num_pairs = 8
meta_train.last_k = 2
meta_train.checkpoint_every = 1
meta_train.init_theta = 'random'
meta_train.progress = False
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        PYTHONPATH=str(REPO),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **extra,
    )
    return env


def _cli(args):
    return [sys.executable, "-m", "velo_scale.cli", *args]


def _run_single(args, devices):
    out = subprocess.run(
        _cli(args), cwd=REPO, env=_env(devices), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def _run_multihost(args, num_processes=2, devices=2):
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cli(args),
            cwd=REPO,
            env=_env(
                devices,
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES=str(num_processes),
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
def test_meta_train_on_two_processes_equals_one(tmp_path):
    gin_file = tmp_path / "meta.gin"
    gin_file.write_text(META_GIN)
    args = ["meta-train", "--gin_file", str(gin_file), "--workdir"]
    _run_single([*args, str(tmp_path / "one")], devices=4)
    _run_multihost([*args, str(tmp_path / "two")])
    one = velo_scale.load_weights(tmp_path / "one" / "params")
    two = velo_scale.load_weights(tmp_path / "two" / "params")
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    # Process 0 alone wrote the metrics (one row per outer step) and both
    # processes took part in the checkpoints.
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert sorted(
        p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()
    ) == ["1", "2"]


def _last_eval(workdir: pathlib.Path) -> dict:
    import json

    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    return evals[-1], len(rows)


@pytest.mark.slow
def test_train_on_two_processes_equals_one(tmp_path):
    """`velo-scale train` (VeLO, data-parallel over 4 devices) on 2 processes
    x 2 devices reaches the same losses as 1 process x 4 devices; process 0
    alone writes metrics, both take part in the orbax checkpoints."""
    args = [
        "train", "--gin_file", "recipes/digits_mlp.gin",
        "--gin_param", "train.num_steps=8", "--gin_param", "train.eval_every=4",
        "--gin_param", "train.checkpoint_every=4", "--workdir",
    ]  # fmt: skip
    _run_single([*args, str(tmp_path / "one")], devices=4)
    _run_multihost([*args, str(tmp_path / "two")])
    (one, rows_one), (two, rows_two) = (
        _last_eval(tmp_path / "one"),
        _last_eval(tmp_path / "two"),
    )
    assert one["step"] == two["step"] == 8 and rows_one == rows_two
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(two["accuracy"], one["accuracy"], rtol=1e-6)
    assert (tmp_path / "two" / "checkpoints" / "8").is_dir()
