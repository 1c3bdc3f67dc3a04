"""`benchmarks/gpu_step.py` (the accelerator run of issue 13) and its naive
jnp VeLO baseline (`benchmarks/naive_velo.py`), on CPU at toy sizes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import velo_scale
from tests import benchmark_scripts


@pytest.fixture(scope="module")
def gpu_step():
    return benchmark_scripts.load("gpu_step")


def test_naive_velo_is_the_same_step(theta):
    """The baseline is VeLO itself (materialised channels, matmul MLP): its
    updates and state follow velo_scale's within rounding over 3 steps, for
    a factored matrix, a rank-3 tensor, a vector and a scalar."""
    naive_velo = benchmark_scripts.load("naive_velo")
    rng = np.random.default_rng(0)
    shapes = {"m": (48, 64), "r3": (4, 10, 12), "v": (33,), "s": ()}
    params = {
        k: jnp.asarray(0.1 * rng.normal(size=s), jnp.float32) for k, s in shapes.items()
    }
    ref = velo_scale.velo(50, weights=theta, skip_nonfinite=False)
    naive = naive_velo.naive_velo(50, theta)
    ref_update = jax.jit(lambda g, s, p: ref.update(g, s, p, loss=2.0))
    naive_update = jax.jit(lambda g, s, p: naive.update(g, s, p, loss=2.0))
    ref_state, naive_state = ref.init(params), naive.init(params)
    for _ in range(3):
        grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
        u_ref, ref_state = ref_update(grads, ref_state, params)
        u_naive, naive_state = naive_update(grads, naive_state, params)
        for key in shapes:
            a, b = np.asarray(u_ref[key]), np.asarray(u_naive[key])
            assert np.max(np.abs(a)) > 0
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.max(np.abs(a)))
        for a, b in zip(
            jax.tree_util.tree_leaves(ref_state), jax.tree_util.tree_leaves(naive_state)
        ):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, u_ref)


def test_update_part_times_the_three_optimizers(gpu_step, theta):
    row = gpu_step.time_updates(gpu_step.SMOKE_TREE, theta, repeats=2)
    assert row["params"] == 64 * 32 + 32 and row["tensors"] == 2
    for name in gpu_step.OPTIMIZERS:
        assert row[name]["ms"] > 0 and row[name]["compile_s"] > 0
    table = gpu_step.updates_table({"smoke": row})
    assert "| smoke | 2,080 | 2 |" in table
    assert table.count("x |") == 3  # the three ratios


@pytest.mark.slow
def test_smoke_run_writes_every_number(gpu_step, tmp_path):
    """The whole device command at toy sizes: both parts, JSON written."""
    path = tmp_path / "gpu_step.json"
    gpu_step.main(["--smoke", "--repeats", "1", "--json", str(path)])
    out = json.loads(path.read_text())
    assert set(out["updates"]) == {"smoke"}
    vit = out["vit"]
    assert vit["batch"] == 2 and vit["image"] == 28
    for name in ("fwd_bwd", *gpu_step.OPTIMIZERS):
        assert vit[name]["ms"] > 0


def test_velo_update_lowers_for_cuda(theta):
    """Without a GPU here: the update (skip included) lowers for CUDA, so the
    device run does not stop at a CPU-only lowering (`platform_dependent`'s
    default branches, no CPU custom calls)."""
    tx = velo_scale.velo(100, weights=theta)
    params = {"w": jnp.ones((64, 32)), "b": jnp.zeros((32,)), "s": jnp.asarray(1.0)}
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=1.0))
    exported = jax.export.export(update, platforms=["cuda"])(
        params, tx.init(params), params
    )
    assert exported.platforms == ("cuda",)
    assert "custom_call" not in exported.mlir_module()
