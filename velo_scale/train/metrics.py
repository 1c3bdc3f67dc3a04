"""Scalar metrics of a training run: one JSON line per write, plus TensorBoard.

`MetricsWriter` appends to `workdir/metrics.jsonl` one object per call,

    {"step": 100, "split": "train", "time": 1718000000.25, "loss": 0.42, ...}

with `time` in unix seconds. Values are plain floats; a non-finite value
(nan, +-inf) is written as `null` together with `"<name>_nonfinite": true`,
so every line is strict JSON that any plotting tool reads. The file is flushed
after every write, so a crash loses at most the line being written, and
`read_metrics` skips such a truncated last line. When `tensorboardX` is
installed the same scalars also go to TensorBoard under `"<split>/<name>"`.

The JSONL file is the record the reports (`velo_scale.train.reports`) read;
TensorBoard is a convenience for watching a run live.
"""

from __future__ import annotations

import json
import math
import operator
import os
import pathlib
import time
import types
import warnings
from collections.abc import Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
# Per-tensor values of VeLO's schedule (`velo_scale.lr_mult`, the effective
# step size), one row per logged train step, keys "<kind>:<keystr path>".
SCHEDULE_FILE = "schedule.jsonl"
NONFINITE_SUFFIX = "_nonfinite"
RESERVED_KEYS = frozenset({"step", "split", "time"})

# One definition of a run's final train loss and rate, used by the trainer's
# progress bar and summary line and by `velo-scale compare`.
FINAL_LOSS_FRACTION = 0.1
FINAL_LOSS_LABEL = "train loss (mean of last 10% of steps)"
RATE_LABEL = "steps/s (after compilation)"
# Train-row metric: seconds of a process's first step (compilation included).
COMPILE_KEY = "first_step_s"


def final_loss_window(num_steps: int) -> int:
    """How many of the last steps the final train loss averages (>= 1)."""
    return max(1, round(FINAL_LOSS_FRACTION * num_steps))

NO_TENSORBOARDX_MSG = (
    "MetricsWriter(tensorboard=True) needs the `tensorboardX` package, which is "
    "not installed (`pip install tensorboardX`); writing metrics.jsonl only."
)

_warned_no_tensorboardx = False


def _warn_no_tensorboardx_once() -> None:
    global _warned_no_tensorboardx
    if not _warned_no_tensorboardx:
        _warned_no_tensorboardx = True
        warnings.warn(NO_TENSORBOARDX_MSG, RuntimeWarning, stacklevel=3)


def _open_tensorboard(logdir: pathlib.Path) -> Any | None:
    """Returns a `tensorboardX.SummaryWriter`, or None if it is not installed."""
    try:
        import tensorboardX
    except ImportError:
        _warn_no_tensorboardx_once()
        return None
    return tensorboardX.SummaryWriter(logdir=os.fspath(logdir), flush_secs=10)


def _drop_partial_last_line(path: pathlib.Path) -> None:
    """Cuts a line left unfinished by a crash, so that appending stays valid.

    Without this, the first line written after a restart would be glued to the
    fragment and become a corrupt line in the middle of the file.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1  # 0 when the fragment is the only line.
        if _parse_row(data[keep:].decode("utf-8", errors="replace")) is not None:
            f.write(b"\n")  # A whole row that only lacks its newline: keep it.
            return
        f.truncate(keep)
    warnings.warn(
        f"{path}: dropped an unfinished last line ({len(data) - keep} bytes) left "
        "by an earlier run that stopped while writing it.",
        RuntimeWarning,
        stacklevel=3,
    )


def _parse_row(line: str) -> dict[str, Any] | None:
    """The row in `line`, or None if it is not a complete metrics row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or not RESERVED_KEYS <= row.keys():
        return None
    return row


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        shape = getattr(value, "shape", None)
        shape_str = f" with shape={tuple(shape)}" if shape is not None else ""
        raise TypeError(
            f"metric {name!r} must be a real scalar (python number, numpy or jax "
            f"0-d array); got {type(value).__name__}{shape_str}: {value!r:.80}"
        ) from e


class MetricsWriter:
    """Appends scalar metrics to `workdir/metrics.jsonl` and to TensorBoard.

    Each `write` adds one line `{"step", "split", "time", **metrics}` (time in
    unix seconds) and flushes it; non-finite values become `null` with a
    `"<name>_nonfinite": true` marker. Opening a workdir that already has a
    metrics.jsonl appends to it (a resumed run continues its record).

    Args:
      workdir: directory of the run; created if missing.
      tensorboard: also write TensorBoard scalars `"<split>/<name>"` into
        `workdir` with `tensorboardX`. If that package is missing, warns once
        per process and writes the JSONL file only.
      filename: the JSONL file in `workdir` (e.g. `SCHEDULE_FILE`).

    Example:
      >>> with MetricsWriter("/tmp/run") as writer:  # doctest: +SKIP
      ...     writer.write(100, {"loss": 0.42, "lr": 1e-3})
      ...     writer.write(100, {"loss": 0.50, "accuracy": 0.88}, split="eval")
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        filename: str = METRICS_FILE,
    ):
        import jax

        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / filename
        # Multi-host: every process computes the same (replicated) metrics;
        # process 0 writes them, the others only validate.
        self.primary = jax.process_index() == 0
        self._closed = False
        self._file, self._tb = None, None
        if self.primary:
            self.workdir.mkdir(parents=True, exist_ok=True)
            _drop_partial_last_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            self._tb = _open_tensorboard(self.workdir) if tensorboard else None

    @property
    def closed(self) -> bool:
        return self._closed

    def write(
        self, step: int, metrics: Mapping[str, float], *, split: str = "train"
    ) -> None:
        """Appends one row of scalars measured at `step` on `split`.

        Args:
          step: the training step, an integer (python, numpy or jax 0-d int).
          metrics: metric name -> real scalar. Names must be strings other than
            "step", "split", "time" and must not end in "_nonfinite".
          split: which data the metrics describe, e.g. "train" or "eval".

        Raises:
          ValueError: the writer is closed, or a metric name is reserved.
          TypeError: the step is not an integer or a value is not a scalar.
        """
        if self.closed:
            raise ValueError(f"MetricsWriter for {self.workdir} is closed.")
        try:
            step = operator.index(step)
        except TypeError as e:
            raise TypeError(
                f"step must be an integer; got {type(step).__name__}: {step!r}"
            ) from e
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty string; got {split!r}.")
        row: dict[str, Any] = {"step": step, "split": split, "time": time.time()}
        values: dict[str, float] = {}
        for name, value in metrics.items():
            if not isinstance(name, str):
                raise TypeError(f"metric names must be strings; got {name!r}.")
            if name in RESERVED_KEYS or name.endswith(NONFINITE_SUFFIX):
                raise ValueError(
                    f"metric name {name!r} is reserved: names may not be one of "
                    f"{sorted(RESERVED_KEYS)} or end in {NONFINITE_SUFFIX!r}."
                )
            x = values[name] = _as_float(name, value)
            if math.isfinite(x):
                row[name] = x
            else:
                row[name] = None
                row[name + NONFINITE_SUFFIX] = True
        if self._file is None:
            return
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, x in values.items():
                self._tb.add_scalar(f"{split}/{name}", x, step)

    def flush(self) -> None:
        """Flushes the TensorBoard writer (the JSONL file is flushed per write)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Closes the files; further writes raise. Calling it twice is fine."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None and not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()
        self._closed = True

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(
    workdir: str | os.PathLike, filename: str = METRICS_FILE
) -> list[dict[str, Any]]:
    """Reads the rows of `workdir/metrics.jsonl` (or `filename`) in the order
    they were written.

    Rows are returned as written: non-finite values are `None` with a
    `"<name>_nonfinite": True` marker. A resumed run may repeat steps; the
    later row is the newer measurement.

    Args:
      workdir: a directory written by `MetricsWriter`.

    Returns:
      One dict per line, each with at least "step", "split" and "time".

    Raises:
      FileNotFoundError: there is no metrics.jsonl in `workdir`.
      ValueError: a line other than an unfinished last one is not a JSON row.
    """
    path = pathlib.Path(workdir) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"no {filename} in {os.fspath(workdir)!r} (expected {path}); is "
            "this the workdir of a run that wrote metrics with MetricsWriter?"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    # `lines[-1]` is "" when the file ends in a newline; otherwise it is a line
    # a crash cut short (or one being written right now), which we skip.
    unfinished = lines.pop()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}, line {lineno}: not valid JSON ({e.msg} at column "
                f"{e.colno}): {line!r:.120}"
            ) from e
        if not isinstance(row, dict) or not RESERVED_KEYS <= row.keys():
            raise ValueError(
                f"{path}, line {lineno}: expected a JSON object with keys "
                f"{sorted(RESERVED_KEYS)}; got {line!r:.120}"
            )
        rows.append(row)
    # A row truncated by a crash mid-write was never complete: skip it.
    if unfinished.strip() and (row := _parse_row(unfinished)) is not None:
        rows.append(row)
    return rows
