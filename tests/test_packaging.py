"""The lean install: `velo_scale.velo` needs only jax, optax, numpy and
msgpack (the training engine is the `[train]` extra)."""

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_ONLY = ["flax", "orbax", "gin", "tqdm", "matplotlib", "tensorboardX"]


def test_core_dependencies_are_lean():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0] for d in project["dependencies"]}
    assert names == {"jax", "jaxlib", "numpy", "optax", "msgpack"}
    train = " ".join(project["optional-dependencies"]["train"])
    for name in ("flax", "orbax-checkpoint", "gin-config"):
        assert name in train


def test_optimizer_works_without_the_training_engine(reference_dir):
    # Every training-engine package is made unimportable in a fresh process.
    code = f"""
import sys
for name in {TRAIN_ONLY!r}:
    sys.modules[name] = None
import jax.numpy as jnp
import velo_scale
theta = velo_scale.load_weights({str(reference_dir / "theta_perturbed.msgpack")!r})
tx = velo_scale.velo(10, weights=theta)
params = {{"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}}
state = tx.init(params)
updates, state = tx.update(params, state, params, loss=1.0)
assert bool(jnp.all(jnp.isfinite(updates["w"])))
specs = velo_scale.state_partition_specs(tx, params)
assert specs.momentum["w"] is not None
print("lean ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lean ok" in out.stdout
