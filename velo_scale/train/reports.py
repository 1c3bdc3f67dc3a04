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
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from velo_scale.train import metrics as metrics_lib

CONFIG_FILE = "config.json"
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
MISSING = "-"
# Fraction of the last train rows averaged into "final train loss".
FINAL_FRACTION = 0.1

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


def _load_rows(workdir: str | os.PathLike) -> list[Row]:
    """Rows of one run, merged per (split, step) and sorted by step."""
    if not (pathlib.Path(workdir) / metrics_lib.METRICS_FILE).is_file():
        raise FileNotFoundError(
            f"run directory {os.fspath(workdir)!r} has no "
            f"{metrics_lib.METRICS_FILE}; pass the workdir of a run that wrote "
            "metrics with MetricsWriter."
        )
    merged: dict[tuple[str, int], Row] = {}
    for row in metrics_lib.read_metrics(workdir):
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


def _set_log_if_positive(ax: Any, values: Sequence[float]) -> None:
    if values and min(values) > 0:
        ax.set_yscale("log")


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
    """Plots train and eval curves of several runs side by side into a PNG.

    Left panel: the train `metric` against step, raw (thin, light) and smoothed
    by a debiased EMA (same colour). Right panel: every metric of the eval rows
    against step; loss-like metrics (name contains "loss") on a log-scale left
    axis, the others (e.g. accuracy) on a linear right axis, one line style per
    metric. One colour per run. Loss axes are log-scale when all values are
    positive. Non-finite values are left out of the curves.

    Args:
      workdirs: run directories, each with a metrics.jsonl.
      out_png: where to write the PNG; parent directories are created.
      labels: one legend label per run; by default the directory's name plus
        the optimizer from its config.json, e.g. "run1 (velo)".
      metric: the train metric of the left panel.
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
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ImportError(NO_MATPLOTLIB_MSG) from e

    # A bare Figure on the Agg canvas: no pyplot global state, no GUI backend.
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_eval = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(runs))]

    train_values: list[float] = []
    for rows, label, colour in zip(runs, labels, colours):
        steps, values = _series(rows, TRAIN_SPLIT, metric)
        if not steps:
            continue
        train_values += values
        ax_train.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        ax_train.plot(steps, _ema(values, smoothing), color=colour, label=label)
    ax_train.set_title(f"train {metric}")
    ax_train.set_xlabel("step")
    ax_train.set_ylabel(metric)
    if _is_loss(metric):
        _set_log_if_positive(ax_train, train_values)
    if train_values:
        ax_train.legend(loc="best")
    else:
        ax_train.text(
            0.5,
            0.5,
            f"no train {metric!r} rows",
            ha="center",
            transform=ax_train.transAxes,
        )
    ax_train.grid(True, which="both", alpha=0.3)

    eval_names: dict[str, None] = {}
    for rows in runs:
        eval_names.update(dict.fromkeys(_metric_names(rows, EVAL_SPLIT)))
    loss_names = [n for n in eval_names if _is_loss(n)]
    other_names = [n for n in eval_names if not _is_loss(n)]
    styles = ["-", "--", ":", "-."]
    ax_other = ax_eval.twinx() if loss_names and other_names else ax_eval
    style_of = {n: styles[i % len(styles)] for i, n in enumerate(eval_names)}
    loss_values: list[float] = []
    for rows, colour in zip(runs, colours):
        for name in eval_names:
            steps, values = _series(rows, EVAL_SPLIT, name)
            if not steps:
                continue
            ax = ax_eval if _is_loss(name) else ax_other
            ax.plot(
                steps,
                values,
                color=colour,
                linestyle=style_of[name],
                marker="o",
                markersize=3,
            )
            if _is_loss(name):
                loss_values += values
    ax_eval.set_title("eval")
    ax_eval.set_xlabel("step")
    if loss_names:
        ax_eval.set_ylabel(", ".join(loss_names))
        _set_log_if_positive(ax_eval, loss_values)
    if other_names:
        ax_other.set_ylabel(", ".join(other_names))
    ax_eval.grid(True, which="both", alpha=0.3)
    if eval_names:
        handles = [
            Line2D([], [], color=colour, label=label)
            for label, colour in zip(labels, colours)
        ] + [
            Line2D([], [], color="0.3", linestyle=style_of[n], label=n)
            for n in eval_names
        ]
        # Below the panel: "best" cannot see the lines of a twin axis.
        ax_eval.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12),
            ncol=min(len(handles), 4),
            fontsize="small",
        )
    else:
        ax_eval.text(0.5, 0.5, "no eval rows", ha="center", transform=ax_eval.transAxes)

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


def _summary(workdir: str | os.PathLike) -> list[str]:
    rows = _load_rows(workdir)
    train = [r for r in rows if r["split"] == TRAIN_SPLIT]
    train_losses = [v for r in train if (v := _value(r, "loss")) is not None]
    final_train = None
    if train_losses:
        tail = train_losses[-max(1, round(FINAL_FRACTION * len(train_losses))) :]
        final_train = math.fsum(tail) / len(tail)  # nan if the run diverged.
    eval_losses = [
        v
        for r in rows
        if r["split"] == EVAL_SPLIT and (v := _value(r, "loss")) is not None
    ]
    finite_eval = [v for v in eval_losses if math.isfinite(v)]
    best_eval = min(finite_eval) if finite_eval else (math.nan if eval_losses else None)
    times = [r["time"] for r in rows]
    wall = max(times) - min(times) if rows else None
    steps_per_s = None
    if len(train) >= 2 and train[-1]["time"] > train[0]["time"]:
        steps_per_s = (train[-1]["step"] - train[0]["step"]) / (
            train[-1]["time"] - train[0]["time"]
        )
    return [
        _run_name(workdir),
        _optimizer_name(workdir) or MISSING,
        str(max(r["step"] for r in rows)) if rows else MISSING,
        _fmt(final_train),
        _fmt(best_eval),
        _fmt(_last(rows, EVAL_SPLIT, "loss")),
        _fmt(_last(rows, EVAL_SPLIT, "accuracy")),
        _fmt(wall, ".1f"),
        _fmt(steps_per_s, ".3g"),
    ]


COMPARE_COLUMNS = (
    "run",
    "optimizer",
    "steps",
    "final train loss",
    "best eval loss",
    "final eval loss",
    "final eval accuracy",
    "wall time (s)",
    "steps/s",
)


def compare_runs(workdirs: Sequence[str | os.PathLike]) -> str:
    """A markdown table comparing runs, one row per run.

    Columns: run (directory name), optimizer (config.json "optimizer"), steps
    (last step logged), final train loss (mean over the last 10% of train rows,
    at least one; "nan" if any of them is non-finite), best and final eval loss,
    final eval accuracy, wall time (last minus first row time, seconds, restarts
    included) and steps/s (train steps between the first and last train rows
    over the time between them, so compilation before the first row is not
    counted). A value the run does not have is shown as "-".

    Args:
      workdirs: run directories, each with a metrics.jsonl.

    Returns:
      The table as GitHub-flavoured markdown, ending in a newline.

    Raises:
      FileNotFoundError: a workdir has no metrics.jsonl (names the directory).

    Example:
      >>> print(compare_runs(["runs/velo", "runs/adam"]))  # doctest: +SKIP
      | run | optimizer | steps | final train loss | ...
    """
    _check_workdirs(workdirs)
    table = [list(COMPARE_COLUMNS), ["---"] * len(COMPARE_COLUMNS)]
    table += [_summary(d) for d in workdirs]
    lines = []
    for cells in table:
        escaped = [c.replace("|", r"\|") for c in cells]
        lines.append("| " + " | ".join(escaped) + " |")
    return "\n".join(lines) + "\n"
