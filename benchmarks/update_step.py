"""Benchmark one jitted optimizer update: velo_scale's VeLO vs optax.adamw.

For each parameter tree this measures, per optimizer:

* update time: median wall time of `--repeats` calls of the compiled
  `update(grads, state, params[, loss=loss])` (after 2 warm-up calls, each call
  followed by `jax.block_until_ready`; nothing donated), and the same with
  the state donated and each call's new state fed to the next, as a train
  step runs (`donated`: the new state can reuse the old one's buffers).
  Both optimizers are timed in one process, one call of each in turn
  (`run_paired`): a fresh process's first large arrays cost more, which
  inflated AdamW's time by up to ~1.7x when each ran in its own;
* compile time: `jax.jit(...).lower(...).compile()` wall time;
* XLA temp bytes per parameter: `compiled.memory_analysis().temp_size_in_bytes`
  divided by the number of parameters (reported for VeLO);
* peak RSS: `ru_maxrss` of a fresh subprocess that builds the tree, inits the
  optimizer, compiles and runs it (each optimizer and tree in its own process).

Trees: `1m`, `10m`, `50m`, `100m` are k square float32 matrices [d, d] plus
biases [d]; `transformer` is a ~17.6M-parameter, 196-tensor transformer-like
tree of mixed shapes. The timing does not depend on VeLO's weight values, so
the default is the small reference file in the tests.

Targets (issue 13, CPU): VeLO update <= 8x AdamW at 10.5M params (the `10m`
tree); VeLO temp memory <= 8 bytes/param; the `transformer` tree compiles in
<= 15 s. The script prints a table of them after the results. (The TPU
targets are measured by `benchmarks/tpu_aot.py`.)

Usage:
  python benchmarks/update_step.py [--trees 1m,10m,50m,transformer]
      [--repeats 5] [--weights PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO_ROOT / "tests/data/reference/velo/theta_perturbed.msgpack"
SQUARE_TREES = {
    "1m": (4, 512),
    "10m": (10, 1024),
    "50m": (12, 2048),
    "100m": (24, 2048),
}
TREES = [*SQUARE_TREES, "transformer"]
RESULT_PREFIX = "RESULT_JSON "


def tree_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the named parameter tree (flat dict of name -> shape)."""
    if name in SQUARE_TREES:
        layers, d = SQUARE_TREES[name]
        shapes = {}
        for i in range(layers):
            shapes[f"layer{i:02d}/kernel"] = (d, d)
            shapes[f"layer{i:02d}/bias"] = (d,)
        return shapes
    if name != "transformer":
        raise ValueError(f"unknown tree {name!r}; choose from {TREES}")
    return transformer_shapes()


def transformer_shapes(layers: int = 12) -> dict[str, tuple[int, ...]]:
    """The `transformer` tree with `layers` blocks (12: 196 tensors, 17.6M params;
    16 tensors per block, 4 outside the blocks)."""
    vocab, max_len, d, heads, head_dim = 8192, 512, 320, 5, 64
    shapes = {"embed/tokens": (vocab, d), "embed/positions": (max_len, d)}
    for i in range(layers):
        p = f"block{i:02d}"
        for proj in ("query", "key", "value"):
            shapes[f"{p}/attn/{proj}/kernel"] = (d, heads, head_dim)
            shapes[f"{p}/attn/{proj}/bias"] = (heads, head_dim)
        shapes[f"{p}/attn/out/kernel"] = (heads, head_dim, d)
        shapes[f"{p}/attn/out/bias"] = (d,)
        shapes[f"{p}/mlp/wi/kernel"] = (d, 4 * d)
        shapes[f"{p}/mlp/wi/bias"] = (4 * d,)
        shapes[f"{p}/mlp/wo/kernel"] = (4 * d, d)
        shapes[f"{p}/mlp/wo/bias"] = (d,)
        for ln in ("ln_attn", "ln_mlp"):
            shapes[f"{p}/{ln}/scale"] = (d,)
            shapes[f"{p}/{ln}/bias"] = (d,)
    shapes["final_ln/scale"] = (d,)
    shapes["final_ln/bias"] = (d,)
    return shapes


def random_tree(shapes: dict[str, tuple[int, ...]], key: jax.Array, scale: float):
    """float32 normals of the given shapes, times `scale`."""
    keys = jax.random.split(key, len(shapes))
    return {
        name: scale * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, shapes.items())
    }


def make_optimizer(name: str, weights: str):
    import optax

    if name == "adamw":
        return optax.adamw(1e-3)
    import velo_scale

    theta = velo_scale.load_weights(weights)
    return velo_scale.velo(num_steps=10_000, weights=theta)


def make_problem(tree: str | dict[str, tuple[int, ...]]):
    """(shapes, params, grads) of the named tree (or of these shapes), the
    same every call."""
    shapes = tree_shapes(tree) if isinstance(tree, str) else tree
    key_p, key_g = jax.random.split(jax.random.PRNGKey(0))
    return shapes, random_tree(shapes, key_p, 0.02), random_tree(shapes, key_g, 1.0)


def update_call(opt_name: str, tx):
    """`(grads, state, params) -> (updates, state)` of the optimizer (VeLO
    with a fixed loss)."""
    if opt_name == "velo":
        loss = jnp.float32(2.5)
        return lambda g, s, p: tx.update(g, s, p, loss=loss)
    return lambda g, s, p: tx.update(g, s, p)


def run_worker(opt_name: str, tree: str, repeats: int, weights: str) -> dict[str, Any]:
    """Builds the tree and optimizer, compiles and times one update."""
    shapes, params, grads = make_problem(tree)
    tx = make_optimizer(opt_name, weights)
    state = jax.block_until_ready(tx.init(params))
    step = jax.jit(update_call(opt_name, tx))

    start = time.perf_counter()
    compiled = step.lower(grads, state, params).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp_bytes = None if memory is None else int(memory.temp_size_in_bytes)

    for _ in range(2):
        jax.block_until_ready(compiled(grads, state, params))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(grads, state, params))
        times.append(time.perf_counter() - start)

    n_params = sum(int(np.prod(s)) for s in shapes.values())
    return {
        "optimizer": opt_name,
        "tree": tree,
        "params": n_params,
        "tensors": len(shapes),
        "update_ms": 1e3 * statistics.median(times),
        "update_ms_all": [1e3 * t for t in times],
        "compile_s": compile_s,
        "temp_bytes": temp_bytes,
        "temp_bytes_per_param": None if temp_bytes is None else temp_bytes / n_params,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": machine_info(),
    }


def run_paired(tree: str, repeats: int, weights: str) -> dict[str, Any]:
    """Both optimizers' update times in one process, call by call in turn.

    A process's first large arrays cost more than later ones (in a fresh
    process AdamW's `10m` update took 22-26 ms, then 14-15 ms once another
    update had run in it; VeLO's moved less), so the times compared are
    taken side by side: after 2 warm-up calls of each, `repeats` rounds of
    one AdamW and one VeLO call, each undonated and donated (the state
    donated and the new state fed to the next call, as a train step runs
    it: the new state may then reuse the old one's buffers). Medians, ms.
    """
    _, params, grads = make_problem(tree)
    calls = {}
    for opt_name in ("adamw", "velo"):
        tx = make_optimizer(opt_name, weights)
        fn = update_call(opt_name, tx)
        state = jax.block_until_ready(tx.init(params))
        for donated in (False, True):
            jitted = jax.jit(fn, donate_argnums=(1,) if donated else ())
            compiled = jitted.lower(grads, state, params).compile()
            # The donated call gets (and then feeds back) its own state.
            own = jax.tree_util.tree_map(jnp.copy, state) if donated else state
            box = [own]

            def call(compiled=compiled, box=box, donated=donated):
                updates, new_state = compiled(grads, box[0], params)
                jax.block_until_ready((updates, new_state))
                if donated:
                    box[0] = new_state

            calls[f"{opt_name}_{'donated_' if donated else ''}ms"] = call
    return interleaved(calls, repeats, warmups=2)


def interleaved(
    calls: dict[str, Callable[[], None]], repeats: int, warmups: int = 3
) -> dict[str, float]:
    """Median wall ms of each call, timed one of each in turn.

    `warmups` rounds first, untimed; then `repeats` rounds, each calling
    every entry of `calls` once in order (each call blocks until its
    results are ready). Side by side, so that a host's drift over the run
    falls on all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats + warmups):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmups:
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(ts) for name, ts in times.items()}


def spawn_worker(opt_name: str, tree: str, repeats: int, weights: str) -> dict:
    """Runs `run_worker` in a fresh Python process and parses its JSON line."""
    cmd = [sys.executable, __file__, "--worker", opt_name, "--tree", tree]
    cmd += ["--repeats", str(repeats), "--weights", weights]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    sys.stderr.write(proc.stdout + proc.stderr)
    raise RuntimeError(f"worker {opt_name}/{tree} failed (exit {proc.returncode})")


def add_paired(row: dict[str, dict], paired: dict[str, float]) -> None:
    """Puts `run_paired`'s times in a row of per-optimizer results: the
    compared `update_ms` and `update_donated_ms`; each worker's own-process
    median stays as `update_ms_alone`."""
    for opt in ("adamw", "velo"):
        result = row[opt]
        result["update_ms_alone"] = result["update_ms"]
        result["update_ms"] = paired[f"{opt}_ms"]
        result["update_donated_ms"] = paired[f"{opt}_donated_ms"]


def machine_info() -> dict[str, Any]:
    """The host and JAX set-up (called in a worker: it starts a JAX backend)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    device = jax.devices()[0]
    return {
        "processor": platform.processor() or platform.machine(),
        "nproc": cpus or os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": device.platform,
        "device": device.device_kind,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, dict]]) -> str:
    header = (
        "| tree | params | tensors | AdamW update (ms) | VeLO update (ms) | ratio "
        "| donated: AdamW / VeLO (ms), ratio "
        "| AdamW compile (s) | VeLO compile (s) | VeLO temp bytes/param "
        "| peak RSS AdamW / VeLO (MB) |"
    )
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        a, v = row["adamw"], row["velo"]
        lines.append(
            f"| {v['tree']} | {v['params']:,} | {v['tensors']} "
            f"| {a['update_ms']:.2f} | {v['update_ms']:.2f} "
            f"| {v['update_ms'] / a['update_ms']:.2f}x "
            f"| {a['update_donated_ms']:.2f} / {v['update_donated_ms']:.2f}, "
            f"{v['update_donated_ms'] / a['update_donated_ms']:.2f}x "
            f"| {a['compile_s']:.2f} | {v['compile_s']:.2f} "
            f"| {_fmt(v['temp_bytes_per_param'], '.2f')} "
            f"| {a['peak_rss_mb']:.0f} / {v['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def targets_table(rows: list[dict[str, dict]]) -> str:
    """Issue 13's CPU targets, for the trees measured."""
    by_tree = {row["velo"]["tree"]: row for row in rows}
    lines = ["| target | tree | measured | status |", "|---|---|---|---|"]

    def add(target: str, tree: str, value: float | None, limit: float, unit: str):
        if value is None:
            lines.append(f"| {target} | {tree} | n/a | not measured |")
            return
        status = "met" if value <= limit else "**missed**"
        lines.append(f"| {target} | {tree} | {value:.2f}{unit} | {status} |")

    if "10m" in by_tree:
        v, a = by_tree["10m"]["velo"], by_tree["10m"]["adamw"]
        add("update <= 8x AdamW at 10.5M", "10m", v["update_ms"] / a["update_ms"], 8, "x")
        add(
            "the same, state donated (a train step)", "10m",
            v["update_donated_ms"] / a["update_donated_ms"], 8, "x",
        )  # fmt: skip
    for tree, row in by_tree.items():
        add("temp <= 8 B/param", tree, row["velo"]["temp_bytes_per_param"], 8, " B/param")
    if "transformer" in by_tree:
        v = by_tree["transformer"]["velo"]
        add("transformer compile <= 15 s", "transformer", v["compile_s"], 15, " s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="1m,10m,50m,transformer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument(
        "--worker", choices=["adamw", "velo", "paired"], help=argparse.SUPPRESS
    )
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    if args.worker == "paired":
        result = run_paired(args.tree, args.repeats, args.weights)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    if args.worker:
        result = run_worker(args.worker, args.tree, args.repeats, args.weights)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    trees = [t.strip() for t in args.trees.split(",") if t.strip()]
    for tree in trees:
        if tree not in TREES:
            parser.error(f"unknown tree {tree!r}; choose from {','.join(TREES)}")
    rows = []
    for tree in trees:
        row = {
            opt: spawn_worker(opt, tree, args.repeats, args.weights)
            for opt in ("adamw", "velo")
        }
        add_paired(row, spawn_worker("paired", tree, args.repeats, args.weights))
        rows.append(row)
        print(f"  done: {tree}", file=sys.stderr, flush=True)
    # The parent never starts a JAX backend (on an accelerator it would hold
    # memory the workers need): the machine is the one the workers saw.
    machine = rows[0]["velo"]["machine"]
    print(
        f"machine: {machine['processor']}, nproc={machine['nproc']}, "
        f"python {machine['python']}, jax {machine['jax']}, "
        f"backend {machine['backend']} ({machine['device']})\n"
    )
    print(markdown_table(rows))
    print("\nTargets (issue 13, CPU):\n")
    print(targets_table(rows))
    if args.json_path:
        payload = {"machine": machine, "repeats": args.repeats, "results": rows}
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
