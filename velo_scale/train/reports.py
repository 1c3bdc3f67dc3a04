"""Reports over finished (or running) runs: a comparison plot and a table.

Both read `workdir/metrics.jsonl` (written by `MetricsWriter`) and, when
present, `workdir/config.json` for the optimizer's name. Rows that a resumed
run wrote twice for the same (split, step) are merged, the later values
winning, so a restart from a checkpoint does not count steps twice.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from velo_scale.train import metrics as metrics_lib

CONFIG_FILE = "config.json"
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
MISSING = "-"
# Fraction of the last train rows averaged into the final train loss.
FINAL_FRACTION = metrics_lib.FINAL_LOSS_FRACTION
# A loss axis is log-scale when its values span at least this factor.
LOG_SPAN = 5.0

NO_MATPLOTLIB_MSG = (
    "plot_runs needs matplotlib, which is not installed: `pip install matplotlib`."
)

Row = dict[str, Any]


def _run_name(workdir: str | os.PathLike) -> str:
    return os.path.basename(os.path.normpath(os.fspath(workdir)))


def _optimizer_name(workdir: str | os.PathLike) -> str | None:
    """The "optimizer" entry of `workdir/config.json`, or None if absent."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: not valid JSON ({e}); ignoring it.", stacklevel=3)
        return None
    if not isinstance(config, Mapping) or config.get("optimizer") is None:
        return None
    optimizer = config["optimizer"]
    if isinstance(optimizer, Mapping) and "name" in optimizer:
        optimizer = optimizer["name"]
    return str(optimizer)


def _load_rows(
    workdir: str | os.PathLike, filename: str = metrics_lib.METRICS_FILE
) -> list[Row]:
    """Rows of one run, merged per (split, step) and sorted by step."""
    if not (pathlib.Path(workdir) / filename).is_file():
        raise FileNotFoundError(
            f"run directory {os.fspath(workdir)!r} has no {filename}; pass the "
            "workdir of a run that wrote metrics with MetricsWriter"
            + (
                " (schedule.jsonl: trained by velo_scale's trainer with "
                "train.log_schedule=True, the default)."
                if filename == metrics_lib.SCHEDULE_FILE
                else "."
            )
        )
    merged: dict[tuple[str, int], Row] = {}
    for row in metrics_lib.read_metrics(workdir, filename):
        key = (row["split"], row["step"])
        if key in merged:
            # A restarted run measured this step again: newer values win, and a
            # value that is finite now is no longer marked non-finite.
            for name, value in row.items():
                merged[key].pop(name + metrics_lib.NONFINITE_SUFFIX, None)
                merged[key][name] = value
        else:
            merged[key] = dict(row)
    return sorted(merged.values(), key=lambda r: (r["step"], r["time"]))


def _value(row: Row, name: str) -> float | None:
    """`row[name]` as a float: nan if written as non-finite, None if absent."""
    if row.get(name + metrics_lib.NONFINITE_SUFFIX):
        return math.nan
    value = row.get(name)
    return None if value is None else float(value)


def _series(
    rows: Sequence[Row], split: str, name: str
) -> tuple[list[int], list[float]]:
    """(steps, values) of the finite values of `name` on `split`."""
    steps: list[int] = []
    values: list[float] = []
    for row in rows:
        if row["split"] == split:
            value = _value(row, name)
            if value is not None and math.isfinite(value):
                steps.append(row["step"])
                values.append(value)
    return steps, values


def _metric_names(rows: Sequence[Row], split: str) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        if row["split"] == split:
            for name in row:
                if name in metrics_lib.RESERVED_KEYS:
                    continue
                if name.endswith(metrics_lib.NONFINITE_SUFFIX):
                    name = name[: -len(metrics_lib.NONFINITE_SUFFIX)]
                names[name] = None
    return list(names)


def _ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Debiased exponential moving average, as TensorBoard's smoothing slider."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = smoothing * avg + (1.0 - smoothing) * value
        out.append(avg / (1.0 - smoothing**i))
    return out


def _is_loss(name: str) -> bool:
    return "loss" in name.lower()


# Eval metrics where a higher value is better / lower is better (by name).
_HIGHER_IS_BETTER = ("accuracy", "auc", "map", "bleu", "ssim", "return", "psnr")
_LOWER_IS_BETTER = ("loss", "error", "wer", "cer", "perplexity")


def _direction(name: str) -> str:
    """" (higher is better)", " (lower is better)" or "" for a metric name."""
    lowered = name.lower()
    if any(k in lowered for k in _LOWER_IS_BETTER):
        return " (lower is better)"
    if any(k in lowered for k in _HIGHER_IS_BETTER):
        return " (higher is better)"
    return ""


def _use_log_scale(name: str, values: Sequence[float]) -> bool:
    """Log scale for a loss that spans at least a factor LOG_SPAN; a narrow
    range reads better on a linear axis."""
    return (
        _is_loss(name)
        and bool(values)
        and min(values) > 0
        and max(values) / min(values) >= LOG_SPAN
    )


def _read_config(workdir: str | os.PathLike) -> Mapping[str, Any]:
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # _optimizer_name warns about it
    return config if isinstance(config, Mapping) else {}


def run_description(workdir: str | os.PathLike) -> dict[str, str]:
    """What `config.json` says about a run, as short strings: "recipe" (the
    gin files the CLI was given, or its embedded default), "data",
    "optimizer", "weights" (VeLO's `velo.weights` binding), "model"
    (the workload's name). Absent entries are left out."""
    config = _read_config(workdir)
    out: dict[str, str] = {}
    gin_config = config.get("config", {}) if isinstance(config, Mapping) else {}
    if not isinstance(gin_config, Mapping):
        gin_config = {}
    files = gin_config.get("gin_files")
    if isinstance(files, list) and files:
        out["recipe"] = " + ".join(os.path.basename(str(f)) for f in files)
    if config.get("data") is not None:
        out["data"] = str(config["data"])
    optimizer = _optimizer_name(workdir) if config else None
    if optimizer:
        out["optimizer"] = optimizer
    gin_text = str(gin_config.get("gin", ""))
    match = re.search(r"^velo\.weights\s*=\s*(.+)$", gin_text, re.MULTILINE)
    if optimizer == "velo":
        out["weights"] = match.group(1).strip() if match else "default"
    if config.get("workload") is not None:
        out["model"] = str(config["workload"])
    return out


def _figure_title(descriptions: Sequence[Mapping[str, str]]) -> str:
    """The entries every run shares, e.g. "recipe default.gin | data
    fashion_mnist | optimizer velo | weights 'auto'"."""
    parts = []
    for key in ("recipe", "data", "model", "optimizer", "weights"):
        values = {d.get(key) for d in descriptions}
        if len(values) == 1 and None not in values:
            parts.append(f"{key} {values.pop()}")
    return " | ".join(parts)


def _check_workdirs(workdirs: Sequence[str | os.PathLike]) -> None:
    if isinstance(workdirs, (str, os.PathLike)):
        raise TypeError(
            f"workdirs must be a sequence of run directories; got the single path "
            f"{os.fspath(workdirs)!r} (wrap it in a list)."
        )
    if not workdirs:
        raise ValueError("workdirs is empty: pass at least one run directory.")


def plot_runs(
    workdirs: Sequence[str | os.PathLike],
    out_png: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    metric: str = "loss",
    smoothing: float = 0.9,
) -> None:
    """Plots train and eval curves of several runs into a PNG, one small panel
    per metric.

    First panel: the train `metric` against step, raw (thin, light) and
    smoothed by a debiased EMA (same colour), with the legend of runs. Then one
    panel per eval metric (loss, accuracy, error, mAP, BLEU, WER, SSIM, ...),
    titled with the metric's name and whether higher or lower is better. One
    colour per run. A run with a single evaluation is drawn as a marker
    labelled with its value. Loss axes are log-scale when the values are
    positive and span at least a factor `LOG_SPAN`, linear otherwise.
    Non-finite values are left out. The figure's title names what every run
    shares in its config.json: recipe, data, model, optimizer, VeLO weights.

    Args:
      workdirs: run directories, each with a metrics.jsonl.
      out_png: where to write the PNG; parent directories are created.
      labels: one legend label per run; by default the directory's name plus
        the optimizer from its config.json, e.g. "run1 (velo)".
      metric: the train metric of the first panel.
      smoothing: EMA weight in [0, 1) of the smoothed train curve.

    Raises:
      FileNotFoundError: a workdir has no metrics.jsonl (names the directory).
      ValueError: `labels` does not match `workdirs`, or `smoothing` is out of
        range.
      ImportError: matplotlib is not installed.

    Example:
      >>> plot_runs(["runs/velo", "runs/adam"], "runs/compare.png")  # doctest: +SKIP
    """
    _check_workdirs(workdirs)
    if labels is not None and len(labels) != len(workdirs):
        raise ValueError(
            f"labels must give one label per workdir; got {len(labels)=} for "
            f"{len(workdirs)=}."
        )
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1); got {smoothing=}.")
    runs = [_load_rows(d) for d in workdirs]  # Fail before drawing anything.
    if labels is None:
        labels = []
        for d in workdirs:
            optimizer = _optimizer_name(d)
            name = _run_name(d)
            labels.append(f"{name} ({optimizer})" if optimizer else name)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogFormatter
    except ImportError as e:
        raise ImportError(NO_MATPLOTLIB_MSG) from e

    class PlainLogFormatter(LogFormatter):
        """Matplotlib's choice of labelled log ticks, written 0.3, 2."""

        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    def log_y(ax) -> None:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))

    eval_names: dict[str, None] = {}
    for rows in runs:
        eval_names.update(dict.fromkeys(_metric_names(rows, EVAL_SPLIT)))
    # Losses first, then the workload's own metrics in the order written.
    ordered = [n for n in eval_names if _is_loss(n)]
    ordered += [n for n in eval_names if not _is_loss(n)]
    num_panels = 1 + len(ordered)
    ncols = 2 if num_panels == 4 else min(num_panels, 3)
    nrows = math.ceil(num_panels / ncols)

    # A bare Figure on the Agg canvas: no pyplot global state, no GUI backend.
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(num_panels)]
    colours = [f"C{i % 10}" for i in range(len(runs))]

    ax_train = axes[0]
    train_values: list[float] = []
    for rows, label, colour in zip(runs, labels, colours):
        steps, values = _series(rows, TRAIN_SPLIT, metric)
        if not steps:
            continue
        train_values += values
        ax_train.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        ax_train.plot(steps, _ema(values, smoothing), color=colour, label=label)
    ax_train.set_title(f"train {metric} (raw and smoothed)", fontsize="medium")
    ax_train.set_xlabel("step")
    ax_train.set_ylabel(metric)
    if _use_log_scale(metric, train_values):
        log_y(ax_train)
    if train_values:
        ax_train.legend(loc="best", fontsize="small")
    else:
        ax_train.text(
            0.5, 0.5, f"no train {metric!r} rows", ha="center",
            transform=ax_train.transAxes,
        )  # fmt: skip
    ax_train.grid(True, which="both", alpha=0.3)

    for ax, name in zip(axes[1:], ordered):
        values_here: list[float] = []
        for rows, colour in zip(runs, colours):
            steps, values = _series(rows, EVAL_SPLIT, name)
            if not steps:
                continue
            values_here += values
            if len(steps) == 1:
                ax.plot(steps, values, color=colour, marker="o", markersize=7,
                        linestyle="none")  # fmt: skip
                ax.annotate(
                    f"{values[0]:.4g}", (steps[0], values[0]),
                    textcoords="offset points", xytext=(6, 4), color=colour,
                    fontsize="small",
                )  # fmt: skip
            else:
                ax.plot(steps, values, color=colour, marker="o", markersize=3)
        ax.set_title(f"eval {name}{_direction(name)}", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if _use_log_scale(name, values_here):
            log_y(ax)
        ax.grid(True, which="both", alpha=0.3)
    if not ordered:
        ax_train.set_title(
            f"train {metric} (raw and smoothed; no eval rows)", fontsize="medium"
        )
    title = _figure_title([run_description(d) for d in workdirs])
    if title:
        fig.suptitle(title, fontsize="medium")

    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def plot_schedule(
    workdirs: Sequence[str | os.PathLike],
    out_png: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
) -> None:
    """Plots the step sizes the optimizer took, per tensor, over training
    (VeLO's implicit schedule, as the paper's Sec. 7 figure).

    One row of panels per run, from `workdir/schedule.jsonl`: VeLO's per-tensor
    `lr_mult` (when the run used VeLO) and the effective step size
    `rms(update) / rms(param)` (log scale). Each tensor is a thin line
    coloured by its role (`kernel`, `bias`, ...); the role's mean is the thick
    line of the same colour.

    Args:
      workdirs: run directories, each with a schedule.jsonl.
      out_png: where to write the PNG; parent directories are created.
      labels: one title per run (default: the directory's name and optimizer).

    Raises:
      FileNotFoundError: a workdir has no schedule.jsonl.
      ValueError: `labels` does not match `workdirs`.
      ImportError: matplotlib is not installed.
    """
    from velo_scale._src.schedule import LR_MULT, STEP_SIZE, role

    if labels is not None and len(labels) != len(workdirs):
        raise ValueError(
            f"labels must give one label per workdir; got {len(labels)=} for "
            f"{len(workdirs)=}."
        )
    runs = [_load_rows(d, metrics_lib.SCHEDULE_FILE) for d in workdirs]
    if labels is None:
        labels = [
            f"{_run_name(d)} ({_optimizer_name(d)})" if _optimizer_name(d)
            else _run_name(d)
            for d in workdirs
        ]  # fmt: skip
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(NO_MATPLOTLIB_MSG) from e

    kinds = [LR_MULT, STEP_SIZE]
    titles = {
        LR_MULT: "VeLO lr_mult per tensor",
        STEP_SIZE: "effective step size rms(update) / rms(param)",
    }
    fig = Figure(figsize=(5.2 * len(kinds), 3.4 * len(runs) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    for r, (rows, label) in enumerate(zip(runs, labels)):
        names = _metric_names(rows, TRAIN_SPLIT)
        roles = sorted({role(n.split(":", 1)[1]) for n in names if ":" in n})
        colour = {name: f"C{i % 10}" for i, name in enumerate(roles)}
        for c, kind in enumerate(kinds):
            ax = fig.add_subplot(len(runs), len(kinds), r * len(kinds) + c + 1)
            mine = [n for n in names if n.startswith(kind + ":")]
            by_role: dict[str, list[list[float]]] = {}
            for name in mine:
                steps, values = _series(rows, TRAIN_SPLIT, name)
                tensor_role = role(name.split(":", 1)[1])
                ax.plot(steps, values, color=colour[tensor_role], alpha=0.3,
                        linewidth=0.7)  # fmt: skip
                by_role.setdefault(tensor_role, []).append((steps, values))
            for tensor_role, series in by_role.items():
                steps = series[0][0]
                same = [v for s, v in series if s == steps]
                mean = [sum(col) / len(col) for col in zip(*same)]
                ax.plot(steps, mean, color=colour[tensor_role], linewidth=2,
                        label=f"{tensor_role} ({len(series)})")  # fmt: skip
            ax.set_title(f"{label}: {titles[kind]}", fontsize="small")
            ax.set_xlabel("step")
            if not mine:
                ax.text(0.5, 0.5, f"no {kind} (not a VeLO run)", ha="center",
                        transform=ax.transAxes)  # fmt: skip
                continue
            if kind == STEP_SIZE and all(
                v > 0 for n in mine for v in _series(rows, TRAIN_SPLIT, n)[1]
            ):
                ax.set_yscale("log")
            ax.legend(loc="best", fontsize="x-small", title="role (tensors)")
            ax.grid(True, which="both", alpha=0.3)
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None:
        return MISSING
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def _last(rows: Sequence[Row], split: str, name: str) -> float | None:
    for row in reversed(rows):
        if row["split"] == split and (value := _value(row, name)) is not None:
            return value
    return None


def _final_train_loss(train: Sequence[Row]) -> float | None:
    """Mean train loss of the last 10% of the train rows (at least one).

    Rows of steps the trainer skipped (`skipped` = 1: a non-finite loss,
    gradient or update, params unchanged) are left out, as the trainer's
    summary leaves them out; any other non-finite loss makes the mean nan, so
    a divergence is not averaged away."""
    losses = [
        v
        for r in train
        if not _value(r, "skipped") and (v := _value(r, "loss")) is not None
    ]
    if not losses:
        return None
    tail = losses[-metrics_lib.final_loss_window(len(losses)) :]
    return math.fsum(tail) / len(tail)  # nan if the run diverged.


def _rate_and_compile(train: Sequence[Row]) -> tuple[float | None, float | None]:
    """(steps/s after compilation, seconds of first steps).

    The rate counts the steps between consecutive train rows over the time
    between them, except across a row that carries `first_step_s` (the first
    step of a process: compilation, and for a resumed run the downtime before
    it). The second value sums `first_step_s` over the run's starts."""
    steps = seconds = 0.0
    compile_s: float | None = None
    for prev, row in zip(train, train[1:]):
        if _value(row, metrics_lib.COMPILE_KEY) is not None:
            continue
        if row["time"] > prev["time"] and row["step"] > prev["step"]:
            steps += row["step"] - prev["step"]
            seconds += row["time"] - prev["time"]
    for row in train:
        value = _value(row, metrics_lib.COMPILE_KEY)
        if value is not None and math.isfinite(value):
            compile_s = (compile_s or 0.0) + value
    return (steps / seconds if seconds > 0 else None), compile_s


def _eval_columns(runs: Sequence[Sequence[Row]]) -> list[str]:
    """Eval metric names over all runs: losses first, then the rest in the
    order written (accuracy, mAP, BLEU, WER, SSIM, ...)."""
    names: dict[str, None] = {}
    for rows in runs:
        names.update(dict.fromkeys(_metric_names(rows, EVAL_SPLIT)))
    return [n for n in names if _is_loss(n)] + [n for n in names if not _is_loss(n)]


def _summary(
    workdir: str | os.PathLike, rows: Sequence[Row], eval_names: Sequence[str]
) -> list[str]:
    train = [r for r in rows if r["split"] == TRAIN_SPLIT]
    eval_losses = [
        v
        for r in rows
        if r["split"] == EVAL_SPLIT and (v := _value(r, "loss")) is not None
    ]
    finite_eval = [v for v in eval_losses if math.isfinite(v)]
    best_eval = min(finite_eval) if finite_eval else (math.nan if eval_losses else None)
    times = [r["time"] for r in rows]
    wall = max(times) - min(times) if rows else None
    steps_per_s, compile_s = _rate_and_compile(train)
    return [
        _run_name(workdir),
        _optimizer_name(workdir) or MISSING,
        str(max(r["step"] for r in rows)) if rows else MISSING,
        _fmt(_final_train_loss(train)),
        _fmt(best_eval),
        *(_fmt(_last(rows, EVAL_SPLIT, name)) for name in eval_names),
        _fmt(wall, ".1f"),
        _fmt(compile_s, ".1f"),
        _fmt(steps_per_s, ".3g"),
    ]


# The table's columns are LEAD_COLUMNS, "final eval <metric>" for every eval
# metric any of the runs wrote, then TAIL_COLUMNS.
LEAD_COLUMNS = (
    "run",
    "optimizer",
    "steps",
    metrics_lib.FINAL_LOSS_LABEL,
    "best eval loss",
)
TAIL_COLUMNS = (
    "wall time (s)",
    "first step (s, compilation)",
    metrics_lib.RATE_LABEL,
)


def compare_columns(workdirs: Sequence[str | os.PathLike]) -> list[str]:
    """The header `compare_runs` writes for these runs."""
    _check_workdirs(workdirs)
    names = _eval_columns([_load_rows(d) for d in workdirs])
    return [*LEAD_COLUMNS, *(f"final eval {n}" for n in names), *TAIL_COLUMNS]


def compare_runs(workdirs: Sequence[str | os.PathLike]) -> str:
    """A markdown table comparing runs, one row per run.

    Columns: run (directory name), optimizer (config.json "optimizer"), steps
    (last step logged), the train loss as the trainer's summary line defines
    it (`metrics.FINAL_LOSS_LABEL`: the mean over the last 10% of train rows,
    at least one, rows of skipped steps left out; "nan" if any other is
    non-finite), the best eval loss, the final value of every eval metric the
    runs wrote (loss, accuracy, error and the workloads' own: mAP, AUC, BLEU,
    WER, CER, SSIM, normalised return, ...), wall time (last minus first row
    time, seconds, restarts included), the time of the first step of each
    start (compilation; `first_step_s`), and steps/s after compilation
    (`metrics.RATE_LABEL`: steps between consecutive train rows over the time
    between them, not counted across a process's first step). A value the run
    does not have is shown as "-".

    Args:
      workdirs: run directories, each with a metrics.jsonl.

    Returns:
      The table as GitHub-flavoured markdown, ending in a newline.

    Raises:
      FileNotFoundError: a workdir has no metrics.jsonl (names the directory).

    Example:
      >>> print(compare_runs(["runs/velo", "runs/adam"]))  # doctest: +SKIP
      | run | optimizer | steps | train loss (mean of last 10% of steps) | ...
    """
    _check_workdirs(workdirs)
    runs = [_load_rows(d) for d in workdirs]
    eval_names = _eval_columns(runs)
    header = [*LEAD_COLUMNS, *(f"final eval {n}" for n in eval_names), *TAIL_COLUMNS]
    table = [header, ["---"] * len(header)]
    table += [_summary(d, rows, eval_names) for d, rows in zip(workdirs, runs)]
    lines = []
    for cells in table:
        escaped = [c.replace("|", r"\|") for c in cells]
        lines.append("| " + " | ".join(escaped) + " |")
    return "\n".join(lines) + "\n"
