"""`train`: the training loop every recipe uses.

Keyword-only arguments, no gin inside (gin binds `train` at the entry point).
A `velo_scale.workloads.Workload` says what is trained (model, loss,
evaluation); a bare `model` means image classification. One jitted step: loss
and gradients, the optimizer update (VeLO gets `loss=`), non-finite steps
skipped. Params, optimizer state and batches are
sharded on a mesh built from `mesh_shape`/`axis_names`; params by the model's
logical axis annotations and `logical_axis_rules`, the optimizer state by
`velo_scale.state_shardings`, batches along the `data` axis. The train state
(including the data position) is checkpointed with orbax so that a resumed run
continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from velo_scale._src import schedule as schedule_lib
from velo_scale._src import sharding as sharding_lib
from velo_scale.data import BatchIterator, load_dataset, load_tfds
from velo_scale.train import checkpoint as ckpt_lib
from velo_scale.train import lock as lock_lib
from velo_scale.train import metrics as metrics_lib
from velo_scale.train import run_config
from velo_scale.train.metrics import METRICS_FILE, MetricsWriter, read_metrics
from velo_scale.train.optimizers import Optimizer
from velo_scale.train.progress import ProgressBar, StepTimer
from velo_scale.train.signals import StopOnSignal, TrainingInterrupted
from velo_scale.train.state import TrainState
from velo_scale.workloads.base import Workload, split_variables
from velo_scale.workloads.classification import Classification

# Logical axis -> mesh axis. Unlisted logical axes are replicated.
DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", "data"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("conv_in", None),
    ("conv_out", "model"),
)


class NonFiniteLossError(RuntimeError):
    """Training stopped on non-finite values: too many consecutive steps had a
    non-finite loss, gradient, update or optimizer state, or the initial
    state was non-finite. Nothing non-finite was committed or checkpointed."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      state: the final `TrainState` (on the mesh).
      final_loss: mean training loss over the last 10% of the run's steps
        (`metrics.FINAL_LOSS_LABEL`; skipped steps left out).
      eval_metrics: the last evaluation (the workload's metrics), or {}.
      steps_per_second: steps/s of this process after its first step (which
        includes compilation; its time is in the summary line and the first
        train row's `first_step_s`).
      workdir: where metrics and checkpoints went (or None).
    """

    state: TrainState
    final_loss: float
    eval_metrics: dict[str, float]
    steps_per_second: float
    workdir: str | None


def make_mesh(mesh_shape: Sequence[int] | None, axis_names: Sequence[str]) -> Mesh:
    """A mesh over the first prod(mesh_shape) devices (default: all devices on
    the first axis; one -1 entry takes the devices the other axes leave, as
    for a pod slice of unknown size). Axis types are Auto (GSPMD)."""
    devices = jax.devices()
    if mesh_shape is None:
        mesh_shape = (len(devices),) + (1,) * (len(axis_names) - 1)
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if mesh_shape.count(-1) == 1:  # -1: all the devices the other axes leave.
        rest = math.prod(s for s in mesh_shape if s != -1)
        mesh_shape = tuple(len(devices) // rest if s == -1 else s for s in mesh_shape)
    if len(mesh_shape) != len(axis_names):
        raise ValueError(
            f"mesh_shape {mesh_shape} and axis_names {tuple(axis_names)} must have "
            "the same length."
        )
    need = math.prod(mesh_shape)
    if need > len(devices):
        raise ValueError(
            f"mesh_shape {mesh_shape} needs {need} devices but only {len(devices)} "
            "are visible (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "before starting Python)."
        )
    grid = np.array(devices[:need]).reshape(mesh_shape)
    return Mesh(grid, tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))


def _source(data: Any, split: str, data_dir: str | None) -> Any:
    """A dataset from its gin spelling: `"name"`, `"name:split"`,
    `"tfds:name"` / `"tfds:name:split"` (prepared TFDS under `data_dir`), or
    already a dict of arrays / random-access source."""
    if not isinstance(data, str):
        return data
    if data.startswith("tfds:"):
        name, _, explicit = data[len("tfds:") :].partition(":")
        if data_dir is None:
            raise ValueError(
                f"train.data={data!r} needs train.data_dir (the TFDS data dir)."
            )
        return load_tfds(name, explicit or split, data_dir=data_dir)
    name, _, explicit = data.partition(":")
    return load_dataset(name, explicit or split, data_dir=data_dir)


def train(
    *,
    model: nn.Module | None = None,
    workload: Workload | None = None,
    optimizer: Callable[..., Optimizer],
    num_steps: int,
    data: Any = "fashion_mnist",
    eval_data: Any = None,
    data_dir: str | None = None,
    batch_size: int = 128,
    eval_batch_size: int = 1000,
    mesh_shape: Sequence[int] | None = None,
    axis_names: Sequence[str] = ("data", "model"),
    logical_axis_rules: Sequence[tuple[str, Any]] = DEFAULT_AXIS_RULES,
    eval_every: int | None = None,
    workdir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    init_from: str | os.PathLike | None = None,
    seed: int = 0,
    stop_after: int | None = None,
    max_nonfinite_steps: int = 10,
    log_every: int = 1,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    continuation: str | None = None,
    log_schedule: bool = True,
) -> TrainResult:
    """Trains a workload (or `model` as an image classifier).

    Args:
      model: a flax linen module with logical-axis annotated params mapping
        `batch["image"]` to logits; shorthand for
        `workload=Classification(model)`.
      workload: a `velo_scale.workloads.Workload` (model, loss, evaluation);
        give exactly one of `model` and `workload`.
      optimizer: a factory from `velo_scale.train.optimizers` (called with
        `num_steps`); VeLO receives the loss every step.
      num_steps: total optimizer steps of the run (VeLO's horizon).
      data: dataset name (`velo_scale.data.load_dataset`, `"name:split"`) or
        a dict of arrays / random-access source in the workload's batch
        format; a name's "train" split is used.
        `"tfds:name[:split]"` reads a prepared TFDS dataset under `data_dir`.
      eval_data: same; default the "test" split of `data` when it is a name.
      data_dir: where the dataset files are (default: each loader's own).
      batch_size: global batch size (divisible by the mesh's data axis).
      mesh_shape, axis_names: the device mesh (default: all devices on
        `data`).
      logical_axis_rules: logical -> mesh axis rules for the params.
      eval_every: evaluate every this many steps and at the end (None: only
        at the end when eval data exist).
      workdir: metrics (`metrics.jsonl`, TensorBoard), `config.json` and,
        unless `checkpoint_dir` is given, `checkpoints/`.
      checkpoint_every: save every this many steps, and always at the end and
        at `stop_after` (None: only then).
      keep_checkpoints: how many checkpoints to keep.
      init_from: a checkpoint directory whose params start this run (with a
        fresh optimizer), for fine-tuning.
      seed: params init, data order and the step RNG.
      stop_after: stop (after saving) once this step is reached, as a
        preempted job would; a later call resumes from the checkpoint.
      max_nonfinite_steps: stop with `NonFiniteLossError` after this many
        consecutive skipped steps.
      log_every: write train metrics every this many steps.
      progress: show a progress bar (tqdm) on stderr.
      config: written to `workdir/config.json` (e.g. the gin config).
      continuation: how to continue a VeLO run resumed with a larger
        `num_steps` than it was started with: 'naive', 'increase' or 'reset'
        (`velo_scale.extend_horizon`; the VeLO paper's Naive / Increase /
        Reset). Without it such a resume is a `ConfigMismatchError`. Applied
        once, recorded in `workdir/continuations.json`.
      log_schedule: log the step sizes the optimizer takes (VeLO's implicit
        schedule, paper Sec. 7): every train row gets `step_size/<role>`, the
        mean over tensors of that role (`kernel`, `bias`, ...) of
        `rms(update) / rms(param)`, and for VeLO `lr_mult/<role>`; the
        per-tensor values go to `workdir/schedule.jsonl`
        (`velo-scale plot --schedule WORKDIR`). Per-tensor reductions only.

    Returns:
      A `TrainResult`.

    Raises:
      WorkdirLockedError: another live process runs in `workdir`.
      ConfigMismatchError: resuming `workdir` with a different run's
        num_steps, seed, batch size, optimizer, data or model.
      TrainingInterrupted: SIGTERM or SIGINT; the last completed step was
        checkpointed and the same call resumes from it.
      NonFiniteLossError: `max_nonfinite_steps` consecutive skipped steps.
    """
    if num_steps < 1:
        raise ValueError(f"train.num_steps must be >= 1; got {num_steps}.")
    if (model is None) == (workload is None):
        raise ValueError(
            "train needs exactly one of `model` (an image classifier) and "
            "`workload` (e.g. train.workload = @Classification()); got "
            f"model={type(model).__name__ if model else None}, "
            f"workload={type(workload).__name__ if workload else None}."
        )
    workdir = pathlib.Path(workdir).expanduser() if workdir is not None else None
    if checkpoint_dir is None and workdir is not None:
        checkpoint_dir = workdir / "checkpoints"
    run_dirs = [d for d in (workdir, checkpoint_dir) if d is not None]
    for d in run_dirs:
        ckpt_lib.check_writable(d)  # a clear error before anything else
    # One run per workdir; SIGTERM/SIGINT stop after a step, with a checkpoint.
    with (
        lock_lib.lock_run_directories(run_dirs),
        StopOnSignal(enabled=checkpoint_dir is not None) as stop,
    ):
        return _train(
            model=model, workload=workload, optimizer=optimizer,
            num_steps=num_steps, data=data, eval_data=eval_data,
            data_dir=data_dir, batch_size=batch_size,
            eval_batch_size=eval_batch_size, mesh_shape=mesh_shape,
            axis_names=axis_names, logical_axis_rules=logical_axis_rules,
            eval_every=eval_every, workdir=workdir, checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
            init_from=init_from, seed=seed, stop_after=stop_after,
            max_nonfinite_steps=max_nonfinite_steps, log_every=log_every,
            progress=progress, config=config, stop=stop,
            continuation=continuation, log_schedule=log_schedule,
        )  # fmt: skip


def _check_continuation(
    continuation: str | None, optimizer: str, change: Any, num_steps: int
) -> None:
    """A continuation needs VeLO, a known method and a longer horizon."""
    if continuation not in run_config.CONTINUATION_METHODS:
        raise ValueError(
            f"train.continuation must be one of {run_config.CONTINUATION_METHODS}; "
            f"got {continuation!r}."
        )
    if optimizer != "velo":
        raise run_config.ConfigMismatchError(
            f"train.continuation={continuation!r} continues VeLO's horizon, but the "
            f"run's optimizer is {optimizer!r}, whose schedule is fixed by "
            f"num_steps={change.saved}. Use a new --workdir for a run of "
            f"{num_steps} steps."
        )
    if num_steps < int(change.saved):
        raise run_config.ConfigMismatchError(
            f"train.continuation extends a run: num_steps={num_steps} is shorter "
            f"than the run's {change.saved}. Use a new --workdir."
        )


def _extend_horizons(opt_state: Any, num_steps: int, method: str) -> Any:
    """`extend_horizon` applied to every VeLO state inside `opt_state`."""
    from velo_scale._src.horizon import extend_horizon
    from velo_scale._src.state import VeLOState

    def apply(x):
        if isinstance(x, VeLOState):
            return extend_horizon(x, num_steps, method)
        return x

    return jax.tree_util.tree_map(
        apply, opt_state, is_leaf=lambda x: isinstance(x, VeLOState)
    )


def _train(
    *,
    model,
    workload,
    optimizer,
    num_steps,
    data,
    eval_data,
    data_dir,
    batch_size,
    eval_batch_size,
    mesh_shape,
    axis_names,
    logical_axis_rules,
    eval_every,
    workdir,
    checkpoint_dir,
    checkpoint_every,
    keep_checkpoints,
    init_from,
    seed,
    stop_after,
    max_nonfinite_steps,
    log_every,
    progress,
    config,
    stop: StopOnSignal,
    continuation: str | None = None,
    log_schedule: bool = True,
) -> TrainResult:
    """`train` once its directories are locked (see `train`)."""
    if workload is None:
        workload = Classification(model)
    mesh = make_mesh(mesh_shape, axis_names)
    data_axis = axis_names[0]
    if batch_size % mesh.shape[data_axis]:
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by the mesh's "
            f"{data_axis!r} axis ({mesh.shape[data_axis]} devices)."
        )
    train_source = _source(data, "train", data_dir)
    if eval_data is None and isinstance(data, str):
        # Without an explicit split, evaluate on the dataset's "test" split.
        has_split = data.removeprefix("tfds:").count(":") > 0
        eval_data = None if has_split else f"{data}:test"
    eval_source = (
        _source(eval_data, "test", data_dir) if eval_data is not None else None
    )
    iterator = BatchIterator(train_source, batch_size, seed=seed)
    sample = next(BatchIterator(train_source, batch_size, seed=seed))

    opt = optimizer(num_steps=num_steps)
    init_key = jax.random.PRNGKey(seed)
    sample = {k: jnp.asarray(v) for k, v in sample.items()}
    boxed = jax.eval_shape(workload.init, init_key, sample)
    abstract_params, _ = split_variables(nn.meta.unbox(boxed))
    # Mesh specs of every collection (params and e.g. batch_stats) at once.
    param_specs, model_state_specs = split_variables(
        sharding_lib.mesh_param_specs(
            nn.meta.unbox(boxed),
            nn.logical_to_mesh(nn.get_partition_spec(boxed), logical_axis_rules),
            mesh,
            replicate_indivisible=True,
        )
    )
    param_sh, model_state_sh = (
        jax.tree_util.tree_map(
            lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
        )
        for specs in (param_specs, model_state_specs)
    )
    opt_sh = sharding_lib.state_shardings(
        opt.tx, abstract_params, mesh, param_specs, replicate_indivisible=True
    )
    replicated = NamedSharding(mesh, P())
    state_sh = TrainState(
        step=replicated,
        params=param_sh,
        model_state=model_state_sh,
        opt_state=opt_sh,
        rng=replicated,
        data_epoch=replicated,
        data_index=replicated,
        nonfinite_streak=replicated,
        nonfinite_total=replicated,
    )
    batch_sh = NamedSharding(mesh, P(data_axis))

    def init_state(key: jax.Array) -> TrainState:
        params_key, step_key = jax.random.split(key)
        params, model_state = split_variables(
            nn.meta.unbox(workload.init(params_key, sample))
        )
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero,
            params=params,
            model_state=model_state,
            opt_state=opt.tx.init(params),
            rng=step_key,
            data_epoch=zero,
            data_index=zero,
            nonfinite_streak=zero,
            nonfinite_total=zero,
        )

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng, dropout_key = jax.random.split(state.rng)

        (loss, (workload_metrics, model_state)), grads = jax.value_and_grad(
            workload.loss, has_aux=True
        )(state.params, state.model_state, batch, dropout_key)
        if opt.takes_loss:
            updates, opt_state = opt.tx.update(
                grads, state.opt_state, state.params, loss=loss
            )
        else:
            updates, opt_state = opt.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Commit nothing non-finite: the loss, gradients and everything the
        # step would commit (params = params + updates, model and optimizer
        # state) are checked in one fused reduction; a failing step is skipped.
        finite = _all_finite((loss, grads, params, model_state, opt_state))
        keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b), new, old
        )
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            model_state=keep(model_state, state.model_state),
            opt_state=keep(opt_state, state.opt_state),
            rng=rng,
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            **workload_metrics,
            "grad_norm": optax.tree.norm(grads),
            "skipped": (~finite).astype(jnp.int32),
        }
        tensors = {}
        if log_schedule:
            # A skipped step applied nothing: its step sizes are 0.
            applied = keep(updates, jax.tree_util.tree_map(jnp.zeros_like, updates))
            per_tensor = schedule_lib.schedule(
                applied, state.params, new_state.opt_state, opt.velo_weights
            )
            for kind, values in per_tensor.items():
                metrics.update(
                    {f"{kind}/{r}": v for r, v in schedule_lib.by_role(values).items()}
                )
                tensors.update({f"{kind}:{path}": v for path, v in values.items()})
        return new_state, metrics, tensors

    jit_init = jax.jit(init_state, out_shardings=state_sh)
    jit_step = jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None, None),
        donate_argnums=0,
    )

    finite_flags = jax.jit(_finite_flags, out_shardings=replicated)

    def nonfinite_reason(state: TrainState) -> str | None:
        names = [n for n, _ in _inexact_leaves(_committed(state))]
        flags = np.asarray(finite_flags(state))
        bad = [n for n, ok in zip(names, flags) if not ok]
        if not bad:
            return None
        return f"non-finite values in {len(bad)} array(s): {', '.join(bad[:3])}"

    abstract_state = jax.eval_shape(init_state, init_key)
    requested = run_config.describe_run(
        num_steps=num_steps, seed=seed, batch_size=batch_size, optimizer=opt.name,
        data=data, workload=workload, abstract_state=abstract_state,
        mesh_shape=mesh.devices.shape, axis_names=axis_names, config=config,
    )  # fmt: skip
    primary = jax.process_index() == 0
    checkpointer = writer = schedule_writer = None
    try:
        if checkpoint_dir is not None:
            checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, keep=keep_checkpoints)
        # A resumed workdir must be the same run: checked before any restore.
        saved = run_config.read_config(workdir) if workdir is not None else None
        continuations: list = []
        pending = []
        if saved is not None:
            continuations = run_config.read_continuations(workdir)
            pending = run_config.check_resume(
                run_config.effective_record(saved, continuations),
                requested,
                workdir=workdir,
                allow=("num_steps",) if continuation else (),
            )
            if pending:
                _check_continuation(continuation, opt.name, pending[0], num_steps)

        # Start: the newest intact checkpoint of the run, else fresh (or
        # init_from params).
        state = None
        if checkpointer is not None:
            target = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                abstract_state,
                state_sh,
            )
            _, state = checkpointer.restore_latest_intact(
                target, check=nonfinite_reason
            )
        if state is not None:
            iterator.set_state(
                {"epoch": int(state.data_epoch), "index": int(state.data_index)}
            )
            # Continuations recorded at or after the restored step were not
            # in its checkpoint yet (a stop before the next save): apply them
            # again, then the new one.
            todo = [c for c in continuations if c["at_step"] >= int(state.step)]
            if pending:
                todo.append(
                    {"at_step": int(state.step), "num_steps": num_steps,
                     "method": continuation}
                )  # fmt: skip
                if primary:
                    run_config.record_continuation(
                        workdir, int(state.step), num_steps, continuation
                    )
            for c in todo:
                state = state.replace(
                    opt_state=_extend_horizons(
                        state.opt_state, c["num_steps"], c["method"]
                    )
                )
            if todo:
                state = jax.device_put(state, state_sh)
        else:
            state = jit_init(init_key)
            if init_from is not None:
                state = state.replace(
                    params=ckpt_lib.restore_params(init_from, state.params)
                )
                state = state.replace(
                    opt_state=jax.jit(opt.tx.init, out_shardings=opt_sh)(state.params)
                )
            if reason := nonfinite_reason(state):
                raise NonFiniteLossError(
                    f"the initial train state has {reason} (model init"
                    + (f" or init_from={str(init_from)!r}" if init_from else "")
                    + "); nothing was trained or checkpointed."
                )
        first = int(state.step)
        if workdir is not None and saved is None and primary:
            run_config.write_config(workdir, requested)
        writer = MetricsWriter(workdir) if workdir is not None else None
        if writer is not None and log_schedule:
            schedule_writer = MetricsWriter(
                workdir, tensorboard=False, filename=metrics_lib.SCHEDULE_FILE
            )

        def evaluate(state: TrainState) -> dict[str, float]:
            return workload.evaluate(
                state.params, state.model_state, eval_source, eval_batch_size
            )

        last = num_steps if stop_after is None else min(num_steps, stop_after)
        if first >= last:
            return _nothing_to_do(state, first, num_steps, stop_after, workdir, opt)
        bar = ProgressBar(
            progress, first, num_steps, first_message="compiling the train step..."
        )
        window = metrics_lib.final_loss_window(num_steps)
        loss_key = f"loss(last {window})"
        timer = StepTimer()
        recent: list[float] = []
        eval_metrics: dict[str, float] = {}
        steps_run = 0
        saved_step = first
        try:
            for step in range(first + 1, last + 1):
                batch = jax.device_put(next(iterator), batch_sh)
                position = iterator.get_state()
                state, metrics, tensors = jit_step(state, batch)
                state = state.replace(
                    data_epoch=jax.device_put(np.int32(position["epoch"]), replicated),
                    data_index=jax.device_put(np.int32(position["index"]), replicated),
                )
                steps_run += 1
                metrics = {k: float(v) for k, v in metrics.items()}
                timer.step()
                if steps_run == 1:  # compilation included: reported apart
                    metrics[metrics_lib.COMPILE_KEY] = timer.first_step_s
                if metrics["skipped"]:
                    streak = int(state.nonfinite_streak)
                    if streak >= max_nonfinite_steps:
                        raise NonFiniteLossError(
                            _nonfinite_stop_message(streak, step, checkpointer)
                        )
                else:
                    recent = (recent + [metrics["loss"]])[-window:]
                metrics["nonfinite_total"] = float(state.nonfinite_total)
                if writer and (step % log_every == 0 or step == last):
                    writer.write(step, metrics, split="train")
                    if schedule_writer is not None:
                        schedule_writer.write(step, jax.device_get(tensors))
                if eval_source is not None and (
                    (eval_every and step % eval_every == 0) or step == num_steps
                ):
                    eval_metrics = evaluate(state)
                    if writer:
                        writer.write(step, eval_metrics, split="eval")
                    bar.write(_eval_line(step, num_steps, eval_metrics))
                signum = _stop_requested(stop)
                if checkpointer and (
                    (checkpoint_every and step % checkpoint_every == 0)
                    or step == last
                    or signum
                ):
                    _save_finite(checkpointer, step, state, nonfinite_reason)
                    saved_step = step
                bar.update(**{loss_key: float(np.mean(recent)) if recent else math.nan})
                if signum and step < last:
                    if checkpointer:
                        checkpointer.wait()  # on disk before we say so
                    raise _interrupted(
                        signum, step, saved_step if checkpointer else None
                    )
        finally:
            bar.close()
    finally:
        if checkpointer is not None:
            checkpointer.close()
        for w in (writer, schedule_writer):
            if w is not None:
                w.close()
    rate = timer.steps_per_second or 0.0
    final_loss = float(np.mean(recent)) if recent else float("nan")
    summary = (
        f"{opt.name}: step {int(state.step)}/{num_steps}, "
        f"{metrics_lib.FINAL_LOSS_LABEL} {final_loss:.4f}"
        + "".join(f", eval {k} {v:.4g}" for k, v in eval_metrics.items())
        + (f", {rate:.3g} {metrics_lib.RATE_LABEL}" if rate else "")
        + (
            f", first step {timer.first_step_s:.1f} s (compilation included)"
            if timer.first_step_s is not None
            else ""
        )
    )
    print(summary, flush=True)
    return TrainResult(
        state, final_loss, eval_metrics, rate, str(workdir) if workdir else None
    )


def _eval_line(step: int, num_steps: int, eval_metrics: Mapping[str, float]) -> str:
    """`eval at step 200/600: loss 0.5210, accuracy 0.8201, ...`."""
    values = ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items())
    return f"eval at step {step}/{num_steps}: {values or 'no metrics'}"


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path).lstrip(".")


def _inexact_leaves(tree: Any) -> list[tuple[str, jax.Array]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        (_leaf_name(path), x)
        for path, x in flat
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]


def _all_finite(tree: Any) -> jax.Array:
    """bool[]: every float leaf of `tree` is finite (one fused reduction)."""
    leaves = [x for _, x in _inexact_leaves(tree)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _committed(state: TrainState) -> dict[str, Any]:
    """The parts of the state that must stay finite."""
    return {
        "params": state.params,
        "model_state": state.model_state,
        "opt_state": state.opt_state,
    }


def _finite_flags(state: TrainState) -> jax.Array:
    """bool[n]: each float array of `_committed(state)` is finite."""
    leaves = [x for _, x in _inexact_leaves(_committed(state))]
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)])


def _save_finite(checkpointer, step: int, state: TrainState, nonfinite_reason) -> None:
    """Saves `state` unless it holds non-finite values (then raises)."""
    if reason := nonfinite_reason(state):
        raise NonFiniteLossError(
            f"the train state at step {step} has {reason}; it was not "
            "checkpointed. " + _last_checkpoint_sentence(checkpointer)
        )
    checkpointer.save(step, state)


def _last_checkpoint_sentence(checkpointer) -> str:
    if checkpointer is None:
        return "This run writes no checkpoints (no workdir)."
    checkpointer.wait()
    step = checkpointer.latest_step()
    if step is None:
        return "No checkpoint has been written yet."
    return (
        f"The last checkpoint, step {step}, holds finite params and optimizer "
        "state (checked before it was written)."
    )


def _nonfinite_stop_message(streak: int, step: int, checkpointer) -> str:
    return (
        f"{streak} consecutive steps (up to step {step}) had a non-finite loss, "
        "gradient, update or optimizer state; each was skipped with params, model "
        "state and optimizer state unchanged. Lower the learning rate, enable "
        "clipping (optimizer clip_norm) or check the data. "
        + _last_checkpoint_sentence(checkpointer)
        + " Resuming repeats the same steps unless the data or settings change."
    )


def _stop_requested(stop: StopOnSignal) -> int | None:
    """The signal that asked to stop, agreed by all processes (the stop of one
    host stops all at the same step)."""
    signum = stop.requested
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        seen = multihost_utils.process_allgather(np.int32(signum or 0))
        signum = int(np.max(seen)) or None
    return signum


def _interrupted(
    signum: int, step: int, checkpoint_step: int | None
) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    saved = (
        f"checkpoint step {checkpoint_step} is on disk; run the same command to "
        "resume from it"
        if checkpoint_step is not None
        else "this run writes no checkpoints"
    )
    return TrainingInterrupted(
        f"stopped by {name} after step {step}: {saved}.",
        signum=signum,
        step=step,
        checkpoint_step=checkpoint_step,
    )


def _nothing_to_do(state, first, num_steps, stop_after, workdir, opt) -> TrainResult:
    """The workdir's run is already at its last (or `stop_after`) step."""
    final_loss, eval_metrics = float("nan"), {}
    if workdir is not None and (workdir / METRICS_FILE).exists():
        rows = read_metrics(workdir)
        losses = [
            r["loss"]
            for r in rows
            if r["split"] == "train" and r.get("loss") is not None
        ]
        window = metrics_lib.final_loss_window(len(losses))
        final_loss = float(np.mean(losses[-window:])) if losses else final_loss
        evals = [r for r in rows if r["split"] == "eval" and r["step"] == first]
        if evals:
            eval_metrics = {
                k: v for k, v in evals[-1].items()
                if k not in ("step", "split", "time") and isinstance(v, (int, float))
            }  # fmt: skip
    if first >= num_steps:
        print(
            f"{opt.name}: the run in {workdir} is complete (step {first} of "
            f"{num_steps}); nothing to train. Use a new --workdir to train again.",
            flush=True,
        )
    else:
        print(
            f"{opt.name}: {workdir} is already at step {first} (stop_after="
            f"{stop_after}); nothing to train.",
            flush=True,
        )
    return TrainResult(
        state, final_loss, eval_metrics, 0.0, str(workdir) if workdir else None
    )
