"""Wall-clock VeLO vs AdamW vs a naive jnp VeLO, and a ViT-B/16 train step.

Issue 13, item 4: the accelerator run (GPU; any JAX backend works). In one
process, on the default device:

1. *Updates.* For each parameter tree of `update_step.py` (default `10m`
   and `transformer`), the jitted `update` of `optax.adamw(1e-3)`,
   `velo_scale.velo` (its default path) and `naive_velo.naive_velo` (the
   plain jnp VeLO), each with its state donated and fed back as a train
   step runs it, timed one call of each in turn after 3 warm-up calls
   (medians of `--repeats`, `jax.block_until_ready` after each call).
   Ratios: VeLO / AdamW (goal <= 2.5x on GPU), naive / AdamW and naive /
   VeLO.
2. *A ViT-B/16 train step* (`velo_scale.models.ViT`, `ViT.B16`, 224x224x3
   inputs, 1000 classes, `--vit-batch` images): loss and gradients, the
   optimizer's update and `optax.apply_updates` in one jitted step, params
   and state donated; the same three optimizers, and the forward/backward
   pass alone for reference. PyLO reports 585 ms (naive) and 114 ms (its
   CUDA kernels) per ViT-B/16 step on an A100.

The inputs are synthetic (normal params, gradients and images, uniform
labels): the step time does not depend on their values. Compile seconds
are reported beside each.

Prints a markdown table per part and, with `--json`, writes every number.
`--smoke` runs both parts at toy sizes (a 2-tensor tree, `ViT.TINY` on
28x28 inputs) so that the script is tested on CPU
(`tests/test_gpu_step.py`); its times mean nothing.

Usage:
  python benchmarks/gpu_step.py [--trees 10m,transformer] [--vit-batch 32]
      [--repeats 20] [--json out.json] [--skip-vit] [--smoke]

On a lent H200 (the `device` tool; its image has jax, flax, optax and msgpack,
so the repo runs from its root without installing), as one command with
`timeout_s` ~540:
  PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_step.py \
      --json $OUT/gpu_step.json 2>&1 | tee $OUT/gpu_step.log
The JSON is rewritten after each tree and after the ViT part, so a run cut
short still returns what it measured.

Budget (session 33, H200, code before 1b8eb32): VeLO's compile was 25.5 s
on `10m` and ran past 220 s on `transformer`; the ViT part did not finish
in 300 s. XLA:GPU compiles without a GPU here (`tpu_aot.py --topology
h200`): the transformer now takes ~100 s on a 2-core host. Run the parts
as separate invocations inside the one `run` call, most wanted first, each
under its own `timeout`, with `--repeats 10`:
  ... gpu_step.py --trees 10m --repeats 10 --json $OUT/a.json   # + ViT
  ... gpu_step.py --trees transformer --skip-vit --repeats 10 --json $OUT/b.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import naive_velo  # noqa: E402
import update_step  # noqa: E402

import velo_scale  # noqa: E402

OPTIMIZERS = ("adamw", "velo", "naive")
SMOKE_TREE = {"w": (64, 32), "b": (32,)}


def make_optimizers(theta: Any, num_steps: int = 10_000) -> dict[str, Any]:
    """The three optimizers compared, by name."""
    return {
        "adamw": optax.adamw(1e-3),
        "velo": velo_scale.velo(num_steps, weights=theta),
        "naive": naive_velo.naive_velo(num_steps, theta),
    }


def time_updates(
    shapes: dict[str, tuple[int, ...]], theta: Any, repeats: int
) -> dict[str, Any]:
    """Part 1 for one tree: {name: {"ms", "compile_s"}} and the tree's size."""
    _, params, grads = update_step.make_problem(shapes)
    result: dict[str, Any] = {
        "params": sum(int(np.prod(s)) for s in shapes.values()),
        "tensors": len(shapes),
    }
    calls = {}
    for name, tx in make_optimizers(theta).items():
        # The naive VeLO is called as VeLO is (with a fixed loss).
        fn = update_step.update_call("adamw" if name == "adamw" else "velo", tx)
        state = jax.block_until_ready(tx.init(params))
        start = time.perf_counter()
        compiled = jax.jit(fn, donate_argnums=(1,)).lower(grads, state, params).compile()
        result[name] = {"compile_s": time.perf_counter() - start}
        box = [state]

        def call(compiled=compiled, box=box):
            updates, box[0] = compiled(grads, box[0], params)
            jax.block_until_ready((updates, box[0]))

        calls[name] = call
    for name, ms in update_step.interleaved(calls, repeats).items():
        result[name]["ms"] = ms
    return result


def vit_problem(smoke: bool, batch: int):
    """(model, params, images, labels) of the ViT step."""
    from velo_scale.models import ViT

    if smoke:
        model, image = ViT(**ViT.TINY, num_classes=10), 28
    else:
        model, image = ViT(**ViT.B16, num_classes=1000), 224
    k_init, k_x, k_y = jax.random.split(jax.random.PRNGKey(1), 3)
    images = jax.random.normal(k_x, (batch, image, image, 3), jnp.float32)
    labels = jax.random.randint(k_y, (batch,), 0, model.num_classes)
    params = jax.jit(model.init)(k_init, images[:1])["params"]
    return model, params, images, labels


def time_vit_step(theta: Any, smoke: bool, batch: int, repeats: int) -> dict[str, Any]:
    """Part 2: the ViT train step with each optimizer, and fwd/bwd alone."""
    model, params, images, labels = vit_problem(smoke, batch)

    def loss_fn(p):
        logits = model.apply({"params": p}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    result: dict[str, Any] = {
        "params": sum(int(x.size) for x in jax.tree_util.tree_leaves(params)),
        "batch": batch,
        "image": int(images.shape[1]),
    }
    calls = {}

    def fwd_bwd(p):
        return jax.value_and_grad(loss_fn)(p)

    compiled = jax.jit(fwd_bwd).lower(params).compile()
    result["fwd_bwd"] = {"compile_s": None}
    calls["fwd_bwd"] = lambda: jax.block_until_ready(compiled(params))
    for name, tx in make_optimizers(theta).items():

        def step(p, s, tx=tx, name=name):
            loss, grads = jax.value_and_grad(loss_fn)(p)
            if name == "adamw":
                updates, s = tx.update(grads, s, p)
            else:
                updates, s = tx.update(grads, s, p, loss=loss)
            return optax.apply_updates(p, updates), s, loss

        own = jax.tree_util.tree_map(jnp.copy, params)
        state = jax.block_until_ready(tx.init(own))
        start = time.perf_counter()
        compiled_step = jax.jit(step, donate_argnums=(0, 1)).lower(own, state).compile()
        result[name] = {"compile_s": time.perf_counter() - start}
        box = [own, state]

        def call(compiled_step=compiled_step, box=box):
            box[0], box[1], loss = compiled_step(box[0], box[1])
            jax.block_until_ready((box[0], box[1], loss))

        calls[name] = call
    for name, ms in update_step.interleaved(calls, repeats).items():
        result[name]["ms"] = ms
    return result


def _ratio(row: dict[str, Any], a: str, b: str) -> str:
    return f"{row[a]['ms'] / row[b]['ms']:.2f}x"


def updates_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| tree | params | tensors | AdamW / VeLO / naive (ms) | VeLO / AdamW "
        "| naive / AdamW | naive / VeLO | compile AdamW / VeLO / naive (s) |",
        "|" + "---|" * 8,
    ]
    for tree, row in rows.items():
        ms = " / ".join(f"{row[o]['ms']:.2f}" for o in OPTIMIZERS)
        cs = " / ".join(f"{row[o]['compile_s']:.1f}" for o in OPTIMIZERS)
        lines.append(
            f"| {tree} | {row['params']:,} | {row['tensors']} | {ms} "
            f"| {_ratio(row, 'velo', 'adamw')} | {_ratio(row, 'naive', 'adamw')} "
            f"| {_ratio(row, 'naive', 'velo')} | {cs} |"
        )
    return "\n".join(lines)


def vit_table(row: dict[str, Any]) -> str:
    lines = [
        "| ViT step | params | batch | ms | vs fwd/bwd alone | compile (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("fwd_bwd", *OPTIMIZERS):
        compile_s = row[name]["compile_s"]
        lines.append(
            f"| {name} | {row['params']:,} | {row['batch']} | {row[name]['ms']:.2f} "
            f"| {_ratio(row, name, 'fwd_bwd')} "
            f"| {'n/a' if compile_s is None else format(compile_s, '.1f')} |"
        )
    lines.append(
        f"\nVeLO / AdamW step: {_ratio(row, 'velo', 'adamw')}; "
        f"naive / VeLO step: {_ratio(row, 'naive', 'velo')}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="10m,transformer")
    parser.add_argument("--vit-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--weights", default=str(update_step.DEFAULT_WEIGHTS))
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--smoke", action="store_true", help="toy sizes (tests)")
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.vit_batch < 1:
        parser.error("--repeats and --vit-batch must be >= 1")

    theta = velo_scale.load_weights(args.weights)
    device = jax.devices()[0]
    out: dict[str, Any] = {
        "machine": update_step.machine_info(),
        "device": str(device.device_kind),
        "updates": {},
    }
    print(f"device: {device.platform} {device.device_kind}, jax {jax.__version__}")
    trees = {"smoke": SMOKE_TREE} if args.smoke else {
        name: update_step.tree_shapes(name) for name in args.trees.split(",") if name
    }

    def save():
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(out, indent=2))

    for name, shapes in trees.items():
        out["updates"][name] = time_updates(shapes, theta, args.repeats)
        print(f"  done: {name}", flush=True)
        save()
    print("\n" + updates_table(out["updates"]), flush=True)
    if not args.skip_vit:
        batch = 2 if args.smoke else args.vit_batch
        out["vit"] = time_vit_step(theta, args.smoke, batch, args.repeats)
        save()
        print("\n" + vit_table(out["vit"]), flush=True)
    return out


if __name__ == "__main__":
    main()
