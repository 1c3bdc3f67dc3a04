"""Multi-task binary classification of molecular graphs (OGBG-molpcba, B3DB).

AlgoPerf's OGBG workload: a graph network maps each molecule to one logit per
task; the loss is sigmoid cross-entropy averaged over the labels that exist
(molpcba leaves most of its 128 assays unmeasured per molecule), and the
metric is the mean over tasks of the average precision (OGB's evaluator,
AlgoPerf's target metric), computed on the host over the whole eval set. ROC
AUC and accuracy are reported too.

Batches (see `velo_scale.data.molecules`): `node_feat` int32[b, n, 9],
`edge_feat` int32[b, e, 3], `senders`/`receivers` int32[b, e],
`node_mask` bool[b, n], `edge_mask` bool[b, e], `labels` and `label_mask`
float32[b, num_tasks].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from velo_scale.data.iterator import epoch_batches
from velo_scale.data.molecules import (
    NUM_ATOM_FEATURES,
    NUM_BOND_FEATURES,
    OGBG_MAX_EDGES,
    OGBG_MAX_NODES,
)
from velo_scale.workloads.base import FullScale, Workload, gin_configurables

GRAPH_KEYS = (
    "node_feat",
    "edge_feat",
    "senders",
    "receivers",
    "node_mask",
    "edge_mask",
)

# AlgoPerf `ogbg` (jax): validation target, step hint (52,000 since AlgoPerf
# v0.6; 80,000 before), the baseline batch size, and the parameter count of
# its jraph GNN (embeddings 3,584; first block 624,896; four more of 723,200;
# decoder 32,896).
OGBG_FULL_SCALE = FullScale(
    target_metric="mean_average_precision",
    target_value=0.28098,
    higher_is_better=True,
    step_hint=52_000,
    batch_size=512,
    num_params=3_554_176,
)


def sigmoid_cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Elementwise binary cross-entropy of logits, numerically stable.

    `label_smoothing` follows AlgoPerf (`optax.smooth_labels` over the task
    axis): targets `(1 - a) * y + a / num_tasks`.
    """
    if label_smoothing:
        labels = (1.0 - label_smoothing) * labels + label_smoothing / labels.shape[-1]
    return (
        jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    )


def _ranked_counts(labels: np.ndarray, scores: np.ndarray):
    """True/false positives at each distinct score threshold, high to low."""
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last]
    fps = (last + 1) - tps
    return tps, fps


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision `sum_k (R_k - R_{k-1}) P_k` over the distinct score
    thresholds (scikit-learn's `average_precision_score`); nan without
    positives.

    Args:
      labels: `[n]` in {0, 1}.
      scores: `[n]`, higher = more likely positive; ties share a threshold.
    """
    labels = np.asarray(labels, np.float64)
    scores = np.asarray(scores)
    tps, fps = _ranked_counts(labels, scores)
    if tps.size == 0 or tps[-1] == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids, ties as one step); nan unless
    both classes are present."""
    labels = np.asarray(labels, np.float64)
    tps, fps = _ranked_counts(labels, np.asarray(scores))
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _per_task(metric, labels, scores, mask) -> np.ndarray:
    labels, scores, mask = np.asarray(labels), np.asarray(scores), np.asarray(mask)
    values = np.full(labels.shape[1], np.nan)
    for t in range(labels.shape[1]):
        labeled = mask[:, t] > 0
        y = labels[labeled, t]
        if np.any(y == 1) and np.any(y == 0):
            values[t] = metric(y, scores[labeled, t])
    return values


def _nanmean(values: np.ndarray) -> float:
    return float("nan") if np.all(np.isnan(values)) else float(np.nanmean(values))


def mean_average_precision(
    labels: np.ndarray, scores: np.ndarray, mask: np.ndarray
) -> float:
    """OGB/AlgoPerf mAP: average precision of each task on the examples that
    have its label, averaged over the tasks with both classes among them.

    (AlgoPerf tests "both classes" on labels with missing ones counted as 0;
    this differs only for a task whose labeled examples are all positive.)

    Args:
      labels: `[n, num_tasks]` in {0, 1}.
      scores: `[n, num_tasks]` (AlgoPerf: float32 sigmoid probabilities).
      mask: `[n, num_tasks]`, nonzero where the label exists.

    Returns:
      The mean, or nan if no task has both classes.
    """
    return _nanmean(_per_task(average_precision, labels, scores, mask))


def mean_roc_auc(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> float:
    """ROC AUC per task (labeled examples), mean over tasks with both classes."""
    return _nanmean(_per_task(roc_auc, labels, scores, mask))


@dataclasses.dataclass(frozen=True, eq=False)
class MoleculeClassification(Workload):
    """Multi-task sigmoid classification of padded molecular graphs.

    Attributes:
      model: maps the graph arrays (`GRAPH_KEYS`, and `train=`) to logits
        `[b, num_tasks]`, e.g. `velo_scale.models.gnn.GNN`.
      max_nodes, max_edges: padded graph sizes of `dummy_batch`.
      label_smoothing: AlgoPerf's NAdamW baseline uses 0.1 (default 0).
      full_scale: the published workload facts, if any.
    """

    model: nn.Module
    max_nodes: int = OGBG_MAX_NODES
    max_edges: int = OGBG_MAX_EDGES
    label_smoothing: float = 0.0
    full_scale: FullScale | None = None

    @property
    def num_tasks(self) -> int:
        return int(self.model.num_outputs)

    def init_inputs(self, batch):
        return tuple(batch[k] for k in GRAPH_KEYS)

    def init_kwargs(self):
        return {"train": False}

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        b, n, e, t = batch_size, self.max_nodes, self.max_edges, self.num_tasks
        return {
            "node_feat": np.zeros((b, n, NUM_ATOM_FEATURES), np.int32),
            "edge_feat": np.zeros((b, e, NUM_BOND_FEATURES), np.int32),
            "senders": np.zeros((b, e), np.int32),
            "receivers": np.zeros((b, e), np.int32),
            "node_mask": np.zeros((b, n), bool),
            "edge_mask": np.zeros((b, e), bool),
            "labels": np.zeros((b, t), np.float32),
            "label_mask": np.zeros((b, t), np.float32),
        }

    def _logits(self, params, model_state, batch, *, train: bool, rng=None):
        kwargs: dict[str, Any] = {"train": train}
        if rng is not None:
            kwargs["rngs"] = {"dropout": rng}
        return self.model.apply(
            {"params": params, **model_state},
            *(batch[k] for k in GRAPH_KEYS),
            **kwargs,
        )

    def loss(self, params, model_state, batch, rng):
        logits = self._logits(params, model_state, batch, train=True, rng=rng)
        mask = batch["label_mask"].astype(jnp.float32)
        count = jnp.maximum(jnp.sum(mask), 1.0)
        losses = sigmoid_cross_entropy(logits, batch["labels"], self.label_smoothing)
        loss = jnp.sum(losses * mask) / count
        correct = (logits > 0) == (batch["labels"] > 0.5)
        accuracy = jnp.sum(correct * mask) / count
        return loss, ({"accuracy": accuracy}, dict(model_state))

    def predict(self, params, model_state, batch) -> jax.Array:
        """float32 logits `[b, num_tasks]` (eval mode)."""
        return self._logits(params, model_state, batch, train=False)

    def evaluate(
        self,
        params: Any,
        model_state: Mapping[str, Any],
        source: Any,
        batch_size: int,
    ) -> dict[str, float]:
        """Loss, mAP, mean ROC AUC and accuracy over every example of
        `source`, from probabilities gathered on the host. The last batch is
        padded to `batch_size` (one compiled shape)."""
        fn = self._jitted("predict")
        logits, labels, masks = [], [], []
        for batch in epoch_batches(source, batch_size):
            n = len(batch["labels"])
            padded = {
                k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)])
                if n < batch_size
                else v
                for k, v in batch.items()
            }
            out = fn(params, model_state, {k: jnp.asarray(padded[k]) for k in padded})
            logits.append(np.asarray(out, np.float32)[:n])
            labels.append(np.asarray(batch["labels"], np.float32))
            masks.append(np.asarray(batch["label_mask"], np.float32))
        return self.metrics(
            np.concatenate(labels), np.concatenate(logits), np.concatenate(masks)
        )

    @staticmethod
    def metrics(
        labels: np.ndarray, logits: np.ndarray, mask: np.ndarray
    ) -> dict[str, float]:
        """Eval metrics from labels, logits and label mask, all `[n,
        num_tasks]`: `loss` (sigmoid cross-entropy) and `accuracy` are means
        over the existing labels; mAP and ROC AUC rank float32 sigmoid
        probabilities, as AlgoPerf (saturated probabilities tie)."""
        labels = np.asarray(labels, np.float64)
        logits = np.asarray(logits, np.float32)
        mask = np.asarray(mask, np.float64)
        count = max(float(mask.sum()), 1.0)
        x = logits.astype(np.float64)
        bce = np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))
        with np.errstate(over="ignore"):  # exp(-logit) = inf -> probability 0.
            probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
        correct = (logits > 0) == (labels > 0.5)
        return {
            "loss": float(np.sum(bce * mask) / count),
            "mean_average_precision": mean_average_precision(labels, probs, mask),
            "roc_auc": mean_roc_auc(labels, probs, mask),
            "accuracy": float(np.sum(correct * mask) / count),
        }


GIN_CONFIGURABLES = gin_configurables(MoleculeClassification, FullScale)
