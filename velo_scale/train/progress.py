"""Progress of training loops: a tqdm bar on a terminal, plain lines in logs.

`ProgressBar` says what the first (compiling) step is doing before it
starts, starts the bar's clock only after that step (so its rate and ETA
exclude compilation), prints evaluations as lines, and, when stderr is not a
terminal (a log file, CI, `nohup`), prints one plain line every ~5% of the
run (or every `LINE_SECONDS`) instead of tqdm's `\\r` updates.
`StepTimer` measures the same two numbers for the summary line: the first
step's time (compilation included) and steps/s after it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO

# Plain-line mode: a line every this fraction of the run, or this many seconds.
LINE_FRACTION = 0.05
LINE_SECONDS = 30.0
# $VELO_SCALE_PROGRESS=bar|lines forces one mode (default: bar on a TTY).
PROGRESS_ENV = "VELO_SCALE_PROGRESS"


class StepTimer:
    """Times a loop's steps: the first one (with compilation) apart.

    Call `step()` after each step has finished (its results fetched).
    `first_step_s` is the time from construction to the end of the first
    step; `steps_per_second` counts the steps after the first over the time
    since the first ended (evaluations and checkpoints included), None until
    two steps have run.
    """

    def __init__(self):
        self._start = time.perf_counter()
        self._first_end: float | None = None
        self._last_end: float | None = None
        self.steps = 0
        self.first_step_s: float | None = None

    def step(self) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self._first_end is None:
            self._first_end = now
            self.first_step_s = now - self._start
        self._last_end = now

    @property
    def steps_per_second(self) -> float | None:
        if self.steps < 2 or self._last_end <= self._first_end:
            return None
        return (self.steps - 1) / (self._last_end - self._first_end)


def _format_value(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _format_seconds(s: float) -> str:
    s = int(round(s))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressBar:
    """Progress from step `start` of `total` on stderr, with a postfix of
    named values (e.g. loss, meta-loss); a no-op when `enabled` is False.

    Args:
      enabled: show anything at all.
      start: the step the loop starts after (a resumed run's checkpoint).
      total: the last step.
      unit: what a step is called ("step", "outer step").
      first_message: printed before the first step (e.g. "compiling the
        train step..."); its time is printed once the first step is done.
      stream: where to write (default stderr).
      lines: plain lines instead of a tqdm bar; default: when `stream` is not
        a terminal (or $VELO_SCALE_PROGRESS says "lines"/"bar").
    """

    def __init__(
        self,
        enabled: bool,
        start: int,
        total: int,
        unit: str = "step",
        *,
        first_message: str | None = None,
        stream: IO[str] | None = None,
        lines: bool | None = None,
    ):
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._start, self._total, self._unit = start, total, unit
        self._step = start
        self._bar = None
        self._timer = StepTimer()
        if lines is None:
            forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
            if forced in ("bar", "lines"):
                lines = forced == "lines"
            else:
                isatty = getattr(self._stream, "isatty", None)
                lines = not (isatty is not None and isatty())
        self._lines = lines
        self._every = max(1, round(LINE_FRACTION * max(total - start, 1)))
        self._last_line = 0.0
        if enabled and first_message:
            self.write(f"{first_message} ({unit} {start + 1} of {total})")

    def write(self, message: str) -> None:
        """Prints `message` on its own line, without breaking the bar."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def update(self, **postfix) -> None:
        """Advances one step and shows `postfix` (floats with 4 decimals)."""
        if not self._enabled:
            return
        self._step += 1
        self._timer.step()
        if self._timer.steps == 1:
            self.write(
                f"first {self._unit} done in "
                f"{_format_seconds(self._timer.first_step_s)} (compilation "
                "included); rates and ETAs below exclude it"
            )
            if not self._lines:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=self._total,
                    initial=self._step,
                    unit=self._unit,
                    dynamic_ncols=True,
                    mininterval=0.5,
                    file=self._stream,
                )
            self._last_line = time.perf_counter()
            return
        shown = {k: _format_value(v) for k, v in postfix.items()}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
            return
        now = time.perf_counter()
        done = self._step == self._total
        if (
            done
            or (self._step - self._start) % self._every == 0
            or now - self._last_line >= LINE_SECONDS
        ):
            self._last_line = now
            rate = self._timer.steps_per_second
            parts = [f"{self._unit} {self._step}/{self._total}"]
            parts += [f"{k} {v}" for k, v in shown.items()]
            if rate:
                parts.append(f"{rate:.3g} {self._unit}s/s")
                if not done:
                    eta = (self._total - self._step) / rate
                    parts.append(f"ETA {_format_seconds(eta)}")
            print(", ".join(parts), file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
