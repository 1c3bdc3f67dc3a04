"""Orbax checkpointing of the train state: async, atomic, last N kept.

Orbax writes each step into a temporary directory and renames it when the
save is complete, so an interrupted save leaves the previous checkpoint intact
and `latest_step()` never returns a half-written one. Restores take an
abstract target (`jax.ShapeDtypeStruct`s with shardings), so a checkpoint
written on one mesh restores onto another (8 -> 4 -> 1 devices).

Each step also carries a checksum manifest (sha256 of every file, see
`velo_scale.train.manifest`), committed with orbax's rename.
`Checkpointer.restore_latest_intact` verifies it before restoring; a corrupt,
unreadable or unverified step is moved to `corrupt/` with a warning naming
it, and the newest intact one is used instead.
"""

from __future__ import annotations

import os
import pathlib
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from velo_scale.train import manifest as manifest_lib


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used."""


def check_writable(directory: str | os.PathLike) -> pathlib.Path:
    """Creates `directory` and proves it is writable, before training starts."""
    path = pathlib.Path(directory).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"checkpoint directory {str(path)!r} is not writable ({e.strerror}); "
            "choose another --workdir/train.checkpoint_dir or fix its permissions."
        ) from None
    return path


MANIFESTED_FLAG = "velo_scale_checksums"
_FLAG_TEXT = (
    "Every step directory here carries velo_scale_manifest.json (checksums of "
    "its files); velo_scale does not restore a step without one.\n"
)
# Files orbax rewrites or adds when it commits a step, after the data is final.
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
CORRUPT_DIR = "corrupt"


def _is_primary() -> bool:
    return jax.process_index() == 0


# Replicated arrays whose per-replica slice would be smaller than this are
# written whole by one replica. orbax otherwise cuts every replicated array
# into one slice per local device, and each (shape, device) pair compiles its
# own `jit(slice)` (~35 ms on CPU) at the first save: hundreds of compiles
# for VeLO's small replicated state on an 8-device host.
MIN_REPLICA_SLICE_BYTES = 1 << 20


class _StandardHandler(ocp.StandardCheckpointHandler):
    """orbax's `StandardCheckpointHandler` (same files, same metadata name)
    with `MIN_REPLICA_SLICE_BYTES` applied to `jax.Array`s."""

    def __init__(self):
        super().__init__()
        default = ocp.type_handlers.get_type_handler(jax.Array)
        arrays = ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
            array_metadata_store=getattr(default, "_array_metadata_store", None),
        )
        others = (int, float, bytes, np.number, np.ndarray, str)
        registry = ocp.type_handlers.create_type_handler_registry(
            *((t, ocp.type_handlers.get_type_handler(t)) for t in others),
            (jax.Array, arrays),
        )
        self._impl = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)

    @classmethod
    def typestr(cls) -> str:
        return ocp.StandardCheckpointHandler.typestr()


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handler = _StandardHandler()
    registry.add(None, ocp.args.StandardSave, handler)
    registry.add(None, ocp.args.StandardRestore, handler)
    return registry


class Checkpointer:
    """Saves and restores `TrainState`s under one directory, with checksums.

    Every step directory gets a checksum manifest (`velo_scale.train.manifest`).
    With asynchronous saves it is written from orbax's finalization callback
    into the step's temporary directory, so orbax's atomic rename commits the
    data and its checksums together; the two files orbax changes while
    committing are added at the next `save`, `wait` or `close`. Multi-host:
    process 0 writes and verifies manifests.

    Args:
      directory: where step directories go (created; must be writable).
      keep: how many of the latest checkpoints to keep.
      asynchronous: save in a background thread (call `wait()` before exit).
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True
    ):
        self.directory = check_writable(directory)
        self._unfinished: list[int] = []  # steps whose manifest is incomplete
        self._in_flight: int | None = None
        self._asynchronous = asynchronous
        kwargs = {}
        if asynchronous and _has_post_finalization_callback():
            kwargs["async_options"] = ocp.AsyncOptions(
                post_finalization_callback=self._on_finalized
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
            **kwargs,
        )  # fmt: skip
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handler_registry()
        )
        # A directory with steps but no flag was written without manifests
        # (an older velo_scale): its steps are restored unverified.
        self.legacy = not (self.directory / MANIFESTED_FLAG).exists() and any(
            not manifest_lib.has_manifest(self.step_dir(s)) for s in self.all_steps()
        )
        if _is_primary() and not self.legacy:
            flag = self.directory / MANIFESTED_FLAG
            if not flag.exists():
                flag.write_text(_FLAG_TEXT)

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (not verified), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- saving ------------------------------------------------------------------

    def _on_finalized(self) -> None:
        """orbax's post-finalization callback (process 0, background thread):
        the step's data is written, its temporary directory not yet renamed."""
        step = self._in_flight
        if step is None:
            return
        tmp = sorted(self.directory.glob(f"{step}{_TMP_SUFFIX}*"))
        if len(tmp) != 1:
            return  # written after the commit instead (`_finish_manifests`)
        try:
            manifest_lib.write_manifest(tmp[0], pending=_COMMIT_FILES)
        except OSError:  # retried after the commit
            pass

    def _finish_manifests(self) -> None:
        """After orbax has committed: completes (or writes) the manifests."""
        for step in self._unfinished:
            path = self.step_dir(step)
            if not path.is_dir():
                continue  # removed by max_to_keep
            if not manifest_lib.complete_manifest(path):
                manifest_lib.write_manifest(path)
        self._unfinished = []

    def save(self, step: int, state: Any) -> None:
        """Starts saving `state` as `step` (returns before it is on disk when
        asynchronous; the manifest follows)."""
        self._manager.wait_until_finished()
        if _is_primary():
            self._finish_manifests()
        self._in_flight = step
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._unfinished.append(step)
        if not self._asynchronous and _is_primary():
            self._finish_manifests()  # the step is committed already

    def wait(self) -> None:
        """Blocks until pending saves and their manifests are on disk."""
        self._manager.wait_until_finished()
        if _is_primary():
            self._finish_manifests()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    # -- verifying and restoring ---------------------------------------------------

    def verify(self, step: int) -> str | None:
        """None when step's files match its manifest, else the reason.

        Steps of a legacy directory (written without manifests) pass unchecked."""
        path = self.step_dir(step)
        if self.legacy and not manifest_lib.has_manifest(path):
            return None
        return manifest_lib.verify_manifest(path)

    def quarantine(self, step: int, reason: str) -> pathlib.Path | None:
        """Moves a bad step to `corrupt/` (process 0) with a warning naming it."""
        target = None
        if _is_primary():
            target = self.directory / CORRUPT_DIR / f"{step}.{int(time.time())}"
            target.parent.mkdir(exist_ok=True)
            try:
                os.replace(self.step_dir(step), target)
            except OSError:
                target = None
        where = f"moved to {target}" if target else "left in place"
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is not usable: {reason}; "
            f"{where}. Falling back to the newest intact checkpoint.",
            RuntimeWarning,
            stacklevel=2,
        )
        return target

    def reload(self) -> None:
        """Re-reads the step list (after `quarantine`)."""
        if hasattr(self._manager, "reload"):
            self._manager.reload()

    def restore(self, step: int, target: Any) -> Any:
        """Restores step onto `target`: a tree of `jax.ShapeDtypeStruct`s with
        the desired shardings (or arrays, whose shardings are used).

        Raises `CheckpointError` (naming the step) when orbax cannot read it or
        its tree does not match `target`."""
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            target,
        )
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored "
                f"onto this run's train state ({type(e).__name__}: {first}). If the "
                "model or optimizer changed, use a new workdir."
            ) from e

    def _choose_step(self) -> int | None:
        """Process 0 verifies steps newest first, quarantining bad ones; every
        process gets its choice."""
        self.reload()  # steps set aside since the last call are gone
        chosen = -1
        if _is_primary():
            for step in reversed(self.all_steps()):
                reason = self.verify(step)
                if reason is None:
                    chosen = step
                    break
                self.quarantine(step, reason)
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        self.reload()
        return None if chosen < 0 else chosen

    def restore_latest_intact(
        self, target: Any, *, check: Callable[[Any], str | None] | None = None
    ) -> tuple[int | None, Any]:
        """Restores the newest checkpoint that verifies against its manifest.

        Corrupt, unreadable or unverified steps (and those for which
        `check(state)` returns a reason) are moved to `corrupt/` with a warning
        naming the step; the next older one is tried.

        Returns:
          (step, state), or (None, None) when no intact checkpoint exists.
        """
        while (step := self._choose_step()) is not None:
            unverified = self.legacy and not manifest_lib.has_manifest(
                self.step_dir(step)
            )
            try:
                state = self.restore(step, target)
            except CheckpointError as e:
                if not unverified:
                    raise
                reason = str(e.__cause__ or e).strip().splitlines()[0][:200]
                self.quarantine(step, f"orbax cannot read it ({reason})")
                continue
            reason = check(state) if check is not None else None
            if reason is None:
                if unverified:
                    warnings.warn(
                        f"checkpoint step {step} in {self.directory} has no checksum "
                        "manifest (written by an older velo_scale); restored "
                        "unverified.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return step, state
            self.quarantine(step, reason)
        return None, None


_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _has_post_finalization_callback() -> bool:
    import dataclasses

    cls = getattr(ocp, "AsyncOptions", None)
    return cls is not None and "post_finalization_callback" in {
        f.name for f in dataclasses.fields(cls)
    }


def restore_params(directory: str | os.PathLike, target_params: Any) -> Any:
    """The params of the latest intact checkpoint under `directory` (for
    `init_from`); steps whose checksum manifest fails are skipped with a
    warning (nothing in `directory` is changed).

    Args:
      directory: a run's checkpoint directory.
      target_params: abstract or concrete params giving structure, dtypes and
        shardings.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    manager = ocp.CheckpointManager(path)
    step = None
    for candidate in sorted(manager.all_steps(), reverse=True):
        step_dir = path / str(candidate)
        if manifest_lib.has_manifest(step_dir) or (path / MANIFESTED_FLAG).exists():
            if reason := manifest_lib.verify_manifest(step_dir):
                warnings.warn(
                    f"init_from={str(path)!r}: skipping checkpoint step {candidate}: "
                    f"{reason}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
        step = candidate
        break
    if step is None:
        manager.close()
        raise CheckpointError(f"init_from={str(path)!r} holds no intact checkpoint.")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    params = restored["params"] if isinstance(restored, dict) else restored.params
    want = jax.tree_util.tree_structure(target_params)
    got_leaves = jax.tree_util.tree_leaves(params)
    if len(got_leaves) != want.num_leaves:
        raise CheckpointError(
            f"init_from={str(path)!r}: its params have {len(got_leaves)} arrays, the "
            f"model has {want.num_leaves}; is it a checkpoint of the same model?"
        )
    return jax.tree_util.tree_map(
        lambda t, x: (
            jax.device_put(x.astype(t.dtype), t.sharding)
            if hasattr(t, "sharding")
            else x
        ),
        target_params,
        want.unflatten(got_leaves),
    )
