"""Effect of `velo(..., state_dtype=jnp.bfloat16)` on the golden cases.

Runs every reference trajectory in tests/data/reference/velo with float32
and with bfloat16 accumulators and prints, per case, the largest parameter
error against the reference in units of the parity tolerance
(`|ours - ref| / (1e-6 + 1e-5 |ref|)`, <= 1 passes), and the largest error of
the per-step update relative to the tensor's largest update.

Usage: python benchmarks/state_dtype.py
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import velo_scale

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests.reference_data import CASES, Case, flat, load_theta  # noqa: E402


def run(case: Case, theta, state_dtype) -> tuple[float, float]:
    tx = velo_scale.velo(case.num_steps, weights=theta, state_dtype=state_dtype)
    update = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))
    params = case.params(0)
    state = tx.init(params)
    worst_tol, worst_step = 0.0, 0.0
    for k in range(1, case.steps + 1):
        updates, state = update(case.grads(k), state, params, case.losses[k - 1])
        new = optax.apply_updates(params, updates)
        ours, before = flat(new), flat(params)
        for leaf in case.order:
            ref = case[f"step{k}/params/{leaf}"]
            ref_prev = case[
                f"step{k - 1}/params/{leaf}" if k > 1 else f"init/params/{leaf}"
            ]
            err = np.abs(ours[leaf] - ref)
            worst_tol = max(worst_tol, float(np.max(err / (1e-6 + 1e-5 * np.abs(ref)))))
            ref_step = ref - ref_prev
            ours_step = ours[leaf] - before[leaf]
            scale = float(np.max(np.abs(ref_step))) or 1.0
            worst_step = max(
                worst_step, float(np.max(np.abs(ours_step - ref_step))) / scale
            )
        params = new
    return worst_tol, worst_step


def main() -> None:
    theta = load_theta()
    print(
        "| case | float32: params err / tol | bfloat16: params err / tol | "
        "bfloat16: max step err / max step |"
    )
    print("|---|---|---|---|")
    for name in CASES:
        case = Case(name)
        f32, _ = run(case, theta, jnp.float32)
        bf16, step = run(case, theta, jnp.bfloat16)
        print(f"| {name} | {f32:.3f} | {bf16:.1f} | {step:.2e} |")


if __name__ == "__main__":
    main()
