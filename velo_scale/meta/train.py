"""The outer loop of meta-training: ES gradients, Adam on theta, checkpoints.

Each outer step draws `estimates_per_task` ES estimates per task (antithetic
pairs sharded over the `pop` mesh axis), normalises each estimate to unit
length, averages them and takes an Adam step on the meta-parameters. The
estimator is compiled once per static task configuration (`task_signature`)
and unroll length and reused by every task and estimate that shares it
(paper App. E.3: compilation is the expensive part); the estimates that share
one compiled estimator run as a single vmapped batch. The unroll length
follows a curriculum over a few discrete lengths (short first), so each length
compiles once. The meta-parameters, the outer optimizer state and the RNG are
checkpointed with orbax (resume is bit-identical), and the result is exported
in the official `params` format with a JSON of sizes and provenance.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
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
from velo_scale.meta.es import (
    ESConfig,
    es_gradient,
    normalise,
    pes_gradient,
    pes_task_init,
    split_runtime,
    task_signature,
    with_runtime,
)
from velo_scale.meta.init import normalised_momentum_theta, search_lr_mult
from velo_scale.train.progress import ProgressBar

# A network small enough to meta-train on 2 CPU cores.
SMALL_ARCHITECTURE = weights_lib.Architecture(lstm_hidden_size=32, param_inits=16)

# Traces (= compilations) of the ES estimator per task signature, for tests and
# logs: tasks sharing a static configuration share one compiled estimator.
TRACES: collections.Counter = collections.Counter()

# This process's compiled ES / PES estimators, least recently used first, by
# (task signature, unroll length, ES settings, shardings): a later meta_train
# in the same process (a resume, a sweep over outer settings) reuses them.
_ESTIMATORS: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()


def clear_compiled() -> None:
    """Drops the compiled estimators kept by `meta_train` (the next call
    compiles its own)."""
    _ESTIMATORS.clear()


@flax.struct.dataclass
class MetaState:
    """theta (official structure), Adam state, outer step, PRNG key, and the
    PES states of the current tasks (one per task and estimate; None with
    full-unroll ES)."""

    step: jax.Array
    theta: Any
    opt_state: Any
    key: jax.Array
    pes: Any = None


def curriculum(step: int, num_outer_steps: int, lengths: Sequence[int]) -> int:
    """Unroll length at an outer step: `lengths` in equal shares of the run."""
    index = min(len(lengths) - 1, step * len(lengths) // max(num_outer_steps, 1))
    return int(lengths[index])


def round_seed(seed: int, round_index: int) -> int:
    """The task-sampling seed of resampling round `round_index` (a pure
    function of both, so a resumed run draws the same tasks)."""
    return int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0])


def meta_train(
    *,
    tasks: Sequence[Any] | Callable[..., Sequence[Any]],
    num_outer_steps: int,
    architecture: weights_lib.Architecture = SMALL_ARCHITECTURE,
    unroll_lengths: Sequence[int] = (20, 50, 100),
    num_pairs: int = 8,
    estimates_per_task: int = 1,
    sigma: float = 0.01,
    last_k: int = 5,
    truncation_length: int = 0,
    learning_rate: float = 1e-3,
    resample_every: int = 0,
    max_compiled: int = 64,
    seed: int = 0,
    workdir: str | pathlib.Path | None = None,
    checkpoint_every: int = 10,
    stop_after: int | None = None,
    num_devices: int | None = None,
    init_theta: Any = "normalised_momentum",
    init_lr_mult: float | str = 10.0,
    init_schedule: str = "constant",
    lr_mult_candidates: Sequence[float] = (3.0, 10.0, 30.0, 100.0, 300.0),
    progress: bool = True,
) -> MetaState:
    """Meta-trains VeLO weights with antithetic ES or PES.

    Args:
      tasks: tasks (see `velo_scale.meta.tasks`), or a factory of them. With
        `resample_every` > 0 the factory is called as `tasks(seed=s)` with a
        fresh seed every `resample_every` outer steps (e.g. gin
        `meta_train.tasks = @task_distribution`, no parentheses), so
        meta-training sees a new draw from the task distribution each round.
      num_outer_steps: Adam steps on theta.
      architecture: sizes of the meta-trained network.
      unroll_lengths: the curriculum of inner horizons.
      num_pairs, sigma, last_k: ES settings (`ESConfig`).
      estimates_per_task: independent ES estimates per task per outer step
        (fresh perturbations, initialisation and batches each; paper E.3:
        compilation, not running, is the expensive part of a new task). Each
        estimate is normalised to unit length, then all are averaged, so
        every task keeps equal weight.
      truncation_length: K > 0 uses Persistent ES (`es.pes_gradient`): each
        task (and estimate) keeps a `PESState` across outer steps, every
        outer step runs the next K inner steps of each unroll, and the PES
        states are checkpointed with theta. K must divide every unroll
        length; the states restart when the tasks or the length change.
        0: full unrolls (the meta-loss is the mean of the last `last_k`
        losses).
      learning_rate: Adam's step on theta.
      resample_every: outer steps between task draws (0: the tasks are drawn
        once).
      max_compiled: compiled estimators kept (least recently used dropped);
        tasks that differ only in `es.RUNTIME_FIELDS` (the init scale) share
        one. They stay for the process, so a second call (a resume, a sweep)
        reuses them; `clear_compiled()` drops them.
      seed: theta init, perturbations and task draws.
      workdir: checkpoints (`checkpoints/`), `metrics.jsonl`, and the exported
        `params` + `params.json` at the end.
      checkpoint_every: outer steps between checkpoints (and at the end).
      stop_after: stop (after a checkpoint) at this outer step; a later call
        with the same workdir resumes.
      num_devices: devices for the pair axis (default: all; pairs must divide).
      init_theta: the starting meta-parameters: `"normalised_momentum"` (the
        hand-designed start of `velo_scale.meta.init`), `"random"`, a path to a
        weights file (continue from it), or a theta dict.
      init_lr_mult: the normalised-momentum start's step-size multiplier, or
        `"search"`: chosen among `lr_mult_candidates` by meta-loss on the
        first draw of tasks at the longest unroll (`init.search_lr_mult`).
      init_schedule: the normalised-momentum start's lr_mult over training:
        "constant" or "cosine" (`init.normalised_momentum_theta`).
      progress: a progress bar (tqdm, stderr) with the meta-loss.

    Returns:
      The final `MetaState`.
    """
    from velo_scale.train.checkpoint import Checkpointer
    from velo_scale.train.metrics import MetricsWriter

    if estimates_per_task < 1:
        raise ValueError(f"estimates_per_task must be >= 1; got {estimates_per_task}.")
    if resample_every and not callable(tasks):
        raise ValueError(
            "resample_every > 0 needs a task factory (e.g. gin "
            "`meta_train.tasks = @task_distribution`, without parentheses)."
        )
    if init_lr_mult == "search" and init_theta != "normalised_momentum":
        raise ValueError(
            "init_lr_mult='search' tunes the normalised-momentum start; it needs "
            f"init_theta='normalised_momentum', not {init_theta!r}."
        )
    if truncation_length and any(n % truncation_length for n in unroll_lengths):
        raise ValueError(
            f"truncation_length={truncation_length} must divide every unroll "
            f"length; got {tuple(unroll_lengths)}."
        )
    devices = jax.devices()[: num_devices or len(jax.devices())]
    if num_pairs % len(devices):
        raise ValueError(
            f"num_pairs={num_pairs} must be divisible by the {len(devices)} devices "
            "the pairs are spread over (set num_devices)."
        )
    mesh = Mesh(np.array(devices), ("pop",), axis_types=(AxisType.Auto,))
    pair_sharding = NamedSharding(mesh, P("pop"))
    replicated = NamedSharding(mesh, P())
    adam = optax.adam(learning_rate)

    @functools.cache
    def tasks_of_round(round_index: int) -> list[Any]:
        if resample_every:
            drawn = tasks(seed=round_seed(seed, round_index))
        else:
            drawn = tasks() if callable(tasks) else tasks
        return list(drawn)

    def round_of(step: int) -> int:
        return step // resample_every if resample_every else 0

    def start_theta(key: jax.Array, lr_mult: float) -> Any:
        if isinstance(init_theta, str) and init_theta == "normalised_momentum":
            return normalised_momentum_theta(
                key, architecture, lr_mult=lr_mult, schedule=init_schedule
            )
        if isinstance(init_theta, str) and init_theta == "random":
            return weights_lib.init_weights(key, architecture)
        if isinstance(init_theta, (str, pathlib.Path)):
            path = pathlib.Path(init_theta)
            if not path.exists():
                raise ValueError(
                    f"init_theta must be 'normalised_momentum', 'random', a weights "
                    f"file or a theta dict; got {init_theta!r} (no such file)."
                )
            theta = weights_lib.load_weights(path)
            if weights_lib.Architecture.of(theta) != architecture:
                raise ValueError(
                    f"init_theta {path} has architecture "
                    f"{weights_lib.Architecture.of(theta)}, not {architecture}; set "
                    "meta_train.architecture to match."
                )
            return theta
        return init_theta

    def fresh(key: jax.Array, lr_mult: float) -> MetaState:
        init_key, key = jax.random.split(key)
        theta = jax.tree_util.tree_map(jnp.asarray, start_theta(init_key, lr_mult))
        return MetaState(jnp.zeros((), jnp.int32), theta, adam.init(theta), key)

    def pes_states(theta: Any, step: int, key: jax.Array) -> tuple | None:
        """Fresh PES states (t = 0) for the tasks and unroll length of `step`."""
        if not truncation_length:
            return None
        length = curriculum(step, num_outer_steps, unroll_lengths)
        states = []
        for i, task in enumerate(tasks_of_round(round_of(step))):
            config = ESConfig(num_pairs, sigma, length, 1, truncation_length)
            for j in range(estimates_per_task):
                k = jax.random.fold_in(key, i * estimates_per_task + j)
                states.append(pes_task_init(theta, task, k, config))
        return jax.device_put(tuple(states), replicated)

    workdir = pathlib.Path(workdir) if workdir is not None else None
    checkpointer = Checkpointer(workdir / "checkpoints") if workdir else None
    writer = MetricsWriter(workdir, tensorboard=False) if workdir else None
    latest = checkpointer.latest_step() if checkpointer else None
    if latest is not None:  # the structure only: every value is restored
        state = fresh(jax.random.PRNGKey(seed), 1.0)
        state = state.replace(
            pes=pes_states(state.theta, max(latest - 1, 0), state.key)
        )
        state = checkpointer.restore(latest, jax.device_put(state, replicated))
    else:
        lr_mult = init_lr_mult
        if lr_mult == "search":
            lr_mult, _ = search_lr_mult(
                tasks_of_round(0),
                architecture=architecture,
                candidates=lr_mult_candidates,
                num_steps=max(unroll_lengths),
                last_k=last_k,
                key=jax.random.fold_in(jax.random.PRNGKey(seed), 1),
                schedule=init_schedule,
                log=print if progress else None,
            )
        state = fresh(jax.random.PRNGKey(seed), float(lr_mult))
        if writer and init_lr_mult == "search":
            writer.write(0, {"init_lr_mult": float(lr_mult)}, split="train")
        state = jax.device_put(state, replicated)

    # One compiled estimator per (static task configuration, unroll length)
    # and ES settings, kept for the process (`_ESTIMATORS`), least recently
    # used dropped past `max_compiled`.
    estimators = _ESTIMATORS

    @functools.cache
    def static_config(task: Any) -> tuple[Any, tuple[float, ...], tuple]:
        """(template, runtime values, signature) of a task, computed once per
        task object (the signature hashes the task's data arrays)."""
        template, runtime = split_runtime(task)
        return template, runtime, task_signature(template)

    def estimator(task: Any, length: int) -> tuple[Callable, jax.Array]:
        """(the compiled ES / PES estimate of `task`'s static configuration,
        the task's runtime values to call it with)."""
        template, runtime, signature = static_config(task)
        config = ESConfig(num_pairs, sigma, length, min(last_k, length),
                          truncation_length)  # fmt: skip
        # Everything `estimate` closes over besides the template.
        cache_key = (signature, config, pair_sharding, replicated)
        if cache_key in estimators:
            estimators.move_to_end(cache_key)
        else:

            def one(theta, key, runtime):
                task = with_runtime(template, runtime)
                g, loss = es_gradient(theta, task, key, config, sharding=pair_sharding)
                return normalise(g), loss

            def estimate(theta, key, runtime, pes=None):
                """ES: `key` [B] and `runtime` [B, R] stack B estimates (tasks
                of this configuration and their repeats), vmapped; returns
                grads and losses with a leading [B]. PES: one estimate."""
                TRACES[signature] += 1  # runs once per trace (compilation)
                if truncation_length:
                    task = with_runtime(template, runtime)
                    g, loss, pes = pes_gradient(
                        theta, task, pes, key, config, sharding=pair_sharding
                    )
                    return normalise(g), loss, pes
                g, loss = jax.vmap(one, in_axes=(None, 0, 0))(theta, key, runtime)
                return g, loss, None

            estimators[cache_key] = jax.jit(
                estimate, out_shardings=(replicated, replicated, replicated)
            )
            while len(estimators) > max_compiled:
                estimators.popitem(last=False)
        return estimators[cache_key], jnp.asarray(runtime, jnp.float32)

    def apply(state: MetaState, grads: list, key: jax.Array) -> MetaState:
        """Adam step on the mean of every estimate (`grads`: trees whose
        leaves stack estimates on a leading axis)."""
        count = sum(jax.tree_util.tree_leaves(g)[0].shape[0] for g in grads)
        grad = jax.tree_util.tree_map(
            lambda *g: sum(jnp.sum(x, axis=0) for x in g) / count, *grads
        )
        updates, opt_state = adam.update(grad, state.opt_state, state.theta)
        theta = optax.apply_updates(state.theta, updates)
        return MetaState(state.step + 1, theta, opt_state, key)

    apply_jit = jax.jit(apply, out_shardings=replicated)

    def outer_step(state: MetaState, step: int, length: int, task_list: list):
        key, pes_key, *task_keys = jax.random.split(state.key, len(task_list) + 2)
        pes = state.pes
        previous = step - 1
        if truncation_length and (
            step == 0
            or round_of(step) != round_of(previous)
            or length != curriculum(previous, num_outer_steps, unroll_lengths)
        ):
            pes = pes_states(state.theta, step, pes_key)
        # One (task, estimate) slot per ES estimate, in a fixed order.
        slots = []
        for i, (task, task_key) in enumerate(zip(task_list, task_keys)):
            keys = (
                [task_key]
                if estimates_per_task == 1
                else list(jax.random.split(task_key, estimates_per_task))
            )
            fn, runtime = estimator(task, length)
            slots.extend((i, fn, runtime, k) for k in keys)
        grads, new_pes = [], []
        slot_losses: list[list[jax.Array]] = [[] for _ in task_list]
        if truncation_length:
            for n, (i, fn, runtime, k) in enumerate(slots):
                g, loss, slot = fn(state.theta, k, runtime, pes[n])
                grads.append(jax.tree_util.tree_map(lambda x: x[None], g))
                new_pes.append(slot)
                slot_losses[i].append(loss)
        else:  # slots sharing a compiled estimator run as one vmapped batch
            groups: dict[int, list] = {}
            for slot in slots:
                groups.setdefault(id(slot[1]), []).append(slot)
            for group in groups.values():
                fn = group[0][1]
                g, loss, _ = fn(
                    state.theta,
                    jnp.stack([k for _, _, _, k in group]),
                    jnp.stack([r for _, _, r, _ in group]),
                )
                grads.append(g)
                for b, (i, _, _, _) in enumerate(group):
                    slot_losses[i].append(loss[b])
        losses = [jnp.mean(jnp.stack(x)) for x in slot_losses]
        new_state = apply_jit(state.replace(pes=None), grads, key)
        if truncation_length:
            new_state = new_state.replace(pes=tuple(new_pes))
        return new_state, jnp.stack(losses)

    last = num_outer_steps if stop_after is None else min(stop_after, num_outer_steps)
    bar = ProgressBar(progress, int(state.step), num_outer_steps, unit="outer step")
    try:
        for outer in range(int(state.step), last):
            length = curriculum(outer, num_outer_steps, unroll_lengths)
            task_list = tasks_of_round(round_of(outer))
            state, losses = outer_step(state, outer, length, task_list)
            metrics = {
                "meta_loss": float(jnp.mean(losses)),
                "unroll_length": float(length),
            }
            if not resample_every:
                metrics.update(
                    {
                        f"meta_loss/{t.name}_{i}": float(x)
                        for i, (t, x) in enumerate(zip(task_list, losses))
                    }
                )
            if writer:
                writer.write(outer + 1, metrics, split="train")
            bar.update(meta_loss=metrics["meta_loss"], unroll=length)
            if checkpointer and (
                (outer + 1) % checkpoint_every == 0 or outer + 1 == last
            ):
                checkpointer.save(outer + 1, state)
    finally:
        bar.close()
        if checkpointer:
            checkpointer.close()
        if writer:
            writer.close()
    if workdir and int(state.step) > 0 and jax.process_index() == 0:
        # Also after stop_after: a stopped run leaves a usable file.
        drawn = [t for r in range(round_of(int(state.step) - 1) + 1)
                 for t in tasks_of_round(r)]  # fmt: skip
        export(workdir, state, drawn, architecture=architecture, seed=seed,
               num_outer_steps=num_outer_steps)  # fmt: skip
    return state


def export(
    workdir: pathlib.Path,
    state: MetaState,
    tasks: Sequence[Any],
    *,
    architecture: weights_lib.Architecture,
    seed: int,
    num_outer_steps: int | None = None,
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
        "num_outer_steps": num_outer_steps,
        "tasks": dict(
            collections.Counter(getattr(t, "name", type(t).__name__) for t in tasks)
        ),
        "sha256": weights_lib.sha256(theta),
        "made_by": "velo_scale.meta.meta_train (antithetic ES)",
    }
    (workdir / "params.json").write_text(json.dumps(info, indent=2))
    return path


def export_checkpoint(
    workdir: str | pathlib.Path,
    out: str | pathlib.Path | None = None,
    *,
    step: int | None = None,
) -> pathlib.Path:
    """Writes the theta of a meta-training checkpoint as a `params` file.

    For weights from a run that is still going (or was stopped): reads
    `workdir/checkpoints/<step>` (default: the newest complete one) without
    needing the run's configuration.

    Args:
      workdir: the meta-training run's directory.
      out: the file to write (default `workdir/params_<step>`).
      step: which checkpoint.

    Returns:
      The path written.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(workdir).expanduser().absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise ValueError(
                f"{directory} has no complete checkpoint"
                + (f" for step {step}" if step is not None else "")
                + f"; steps there: {list(manager.all_steps())}."
            )
        restored = manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()
    theta = restored["theta"] if isinstance(restored, dict) else restored.theta
    theta = jax.tree_util.tree_map(np.asarray, theta)
    path = pathlib.Path(out) if out is not None else directory.parent / f"params_{step}"
    gen_id = f"velo_scale-es-checkpoint-{step}"
    weights_lib.save_weights(path, theta, gen_id=gen_id, step=int(step))
    return path
