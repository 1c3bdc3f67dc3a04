"""Where prepared datasets are cached, and atomic writes of cache files.

Every loader that prepares data once (parsed Bible pairs, featurised
molecules, speech features, MRI slices, generated Hopper trajectories, the
Criteo line index) caches it under one root: `$VELO_SCALE_CACHE`, else
`$XDG_CACHE_HOME/velo_scale`, else `~/.cache/velo_scale`. Files are written
to a temporary name in the same folder and renamed into place, so an
interrupted run never leaves a half-written cache file.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Mapping

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
