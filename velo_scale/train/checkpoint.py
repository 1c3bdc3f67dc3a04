"""Orbax checkpointing of the train state: async, atomic, last N kept.

Orbax writes each step into a temporary directory and renames it when the
save is complete, so an interrupted save leaves the previous checkpoint intact
and `latest_step()` never returns a half-written one. Restores take an
abstract target (`jax.ShapeDtypeStruct`s with shardings), so a checkpoint
written on one mesh restores onto another (8 -> 4 -> 1 devices).
"""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp


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


class Checkpointer:
    """Saves and restores `TrainState`s under one directory.

    Args:
      directory: where step directories go (created; must be writable).
      keep: how many of the latest checkpoints to keep.
      asynchronous: save in a background thread (call `wait()` before exit).
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True
    ):
        self.directory = check_writable(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts saving `state` as `step` (returns before it is on disk when
        asynchronous)."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, step: int, target: Any) -> Any:
        """Restores step onto `target`: a tree of `jax.ShapeDtypeStruct`s with
        the desired shardings (or arrays, whose shardings are used)."""
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            target,
        )
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_params(directory: str | os.PathLike, target_params: Any) -> Any:
    """The params of the latest checkpoint under `directory` (for `init_from`).

    Args:
      directory: a run's checkpoint directory.
      target_params: abstract or concrete params giving structure, dtypes and
        shardings.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    manager = ocp.CheckpointManager(path)
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"init_from={str(path)!r} holds no complete checkpoint.")
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
