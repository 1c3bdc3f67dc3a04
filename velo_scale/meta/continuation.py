"""Continuing VeLO past its horizon on the held-out suite (paper Sec. 6).

VeLO is told the length of training, `num_steps`, and conditions on the
fraction done. The paper (Metz et al. 2022, Sec. 6) asks what to do when a run
must go on past that horizon, and compares three ways against finishing the
whole length in one run told the full horizon:

* Naive Continue (`naive`): keep going with the old horizon;
* Increase Steps (`increase`): tell VeLO the new total, keep the iteration;
* Reset (`reset`): a fresh horizon for the remaining steps, keeping the
  accumulators (`velo_scale.extend_horizon` has the details).

For every held-out task of `velo_scale.meta.evaluation` (the suite's tasks
and step count H, read from `gin_configs/eval/heldout.gin`) the study runs,
through `velo_scale.train.train`:

* VeLO with `num_steps=H` in a workdir; for each method a copy of that
  workdir resumed to 2H steps with `train.continuation=method`, so the first
  H steps (and the data order after them) are the same in all three;
* one VeLO run told `num_steps=2H` from the start;
* AdamW (the suite's warm-up + cosine, `adamw_grid_point`) for 2H steps over
  a log-spaced learning-rate grid, keeping the lowest final training loss.

Metric: the final training loss at step 2H (the suite's trailing mean,
`RunRecord.final`), plus each run's end-of-training metrics on the eval
split. Per task the three methods are ranked (ties within a relative
tolerance share a place), and the best is compared with the single 2H run
and the tuned AdamW by relative loss difference, `(a - b) / |b|` (negative:
`a` is lower). The summary counts, like the paper's, how often each method
is the worst and the best of the three, and how often the single run beats
all three.

`python -m velo_scale.meta.continuation --weights auto --out CONTINUATION.md`
writes the report, its curves (`<stem>_curves.png`) and the numbers
(`<stem>_results.json`); every run's record is cached in `--workdir`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from velo_scale.meta.evaluation import (
    HELDOUT_TASKS,
    EvalTask,
    RunRecord,
    TaskResult,
    _cached_run,
    _record_path,
    adamw_grid,
    describe_weights,
    enable_compilation_cache,
    final_loss,
    lr_grid,
    run_one,
    smooth,
    weights_digest,
)
from velo_scale.train.lock import INFO_FILE, LOCK_FILE
from velo_scale.train.run_config import CONTINUATION_METHODS as METHODS

SUITE_GIN = "gin_configs/eval/heldout.gin"
SINGLE = "single"  # the VeLO run told 2H steps from the start
ADAMW = "adamw"  # the tuned AdamW for 2H steps


# --------------------------------------------------------------------------
# Records and the comparison.
# --------------------------------------------------------------------------


def relative_difference(a: float, b: float) -> float:
    """`(a - b) / |b|` (a fraction; negative: `a` is the lower loss), NaN
    when either is non-finite or `b` is 0."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return (a - b) / abs(b)


def _tied(a: float, b: float, rtol: float) -> bool:
    """`a` and `b` (final losses) count as equal: the same value, or both
    finite and `|a - b| <= rtol * |b|`."""
    if a == b:
        return True
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * abs(b)


def rank(finals: Mapping[str, float], rtol: float) -> list[tuple[str, ...]]:
    """The methods grouped by final loss, lowest first; a method within
    `rtol` (relative) of its group's lowest loss shares that group's place.
    Non-finite losses (diverged runs) rank last."""
    order = sorted(finals, key=lambda m: (not math.isfinite(finals[m]), finals[m]))
    groups: list[list[str]] = []
    for m in order:
        if groups and _tied(finals[m], finals[groups[-1][0]], rtol):
            groups[-1].append(m)
        else:
            groups.append([m])
    return [tuple(g) for g in groups]


class TaskOutcome(NamedTuple):
    """The comparison on one task (losses: final training loss at 2H).

    Attributes:
      task: the task's name.
      finals: final training loss per run: each method, `SINGLE`, `ADAMW`.
      ranking: the three methods grouped by final loss, best first.
      best_vs_single: relative difference of the best method's loss and the
        single 2H run's (a fraction; negative: the continuation is lower).
      best_vs_adamw: the same against the tuned AdamW.
      single_beats_all: the single 2H run is lower than every method by more
        than the tie tolerance.
    """

    task: str
    finals: dict[str, float]
    ranking: list[tuple[str, ...]]
    best_vs_single: float
    best_vs_adamw: float
    single_beats_all: bool

    @property
    def best(self) -> tuple[str, ...]:
        """The method(s) with the lowest final loss."""
        return self.ranking[0]

    @property
    def worst(self) -> tuple[str, ...]:
        """The method(s) with the highest final loss (all three if tied)."""
        return self.ranking[-1]


@dataclasses.dataclass
class TaskStudy:
    """All runs of one task.

    Attributes:
      task: the task at its full length (`num_steps` = 2H).
      horizon: H, the steps of the first VeLO run (the one continued).
      base: that H-step run.
      continued: method -> the base run resumed to 2H steps with it.
      single: VeLO told 2H steps from the start.
      adamw: AdamW for 2H steps, one run per grid learning rate.
      window: trailing-mean window of the losses (steps).
      error: why the task failed, if it did.
    """

    task: EvalTask
    horizon: int
    base: RunRecord | None
    continued: dict[str, RunRecord]
    single: RunRecord | None
    adamw: list[RunRecord]
    window: int
    error: str | None = None

    @property
    def best_adamw(self) -> RunRecord | None:
        """The AdamW run with the lowest finite final loss (as the suite's)."""
        return TaskResult(self.task, self.adamw, None, None, self.window).best_adamw

    def runs(self) -> dict[str, RunRecord]:
        """The runs compared at 2H: each method, `SINGLE`, `ADAMW` (best)."""
        out = dict(self.continued)
        for name, run in ((SINGLE, self.single), (ADAMW, self.best_adamw)):
            if run is not None:
                out[name] = run
        return out

    def problem(self) -> str | None:
        """Why the task cannot be compared, or None when it can."""
        if self.error:
            return self.error
        if self.base is None or self.base.error:
            return (
                f"the {self.horizon}-step run failed: {self.base and self.base.error}"
            )
        missing = {*METHODS, SINGLE, ADAMW} - set(self.runs())
        if ADAMW in missing:
            return "every AdamW run diverged"
        return f"missing runs: {sorted(missing)}" if missing else None

    def complete(self) -> bool:
        """Every compared run is there (diverged continuations rank last)."""
        return self.problem() is None

    def outcome(self, tie_rtol: float, *, on_eval: bool = False) -> TaskOutcome:
        """The ranking and relative differences (needs `complete()`), by the
        final training loss, or with `on_eval` by the eval-split loss at 2H
        (inf where a run has none)."""
        finals = {
            name: run.eval_metrics.get("loss", math.inf) if on_eval else run.final(self.window)
            for name, run in self.runs().items()
        }  # fmt: skip
        methods = {m: finals[m] for m in METHODS}
        ranking = rank(methods, tie_rtol)
        best = finals[ranking[0][0]]
        return TaskOutcome(
            task=self.task.name,
            finals=finals,
            ranking=ranking,
            best_vs_single=relative_difference(best, finals[SINGLE]),
            best_vs_adamw=relative_difference(best, finals[ADAMW]),
            single_beats_all=finals[SINGLE] < best
            and not _tied(finals[SINGLE], best, tie_rtol),
        )

    def loss_at_horizon(self) -> float:
        """The base run's final training loss at step H."""
        return self.base.final(self.window) if self.base else math.inf

    def single_at_horizon(self) -> float:
        """The single 2H run's training loss at step H (trailing mean): how
        much VeLO's first H steps depend on the horizon it was told."""
        if self.single is None or self.single.error:
            return math.inf
        steps = [step for step in self.single.steps if step <= self.horizon]
        losses = self.single.losses[: len(steps)]
        return final_loss(steps, losses, self.window) if steps else math.inf


class Summary(NamedTuple):
    """Counts over the complete tasks (paper Sec. 6's comparison).

    Attributes:
      tasks: complete tasks counted.
      best: method -> tasks where it is (or shares) the best of the three.
      worst: method -> tasks where it is (or shares) the worst.
      ties: tasks where two or more methods share a place.
      single_beats_all: tasks where the single 2H run beats every method.
      best_beats_single: tasks where the best method beats the single run.
      best_beats_adamw: tasks where the best method beats the tuned AdamW.
      single_beats_adamw: tasks where the single 2H run beats the tuned AdamW.
    """

    tasks: int
    best: dict[str, int]
    worst: dict[str, int]
    ties: int
    single_beats_all: int
    best_beats_single: int
    best_beats_adamw: int
    single_beats_adamw: int


def summarize(outcomes: Sequence[TaskOutcome], tie_rtol: float) -> Summary:
    """Counts wins, worsts and the single run's wins over `outcomes`.

    "Beats" means lower by more than `tie_rtol` (relative); a shared place
    counts for every method in it (all three tied: each is best and worst)."""

    def beats(a: float, b: float) -> bool:
        return a < b and not _tied(a, b, tie_rtol)

    return Summary(
        tasks=len(outcomes),
        best={m: sum(m in o.best for o in outcomes) for m in METHODS},
        worst={m: sum(m in o.worst for o in outcomes) for m in METHODS},
        ties=sum(any(len(g) > 1 for g in o.ranking) for o in outcomes),
        single_beats_all=sum(o.single_beats_all for o in outcomes),
        best_beats_single=sum(
            beats(o.finals[o.best[0]], o.finals[SINGLE]) for o in outcomes
        ),
        best_beats_adamw=sum(
            beats(o.finals[o.best[0]], o.finals[ADAMW]) for o in outcomes
        ),
        single_beats_adamw=sum(
            beats(o.finals[SINGLE], o.finals[ADAMW]) for o in outcomes
        ),
    )


# --------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------


def _task_dir(root: pathlib.Path, task: EvalTask) -> pathlib.Path:
    return root / "workdirs" / f"{task.name}_{task.num_steps}x{task.batch_size}"


def _has_checkpoint(workdir: pathlib.Path, step: int) -> bool:
    return (workdir / "checkpoints" / str(step)).is_dir()


def _failed(name: str, reason: str) -> RunRecord:
    """The record of a run that could not start."""
    return RunRecord(name, None, [], [], {}, 0.0, reason)


def study_task(
    task: EvalTask,
    *,
    horizon: int,
    learning_rates: Sequence[float],
    velo_weights: Any = "auto",
    smoothing_window: int = 10,
    seed: int = 0,
    cache_dir: pathlib.Path,
    log: Callable[[str], None] = print,
) -> TaskStudy:
    """All runs of the study on one task (`task.num_steps` is ignored).

    Args:
      task: a held-out task.
      horizon: H; the continuations and the other runs go to 2H steps.
      learning_rates: the AdamW grid.
      velo_weights: as `velo(weights=...)`.
      smoothing_window: trailing-mean window of the losses (steps).
      seed: params init, data order and the step RNG of every run.
      cache_dir: run records (reused when present) and the workdirs of the
        H-step run and its continuations.
      log: progress lines.
    """
    from velo_scale.train import optimizers

    short = dataclasses.replace(task, num_steps=horizon)
    full = dataclasses.replace(task, num_steps=2 * horizon)
    velo = functools.partial(optimizers.velo, weights=velo_weights)
    key = f"velo_{weights_digest(velo_weights)}"
    base_dir = _task_dir(cache_dir, short) / key

    def note(name: str, run: RunRecord) -> None:
        log(f"  {task.name} {name}: final {run.final(smoothing_window):.4f} "
            f"({run.seconds:.0f}s){' ' + run.error if run.error else ''}")  # fmt: skip

    paths = {
        m: _record_path(cache_dir, full, f"{key}_{m}_from{horizon}") for m in METHODS
    }
    base_path = _record_path(cache_dir, short, key)
    needed = any(not p.exists() for p in paths.values())
    if not base_path.exists() or (needed and not _has_checkpoint(base_dir, horizon)):
        # Start the H-step run afresh (a continuation needs its checkpoint;
        # a workdir without a record is from an unfinished run).
        base_path.unlink(missing_ok=True)
        shutil.rmtree(base_dir, ignore_errors=True)
    base = _cached_run(
        base_path,
        lambda: run_one(short, velo, name="velo", seed=seed, workdir=base_dir),
    )
    note(f"velo {horizon} steps", base)
    continued = {}
    for method in METHODS:
        run_dir = _task_dir(cache_dir, full) / f"{key}_{method}_from{horizon}"

        def resume(method=method, run_dir=run_dir) -> RunRecord:
            if base.error:
                return _failed(f"velo_{method}", f"the {horizon}-step run failed")
            shutil.rmtree(run_dir, ignore_errors=True)  # a half-done resume
            shutil.copytree(
                base_dir, run_dir, ignore=shutil.ignore_patterns(LOCK_FILE, INFO_FILE)
            )
            return run_one(full, velo, name=f"velo_{method}", seed=seed,
                           workdir=run_dir, continuation=method)  # fmt: skip

        continued[method] = _cached_run(paths[method], resume)
        note(f"velo {method} -> {2 * horizon}", continued[method])
    single = _cached_run(
        _record_path(cache_dir, full, key),
        lambda: run_one(full, velo, name="velo", seed=seed),
    )
    note(f"velo single {2 * horizon}", single)
    adamw = adamw_grid(full, learning_rates, seed=seed, cache_dir=cache_dir, log=note)
    return TaskStudy(full, horizon, base, continued, single, adamw, smoothing_window)


def suite_defaults(gin_file: str = SUITE_GIN) -> dict[str, Any]:
    """The held-out suite's tasks, steps, eval examples, smoothing window and
    seed, as bound in its gin file (`run_suite.*`)."""
    import gin

    from velo_scale import cli

    cli.parse_gin([gin_file], [])
    names = ("tasks", "num_steps", "eval_examples", "smoothing_window", "seed")
    return {n: gin.query_parameter(f"run_suite.{n}") for n in names}


def run_study(
    tasks: Sequence[str],
    *,
    horizon: int,
    eval_examples: int | None,
    lr_low: float = 1e-4,
    lr_high: float = 1e-1,
    lr_num: int = 7,
    smoothing_window: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    velo_weights: Any = "auto",
    tie_rtol: float = 0.01,
    out: str | pathlib.Path | None = "CONTINUATION.md",
    cache_dir: str | pathlib.Path,
    compilation_cache: str | None = "~/.cache/velo_scale/jax_eval_cache",
) -> list[TaskStudy]:
    """Runs the study on `tasks` and writes the report.

    Args:
      tasks: names in `HELDOUT_TASKS`.
      horizon: H (steps); the continuations go to 2H.
      eval_examples: the end-of-run evaluation's test examples per task
        (None: each task's own).
      lr_low, lr_high, lr_num: the AdamW grid (log-spaced, both ends in).
      smoothing_window: trailing-mean window of the losses (steps).
      seed: of every run.
      batch_size: overrides every task's (None: each task's own).
      velo_weights: as `velo(weights=...)`.
      tie_rtol: final losses within this relative difference tie.
      out: the markdown report (None: none).
      cache_dir: run records and workdirs; a rerun reuses finished runs.
      compilation_cache: JAX persistent compilation cache (None: leave JAX's
        configuration alone).
    """
    enable_compilation_cache(compilation_cache)
    unknown = [t for t in tasks if t not in HELDOUT_TASKS]
    if unknown:
        raise ValueError(f"unknown eval tasks {unknown}; known: {list(HELDOUT_TASKS)}.")
    if horizon < 2:
        raise ValueError(f"the horizon H must be >= 2 steps; got {horizon}.")
    grid = lr_grid(lr_low, lr_high, lr_num)
    cache = pathlib.Path(cache_dir).expanduser()
    log = functools.partial(print, file=sys.stderr, flush=True)
    overrides = {
        k: v for k, v in (("eval_examples", eval_examples), ("batch_size", batch_size))
        if v is not None
    }  # fmt: skip
    t0 = time.time()
    studies = []
    for name in tasks:
        task = dataclasses.replace(HELDOUT_TASKS[name], **overrides)
        log(f"continuation study {name}: H={horizon}, batch {task.batch_size}")
        try:
            study = study_task(
                task, horizon=horizon, learning_rates=grid, velo_weights=velo_weights,
                smoothing_window=smoothing_window, seed=seed, cache_dir=cache, log=log,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - one broken task must not end the study
            log(f"  {name} failed: {type(e).__name__}: {e}")
            study = TaskStudy(
                dataclasses.replace(task, num_steps=2 * horizon), horizon, None, {},
                None, [], smoothing_window, error=f"{type(e).__name__}: {str(e)[:100]}",
            )  # fmt: skip
        studies.append(study)
        log(f"  {name} done ({(time.time() - t0) / 60:.1f} min so far)")
    if out is not None:
        settings = {
            "H": f"{horizon} steps (continued to {2 * horizon})",
            "AdamW lr grid": f"{lr_num} log-spaced in [{lr_low:g}, {lr_high:g}] "
            f"(warm-up 5% + cosine over {2 * horizon} steps, weight decay 1e-4)",
            "eval examples": eval_examples if eval_examples is not None else "task's",
            "smoothing window": f"{smoothing_window} steps",
            "tie tolerance": f"{tie_rtol:g} (relative)",
            "seed": seed,
        }
        png = write_report(
            studies, out, weights_desc=describe_weights(velo_weights),
            settings=settings, tie_rtol=tie_rtol,
        )  # fmt: skip
        log(f"wrote {out} and {png}")
    return studies


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------

_CURVES = {  # run -> (label, colour, line style), in drawing order
    ADAMW: ("AdamW (tuned)", "C0", "-"),
    SINGLE: ("single 2H run", "k", "--"),
    "naive": ("Naive Continue", "C1", "-"),
    "increase": ("Increase Steps", "C2", "-"),
    "reset": ("Reset", "C3", "-"),
}
_EVAL_EXTRA = ("accuracy", "auc", "roc_auc")  # first present is shown beside loss


def _loss(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "diverged"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%" if math.isfinite(x) else "-"


def _ranking(o: TaskOutcome) -> str:
    return " < ".join(" = ".join(g) for g in o.ranking)


def plot(studies: Sequence[TaskStudy], path: str | pathlib.Path) -> None:
    """One panel per task: the smoothed training loss of the three
    continuations, the single 2H run and the tuned AdamW, with the first
    horizon H marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, max(1, len(studies)))
    rows = math.ceil(max(1, len(studies)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(studies) :]:
        ax.axis("off")
    for ax, s in zip(axes.flat, studies):
        shown, runs = [], s.runs()
        for name, (label, colour, style) in _CURVES.items():
            run = runs.get(name)
            if run is None or not run.steps:
                continue
            curve = smooth(run.losses, s.window)
            if name == ADAMW:
                label = f"{label}, lr {run.learning_rate:.1e}"
            ax.plot(run.steps, curve, color=colour, ls=style, lw=1.0, label=label)
            shown.append(curve[np.asarray(run.steps) >= s.horizon // 2])
        ax.axvline(s.horizon, color="0.6", ls=":", lw=0.8)
        values = np.concatenate(shown) if shown else np.array([])
        values = values[np.isfinite(values)]
        if len(values):
            lo, hi = values.min(), values.max()
            pad = 0.08 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(
            s.task.name + (f" (failed: {s.error})" if s.error else ""), fontsize=9
        )
        ax.set_xlabel(f"step (H = {s.horizon} dotted)", fontsize=8)
        ax.set_ylabel(f"train loss (trailing mean {s.window})", fontsize=8)
        ax.tick_params(labelsize=7)
        if shown:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _eval_cell(run: RunRecord | None) -> str:
    if run is None or not run.eval_metrics:
        return "-"
    m = run.eval_metrics
    extra = next((k for k in _EVAL_EXTRA if k in m), None)
    loss = f"{m['loss']:.4f}" if "loss" in m else "-"
    return loss + (f" ({extra} {m[extra]:.3f})" if extra else "")


def standard_error(run: RunRecord, window: int) -> float:
    """The noise of a run's final loss, as a fraction of it: the standard
    deviation of its last `window` finite losses / sqrt(window) / |final|
    (each step's loss is one minibatch's)."""
    tail = np.asarray(run.losses[-window:], np.float64)
    tail = tail[np.isfinite(tail)]
    final = run.final(window)
    if len(tail) < 2 or not math.isfinite(final) or final == 0:
        return math.nan
    return float(np.std(tail, ddof=1) / np.sqrt(len(tail)) / abs(final))


def results_json(studies: Sequence[TaskStudy], tie_rtol: float) -> dict[str, Any]:
    """The numbers of the report: per task, and the summary with ties
    (`tie_rtol`) and by raw values (`summary_raw`)."""
    rows = []
    for s in studies:
        row: dict[str, Any] = {
            "task": s.task.name, "data": s.task.data, "horizon": s.horizon,
            "num_steps": s.task.num_steps, "batch_size": s.task.batch_size,
            "error": s.problem(),
        }  # fmt: skip
        if s.complete():
            o = s.outcome(tie_rtol)
            runs = s.runs()
            row.update(
                finals=o.finals,
                standard_errors={
                    n: standard_error(r, s.window) for n, r in runs.items()
                },
                loss_at_horizon=s.loss_at_horizon(),
                single_at_horizon=s.single_at_horizon(),
                ranking=[list(g) for g in o.ranking],
                ranking_raw=[list(g) for g in s.outcome(0.0).ranking],
                best_vs_single=o.best_vs_single,
                best_vs_adamw=o.best_vs_adamw,
                single_beats_all=o.single_beats_all,
                best_lr=runs[ADAMW].learning_rate,
                eval={name: run.eval_metrics for name, run in runs.items()},
                errors={n: r.error for n, r in runs.items() if r.error},
            )
        rows.append(row)
    done = [s for s in studies if s.complete()]
    return {
        "tie_rtol": tie_rtol,
        "summary": summarize([s.outcome(tie_rtol) for s in done], tie_rtol)._asdict(),
        "summary_raw": summarize([s.outcome(0.0) for s in done], 0.0)._asdict(),
        "summary_eval_raw": summarize(
            [s.outcome(0.0, on_eval=True) for s in done], 0.0
        )._asdict(),
        "tasks": rows,
    }


def _counts(summary: Summary) -> str:
    n = summary.tasks
    best = ", ".join(f"`{m}` {summary.best[m]}/{n}" for m in METHODS)
    worst = ", ".join(f"`{m}` {summary.worst[m]}/{n}" for m in METHODS)
    return f"best of the three: {best}; worst: {worst}"


def summary_lines(
    raw: Summary, tied: Summary, on_eval: Summary, tie_rtol: float
) -> list[str]:
    """The summary bullets: counts by raw final training loss, with ties, and
    by the eval-split loss."""
    n = raw.tasks
    return [
        f"- By raw final loss: {_counts(raw)}. The single 2H run beats all "
        f"three on {raw.single_beats_all}/{n}.\n",
        f"- Counting losses within {tie_rtol:g} (relative) as ties, a shared "
        f"place counting for each method in it: {_counts(tied)}; {tied.ties}/{n} "
        f"tasks have a tie. The single 2H run beats all three on "
        f"{tied.single_beats_all}/{n}; the best continuation beats it on "
        f"{tied.best_beats_single}/{n}.\n",
        f"- Against the tuned AdamW (same tolerance): the best continuation "
        f"beats it on {tied.best_beats_adamw}/{n}, the single 2H run on "
        f"{tied.single_beats_adamw}/{n}.\n",
        f"- By the eval-split loss at 2H (raw): {_counts(on_eval)}. The single 2H "
        f"run beats all three on {on_eval.single_beats_all}/{n}; the best "
        f"continuation beats the tuned AdamW on {on_eval.best_beats_adamw}/{n}.\n",
    ]


def _median(xs: Sequence[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    return _pct(float(np.median(xs))) if xs else "-"


def _reading(studies: Sequence[TaskStudy], tie_rtol: float, notable: float = 0.05) -> list[str]:  # fmt: skip
    """The data-driven part of "Reading the results" (bullets); differences
    above `notable` (relative) are listed by task."""
    done = [s for s in studies if s.complete()]
    if not done:
        return ["- No task completed; there is nothing to compare.\n"]
    outs = [s.outcome(tie_rtol) for s in done]
    drift = [relative_difference(s.single_at_horizon(), s.loss_at_horizon()) for s in done]  # fmt: skip
    noise = [standard_error(run, s.window) for s in done for run in s.runs().values()]
    lines = [
        "- How much VeLO's first H steps depend on the horizon it is told: the "
        "single 2H run's loss at step H differs from the H-step run's by "
        f"{', '.join(f'{s.task.name} {_pct(d)}' for s, d in zip(done, drift))}.\n",
        f"- Noise scale: the standard error of a final loss (std of the last "
        f"{done[0].window} one-minibatch losses / sqrt({done[0].window})) is a median "
        f"{_median(noise)} of the loss over these runs.\n",
    ]
    for m in METHODS:
        gaps = [relative_difference(o.finals[m], o.finals[SINGLE]) for o in outs]
        gains = [relative_difference(o.finals[m], s.loss_at_horizon()) for o, s in zip(outs, done)]  # fmt: skip
        lines.append(
            f"- `{m}`: median final loss vs the single 2H run {_median(gaps)}; "
            f"median change of the loss from step H to 2H {_median(gains)}.\n"
        )
    spreads = [
        relative_difference(o.finals[o.worst[0]], o.finals[o.best[0]]) for o in outs
    ]
    far = [
        f"{o.task}: `{m}` {_pct(relative_difference(o.finals[m], o.finals[o.best[0]]))}"
        for o in outs
        for m in METHODS
        if relative_difference(o.finals[m], o.finals[o.best[0]]) > notable
    ]
    lines.append(
        f"- Spread of the three continuations, (worst - best) / best: median "
        f"{_median(spreads)}; all three tie (within {tie_rtol:g}) on "
        f"{sum(len(o.ranking) == 1 for o in outs)}/{len(outs)} tasks. More than "
        f"{_pct(notable)} above the best: {'; '.join(far) or 'none'}.\n"
    )
    vs_single = [
        f"{o.task} {_pct(o.best_vs_single)}"
        for o in outs
        if abs(o.best_vs_single) > notable
    ]
    singles = [relative_difference(o.finals[SINGLE], o.finals[ADAMW]) for o in outs]
    lines.append(
        f"- The best continuation vs the single 2H run differs by more than "
        f"{_pct(notable)} on: {', '.join(vs_single) or 'none'}. The single 2H run "
        f"vs the tuned AdamW: median {_median(singles)}.\n"
    )
    return lines


_CAVEATS = """\
- These are velo_scale's own project weights (`weights='auto'` falls back to
  them because the official VeLO `params` file cannot be downloaded offline),
  meta-trained briefly on tiny tasks with short unrolls; they are weak (see
  EVAL.md), so this is not a reproduction of the paper's Sec. 6 numbers.
  Rerun with `--weights official` (or `$VELO_SCALE_WEIGHTS`) when the
  official file is available.
- Each number is one seed of one-minibatch losses averaged over the last
  `smoothing window` steps; differences of a few percent are within the
  noise of such a run. The tie tolerance only merges near-equal losses for
  the counts; the table gives the raw values.
- The three continuations share the first H steps exactly (copies of one
  workdir resumed with `train.continuation`), so their differences come from
  the last H steps only. The single 2H run sees the same data in the same
  order but takes different steps from step 1 (VeLO conditions on the
  fraction of training done).
- The tuned AdamW is the best of the grid by the same final training loss,
  a maximum over several noisy runs that favours it slightly.
"""


def write_report(
    studies: Sequence[TaskStudy],
    out: str | pathlib.Path,
    *,
    weights_desc: str,
    settings: Mapping[str, Any],
    tie_rtol: float,
) -> pathlib.Path:
    """Writes the markdown report `out`, its curves (`<stem>_curves.png`) and
    numbers (`<stem>_results.json`) beside it; returns the plot's path."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name(out.stem + "_curves.png")
    plot(studies, png)
    numbers = results_json(studies, tie_rtol)
    tied, raw = Summary(**numbers["summary"]), Summary(**numbers["summary_raw"])
    on_eval = Summary(**numbers["summary_eval_raw"])
    all_runs = [
        r for s in studies for r in (s.base, *s.continued.values(), s.single, *s.adamw) if r
    ]  # fmt: skip
    minutes = sum(r.seconds for r in all_runs) / 60
    table = [
        "| task | steps x batch | naive | increase | reset | single 2H | AdamW (lr) "
        "| ranking (lowest first) | best vs single | best vs AdamW |\n",
        "|---|---|---|---|---|---|---|---|---|---|\n",
    ]
    evals = [
        "| task | naive | increase | reset | single 2H | AdamW |\n",
        "|---|---|---|---|---|---|\n",
    ]
    for s in studies:
        head = f"| {s.task.name} | {s.horizon}+{s.horizon} x {s.task.batch_size} |"
        if not s.complete():
            table.append(f"{head} failed: {s.problem()} |||||||||\n")
            continue
        o, runs = s.outcome(tie_rtol), s.runs()
        f = o.finals
        table.append(
            f"{head} {' | '.join(_loss(f[m]) for m in (*METHODS, SINGLE))} | "
            f"{_loss(f[ADAMW])} ({runs[ADAMW].learning_rate:.1e}) | {_ranking(o)} | "
            f"{_pct(o.best_vs_single)} | {_pct(o.best_vs_adamw)} |\n"
        )
        evals.append(
            f"| {s.task.name} | "
            + " | ".join(_eval_cell(runs.get(n)) for n in (*METHODS, SINGLE, ADAMW))
            + " |\n"
        )
    lines = [
        "# Continuing VeLO past its horizon (paper Sec. 6)\n\n",
        f"VeLO weights: {weights_desc}.\n\n",
        "Per held-out task (the suite of EVAL.md, `velo_scale/meta/evaluation.py`): "
        "VeLO told H steps, then three copies of its workdir resumed to 2H with "
        "`train.continuation` = `naive` (Naive Continue), `increase` (Increase "
        "Steps), `reset` (Reset); one VeLO run told 2H from the start; AdamW "
        "tuned over a learning-rate grid for 2H steps. Same seed and data order "
        "for all.\n\n",
        "Settings: "
        + ", ".join(f"{k} = {v}" for k, v in settings.items())
        + f"; {len(all_runs)} training runs took {minutes:.1f} min in all (sum of "
        "per-run wall times, compilation included; a continuation counts only "
        "its resumed steps).\n\n",
        "Metric: final training loss at step 2H (trailing mean over the "
        "smoothing window; lower is better). Ranking: the three methods, lowest "
        f"loss first; '=' when within {tie_rtol:g} relative. 'best vs single' / "
        "'best vs AdamW': (best method's loss - the other's) / the other's "
        "(negative: the continuation is lower).\n\n",
        *table,
        "\nEval split at step 2H: loss (and accuracy / AUC where the task has it):\n\n",
        *evals,
        f"\nSummary over {raw.tasks} tasks (the paper's counts):\n\n",
        *summary_lines(raw, tied, on_eval, tie_rtol),
        f"\n![curves]({png.name})\n\n",
        "## Reading the results\n\n",
        *_reading(studies, tie_rtol),
        _CAVEATS,
    ]
    out.write_text("".join(lines))
    out.with_name(out.stem + "_results.json").write_text(
        json.dumps(numbers, indent=1, default=str)
    )
    return png


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m velo_scale.meta.continuation`: runs the study, writes the report."""
    suite = suite_defaults()
    p = argparse.ArgumentParser(
        prog="python -m velo_scale.meta.continuation",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("--weights", default="auto", help="VeLO weights (as velo(weights=))")
    p.add_argument("--out", default="CONTINUATION.md", help="the markdown report")
    p.add_argument("--tasks", nargs="+", default=list(suite["tasks"]),
                   help=f"held-out tasks (default: the suite's, {SUITE_GIN})")  # fmt: skip
    p.add_argument("--steps", type=int, default=suite["num_steps"],
                   help="H, the first run's horizon (default: the suite's steps)")  # fmt: skip
    p.add_argument("--lr-grid-size", type=int, default=7, help="AdamW grid points")
    p.add_argument("--lr-low", type=float, default=1e-4)
    p.add_argument("--lr-high", type=float, default=1e-1)
    p.add_argument("--batch-size", type=int, default=None, help="override every task's")
    p.add_argument("--eval-examples", type=int, default=suite["eval_examples"])
    p.add_argument("--tie-rtol", type=float, default=0.01,
                   help="final losses within this relative difference tie")  # fmt: skip
    p.add_argument("--workdir", default="~/.cache/velo_scale/continuation",
                   help="run records and workdirs (a rerun reuses them)")  # fmt: skip
    args = p.parse_args(argv)
    run_study(
        args.tasks, horizon=args.steps, eval_examples=args.eval_examples,
        lr_low=args.lr_low, lr_high=args.lr_high, lr_num=args.lr_grid_size,
        smoothing_window=suite["smoothing_window"], seed=suite["seed"],
        batch_size=args.batch_size, velo_weights=args.weights,
        tie_rtol=args.tie_rtol, out=args.out, cache_dir=args.workdir,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
