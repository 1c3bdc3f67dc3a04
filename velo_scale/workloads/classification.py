"""Image classification: softmax cross-entropy, accuracy and error.

The workload of the default recipe and of the image recipes (MLP, CNN, ViT,
ResNet). Batches: `{"image": float32[b, h, w, c], "label": int32[b]}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from velo_scale.workloads.base import FullScale, Workload, gin_configurables


@dataclasses.dataclass(frozen=True, eq=False)
class Classification(Workload):
    """Softmax classification of `batch["image"]`.

    Attributes:
      model: maps images to logits `[b, num_classes]`.
      train_flag: pass `train=True/False` to the model (models with dropout
        or BatchNorm); BatchNorm statistics live in the `batch_stats`
        collection and are updated by every training step.
      label_smoothing: e.g. 0.1 (a hyper-parameter of AlgoPerf's ImageNet
        baselines, 0.1 or 0.2 across their tuning points).
      image_shape: `(h, w, c)` of `dummy_batch`.
      full_scale: the published workload facts, if any.
    """

    model: nn.Module
    train_flag: bool = False
    label_smoothing: float = 0.0
    image_shape: tuple[int, int, int] = (28, 28, 1)
    full_scale: FullScale | None = None

    def init_inputs(self, batch):
        return (batch["image"],)

    def init_kwargs(self):
        return {"train": False} if self.train_flag else {}

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return {
            "image": np.zeros((batch_size, *self.image_shape), np.float32),
            "label": np.zeros((batch_size,), np.int32),
        }

    def _losses(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        if not self.label_smoothing:
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, logits.shape[-1]), self.label_smoothing
        )
        return optax.softmax_cross_entropy(logits, targets)

    def loss(self, params, model_state, batch, rng):
        variables = {"params": params, **model_state}
        kwargs: dict[str, Any] = {"rngs": {"dropout": rng}}
        if self.train_flag:
            kwargs["train"] = True
            kwargs["mutable"] = list(model_state)
        out = self.model.apply(variables, batch["image"], **kwargs)
        logits, new_state = out if self.train_flag else (out, {})
        new_state = {**model_state, **dict(new_state)}
        loss = self._losses(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, ({"accuracy": accuracy}, new_state)

    def eval_sums(self, params, model_state, batch):
        variables = {"params": params, **model_state}
        kwargs = {"train": False} if self.train_flag else {}
        logits = self.model.apply(variables, batch["image"], **kwargs)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {
            "loss": jnp.sum(losses),
            "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"]),
            "count": jnp.asarray(batch["label"].shape[0], jnp.float32),
        }

    def eval_finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        accuracy = float(sums["correct"]) / count
        return {
            "loss": float(sums["loss"]) / count,
            "accuracy": accuracy,
            "error": 1.0 - accuracy,
        }


GIN_CONFIGURABLES = gin_configurables(Classification, FullScale)
