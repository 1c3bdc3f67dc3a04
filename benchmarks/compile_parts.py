"""Compile time per tensor of VeLO's parts, against optax.adamw's, in one process.

`benchmarks/tpu_aot.py` measures whole steps; this script splits the
per-tensor compile cost (the term of the App. B.7 model a deeper unscanned
model multiplies) into its parts. For each tensor shape it compiles each
part for a group of K1 and of K2 like tensors (one device, params and state
as `jax.ShapeDtypeStruct`s) and prints the marginal compile CPU time per
tensor, (t(K2) - t(K1)) / (K2 - K1), which cancels the constant terms
(the per-tensor LSTM, the first-compile set-up). Parts:

* `phase_a`: `velo_pallas.phase_a` of the group (the reduction kernels and
  the small arrays combined between them);
* `phase_ac`: phase A, then `phase_c` (the apply kernel) with its weights as
  an input (no per-tensor LSTM between them);
* `late_commit`: `velo_pallas.write_accumulators` per tensor;
* `step`: `velo_scale.velo(...).update` and `optax.apply_updates`, params
  and state donated (as `tpu_aot.py` compiles it);
* `adamw`: the same step with `optax.adamw`.

The Pallas parts need a TPU target: `--topology v5e:2x2` (default; libtpu
compiles ahead of time on this host, see BENCHMARKS.md) uses its first chip.
`--topology cpu` compiles `step` (XLA path) and `adamw` for this host's CPU.

    TPU_ACCELERATOR_TYPE=v5litepod-4 python benchmarks/compile_parts.py \\
        --shapes 320x1280,1280 --k 2,10

CPU seconds (all threads) are less sensitive to host load than wall time,
but on a shared 2-core host they still vary by ~30% between runs; compare
figures from one run.
"""

from __future__ import annotations

import argparse
import os
import time

PARTS = ("phase_a", "phase_ac", "late_commit", "step", "adamw")


def _shape(spec: str) -> tuple[int, ...]:
    return tuple(int(d) for d in spec.split("x"))


def _accumulators(shape, sds):
    """ShapeDtypeStructs of one tensor's lifted accumulators (f32), shaped as
    `accumulators.init_all` makes them."""
    import jax
    import jax.numpy as jnp

    from velo_scale._src import accumulators, param_net

    zeros = jax.ShapeDtypeStruct(shape, jnp.float32)
    acc = jax.eval_shape(lambda z: accumulators.init_all(jnp.zeros_like(z)), zeros)
    return param_net.Accumulators(
        *(None if x is None else sds(x.shape, x.dtype) for x in acc)
    )


def _part(part: str, shape: tuple[int, ...], k: int, sds, theta, on_tpu: bool = True):
    """(function, args) compiling `part` for a group of k tensors (`sds(shape,
    dtype)` makes the inputs; on_tpu: VeLO's step takes the Pallas path)."""
    import jax
    import jax.numpy as jnp
    import optax

    import velo_scale
    from velo_scale._src import param_net
    from velo_scale._src.kernels import velo_pallas as vp

    ps = [sds(shape, jnp.float32) for _ in range(k)]
    accs = [_accumulators(shape, sds) for _ in range(k)]
    if part == "phase_a":
        return (lambda ps, gs, accs: vp.phase_a(ps, gs, accs)), (ps, ps, accs)
    if part == "phase_ac":
        # The per-tensor MLP weights phase B would give (the bank's shapes),
        # packed as the Pallas step packs them.
        bank = theta["ff_mod_stack"]["~"]
        mlps = {n: jax.ShapeDtypeStruct((k, *w.shape[1:]), w.dtype) for n, w in bank.items()}
        mean_sq = jax.ShapeDtypeStruct((k, param_net.NUM_PARAM_FEATURES), jnp.float32)
        w0 = jax.eval_shape(param_net.first_layer, mlps, mean_sq)
        scale = jax.ShapeDtypeStruct((k,), jnp.float32)
        weights = jax.eval_shape(lambda *a: vp.pack_weights(*a, True), mlps, w0, scale)
        hidden, layers = w0.shape[-1], param_net.num_hidden_layers(mlps)

        def phase_ac(ps, gs, accs, weights, w0):
            a = vp.phase_a(ps, gs, accs)
            return vp.phase_c(weights, w0, ps, gs, accs, a, hidden=hidden, layers=layers)

        args = (ps, ps, accs, sds(weights.shape, weights.dtype), sds(w0.shape, w0.dtype))
        return phase_ac, args
    if part == "late_commit":

        def late(ok, gs, accs):
            return [vp.write_accumulators(ok, g, a) for g, a in zip(gs, accs)]

        return late, (sds((), jnp.bool_), ps, accs)
    if part in ("step", "adamw"):
        params = {f"p{i}": p for i, p in enumerate(ps)}
        if part == "adamw":
            tx = optax.adamw(1e-3)
        else:
            tx = velo_scale.velo(
                num_steps=1000,
                weights=theta,
                implementation="pallas" if on_tpu else "xla",
                pallas_interpret=False,
            )
        state = jax.tree_util.tree_map(
            lambda x: sds(x.shape, x.dtype), jax.eval_shape(tx.init, params)
        )

        def step(params, state, grads, loss):
            if part == "adamw":
                updates, state = tx.update(grads, state, params)
            else:
                updates, state = tx.update(grads, state, params, loss=loss)
            return optax.apply_updates(params, updates), state

        jitted = jax.jit(step, donate_argnums=(0, 1))
        return jitted, (params, state, params, sds((), jnp.float32))
    raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")


def compile_cpu_seconds(fn, args) -> float:
    import jax

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    lowered = jitted.lower(*args)
    start = time.process_time()
    lowered.compile()
    return time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2", help="a TPU topology, or cpu")
    parser.add_argument("--shapes", default="320x1280,1280")
    parser.add_argument("--k", default="2,10", help="the two group sizes K1,K2")
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args(argv)
    if args.topology != "cpu":
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu

    import jax
    from jax.sharding import SingleDeviceSharding

    import velo_scale

    if args.topology == "cpu":
        device = jax.devices("cpu")[0]
        parts = [p for p in args.parts.split(",") if p in ("step", "adamw")]
    else:
        from jax.experimental import topologies

        device = topologies.get_topology_desc(args.topology, "tpu").devices[0]
        parts = args.parts.split(",")
    sharding = SingleDeviceSharding(device)

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    on_tpu = args.topology != "cpu"
    theta = velo_scale.init_weights(jax.random.PRNGKey(0), velo_scale.Architecture())
    k1, k2 = (int(k) for k in args.k.split(","))
    if k2 <= k1:
        raise ValueError(f"--k {args.k}: the second group size must be the larger")
    # The first compile pays one-time set-up: not counted.
    compile_cpu_seconds(
        *_part(parts[0], _shape(args.shapes.split(",")[0]), 1, sds, theta, on_tpu)
    )

    print(f"Compile CPU s per tensor on {args.topology} (one device), "
          f"groups of {k1} and {k2} like tensors; jax {jax.__version__}\n")  # fmt: skip
    print("| shape | part | K1 CPU s | K2 CPU s | per tensor ms | vs AdamW's per tensor |")
    print("|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        shape = _shape(spec)
        rows = {}
        for part in parts:
            t1 = compile_cpu_seconds(*_part(part, shape, k1, sds, theta, on_tpu))
            t2 = compile_cpu_seconds(*_part(part, shape, k2, sds, theta, on_tpu))
            rows[part] = (t1, t2, (t2 - t1) / (k2 - k1))
        base = rows.get("adamw", (0, 0, 0))[2]
        for part, (t1, t2, per) in rows.items():
            ratio = f"{per / base:.1f}x" if base > 0 and part != "adamw" else ""
            print(f"| {spec} | {part} | {t1:.2f} | {t2:.2f} | {per * 1000:.0f} | {ratio} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
