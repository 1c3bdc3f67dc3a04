"""What a run is, recorded once in `config.json` and checked on every resume.

A fresh run writes `workdir/config.json`: the fields that make the run what
it is (`num_steps`, `seed`, `batch_size`, the optimizer, the data, the
workload and the layout of params, model state and optimizer state), the mesh
and the gin config. A resumed run compares its request with that record
before restoring anything (`check_resume`). A change of an identity field is
a `ConfigMismatchError` naming the field and the ways out; the mesh and
everything else (evaluation and checkpoint frequency, logging, ...) may
change, and changed gin bindings are listed in a warning. `config.json` is
never rewritten.

`num_steps` is special: VeLO's horizon and every schedule are set by it, so a
resume with another value is not the run that was asked for. The way to
continue past the horizon is a continuation method, `'naive'`, `'increase'`
or `'reset'` (the VeLO paper's; `train.continuation`, issue 15), which will
call `check_resume(..., allow=("num_steps",))`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax

CONFIG_FILE = "config.json"
CONTINUATION_METHODS = ("naive", "increase", "reset")

# Field -> how messages name it. Order: the order of the checks.
IDENTITY_FIELDS: dict[str, str] = {
    "num_steps": "train.num_steps (VeLO's horizon and the schedules)",
    "seed": "train.seed (params init, data order, step RNG)",
    "batch_size": "train.batch_size",
    "optimizer": "the optimizer",
    "data": "train.data",
    "workload": "the workload",
    "params": "the model's parameters",
    "model_state": "the model's state collections (e.g. batch_stats)",
    "opt_state": "the optimizer state's layout (the optimizer or its settings, "
    "e.g. clip_norm or the VeLO weights' architecture)",
}


class ConfigMismatchError(ValueError):
    """A resume asks for a different run than the one in the workdir."""


@dataclasses.dataclass(frozen=True)
class ConfigChange:
    """One field whose requested value differs from the recorded one."""

    field: str
    saved: Any
    requested: Any


def tree_signature(tree: Any) -> dict[str, str]:
    """`{"['dense']['kernel']": "float32[64,10]", ...}` of an (abstract) tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(path): f"{jax.numpy.dtype(x.dtype).name}{list(x.shape)}"
        for path, x in flat
    }


def _digest(signature: Mapping[str, str]) -> str:
    text = json.dumps(sorted(signature.items()))
    return f"{len(signature)} arrays, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def describe_run(
    *,
    num_steps: int,
    seed: int,
    batch_size: int,
    optimizer: str,
    data: Any,
    workload: Any,
    abstract_state: Any,
    mesh_shape: Sequence[int],
    axis_names: Sequence[str],
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record written to `config.json` (identity fields, mesh, config).

    Args:
      abstract_state: the run's `TrainState` of `jax.ShapeDtypeStruct`s.
    """
    return {
        "num_steps": int(num_steps),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "optimizer": optimizer,
        "data": data if isinstance(data, str) else None,
        "workload": type(workload).__name__,
        "params": tree_signature(abstract_state.params),
        "model_state": tree_signature(abstract_state.model_state),
        "opt_state": _digest(tree_signature(abstract_state.opt_state)),
        "mesh_shape": list(mesh_shape),
        "axis_names": list(axis_names),
        "config": dict(config or {}),
    }


def config_changes(
    saved: Mapping[str, Any], requested: Mapping[str, Any]
) -> list[ConfigChange]:
    """Identity fields that differ (fields the record lacks are not compared:
    older records had fewer)."""
    return [
        ConfigChange(f, saved[f], requested.get(f))
        for f in IDENTITY_FIELDS
        if f in saved and saved[f] != requested.get(f)
    ]


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return f"{len(value)} arrays"
    return repr(value)


def _tree_diff(saved: Mapping[str, str], requested: Mapping[str, str]) -> str:
    lines = []
    for key in sorted(set(saved) | set(requested)):
        a, b = saved.get(key), requested.get(key)
        if a != b:
            lines.append(f"{key}: {a or 'absent'} -> {b or 'absent'}")
    shown = "; ".join(lines[:4]) + (
        f"; ... ({len(lines)} in all)" if len(lines) > 4 else ""
    )
    return shown


def explain(change: ConfigChange, workdir: str | os.PathLike) -> str:
    """One sentence: the field, both values, and the ways out."""
    what = IDENTITY_FIELDS[change.field]
    if isinstance(change.saved, dict) and isinstance(change.requested, dict):
        values = _tree_diff(change.saved, change.requested)
    else:
        values = (
            f"{_show(change.saved)} in the workdir, {_show(change.requested)} requested"
        )
    head = f"{what} differs from the run in {workdir}: {values}."
    if change.field == "num_steps":
        return (
            f"{head} Resuming would keep the old horizon, which is not the run "
            f"you asked for. Ways out: set train.num_steps={change.saved!r} to "
            "finish that run, use a new --workdir for a fresh run of "
            f"{change.requested} steps, or continue past the horizon with a "
            "continuation method, train.continuation = "
            + " | ".join(repr(m) for m in CONTINUATION_METHODS)
            + " (the VeLO paper's Naive / Increase / Reset; README: The horizon)."
        )
    return (
        f"{head} Ways out: use a new --workdir, or set it back to what the "
        "workdir's config.json records."
    )


def check_resume(
    saved: Mapping[str, Any],
    requested: Mapping[str, Any],
    *,
    workdir: str | os.PathLike,
    allow: Sequence[str] = (),
) -> list[ConfigChange]:
    """Raises `ConfigMismatchError` for a changed identity field not in `allow`.

    Returns the allowed changes (for the caller to act on, e.g. a
    continuation method for "num_steps"). Changed gin bindings that are not
    identity fields are listed in a warning.
    """
    changes = config_changes(saved, requested)
    bad = [c for c in changes if c.field not in allow]
    if any(c.field == "params" for c in bad):  # the optimizer state follows them
        bad = [c for c in bad if c.field != "opt_state"]
    if bad:
        raise ConfigMismatchError(" ".join(explain(c, workdir) for c in bad))
    old = str(saved.get("config", {}).get("gin", "")).splitlines()
    new = str(requested.get("config", {}).get("gin", "")).splitlines()
    differ = sorted(
        (set(old) ^ set(new)) - {""},
        key=lambda line: (line.split("=")[0], line in new),
    )
    differ = [line for line in differ if not line.startswith("#")]
    if differ:
        warnings.warn(
            f"resuming {workdir} with changed gin bindings (allowed; config.json "
            "keeps the original): "
            + "; ".join(
                ("+ " if line in new else "- ") + line.strip() for line in differ[:10]
            ),
            RuntimeWarning,
            stacklevel=2,
        )
    return [c for c in changes if c.field in allow]


def _read_json(path: pathlib.Path, kind: type, what: str) -> Any:
    """`path`'s JSON value (None if absent); `ConfigMismatchError` naming
    what the file records when it cannot be read or is not a `kind`."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, kind):
            raise ValueError(f"not a JSON {kind.__name__}")
    except (OSError, ValueError) as e:
        raise ConfigMismatchError(
            f"{path} cannot be read ({e}); it records {what}. Restore it, or use "
            "a new --workdir."
        ) from None
    return value


def read_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The workdir's `config.json`, or None when there is none.

    Raises `ConfigMismatchError` when it exists but is not valid JSON."""
    return _read_json(
        pathlib.Path(workdir) / CONFIG_FILE, dict, "what this workdir's run is"
    )


def write_config(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Writes `config.json` atomically; refuses to replace an existing one."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if path.exists():
        raise FileExistsError(f"{path} exists; config.json is written once per run.")
    tmp = path.with_name(f"{CONFIG_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


CONTINUATIONS_FILE = "continuations.json"


def read_continuations(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The continuations applied to the workdir's run, oldest first.

    Each entry: `{"at_step": the step resumed from, "num_steps": the new
    total, "method": 'naive' | 'increase' | 'reset'}`."""
    entries = _read_json(
        pathlib.Path(workdir) / CONTINUATIONS_FILE,
        list,
        "how this run was continued past its horizon",
    )
    return entries or []


def record_continuation(
    workdir: str | os.PathLike, at_step: int, num_steps: int, method: str
) -> None:
    """Appends one continuation to `continuations.json` (atomically)."""
    entries = read_continuations(workdir)
    entries.append({"at_step": int(at_step), "num_steps": int(num_steps), "method": method})
    path = pathlib.Path(workdir) / CONTINUATIONS_FILE
    tmp = path.with_name(f"{CONTINUATIONS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=2))
    os.replace(tmp, path)


def effective_record(
    saved: Mapping[str, Any], continuations: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """`config.json`'s record with `num_steps` of the latest continuation."""
    record = dict(saved)
    if continuations:
        record["num_steps"] = continuations[-1]["num_steps"]
    return record
