"""The outer loop of meta-training: ES gradients, Adam on theta, checkpoints.

Each outer step draws `estimates_per_task` ES estimates per task (antithetic
pairs sharded over the `pop` mesh axis), normalises each estimate to unit
length, averages them and takes an Adam step on the meta-parameters. The
estimator is compiled once per static task configuration (`task_signature`)
and unroll length and reused by every task and estimate that shares it
(paper App. E.3: compilation is the expensive part). The unroll length
follows a curriculum over a few discrete lengths (short first), so each length
compiles once. The meta-parameters, the outer optimizer state and the RNG are
checkpointed with orbax (resume is bit-identical), and the result is exported
in the official `params` format with a JSON of sizes and provenance.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from velo_scale._src import weights as weights_lib
from velo_scale.meta.es import ESConfig, es_gradient, normalise, task_signature
from velo_scale.meta.init import normalised_momentum_theta

# A network small enough to meta-train on 2 CPU cores.
SMALL_ARCHITECTURE = weights_lib.Architecture(lstm_hidden_size=32, param_inits=16)

# Traces (= compilations) of the ES estimator per task signature, for tests and
# logs: tasks sharing a static configuration share one compiled estimator.
TRACES: collections.Counter = collections.Counter()


@flax.struct.dataclass
class MetaState:
    """theta (official structure), Adam state, outer step and PRNG key."""

    step: jax.Array
    theta: Any
    opt_state: Any
    key: jax.Array


def curriculum(step: int, num_outer_steps: int, lengths: Sequence[int]) -> int:
    """Unroll length at an outer step: `lengths` in equal shares of the run."""
    index = min(len(lengths) - 1, step * len(lengths) // max(num_outer_steps, 1))
    return int(lengths[index])


def meta_train(
    *,
    tasks: Sequence[Any] | Callable[[], Sequence[Any]],
    num_outer_steps: int,
    architecture: weights_lib.Architecture = SMALL_ARCHITECTURE,
    unroll_lengths: Sequence[int] = (20, 50, 100),
    num_pairs: int = 8,
    estimates_per_task: int = 1,
    sigma: float = 0.01,
    last_k: int = 5,
    learning_rate: float = 1e-3,
    seed: int = 0,
    workdir: str | pathlib.Path | None = None,
    checkpoint_every: int = 10,
    stop_after: int | None = None,
    num_devices: int | None = None,
    init_theta: Any = "normalised_momentum",
    progress: bool = True,
) -> MetaState:
    """Meta-trains VeLO weights with antithetic ES.

    Args:
      tasks: tasks (see `velo_scale.meta.tasks`) or a factory of them; one ES
        estimate per task per outer step.
      num_outer_steps: Adam steps on theta.
      architecture: sizes of the meta-trained network.
      unroll_lengths: the curriculum of inner horizons.
      num_pairs, sigma, last_k: ES settings (`ESConfig`).
      estimates_per_task: independent ES estimates per task per outer step
        (fresh perturbations, initialisation and batches each; paper E.3:
        compilation, not running, is the expensive part of a new task). Each
        estimate is normalised to unit length, then all are averaged, so
        every task keeps equal weight.
      learning_rate: Adam's step on theta.
      seed: theta init, perturbations and task draws.
      workdir: checkpoints (`checkpoints/`), `metrics.jsonl`, and the exported
        `params` + `params.json` at the end.
      checkpoint_every: outer steps between checkpoints (and at the end).
      stop_after: stop (after a checkpoint) at this outer step; a later call
        with the same workdir resumes.
      num_devices: devices for the pair axis (default: all; pairs must divide).
      init_theta: the starting meta-parameters: `"normalised_momentum"` (the
        hand-designed start of `velo_scale.meta.init`), `"random"`, or a theta
        dict.
      progress: print one line per outer step.

    Returns:
      The final `MetaState`.
    """
    from velo_scale.train.checkpoint import Checkpointer
    from velo_scale.train.metrics import MetricsWriter

    task_list = list(tasks() if callable(tasks) else tasks)
    if estimates_per_task < 1:
        raise ValueError(f"estimates_per_task must be >= 1; got {estimates_per_task}.")
    devices = jax.devices()[: num_devices or len(jax.devices())]
    if num_pairs % len(devices):
        raise ValueError(
            f"num_pairs={num_pairs} must be divisible by the {len(devices)} devices "
            "the pairs are spread over (set num_devices)."
        )
    mesh = Mesh(np.array(devices), ("pop",), axis_types=(AxisType.Auto,))
    pair_sharding = NamedSharding(mesh, P("pop"))
    adam = optax.adam(learning_rate)

    def fresh(key: jax.Array) -> MetaState:
        init_key, key = jax.random.split(key)
        if isinstance(init_theta, str) and init_theta == "normalised_momentum":
            theta = normalised_momentum_theta(init_key, architecture)
        elif isinstance(init_theta, str) and init_theta == "random":
            theta = weights_lib.init_weights(init_key, architecture)
        elif isinstance(init_theta, str):
            raise ValueError(
                f"init_theta must be 'normalised_momentum', 'random' or a theta dict; "
                f"got {init_theta!r}."
            )
        else:
            theta = init_theta
        theta = jax.tree_util.tree_map(jnp.asarray, theta)
        return MetaState(jnp.zeros((), jnp.int32), theta, adam.init(theta), key)

    replicated = NamedSharding(mesh, P())
    state = jax.device_put(fresh(jax.random.PRNGKey(seed)), replicated)
    workdir = pathlib.Path(workdir) if workdir is not None else None
    checkpointer = Checkpointer(workdir / "checkpoints") if workdir else None
    writer = MetricsWriter(workdir, tensorboard=False) if workdir else None
    if checkpointer and checkpointer.latest_step() is not None:
        state = checkpointer.restore(checkpointer.latest_step(), state)

    signatures = [task_signature(t) for t in task_list]
    estimators: dict[tuple, Callable] = {}

    def estimator(i: int, length: int) -> Callable:
        """The compiled ES estimate of task i; shared by every task with the
        same static configuration (`task_signature`) and unroll length."""
        cache_key = (signatures[i], length)
        if cache_key not in estimators:
            config = ESConfig(num_pairs, sigma, length, min(last_k, length))
            task, signature = task_list[i], signatures[i]

            def estimate(theta: Any, key: jax.Array) -> tuple[Any, jax.Array]:
                TRACES[signature] += 1  # runs once per trace (compilation)
                g, loss = es_gradient(theta, task, key, config, sharding=pair_sharding)
                return normalise(g), loss

            estimators[cache_key] = jax.jit(
                estimate, out_shardings=(replicated, replicated)
            )
        return estimators[cache_key]

    def apply(state: MetaState, grads: list, key: jax.Array) -> MetaState:
        grad = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
        updates, opt_state = adam.update(grad, state.opt_state, state.theta)
        theta = optax.apply_updates(state.theta, updates)
        return MetaState(state.step + 1, theta, opt_state, key)

    apply_jit = jax.jit(apply, out_shardings=replicated)

    def outer_step(state: MetaState, length: int) -> tuple[MetaState, jax.Array]:
        key, *task_keys = jax.random.split(state.key, len(task_list) + 1)
        grads, losses = [], []
        for i, task_key in enumerate(task_keys):
            keys = (
                [task_key]
                if estimates_per_task == 1
                else list(jax.random.split(task_key, estimates_per_task))
            )
            task_losses = []
            for k in keys:
                g, loss = estimator(i, length)(state.theta, k)
                grads.append(g)
                task_losses.append(loss)
            losses.append(jnp.mean(jnp.stack(task_losses)))
        return apply_jit(state, grads, key), jnp.stack(losses)

    last = num_outer_steps if stop_after is None else min(stop_after, num_outer_steps)
    t0 = time.time()
    try:
        for outer in range(int(state.step), last):
            length = curriculum(outer, num_outer_steps, unroll_lengths)
            state, losses = outer_step(state, length)
            metrics = {
                "meta_loss": float(jnp.mean(losses)),
                "unroll_length": float(length),
            }
            metrics.update(
                {
                    f"meta_loss/{t.name}_{i}": float(x)
                    for i, (t, x) in enumerate(zip(task_list, losses))
                }
            )
            if writer:
                writer.write(outer + 1, metrics, split="train")
            if progress:
                print(
                    f"meta step {outer + 1}/{num_outer_steps} unroll {length} "
                    f"meta-loss {metrics['meta_loss']:.4f} ({time.time() - t0:.0f} s)",
                    flush=True,
                )
            if checkpointer and (
                (outer + 1) % checkpoint_every == 0 or outer + 1 == last
            ):
                checkpointer.save(outer + 1, state)
    finally:
        if checkpointer:
            checkpointer.close()
        if writer:
            writer.close()
    if workdir and int(state.step) == num_outer_steps:
        export(workdir, state, task_list, architecture=architecture, seed=seed)
    return state


def export(
    workdir: pathlib.Path,
    state: MetaState,
    tasks: Sequence[Any],
    *,
    architecture: weights_lib.Architecture,
    seed: int,
) -> pathlib.Path:
    """Writes `workdir/params` (official format) and `workdir/params.json`."""
    path = workdir / "params"
    theta = jax.tree_util.tree_map(np.asarray, state.theta)
    gen_id = f"velo_scale-es-{seed}-{int(state.step)}"
    weights_lib.save_weights(path, theta, gen_id=gen_id, step=int(state.step))
    info = {
        "architecture": dataclasses.asdict(architecture),
        "gen_id": gen_id,
        "outer_steps": int(state.step),
        "tasks": [getattr(t, "name", type(t).__name__) for t in tasks],
        "sha256": weights_lib.sha256(theta),
        "made_by": "velo_scale.meta.meta_train (antithetic ES)",
    }
    (workdir / "params.json").write_text(json.dumps(info, indent=2))
    return path
