"""Where a compiled update's time goes on XLA:CPU, kernel by kernel.

Compiles `velo(...).update` and `optax.adamw(...).update` for one tree (the
trees of `update_step.py`), runs each `--repeats` times under
`jax.profiler` (perfetto trace) and prints, per step:

* the wall time of the step;
* the kernels' own time, summed over XLA:CPU's worker threads (a kernel
  split across the 2 cores counts both halves, so this sum can exceed the
  wall time; and XLA:CPU runs independent kernels at once on more threads
  than cores, so a kernel's span includes time it waited for a core);
* per group, the wall time during which at least one of its kernels ran
  (`covered`, the union of their spans): what the group costs the step
  when nothing else ran beside it, the better measure of the two;
* a table of VeLO's kernels grouped by role: the fusion's name without its
  numeric suffix (`multiply_negate_fusion.3` -> `multiply_negate_fusion`),
  with the count per step, thread-ms per step, share of the total, and the
  `op_name` of one of them from the compiled HLO's metadata (which says
  which JAX operation the fusion ends in: `.../reduce`, `.../select_n`).

The grouping is XLA's naming, not VeLO's phases; the `op_name` column ties
a group to the code. Numbers from one run only: on a shared 2-core host a
kernel's time varies by up to ~30% between runs, so compare within a run.

Usage:
  JAX_PLATFORMS=cpu python benchmarks/cpu_kernels.py [--tree 10m]
      [--repeats 5] [--top 15] [--donate]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_step  # noqa: E402  (a sibling script, not a package)

_SUFFIX = re.compile(r"\.\d+$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.*)$", re.MULTILINE)
_OP_NAME = re.compile(r'metadata=\{op_name="([^"]*)"')


def kernel_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the `op_name` of its metadata ("" without), from
    HLO text: every instruction, so that kernels XLA made without metadata
    (`wrapped_reduce-window`) are counted too."""
    names = {}
    for name, rest in _INSTRUCTION.findall(hlo_text):
        op = _OP_NAME.search(rest)
        names[name] = op.group(1) if op else ""
    return names


def covered_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of `(start, end)` intervals: the wall time
    during which at least one of them ran."""
    total, end = 0.0, None
    for lo, hi in sorted(intervals):
        if end is None or lo > end:
            total, end = total + (hi - lo), hi
        elif hi > end:
            total, end = total + (hi - end), hi
    return total


def _kernel_events(
    trace_dir: str, names: dict[str, str]
) -> list[tuple[str, float, float]]:
    """(kernel name, start, duration in µs) of every kernel event in the trace."""
    files = sorted(glob.glob(f"{trace_dir}/**/*.json.gz", recursive=True))
    if not files:
        raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [
        (e["name"], float(e.get("ts", 0.0)), float(e.get("dur", 0.0)))
        for e in events
        if e.get("ph") == "X" and e.get("name") in names
    ]


def profile(compiled, args, repeats: int, donate: bool = False) -> dict:
    """Wall ms per step and kernel thread-ms per step, grouped by role.

    With `donate`, `compiled` donates the state (`args[1]`) and each call's
    new state is fed to the next, as a train step runs."""
    names = kernel_names(compiled.as_text())
    args = list(args)
    if donate:
        args[1] = jax.tree_util.tree_map(jnp.copy, args[1])

    def call():
        updates, state = compiled(*args)
        if donate:
            args[1] = state
        jax.block_until_ready((updates, state))

    for _ in range(2):
        call()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        wall_ms = 1e3 * (time.perf_counter() - start) / repeats
        jax.profiler.stop_trace()
        events = _kernel_events(trace_dir, names)
    if not events:
        raise RuntimeError(
            "the trace has no kernel events named as in the compiled HLO; "
            "this jax's profiler may not trace XLA:CPU kernels"
        )
    total = collections.Counter()
    count = collections.Counter()
    spans = collections.defaultdict(list)
    example = {}
    for name, start, dur in events:
        group = _SUFFIX.sub("", name)
        total[group] += dur / 1e3 / repeats
        count[group] += 1
        spans[group].append((start, start + dur))
        example.setdefault(group, names[name])
    every = [span for group in spans.values() for span in group]
    return {
        "wall_ms": wall_ms,
        "kernel_ms": sum(total.values()),
        "covered_ms": covered_us(every) / 1e3 / repeats,
        "groups": [
            {
                "kernel": group,
                "per_step": count[group] / repeats,
                "thread_ms": ms,
                "covered_ms": covered_us(spans[group]) / 1e3 / repeats,
                "op_name": example[group],
            }
            for group, ms in total.most_common()
        ],
    }


def compile_update(opt_name: str, tree: str, weights: str, donate: bool = False):
    """The compiled update of `update_step`'s optimizer on `tree` (the state
    donated with `donate`), and its args."""
    _, params, grads = update_step.make_problem(tree)
    tx = update_step.make_optimizer(opt_name, weights)
    state = jax.block_until_ready(tx.init(params))
    args = (grads, state, params)
    fn = update_step.update_call(opt_name, tx)
    jitted = jax.jit(fn, donate_argnums=(1,) if donate else ())
    return jitted.lower(*args).compile(), args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="10m", choices=update_step.TREES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--weights", default=str(update_step.DEFAULT_WEIGHTS))
    parser.add_argument(
        "--donate", action="store_true",
        help="donate the state and feed each new state back (a train step)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    results = {}
    for opt_name in ("adamw", "velo"):
        compiled, call_args = compile_update(
            opt_name, args.tree, args.weights, args.donate
        )
        results[opt_name] = profile(compiled, call_args, args.repeats, args.donate)
    a, v = results["adamw"], results["velo"]
    print(f"machine: {update_step.machine_info()}")
    print(
        f"tree {args.tree}{' (state donated)' if args.donate else ''}: step wall ms AdamW {a['wall_ms']:.2f}, VeLO "
        f"{v['wall_ms']:.2f} ({v['wall_ms'] / a['wall_ms']:.1f}x); kernel "
        f"thread-ms AdamW {a['kernel_ms']:.2f}, VeLO {v['kernel_ms']:.2f}; "
        f"covered ms AdamW {a['covered_ms']:.2f}, VeLO {v['covered_ms']:.2f}"
    )
    print()
    print(
        "| VeLO kernel group | per step | thread-ms / step | covered ms / step "
        "| share of the step | op_name (one) |"
    )
    print("|---|---|---|---|---|---|")
    for g in sorted(v["groups"], key=lambda g: -g["covered_ms"])[: args.top]:
        print(
            f"| {g['kernel']} | {g['per_step']:.0f} | {g['thread_ms']:.2f} "
            f"| {g['covered_ms']:.2f} | {100 * g['covered_ms'] / v['wall_ms']:.1f}% "
            f"| {g['op_name'] or '(none)'} |"
        )


if __name__ == "__main__":
    main()
