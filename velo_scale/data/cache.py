"""Where prepared datasets are cached, and atomic writes of cache files.

Every loader that prepares data once (parsed Bible pairs, featurised
molecules, speech features, MRI slices, generated Hopper trajectories, the
Criteo line index) caches it under one root: `$VELO_SCALE_CACHE`, else
`$XDG_CACHE_HOME/velo_scale`, else `~/.cache/velo_scale`. Files are written
to a temporary name in the same folder and renamed into place, so an
interrupted run never leaves a half-written cache file.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping

import numpy as np

from velo_scale._src.weights import atomic_write_bytes

CACHE_ENV = "VELO_SCALE_CACHE"


def cache_dir(*parts: str) -> pathlib.Path:
    """The cache root (see module docstring), joined with `parts`."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(xdg, "velo_scale")
    return pathlib.Path(root).expanduser().joinpath(*parts)


@contextlib.contextmanager
def preparing(what: str, estimate: str | None = None) -> Iterator[None]:
    """Says on stderr that `what` is being prepared (first use) and, after,
    how long it took and where it is cached: the minutes of a first-use
    preparation are never silent.

    Example:
      >>> with preparing("B3DB molecules", "~1 min"):  # doctest: +SKIP
      ...     data = featurise()
    """
    hint = f", {estimate}" if estimate else ""
    print(
        f"preparing {what} (first use{hint}; cached in {cache_dir()})...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    yield
    print(
        f"prepared {what} in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def save_npz_atomic(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    *,
    compressed: bool = False,
) -> None:
    """Writes `arrays` as an .npz file at `path`, atomically."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    atomic_write_bytes(pathlib.Path(path), buffer.getvalue())


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes one array as an .npy file at `path`, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(pathlib.Path(path), buffer.getvalue())
