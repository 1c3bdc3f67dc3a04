"""SIGTERM / SIGINT as a request to stop after the current step.

TPU VMs and most schedulers send SIGTERM before they take a machine away;
Ctrl-C sends SIGINT. Inside `StopOnSignal` the first of either only records
the request: the training loop finishes the step in progress, checkpoints it
and raises `TrainingInterrupted`. A second signal gets the default action at
once (SIGINT: KeyboardInterrupt; SIGTERM: the process ends), for a save that
hangs. Handlers can only be installed from the main thread; elsewhere
`StopOnSignal` does nothing.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM/SIGINT after checkpointing its last step.

    A `KeyboardInterrupt`, so that `except Exception` does not swallow it.

    Attributes:
      signum: the signal received.
      step: the last completed step.
      checkpoint_step: the step of the checkpoint written (None: no
        checkpointing in this run).
    """

    def __init__(
        self, message: str, *, signum: int, step: int, checkpoint_step: int | None
    ):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint_step = checkpoint_step

    def __str__(self) -> str:
        return str(self.args[0])


class StopOnSignal:
    """Context manager that turns the first SIGTERM/SIGINT into `requested`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            self._restore()
            signal.raise_signal(signum)  # second signal: the default action
            return
        self.requested = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        if self.enabled:
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()
