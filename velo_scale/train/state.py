"""The train state: everything a run needs to continue bit-identically."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """Params, optimizer state, counters, RNG and the data position.

    Attributes:
      step: i32[], optimizer steps taken (including skipped non-finite ones).
      params: the model parameters (what the optimizer updates).
      model_state: the model's other variable collections (e.g.
        `{"batch_stats": ...}`; `{}` for most models).
      opt_state: the optimizer state (VeLO: `velo_scale.VeLOState`).
      rng: u32[2], PRNG key for stochastic layers (split every step).
      data_epoch, data_index: i32[], position of the training iterator after
        the last batch used (`BatchIterator.get_state()`).
      nonfinite_streak: i32[], consecutive steps skipped for a non-finite loss
        or gradient; nonfinite_total: i32[], all skipped steps.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    data_epoch: jax.Array
    data_index: jax.Array
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array
