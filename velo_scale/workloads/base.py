"""`Workload`: what the trainer needs to know about a task.

A workload owns a Flax model and its calling convention: how the model is
initialised from a batch, the training loss (and any mutable collections such
as BatchNorm statistics), and how it is evaluated (a jitted per-batch sum
reduced on the host, or a host-side loop for metrics such as BLEU, WER or a
simulator rollout). `velo_scale.train.train(workload=...)` drives any of them;
the data arrive as dicts of arrays with the batch on axis 0.

Variables are split in two: `params` (what the optimizer updates) and
`model_state` (every other collection, e.g. `{"batch_stats": ...}`; `{}` for
most models), both kept in the train state and checkpointed.
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

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class FullScale:
    """Published facts of a full-scale workload (AlgoPerf / the paper).

    Attributes:
      target_metric: the eval metric the budget is measured against (e.g.
        "error", "bleu", "wer", "ssim", "mean_average_precision", "loss").
      target_value: the AlgoPerf validation target.
      higher_is_better: direction of `target_metric`.
      step_hint: AlgoPerf's step budget (VeLO's `num_steps`).
      batch_size: the global batch size of the reference runs.
      num_params: the model's published parameter count, or None.
    """

    target_metric: str
    target_value: float
    higher_is_better: bool
    step_hint: int
    batch_size: int
    num_params: int | None = None


class Workload:
    """Base class: subclasses set `model` and implement `init_inputs`, `loss`
    and either `eval_sums` (+ `eval_finalize`) or `evaluate`.

    Subclasses are (frozen) dataclasses, so gin can configure their fields.
    """

    model: nn.Module

    # -- initialisation ----------------------------------------------------
    def init_inputs(self, batch: Batch) -> tuple[Any, ...]:
        """Positional model inputs taken from a batch (for `model.init`)."""
        raise NotImplementedError

    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.init` (e.g. `train=False`)."""
        return {}

    def init(self, key: jax.Array, batch: Batch) -> dict[str, Any]:
        """All variables (boxed with their logical axes) from one batch."""
        params_key, dropout_key = jax.random.split(key)
        return self.model.init(
            {"params": params_key, "dropout": dropout_key},
            *self.init_inputs(batch),
            **self.init_kwargs(),
        )

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """Zeros with a real batch's shapes and dtypes, only for building the
        model abstractly (`jax.eval_shape`); never trained on."""
        raise NotImplementedError

    # -- training ----------------------------------------------------------
    def loss(
        self,
        params: Any,
        model_state: Mapping[str, Any],
        batch: Batch,
        rng: jax.Array,
    ) -> tuple[jax.Array, tuple[Metrics, dict[str, Any]]]:
        """Mean training loss of a batch.

        Returns `(loss, (metrics, new_model_state))`; `metrics` are scalars
        logged every step (the trainer adds `loss`).
        """
        raise NotImplementedError

    # -- evaluation --------------------------------------------------------
    def eval_sums(
        self, params: Any, model_state: Mapping[str, Any], batch: Batch
    ) -> dict[str, jax.Array]:
        """Per-batch sums (jitted by `evaluate`), e.g. `{"loss": sum of
        per-example losses, "correct": ..., "count": number of examples}`."""
        raise NotImplementedError

    def eval_finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Metrics from the sums over the whole eval set."""
        count = max(float(sums["count"]), 1.0)
        return {k: float(v) / count for k, v in sums.items() if k != "count"}

    def evaluate(
        self,
        params: Any,
        model_state: Mapping[str, Any],
        source: Any,
        batch_size: int,
    ) -> dict[str, float]:
        """Evaluates on every example of `source` once (the last batch may be
        short). Default: jitted `eval_sums`, summed on the host."""
        fn = self._jitted("eval_sums")
        totals: dict[str, float] = {}
        for batch in epoch_batches(source, batch_size):
            sums = fn(params, model_state, _as_jax(batch))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return self.eval_finalize(totals)

    def _jitted(self, name: str):
        cache = self.__dict__.setdefault("_jit_cache", {})
        if name not in cache:
            cache[name] = jax.jit(getattr(self, name))
        return cache[name]


def _as_jax(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`(params, model_state)` from a variables dict."""
    variables = dict(variables)
    params = variables.pop("params", {})
    return params, variables


def count_params(params: Any) -> int:
    """Number of scalars in a (possibly abstract) params tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def abstract_variables(
    workload: Workload, batch_size: int = 2, seed: int = 0
) -> dict[str, Any]:
    """The unboxed variables as `jax.ShapeDtypeStruct`s, built with
    `jax.eval_shape` (no data, no full-size allocation)."""
    batch = workload.dummy_batch(batch_size)
    boxed = jax.eval_shape(workload.init, jax.random.PRNGKey(seed), batch)
    return nn.meta.unbox(boxed)


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean of `values` over entries with nonzero `weights` (all if None)."""
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def gin_configurables(*objs: Any) -> dict[str, Any]:
    """`{name: obj}` for the CLI's gin registry (modules export this as
    `GIN_CONFIGURABLES`)."""
    return {o.__name__: o for o in objs}
