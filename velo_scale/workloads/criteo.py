"""Click-through prediction (AlgoPerf's Criteo 1TB DLRM-small workload).

Sigmoid binary cross-entropy on one logit per example. Evaluation collects
every logit on the host and reports the log loss (mean binary cross-entropy,
AlgoPerf's target metric, named `loss`) and the ROC AUC (`auc`, the
probability that a random click scores above a random non-click, ties
counting one half).

Batches (`velo_scale.data.tabular`): `{"dense": float32[b, 13], "sparse":
int32[b, 26], "label": float32[b] in {0, 1}}`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from velo_scale.data.iterator import epoch_batches
from velo_scale.data.tabular import NUM_DENSE, NUM_SPARSE
from velo_scale.workloads.base import FullScale, Workload, gin_configurables

# AlgoPerf criteo1tb (DLRM-small): validation log loss target, step hint,
# global batch size of its baselines, and the model's parameter count.
CRITEO1TB = FullScale(
    target_metric="loss",
    target_value=0.123735,
    higher_is_better=False,
    step_hint=10_666,
    batch_size=262_144,
    num_params=539_267_457,
)


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of labels in [0, 1] under sigmoid(logits),
    in nats, computed stably in float64: `log(1 + e^x) - y x`."""
    x = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    if x.size == 0:
        return float("nan")
    return float(np.mean(np.logaddexp(0.0, x) - y * x))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (positives * negatives)).

    Tied scores get their average rank, so a tie between a positive and a
    negative counts one half. Labels > 0.5 are positives. NaN when either
    class is absent.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    positive = np.asarray(labels).reshape(-1) > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_scores)) + 1])
    ends = np.append(starts[1:], scores.size)
    ranks = np.empty(scores.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based.
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclasses.dataclass(frozen=True, eq=False)
class ClickPrediction(Workload):
    """Binary click prediction from dense and categorical features.

    Attributes:
      model: maps `(dense, sparse, train=...)` to logits `[b]` (`DLRMSmall`).
      num_dense / num_sparse: feature counts of `dummy_batch` (Criteo: 13, 26).
      full_scale: the published workload facts, if any (`CRITEO1TB`).
    """

    model: nn.Module
    num_dense: int = NUM_DENSE
    num_sparse: int = NUM_SPARSE
    full_scale: FullScale | None = None

    def init_inputs(self, batch):
        return (batch["dense"], batch["sparse"])

    def init_kwargs(self):
        return {"train": False}

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return {
            "dense": np.zeros((batch_size, self.num_dense), np.float32),
            "sparse": np.zeros((batch_size, self.num_sparse), np.int32),
            "label": np.zeros((batch_size,), np.float32),
        }

    def loss(self, params, model_state, batch, rng):
        logits = self.model.apply(
            {"params": params, **model_state},
            batch["dense"],
            batch["sparse"],
            train=True,
            rngs={"dropout": rng},
        )
        labels = batch["label"].astype(jnp.float32)
        loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
        accuracy = jnp.mean((logits > 0) == (labels > 0.5))
        return loss, ({"accuracy": accuracy}, dict(model_state))

    def logits(self, params, model_state, batch) -> jax.Array:
        """Eval-mode logits [b] of a batch."""
        return self.model.apply(
            {"params": params, **model_state},
            batch["dense"],
            batch["sparse"],
            train=False,
        )

    def evaluate(self, params, model_state, source, batch_size):
        """Log loss (`loss`) and ROC AUC (`auc`) over every example once; the
        logits are gathered on the host."""
        fn = self._jitted("logits")
        labels, logits = [], []
        for batch in epoch_batches(source, batch_size):
            inputs = {k: jnp.asarray(batch[k]) for k in ("dense", "sparse")}
            logits.append(np.asarray(fn(params, model_state, inputs)))
            labels.append(np.asarray(batch["label"]))
        y, x = np.concatenate(labels), np.concatenate(logits)
        return {"loss": log_loss(y, x), "auc": roc_auc(y, x)}


GIN_CONFIGURABLES = gin_configurables(ClickPrediction, FullScale)
