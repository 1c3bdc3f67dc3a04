"""VeLOdrome-style evaluation on held-out tasks (paper Sec. 5).

Meta-training (`velo_scale.meta.distribution`) samples MLP / ConvNet /
MLP-autoencoder / tiny-ViT / char-LM tasks on digits, Fashion-MNIST and Bible
text. The suite here holds tasks it never samples: other model families (GNN,
Decision Transformer, DLRM, ResNet with BatchNorm, a deeper ViT, a deeper and
wider CNN) and other datasets (B3DB molecules, Hopper trajectories, UCI Adult
and MovieLens clicks).

For every task the runner trains, through `velo_scale.train.train`:

* AdamW (warm-up + cosine) at each learning rate of a log-spaced grid
  (`lr_grid(1e-5, 1e-1, 15)`); the tuned baseline is the learning rate with
  the lowest final training loss;
* NAdamW with warm-up + cosine at fixed AlgoPerf-like hyperparameters;
* VeLO (no hyperparameters) with the given weights.

The metric is the paper's: the number of steps VeLO needs to reach the tuned
AdamW's final training loss, and the "improvement in training time" =
AdamW's steps to that loss / VeLO's steps (> 1: VeLO is faster; 'never' when
VeLO does not get there within the same budget).

Smoothing: per-step training losses are noisy (one minibatch each), so every
curve is first smoothed with a trailing moving average over the last
`smoothing_window` steps (default 10, the same window as
`TrainResult.final_loss`; non-finite / skipped steps are left out of the
mean). The *final loss* of a run is the last value of its smoothed curve, the
*target* is the tuned AdamW's final loss, and *steps to reach* is the first
step at which the smoothed curve is <= target, counting only steps with a full
window behind them (step >= `smoothing_window`). A trailing (causal) window
never looks at future steps, so a run cannot "reach" the target early by
averaging in later losses.

The suite is plain data (`EvalTask` rows in `HELDOUT_TASKS`); gin picks the
tasks and overrides steps/batch sizes (`gin_configs/eval/*.gin`), and
`velo-scale eval` runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

NEVER = "never"


# --------------------------------------------------------------------------
# The suite, as plain data.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """One held-out task.

    Attributes:
      name: short id (table row).
      make_workload: builds the `velo_scale.workloads.Workload` (called once
        per run, so every run starts from the same fresh object).
      data: dataset name for `velo_scale.data.load_dataset` ("train" is
        trained on, "test" evaluated at the end).
      num_steps: training steps of every run.
      batch_size: training batch size.
      eval_examples: the end-of-run evaluation uses the first this many test
        examples (None: all); evaluation is informational only.
      description: one line for the report.
    """

    name: str
    make_workload: Callable[[], Any]
    data: str
    num_steps: int
    batch_size: int
    eval_examples: int | None = 1000
    description: str = ""


def _gnn_b3db():
    from velo_scale.models.gnn import GNN
    from velo_scale.workloads.molecules import MoleculeClassification

    model = GNN(
        num_outputs=1, latent_dim=32, hidden_dims=(32,), num_message_passing_steps=2,
        dropout_rate=0.0, embedding="one_hot",
    )  # fmt: skip
    return MoleculeClassification(model=model, max_nodes=64, max_edges=160)


def _dt_hopper():
    from velo_scale.models.decision_transformer import DecisionTransformer
    from velo_scale.workloads.decision_transformer import DecisionTransformerWorkload

    model = DecisionTransformer(
        state_dim=11, act_dim=3, embed_dim=32, num_layers=2, num_heads=1,
        max_timestep=1000, dropout_rate=0.0,
    )  # fmt: skip
    # No environment rollouts: the eval is the held-out action MSE only.
    return DecisionTransformerWorkload(
        model=model, context_length=10, rollout_episodes=0
    )


def _dlrm():
    from velo_scale.models.dlrm import DLRMSmall
    from velo_scale.workloads.criteo import ClickPrediction

    model = DLRMSmall(
        vocab_size=4096, embed_dim=16, mlp_bottom_dims=(32, 16),
        mlp_top_dims=(32, 16, 1),
    )  # fmt: skip
    return ClickPrediction(model=model)


def _resnet_bn_fmnist():
    from velo_scale.models.resnet import ResNet
    from velo_scale.workloads.classification import Classification

    model = ResNet(
        stage_sizes=(1, 1), num_filters=8, bottleneck=False, small_stem=True,
        num_classes=10, bn_init_scale=1.0,
    )  # fmt: skip
    return Classification(model=model, train_flag=True)


def _wide_cnn_fmnist():
    from velo_scale.models.small import CNN
    from velo_scale.workloads.classification import Classification

    return Classification(model=CNN(features=(32, 64, 64), dense=256))


def _deep_vit_fmnist():
    from velo_scale.models.vit import ViT
    from velo_scale.workloads.classification import Classification

    return Classification(
        model=ViT(patch=7, width=32, depth=4, num_heads=2, mlp_dim=64, num_classes=10)
    )


def _mlp_adult():
    from velo_scale.workloads.criteo import ClickPrediction

    return ClickPrediction(model=DenseFeatureMLP(hidden=(64, 64)))


def _mlp_digits_deep():
    from velo_scale.models.small import MLP
    from velo_scale.workloads.classification import Classification

    return Classification(
        model=MLP(hidden=(128, 128, 128, 128), num_classes=10), image_shape=(8, 8, 1)
    )


def _dense_feature_mlp_cls():
    import flax.linen as nn
    import jax.numpy as jnp

    class _DenseFeatureMLP(nn.Module):
        """An MLP on the dense (numeric) click features only; ignores the
        categorical ids. Maps `(dense, sparse, train=)` to logits [b]."""

        hidden: Sequence[int] = (64, 64)

        @nn.compact
        def __call__(self, dense, sparse, train: bool = False):
            del sparse, train
            x = dense.astype(jnp.float32)
            for i, h in enumerate(self.hidden):
                x = nn.relu(
                    nn.Dense(
                        h,
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.lecun_normal(), ("embed", "mlp")
                        ),
                        name=f"dense{i}",
                    )(x)
                )
            out = nn.Dense(
                1,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("mlp", None)
                ),
                name="head",
            )(x)
            return out[:, 0]

    return _DenseFeatureMLP


class _Lazy:
    """`DenseFeatureMLP(...)`: the flax class built on first use (keeps flax
    out of this module's import)."""

    def __call__(self, **kw):
        return _dense_feature_mlp_cls()(**kw)


DenseFeatureMLP = _Lazy()


_STEPS, _BATCH = 150, 32
HELDOUT_TASKS: dict[str, EvalTask] = {
    t.name: t
    for t in (
        EvalTask("gnn_b3db", _gnn_b3db, "b3db", _STEPS, _BATCH,
                 description="GNN (32 wide, 2 message-passing steps) on B3DB "
                 "blood-brain-barrier molecules"),
        EvalTask("dt_hopper", _dt_hopper, "hopper", _STEPS, _BATCH,
                 description="Decision Transformer (embed 32, 2 layers, K=10) on "
                 "Hopper trajectories"),
        EvalTask("dlrm_adult", _dlrm, "adult_clicks", _STEPS, 128,
                 description="DLRM (4096x16 table, MLPs 32-16 / 32-16-1) on "
                 "UCI Adult as clicks"),
        EvalTask("dlrm_movielens", _dlrm, "movielens_clicks", _STEPS, 128,
                 description="the same DLRM on MovieLens-100k as clicks"),
        EvalTask("resnet_bn_fmnist", _resnet_bn_fmnist, "fashion_mnist", _STEPS,
                 _BATCH, description="ResNet with BatchNorm (2 basic-block "
                 "stages, 8/16 filters) on Fashion-MNIST"),
        EvalTask("cnn_wide_fmnist", _wide_cnn_fmnist, "fashion_mnist", _STEPS,
                 _BATCH, description="deeper/wider CNN (32-64-64 convs + "
                 "max-pool, dense 256) on Fashion-MNIST"),
        EvalTask("vit_deep_fmnist", _deep_vit_fmnist, "fashion_mnist", _STEPS,
                 _BATCH, description="ViT with 4 blocks (width 32, 2 heads, "
                 "patch 7) on Fashion-MNIST"),
        EvalTask("mlp_adult", _mlp_adult, "adult_clicks", _STEPS, 128,
                 description="MLP (64-64) on the numeric features of UCI Adult"),
        EvalTask("mlp_deep_digits", _mlp_digits_deep, "digits", _STEPS, _BATCH,
                 description="4x128 MLP on digits (deeper than meta-training's "
                 "MLPs)"),
    )
}  # fmt: skip


def adamw_grid_point(
    num_steps: int,
    *,
    learning_rate: float,
    warmup_steps: float = 0.05,
    weight_decay: float = 1e-4,
) -> Any:
    """`velo_scale.train.optimizers.adamw` (warm-up + cosine) with the peak
    learning rate held in the optimizer state instead of baked into the
    compiled step: `-lr * unit_schedule(t) * (adam + wd * p)` is the same
    update (the schedule is linear in its peak), but every point of the grid
    compiles to the same train step, so JAX's persistent compilation cache
    compiles it once per task instead of 15 times."""
    import optax

    from velo_scale.train import optimizers

    unit = optimizers.warmup_cosine(num_steps, 1.0, warmup_steps)
    tx = optax.chain(
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=learning_rate, weight_decay=weight_decay
        ),
        optax.scale_by_schedule(unit),
    )
    return optimizers.Optimizer(tx, False, "adamw")


def enable_compilation_cache(path: str | pathlib.Path | None) -> None:
    """Turns on JAX's persistent compilation cache at `path` (None: leave the
    configuration alone)."""
    if path is None:
        return
    import jax

    pathlib.Path(path).expanduser().mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def lr_grid(low: float = 1e-5, high: float = 1e-1, num: int = 15) -> list[float]:
    """`num` learning rates log-spaced from `low` to `high` (both included)."""
    if num < 1 or not 0 < low <= high:
        raise ValueError(
            f"lr_grid needs 0 < low <= high and num >= 1; got {low}, {high}, {num}."
        )
    return [float(x) for x in np.geomspace(low, high, num)]


# --------------------------------------------------------------------------
# Curves and the steps-to-reach metric.
# --------------------------------------------------------------------------


def smooth(losses: Sequence[float], window: int = 10) -> np.ndarray:
    """Trailing moving average: entry i is the mean of the finite values among
    `losses[max(0, i - window + 1) : i + 1]` (NaN when there are none)."""
    x = np.asarray(losses, np.float64)
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1; got {window}.")
    ok = np.isfinite(x)
    vals = np.where(ok, x, 0.0)
    csum = np.concatenate([[0.0], np.cumsum(vals)])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(len(x))
    lo = np.maximum(0, idx - window + 1)
    total, count = csum[idx + 1] - csum[lo], ccnt[idx + 1] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def final_loss(
    steps: Sequence[int], losses: Sequence[float], window: int = 10
) -> float:
    """The last finite value of the smoothed curve (inf if none, e.g. a run
    that diverged from the start)."""
    del steps
    s = smooth(losses, window)
    finite = s[np.isfinite(s)]
    return float(finite[-1]) if len(finite) and np.isfinite(s[-1]) else math.inf


def steps_to_reach(
    steps: Sequence[int], losses: Sequence[float], target: float, window: int = 10
) -> int | str:
    """First step at which the smoothed curve is <= `target`, or `NEVER`.

    Only steps with a full window behind them count (index >= window - 1; for
    a curve shorter than the window, its last step), so a lucky first
    minibatch cannot 'reach' the target on its own."""
    if not math.isfinite(target):
        return NEVER
    s = smooth(losses, window)
    ok = np.isfinite(s) & (s <= target)
    ok[: min(window, len(s)) - 1] = False
    hit = np.nonzero(ok)[0]
    return int(steps[hit[0]]) if len(hit) else NEVER


def speedup(baseline_steps: int | str, velo_steps: int | str) -> float | str:
    """Improvement in training time: baseline steps / VeLO steps, or NEVER."""
    if velo_steps == NEVER or baseline_steps == NEVER:
        return NEVER
    return float(baseline_steps) / float(velo_steps)


# --------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RunRecord:
    """One training run's curve and end metrics."""

    optimizer: str
    learning_rate: float | None
    steps: list[int]
    losses: list[float]
    eval_metrics: dict[str, float]
    seconds: float
    error: str | None = None

    def final(self, window: int) -> float:
        if self.error or not self.steps:
            return math.inf
        return final_loss(self.steps, self.losses, window)


def _subset(source: Any, n: int | None) -> Any:
    """The first `n` examples of a dict-of-arrays source (others unchanged)."""
    if n is None or not isinstance(source, Mapping):
        return source
    return {k: v[:n] for k, v in source.items()}


@functools.cache
def _load(name: str, split: str) -> Any:
    from velo_scale.data import load_dataset

    return load_dataset(name, split)


def _read_curve(workdir: pathlib.Path) -> tuple[list[int], list[float]]:
    from velo_scale.train.metrics import read_metrics

    try:
        rows = read_metrics(workdir)
    except FileNotFoundError:
        return [], []
    steps, losses = [], []
    for row in rows:
        if row["split"] != "train":
            continue
        steps.append(int(row["step"]))
        loss = row.get("loss")
        losses.append(float(loss) if loss is not None else math.nan)
    return steps, losses


def run_one(
    task: EvalTask,
    optimizer: Callable[..., Any],
    *,
    name: str,
    learning_rate: float | None = None,
    seed: int = 0,
    workdir: str | pathlib.Path | None = None,
    continuation: str | None = None,
) -> RunRecord:
    """Trains `task` once with `optimizer` (a factory of `num_steps`) and
    returns its per-step training losses (from the run's metrics.jsonl).

    With `workdir` holding a shorter VeLO run, `continuation` ('naive' |
    'increase' | 'reset', `train.continuation`) resumes it to
    `task.num_steps`; the curve then includes the earlier steps."""
    from velo_scale.train import trainer

    train_src = _load(task.data, "train")
    eval_src = _subset(_load(task.data, "test"), task.eval_examples)
    with tempfile.TemporaryDirectory(prefix=f"velo_eval_{task.name}_") as tmp:
        run_dir = pathlib.Path(workdir) if workdir is not None else pathlib.Path(tmp)
        t0 = time.time()
        error, eval_metrics = None, {}
        try:
            result = trainer.train(
                workload=task.make_workload(),
                optimizer=optimizer,
                num_steps=task.num_steps,
                data=train_src,
                eval_data=eval_src,
                batch_size=task.batch_size,
                eval_batch_size=min(1000, task.eval_examples or 1000),
                workdir=run_dir,
                mesh_shape=(1, 1),  # tiny tasks: one device
                seed=seed,
                progress=False,
                continuation=continuation,
            )
            eval_metrics = {k: float(v) for k, v in result.eval_metrics.items()}
        except trainer.NonFiniteLossError as e:
            error = f"diverged: {str(e).splitlines()[0][:120]}"
        steps, losses = _read_curve(run_dir)
    return RunRecord(
        name, learning_rate, steps, losses, eval_metrics, time.time() - t0, error
    )


@dataclasses.dataclass
class TaskResult:
    """All runs of one task and the derived metric."""

    task: EvalTask
    adamw: list[RunRecord]
    nadamw: RunRecord | None
    velo: RunRecord | None
    window: int
    error: str | None = None

    @property
    def best_adamw(self) -> RunRecord | None:
        runs = [r for r in self.adamw if math.isfinite(r.final(self.window))]
        return min(runs, key=lambda r: r.final(self.window)) if runs else None

    def summary(self) -> dict[str, Any]:
        best, w = self.best_adamw, self.window
        out: dict[str, Any] = {
            "task": self.task.name,
            "data": self.task.data,
            "num_steps": self.task.num_steps,
            "batch_size": self.task.batch_size,
            "error": self.error,
        }
        if best is None:
            return out
        target = best.final(w)
        base_steps = steps_to_reach(best.steps, best.losses, target, w)
        out.update(
            best_lr=best.learning_rate,
            adamw_final=target,
            adamw_steps=base_steps,
            adamw_diverged=sum(r.error is not None for r in self.adamw),
        )
        for key, run in (("nadamw", self.nadamw), ("velo", self.velo)):
            if run is None:
                continue
            reach = (
                steps_to_reach(run.steps, run.losses, target, w)
                if not run.error
                else NEVER
            )
            out[f"{key}_final"] = run.final(w)
            out[f"{key}_steps"] = reach
            out[f"{key}_speedup"] = speedup(base_steps, reach)
            out[f"{key}_eval"] = run.eval_metrics
            out[f"{key}_error"] = run.error
        out["adamw_eval"] = best.eval_metrics
        return out


def _record_path(
    cache: pathlib.Path | None, task: EvalTask, run: str
) -> pathlib.Path | None:
    """Where a run's record is kept: keyed by task, steps, batch and run."""
    if cache is None:
        return None
    return cache / f"{task.name}_{task.num_steps}x{task.batch_size}" / f"{run}.json"


def _cached_run(path, fn) -> RunRecord:
    """Runs `fn` unless `path` holds its record (a restarted eval resumes)."""
    if path is not None and path.exists():
        return RunRecord(**json.loads(path.read_text()))
    record = fn()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(record)))
    return record


def adamw_grid(
    task: EvalTask,
    learning_rates: Sequence[float],
    *,
    seed: int = 0,
    cache_dir: pathlib.Path | None = None,
    log: Callable[[str, RunRecord], None] = lambda name, run: None,
) -> list[RunRecord]:
    """AdamW (`adamw_grid_point`) on `task` at each learning rate, cached.

    `log(name, record)` is called after each run, e.g. "adamw lr=1.00e-03".
    """
    runs = []
    for lr in learning_rates:
        run = _cached_run(
            _record_path(cache_dir, task, f"adamw_{lr:.3e}"),
            lambda lr=lr: run_one(
                task, functools.partial(adamw_grid_point, learning_rate=lr),
                name="adamw", learning_rate=lr, seed=seed,
            ),
        )  # fmt: skip
        log(f"adamw lr={lr:.2e}", run)
        runs.append(run)
    return runs


def evaluate_task(
    task: EvalTask,
    *,
    learning_rates: Sequence[float],
    nadamw_kwargs: Mapping[str, Any],
    velo_weights: Any = "auto",
    smoothing_window: int = 10,
    seed: int = 0,
    cache_dir: pathlib.Path | None = None,
    log: Callable[[str], None] = print,
) -> TaskResult:
    """AdamW over `learning_rates`, NAdamW and VeLO on one task."""
    from velo_scale.train import optimizers

    adamw_runs = adamw_grid(
        task, learning_rates, seed=seed, cache_dir=cache_dir,
        log=lambda name, run: log(
            f"  {task.name} {name}: final {run.final(smoothing_window):.4f}"
            f" ({run.seconds:.0f}s){' ' + run.error if run.error else ''}"
        ),
    )  # fmt: skip
    nadamw = _cached_run(
        _record_path(cache_dir, task, "nadamw"),
        lambda: run_one(
            task, functools.partial(optimizers.nadamw, **nadamw_kwargs),
            name="nadamw", learning_rate=nadamw_kwargs.get("learning_rate"), seed=seed,
        ),
    )  # fmt: skip
    log(f"  {task.name} nadamw: final {nadamw.final(smoothing_window):.4f}")
    velo = _cached_run(
        _record_path(cache_dir, task, f"velo_{weights_digest(velo_weights)}"),
        lambda: run_one(
            task, functools.partial(optimizers.velo, weights=velo_weights),
            name="velo", seed=seed,
        ),
    )  # fmt: skip
    log(f"  {task.name} velo: final {velo.final(smoothing_window):.4f}")
    return TaskResult(task, adamw_runs, nadamw, velo, smoothing_window)


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _fmt_speedup(x: Any) -> str:
    return x if isinstance(x, str) else f"{x:.2f}x"


def markdown_table(results: Sequence[TaskResult]) -> str:
    """One row per task: tuned AdamW, NAdamW and VeLO final losses, VeLO's
    steps to the tuned AdamW loss and the improvement in training time."""
    head = (
        "| task | data | steps x batch | AdamW best lr | AdamW final | "
        "AdamW steps to it | NAdamW final | NAdamW steps (speed-up) | "
        "VeLO final | VeLO steps to AdamW loss | VeLO speed-up |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        s = r.summary()
        if "best_lr" not in s:
            rows.append(
                f"| {s['task']} | {s['data']} | {s['num_steps']} x {s['batch_size']} "
                f"| failed: {s['error'] or 'every AdamW run diverged'} |||||||\n"
            )
            continue
        nad = (
            f"{s['nadamw_steps']} ({_fmt_speedup(s['nadamw_speedup'])})"
            if "nadamw_steps" in s else "-"
        )  # fmt: skip
        rows.append(
            f"| {s['task']} | {s['data']} | {s['num_steps']} x {s['batch_size']} | "
            f"{s['best_lr']:.1e} | {_fmt(s['adamw_final'])} | {s['adamw_steps']} | "
            f"{_fmt(s.get('nadamw_final'))} | {nad} | {_fmt(s.get('velo_final'))} | "
            f"{s.get('velo_steps', '-')} | {_fmt_speedup(s.get('velo_speedup', '-'))} |\n"
        )
    return head + "".join(rows)


def summary_line(results: Sequence[TaskResult]) -> str:
    sums = [r.summary() for r in results]
    done = [s for s in sums if "velo_speedup" in s]
    wins = [s for s in done if s["velo_speedup"] != NEVER and s["velo_speedup"] >= 1]
    reached = [s for s in done if s["velo_speedup"] != NEVER]
    beats_final = [s for s in done if s["velo_final"] <= s["adamw_final"]]
    return (
        f"VeLO reached the tuned AdamW's final training loss on {len(reached)}/"
        f"{len(done)} tasks, at least as fast as AdamW on {len(wins)}/{len(done)}; "
        f"its final loss was <= the tuned AdamW's on {len(beats_final)}/{len(done)}."
    )


def plot(results: Sequence[TaskResult], path: str | pathlib.Path) -> None:
    """Smoothed training-loss curves per task: best AdamW, NAdamW, VeLO (and
    the other AdamW learning rates faintly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(results))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, r in zip(axes.flat, results):
        w, best = r.window, r.best_adamw
        for run in r.adamw:
            if run.steps and run is not best:
                ax.plot(run.steps, smooth(run.losses, w), color="0.8", lw=0.7)
        if best is not None:
            ax.plot(best.steps, smooth(best.losses, w), color="C0",
                    label=f"AdamW (best lr {best.learning_rate:.1e})")  # fmt: skip
            ax.axhline(best.final(w), color="C0", ls=":", lw=0.8)
        if r.nadamw is not None and r.nadamw.steps:
            ax.plot(
                r.nadamw.steps, smooth(r.nadamw.losses, w), color="C2", label="NAdamW"
            )
        if r.velo is not None and r.velo.steps:
            ax.plot(r.velo.steps, smooth(r.velo.losses, w), color="C3", label="VeLO")
        finals = [x.final(w) for x in [*r.adamw, r.nadamw, r.velo] if x is not None]
        finals = [f for f in finals if math.isfinite(f)]
        if best is not None and finals:
            first = [
                smooth(x.losses, w)[0]
                for x in (best, r.velo)
                if x is not None and x.steps
            ]
            top = max([f for f in first if np.isfinite(f)] + [max(finals)])
            ax.set_ylim(min(finals) * 0.9 if min(finals) > 0 else min(finals) - 0.05,
                        top * 1.05 if top > 0 else top + 0.05)  # fmt: skip
        ax.set_title(r.task.name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(f"train loss (trailing mean {w})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: Sequence[TaskResult],
    out: str | pathlib.Path,
    *,
    weights_desc: str,
    settings: Mapping[str, Any],
    wall_seconds: float | None = None,
) -> pathlib.Path:
    """Writes the markdown report `out` and its plot beside it
    (`<stem>_curves.png`); returns the plot's path."""
    all_runs = [x for r in results for x in (*r.adamw, r.nadamw, r.velo) if x]
    runs, run_seconds = len(all_runs), sum(x.seconds for x in all_runs)
    del wall_seconds  # a resumed run's wall time would not be the suite's
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name(out.stem + "_curves.png")
    plot(results, png)
    lines = [
        "# Held-out evaluation (VeLOdrome-style)\n\n",
        f"VeLO weights: {weights_desc}.\n\n",
        "Tasks (none is sampled by meta-training, "
        "`velo_scale/meta/distribution.py`):\n\n",
        *[
            f"- `{r.task.name}`: {r.task.description} (`{r.task.data}`).\n"
            for r in results
        ],
        "\nSettings: "
        + ", ".join(f"{k} = {v}" for k, v in settings.items())
        + f"; {runs} training runs took {run_seconds / 60:.1f} min in all (sum of "
        "per-run wall times, compilation included)" + ".\n\n",
        "Metric (paper Sec. 5): steps VeLO needs to reach the final training loss "
        "of AdamW tuned over the learning-rate grid; speed-up = AdamW's steps to "
        "that loss / VeLO's steps ('never': not within the budget). Losses are "
        f"trailing means over {results[0].window if results else 10} steps (see "
        "`velo_scale/meta/evaluation.py`).\n\n",
        markdown_table(results),
        "\n" + summary_line(results) + "\n\n",
        f"![curves]({png.name})\n",
    ]
    out.write_text("".join(lines))
    (out.with_name(out.stem + "_results.json")).write_text(
        json.dumps([r.summary() for r in results], indent=1, default=str)
    )
    return png


def weights_digest(weights: Any) -> str:
    """12 hex digits of the sha256 of the theta `weights` resolves to: VeLO
    run records are cached per weights file, so a rerun with new weights
    reuses the (weights-independent) AdamW and NAdamW records."""
    import contextlib
    import io

    from velo_scale._src import weights as weights_lib
    from velo_scale.train import optimizers

    with contextlib.redirect_stderr(io.StringIO()):  # the fallback notice
        theta = optimizers.resolve_velo_weights(weights)
    if isinstance(theta, (str, pathlib.Path)):
        theta = weights_lib.load_weights(theta)
    return weights_lib.sha256(theta)[:12]


def describe_weights(weights: Any) -> str:
    """Which VeLO weights `weights` resolves to, in words."""
    if weights != "auto":
        return f"`{weights}`"
    import os

    from velo_scale._src import weights as weights_lib
    from velo_scale.train import optimizers

    if (
        os.environ.get(weights_lib.WEIGHTS_ENV)
        or weights_lib.default_cache_path().exists()
    ):
        return "'auto' -> the official VeLO weights"
    project = (
        os.environ.get(optimizers.PROJECT_WEIGHTS_ENV)
        or optimizers.packaged_project_weights()
    )
    return (
        f"'auto' -> velo_scale's own meta-trained project weights (`{project}`); "
        "the official VeLO file (Metz et al. 2022) is not available offline, so "
        "these are NOT the paper's weights"
    )


def run_suite(
    tasks: Sequence[str] = tuple(HELDOUT_TASKS),
    *,
    num_steps: int | None = None,
    batch_size: int | None = None,
    lr_low: float = 1e-5,
    lr_high: float = 1e-1,
    lr_num: int = 15,
    nadamw_learning_rate: float = 2e-3,
    nadamw_warmup: float = 0.05,
    nadamw_weight_decay: float = 0.08,
    nadamw_b2: float = 0.999,
    smoothing_window: int = 10,
    eval_examples: int | None = None,
    seed: int = 0,
    velo_weights: Any = "auto",
    out: str | pathlib.Path | None = "EVAL.md",
    cache_dir: str | pathlib.Path | None = None,
    compilation_cache: str | None = "~/.cache/velo_scale/jax_eval_cache",
) -> list[TaskResult]:
    """Runs the held-out suite and writes the report.

    Args:
      tasks: names in `HELDOUT_TASKS`.
      num_steps, batch_size, eval_examples: override every task's value.
      lr_low, lr_high, lr_num: the AdamW learning-rate grid (log-spaced).
      nadamw_*: the single NAdamW run (warm-up fraction + cosine).
      smoothing_window: trailing-mean window of the loss curves.
      velo_weights: as `velo(weights=...)`.
      out: the markdown report (None: no report).
      cache_dir: keep each run's record here; a rerun skips finished runs
        (VeLO's records are keyed by the weights' digest, so evaluating new
        weights reruns only VeLO).
      compilation_cache: JAX persistent compilation cache directory (None:
        leave JAX's configuration alone); with it the AdamW grid compiles
        its train step once per task (`adamw_grid_point`).
    """
    enable_compilation_cache(compilation_cache)
    unknown = [t for t in tasks if t not in HELDOUT_TASKS]
    if unknown:
        raise ValueError(f"unknown eval tasks {unknown}; known: {list(HELDOUT_TASKS)}.")
    grid = lr_grid(lr_low, lr_high, lr_num)
    nadamw_kwargs = dict(
        learning_rate=nadamw_learning_rate, warmup_steps=nadamw_warmup,
        weight_decay=nadamw_weight_decay, b2=nadamw_b2,
    )  # fmt: skip
    cache = pathlib.Path(cache_dir) if cache_dir is not None else None
    log = functools.partial(print, file=sys.stderr, flush=True)
    t0 = time.time()
    results = []
    for name in tasks:
        task = HELDOUT_TASKS[name]
        overrides = {
            k: v
            for k, v in (("num_steps", num_steps), ("batch_size", batch_size),
                         ("eval_examples", eval_examples))
            if v is not None
        }  # fmt: skip
        task = dataclasses.replace(task, **overrides)
        log(f"eval task {task.name}: {task.num_steps} steps x batch {task.batch_size}")
        try:
            result = evaluate_task(
                task, learning_rates=grid, nadamw_kwargs=nadamw_kwargs,
                velo_weights=velo_weights, smoothing_window=smoothing_window,
                seed=seed, cache_dir=cache, log=log,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - one broken task must not end the suite
            log(f"  {task.name} failed: {type(e).__name__}: {e}")
            result = TaskResult(task, [], None, None, smoothing_window,
                                error=f"{type(e).__name__}: {str(e)[:100]}")  # fmt: skip
        results.append(result)
        log(f"  {task.name} done ({(time.time() - t0) / 60:.1f} min so far)")
    if out is not None:
        settings = {
            "AdamW lr grid": f"{lr_num} log-spaced in [{lr_low:g}, {lr_high:g}] "
            "(warm-up 5% + cosine, weight decay 1e-4)",
            "NAdamW": f"lr {nadamw_learning_rate:g}, warm-up {nadamw_warmup:g} + cosine, "
            f"b2 {nadamw_b2:g}, weight decay {nadamw_weight_decay:g}",
            "seed": seed,
        }
        png = write_report(
            results, out, weights_desc=describe_weights(velo_weights),
            settings=settings, wall_seconds=time.time() - t0,
        )  # fmt: skip
        log(f"wrote {out} and {png}")
    return results


GIN_CONFIGURABLES = {"run_suite": run_suite}
