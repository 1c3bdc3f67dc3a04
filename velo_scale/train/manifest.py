"""Checksum manifests of checkpoint step directories.

`write_manifest(step_dir)` records the size and sha256 of every file under a
step directory in `step_dir/velo_scale_manifest.json`, together with the
sha256 of that record itself (so a flipped bit in the manifest is caught
too). It is written to a temporary file and renamed into place.
`verify_manifest(step_dir)` re-reads every file and returns None when all
match, else a sentence saying what is wrong (missing manifest, unreadable
file, size or checksum mismatch, a file that is missing or was not there).

`pending` names files that may still change after the manifest was first
written (orbax rewrites the step's `_CHECKPOINT_METADATA` and writes
`commit_success.txt` when it commits the step, after the data is final); they
are accepted unverified until `complete_manifest` adds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

MANIFEST_FILE = "velo_scale_manifest.json"
FORMAT = 1
_CHUNK = 1 << 22


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: pathlib.Path) -> list[str]:
    return sorted(
        p.relative_to(step_dir).as_posix()
        for p in step_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE and ".tmp-" not in p.name
    )


def _record_digest(record: dict[str, Any]) -> str:
    body = {k: record[k] for k in ("format", "files", "pending")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write(step_dir: pathlib.Path, files: dict, pending: list[str]) -> None:
    record = {"format": FORMAT, "files": files, "pending": sorted(pending)}
    record["sha256"] = _record_digest(record)
    path = step_dir / MANIFEST_FILE
    tmp = step_dir / f"{MANIFEST_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(step_dir: str | os.PathLike, *, pending: Iterable[str] = ()) -> None:
    """Writes the manifest of every file under `step_dir` except `pending`
    (relative paths that are still to change; see `complete_manifest`)."""
    step_dir = pathlib.Path(step_dir)
    pending = [p for p in pending]
    files = {
        rel: {
            "size": (step_dir / rel).stat().st_size,
            "sha256": _sha256(step_dir / rel),
        }
        for rel in _files(step_dir)
        if rel not in pending
    }
    _write(step_dir, files, pending)


def read_manifest(step_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest record if present, intact and self-consistent, else None."""
    path = pathlib.Path(step_dir) / MANIFEST_FILE
    try:
        record = json.loads(path.read_text())
        if record.get("sha256") != _record_digest(record):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record


def complete_manifest(step_dir: str | os.PathLike) -> bool:
    """Adds the checksums of the manifest's pending files (now final).

    Returns True when the manifest is complete afterwards."""
    step_dir = pathlib.Path(step_dir)
    record = read_manifest(step_dir)
    if record is None:
        return False
    if not record["pending"]:
        return True
    files = dict(record["files"])
    for rel in record["pending"]:
        p = step_dir / rel
        if p.is_file():
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    _write(step_dir, files, [])
    return True


def has_manifest(step_dir: str | os.PathLike) -> bool:
    return (pathlib.Path(step_dir) / MANIFEST_FILE).exists()


def verify_manifest(step_dir: str | os.PathLike) -> str | None:
    """None when every file of `step_dir` matches its manifest, else why not."""
    step_dir = pathlib.Path(step_dir)
    if not (step_dir / MANIFEST_FILE).exists():
        return f"it has no checksum manifest ({MANIFEST_FILE})"
    record = read_manifest(step_dir)
    if record is None:
        return f"its checksum manifest ({MANIFEST_FILE}) is unreadable or damaged"
    try:
        present = set(_files(step_dir))
    except OSError as e:
        return f"its files cannot be listed ({e})"
    expected = set(record["files"])
    pending = set(record["pending"])
    if missing := sorted(expected - present):
        return f"{len(missing)} file(s) are missing: {missing[:3]}"
    if extra := sorted(present - expected - pending):
        return f"{len(extra)} file(s) are not in its manifest: {extra[:3]}"
    for rel in sorted(expected):
        want = record["files"][rel]
        path = step_dir / rel
        try:
            size = path.stat().st_size
            if size != want["size"]:
                return f"{rel} has {size} bytes, its manifest says {want['size']}"
            if _sha256(path) != want["sha256"]:
                return f"{rel} does not match its checksum"
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror or e})"
    return None
