"""Readers for the golden trajectories of the reference VeLO (see README there)."""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import numpy as np

REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "reference" / "velo"
CASES = ("mlp", "shapes", "extreme", "horizon")
CHECKPOINT = REFERENCE_DIR / "theta_perturbed.msgpack"


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        raise FileNotFoundError(
            f"reference data {path} is missing; it ships in the repository under "
            "tests/data/reference/velo (copied from ../shared/reference/velo)."
        )
    return path


@functools.cache
def load_theta():
    import velo_scale

    return velo_scale.load_weights(_require(CHECKPOINT))


class Case:
    """One golden trajectory: inputs, and the reference's state after each step."""

    def __init__(self, name: str):
        self.name = name
        self.arrays = dict(np.load(_require(REFERENCE_DIR / f"{name}.npz")))
        self.manifest = json.loads(_require(REFERENCE_DIR / f"{name}.json").read_text())
        self.order = list(self.manifest["tensor_order"])
        self.num_steps = int(self.arrays["num_steps"])
        self.steps = int(self.manifest["steps_run"])
        self.losses = self.arrays["losses"]

    def tree(self, prefix: str) -> dict[str, Any]:
        """Nested dict of the leaves stored under `prefix/<leaf>`."""
        return nest({k: self.arrays[f"{prefix}/{k}"] for k in self.order})

    def params(self, step: int) -> dict[str, Any]:
        return self.tree("init/params" if step == 0 else f"step{step}/params")

    def grads(self, step: int) -> dict[str, Any]:
        return self.tree(f"grads/step{step}")

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def flat(tree: Any) -> dict[str, np.ndarray]:
    """'/'-joined key path -> numpy leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        out[key] = np.asarray(leaf)
    return out
