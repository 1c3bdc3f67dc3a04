"""MRI reconstruction (fastMRI single-coil, AlgoPerf): L1 loss, SSIM metric.

A model maps the normalised zero-filled reconstruction `batch["inputs"]`
`[b, h, w]` to the normalised fully sampled image `batch["targets"]`; the
training loss is the mean absolute error per pixel (AlgoPerf's
`MEAN_ABSOLUTE_ERROR`). Evaluation reports that loss and the structural
similarity (SSIM, Wang et al. 2004) of each slice, computed as AlgoPerf's
fastMRI workload does: output and target are de-normalised with the example's
`mean` and `std`, SSIM uses a 7x7 uniform window (symmetric padding), k1 =
0.01, k2 = 0.03, sample covariances (49/48), data range = `volume_max` (the
max of the slice's volume), is averaged over the pixels at least 3 from the
border and clipped to [-1, 1]; the reported `ssim` is the mean over slices.
Batches: see `velo_scale.data.mri`.
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
from velo_scale.workloads.base import FullScale, Workload, gin_configurables

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03

FASTMRI = FullScale(
    target_metric="ssim",
    target_value=0.723653,  # AlgoPerf validation target (test: 0.740633).
    higher_is_better=True,
    step_hint=18_094,
    batch_size=32,
    num_params=7_756_097,  # UNet(num_channels=32, num_pool_layers=4).
)


def _box_filter(x: jax.Array, size: int) -> jax.Array:
    """Mean over `size x size` windows of `[b, h, w]` with symmetric padding
    (scipy's "reflect" mode, as skimage's `uniform_filter`): same shape."""
    pad = size // 2
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="symmetric")
    total = jax.lax.reduce_window(
        x, 0.0, jax.lax.add, (1, size, size), (1, 1, 1), "VALID"
    )
    return total / size**2


def structural_similarity(
    x: jax.Array,
    y: jax.Array,
    data_range: jax.Array,
    win_size: int = SSIM_WINDOW,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> jax.Array:
    """Mean SSIM of each image pair, as skimage's `structural_similarity`
    with its defaults (uniform window, sample covariance).

    Args:
      x, y: images float[b, h, w] (h, w > win_size).
      data_range: float[b] (or scalar), the dynamic range L in
        `C1 = (k1 L)^2`, `C2 = (k2 L)^2`.

    Returns:
      float32[b]: SSIM averaged over the pixels `win_size // 2` or more away
      from the border.
    """
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    data_range = jnp.broadcast_to(jnp.asarray(data_range, jnp.float32), x.shape[:1])
    data_range = data_range[:, None, None]
    n = win_size**2
    cov_norm = n / (n - 1)
    ux, uy = _box_filter(x, win_size), _box_filter(y, win_size)
    vx = cov_norm * (_box_filter(x * x, win_size) - ux * ux)
    vy = cov_norm * (_box_filter(y * y, win_size) - uy * uy)
    vxy = cov_norm * (_box_filter(x * y, win_size) - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return jnp.mean(s[:, pad:-pad, pad:-pad], axis=(1, 2))


def ssim(
    outputs: jax.Array,
    targets: jax.Array,
    mean: jax.Array,
    std: jax.Array,
    volume_max: jax.Array,
) -> jax.Array:
    """AlgoPerf's fastMRI SSIM of normalised images: float32[b].

    Args:
      outputs, targets: float[b, h, w], normalised as the data are.
      mean, std: float[b], the normalisation to undo.
      volume_max: float[b], the data range (0, as in padding, is read as 1).
    """
    mean = mean[:, None, None]
    std = std[:, None, None]
    volume_max = jnp.where(volume_max == 0, 1.0, volume_max)
    values = structural_similarity(
        outputs * std + mean, targets * std + mean, volume_max
    )
    return jnp.clip(values, -1.0, 1.0)


def _l1(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example mean absolute error: float32[b]."""
    return jnp.mean(jnp.abs(outputs - targets), axis=tuple(range(1, outputs.ndim)))


@dataclasses.dataclass(frozen=True, eq=False)
class FastMRI(Workload):
    """Single-coil MRI reconstruction with an image-to-image model.

    Attributes:
      model: maps `inputs` `[b, h, w]` to images `[b, h, w]` and takes
        `train=` (dropout), e.g. `velo_scale.models.UNet`.
      image_shape: `(h, w)` of `dummy_batch` (fastMRI knee: 320x320).
      full_scale: the published workload facts, if any.
    """

    model: nn.Module
    image_shape: tuple[int, int] = (320, 320)
    full_scale: FullScale | None = None

    def init_inputs(self, batch):
        return (batch["inputs"],)

    def init_kwargs(self):
        return {"train": False}

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        images = np.zeros((batch_size, *self.image_shape), np.float32)
        ones = np.ones((batch_size,), np.float32)
        return {
            "inputs": images,
            "targets": images,
            "mean": 0 * ones,
            "std": ones,
            "volume_max": ones,
        }

    def loss(self, params, model_state, batch, rng):
        outputs = self.model.apply(
            {"params": params, **model_state},
            batch["inputs"],
            train=True,
            rngs={"dropout": rng},
        )
        return jnp.mean(_l1(outputs, batch["targets"])), ({}, dict(model_state))

    def eval_sums(self, params, model_state, batch):
        outputs = self.model.apply(
            {"params": params, **model_state}, batch["inputs"], train=False
        )
        values = ssim(
            outputs, batch["targets"], batch["mean"], batch["std"], batch["volume_max"]
        )
        return {
            "loss": jnp.sum(_l1(outputs, batch["targets"])),
            "ssim": jnp.sum(values),
            "count": jnp.asarray(outputs.shape[0], jnp.float32),
        }


def _zero_filled_sums(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    values = ssim(
        batch["inputs"],
        batch["targets"],
        batch["mean"],
        batch["std"],
        batch["volume_max"],
    )
    return {
        "loss": jnp.sum(_l1(batch["inputs"], batch["targets"])),
        "ssim": jnp.sum(values),
        "count": jnp.asarray(values.shape[0], jnp.float32),
    }


def zero_filled_metrics(source: Any, batch_size: int = 256) -> dict[str, float]:
    """The baseline without a model: L1 loss and SSIM of the (normalised)
    zero-filled reconstruction `inputs` against `targets`, over `source`."""
    fn = jax.jit(_zero_filled_sums)
    totals: dict[str, float] = {}
    for batch in epoch_batches(source, batch_size):
        for k, v in fn({k: jnp.asarray(v) for k, v in batch.items()}).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    return {k: v / count for k, v in totals.items()}


GIN_CONFIGURABLES = gin_configurables(FastMRI, FullScale)
