"""Inner-training tasks for meta-training: small models on real data.

A task is pure and jittable: `init(key) -> params`, `batch(key, step) ->
batch` (drawn from arrays held by the task, so an antithetic pair that shares
the key sees exactly the same batches), `loss(params, batch) -> f32[]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationTask:
    """An MLP classifier on an in-memory dataset.

    Attributes:
      images: f32[n, ...] inputs; labels: i32[n].
      hidden: widths of the relu hidden layers.
      batch_size: examples per inner step.
      init_scale: multiplies the LeCun-normal initial weights.
      name: for logs and provenance.
    """

    images: np.ndarray
    labels: np.ndarray
    hidden: Sequence[int] = (32,)
    batch_size: int = 64
    init_scale: float = 1.0
    name: str = "mlp"

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def init(self, key: jax.Array) -> dict[str, Any]:
        sizes = (int(np.prod(self.images.shape[1:])), *self.hidden, self.num_classes)
        params = {}
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            key, sub = jax.random.split(key)
            w = jax.random.normal(sub, (n_in, n_out)) * (
                self.init_scale / np.sqrt(n_in)
            )
            params[f"layer{i}"] = {"w": w, "b": jnp.zeros((n_out,))}
        return params

    def batch(self, key: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
        idx = jax.random.randint(
            jax.random.fold_in(key, step), (self.batch_size,), 0, len(self.labels)
        )
        return {"x": jnp.asarray(self.images)[idx], "y": jnp.asarray(self.labels)[idx]}

    def loss(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        x = batch["x"].reshape(batch["x"].shape[0], -1)
        n = len(params)
        for i in range(n):
            x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
            if i < n - 1:
                x = jax.nn.relu(x)
        return optax.softmax_cross_entropy_with_integer_labels(x, batch["y"]).mean()


def digits_mlp_task(
    hidden: Sequence[int] = (32,), batch_size: int = 64
) -> ClassificationTask:
    """MLP on scikit-learn's digits (1,500 real 8x8 training images)."""
    from velo_scale.data import load_dataset

    data = load_dataset("digits", "train")
    return ClassificationTask(
        data["image"], data["label"], tuple(hidden), batch_size, name="digits_mlp"
    )
