"""One run per workdir: an OS advisory lock plus a file naming its holder.

`WorkdirLock(directory).acquire()` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on
`directory/run.lock` and writes `directory/run.lock.json` (pid, host, start
time, command line; written to a temporary file and renamed, so a reader
never sees half of it). A second process on the same directory gets
`WorkdirLockedError` naming the holder. The kernel drops a flock when its
process dies, however it dies, so a lock left by a crash (kill -9, OOM, a
lost VM) never blocks: the next run takes it and warns, naming the dead
holder from the info file it left. `release()` removes the info file, then
unlocks.

Where the file system does not support flock (some FUSE mounts), the info
file alone decides: a holder on this host whose pid is alive blocks, a dead
one is taken over with a warning, and one on another host blocks (its
liveness cannot be checked from here; delete the file if it is gone).

Multi-host runs: only process 0 takes the lock (every process writes into
one shared directory), and the outcome is broadcast so that every process
of a refused run stops with the error (`lock_run_directories`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import pathlib
import socket
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = "run.lock"
INFO_FILE = "run.lock.json"
# flock errors that mean "not supported here", not "held by someone".
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirLockedError(RuntimeError):
    """Another live process holds the run directory."""


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "a process that left no info file"
    return (
        f"pid {info.get('pid')} on host {info.get('host')!r}, started "
        f"{info.get('started')}"
        + (f" ({info['command']})" if info.get("command") else "")
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class WorkdirLock:
    """An exclusive lock on one run directory (see the module docstring).

    Args:
      directory: the workdir (or checkpoint directory); created if missing.

    Example:
      >>> with WorkdirLock("/tmp/run"):  # doctest: +SKIP
      ...     train(...)
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory).expanduser().absolute()
        self.lock_path = self.directory / LOCK_FILE
        self.info_path = self.directory / INFO_FILE
        self._fd: int | None = None
        self._held = False

    def read_info(self) -> dict[str, Any] | None:
        """The holder's info file, or None when missing or unreadable."""
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return None

    def _write_info(self) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now()
            .astimezone()
            .isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        tmp = self.info_path.with_name(f"{INFO_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.info_path)

    def _refuse(self, info: dict[str, Any] | None) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"{self.directory} is in use by another run: {_describe(info)}. "
            "Two runs on one workdir would mix their metrics and checkpoints. "
            "Wait for it to finish, stop it, or use another --workdir."
        )

    def _warn_stale(self, info: dict[str, Any] | None) -> None:
        warnings.warn(
            f"{self.directory}: taking over the lock left by {_describe(info)}, "
            "which is no longer running (it stopped without releasing it, e.g. "
            "killed or crashed).",
            RuntimeWarning,
            stacklevel=3,
        )

    def acquire(self) -> WorkdirLock:
        """Takes the lock or raises `WorkdirLockedError` naming the holder."""
        if self._held:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        supported = fcntl is not None
        if supported:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise self._refuse(self.read_info()) from None
                if e.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                supported = False
        previous = self.read_info()
        if previous is not None and previous.get("pid") != os.getpid():
            if not supported:
                same_host = previous.get("host") == socket.gethostname()
                pid = previous.get("pid")
                if not same_host or (isinstance(pid, int) and _pid_alive(pid)):
                    os.close(fd)
                    raise self._refuse(previous)
            self._warn_stale(previous)
        self._fd = fd
        self._write_info()
        self._held = True
        return self

    def release(self) -> None:
        """Removes the info file and unlocks (a no-op when not held)."""
        if not self._held:
            return
        with contextlib.suppress(OSError):
            self.info_path.unlink()
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        self._held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _unique(paths: Iterable[pathlib.Path]) -> list[pathlib.Path]:
    """Distinct directories, dropping those inside another one of the list."""
    paths = sorted(
        {p.expanduser().absolute() for p in paths}, key=lambda p: len(p.parts)
    )
    kept: list[pathlib.Path] = []
    for p in paths:
        if not any(p == k or k in p.parents for k in kept):
            kept.append(p)
    return kept


def lock_run_directories(
    directories: Sequence[str | os.PathLike | None],
) -> contextlib.ExitStack:
    """Locks the run's directories (workdir, checkpoint dir) on process 0.

    Returns an `ExitStack` that releases them. In a multi-host run process 0
    decides and broadcasts, so every process of a refused run raises
    `WorkdirLockedError` (the others saying process 0 could not lock).
    """
    import jax

    stack = contextlib.ExitStack()
    dirs = _unique(pathlib.Path(d) for d in directories if d is not None)
    error: WorkdirLockedError | None = None
    if jax.process_index() == 0:
        try:
            for d in dirs:
                stack.enter_context(WorkdirLock(d))
        except WorkdirLockedError as e:
            stack.close()
            error = e
    if jax.process_count() > 1 and dirs:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(ok) and error is None:
            error = WorkdirLockedError(
                f"process 0 could not lock {', '.join(map(str, dirs))}: another "
                "run uses it (process 0's error names it)."
            )
    if error is not None:
        raise error
    return stack
