"""Continuing a VeLO run past the `num_steps` it was told (paper Sec. 6).

VeLO conditions on the fraction of training done, `iteration / num_steps`,
through a tanh embedding at timescales up to 1.1, and on loss averages whose
half-lives reach `num_steps`. Past the horizon the time features saturate
(every `tanh(10 (x - t))` is near 1 once x > 1.1) and VeLO keeps taking the
small steps of the end of training. The paper compares three ways to go on:

* `naive`: change nothing; the fraction runs past 1 (the time features
  saturate near 1.1).
* `increase`: tell VeLO the new total horizon and keep the iteration, so the
  fraction drops to `iteration / new_num_steps` and the schedule stretches
  out. The loss buffer keeps its averages and takes the decays of the new
  horizon.
* `reset`: start a fresh horizon of the remaining `new_num_steps - iteration`
  steps at iteration 0, keeping the per-parameter accumulators (momentum,
  rms, factored) and the per-tensor LSTM state; the loss buffer restarts
  (its bias correction assumes it starts empty) with the decays of the new
  horizon.

Under gradient accumulation (`num_steps > max_training_steps`) a VeLO step is
`k = ceil(num_steps / max_training_steps)` calls and the horizon the state
holds is in VeLO steps. `extend_horizon` takes the new total in calls, like
`velo(num_steps)`, and sets the horizon to `num_steps // k` for the new `k`;
continue with `velo(num_steps)` built for the new total, so that the
transformation accumulates the same `k` calls (the sums in progress carry
over). Accumulation cannot be switched on or off mid-run.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from velo_scale._src import loss_features
from velo_scale._src.state import VeLOState
from velo_scale._src.velo import DEFAULT_MAX_TRAINING_STEPS
from velo_scale._src.velo import _num_accumulate as calls_per_step

METHODS = ("naive", "increase", "reset")


def extend_horizon(
    state: VeLOState,
    num_steps: int,
    method: str,
    *,
    max_training_steps: int = DEFAULT_MAX_TRAINING_STEPS,
) -> VeLOState:
    """The state of a VeLO run continued to a new total of `num_steps` calls.

    Args:
      state: a `VeLOState` (concrete or traced).
      num_steps: the new total number of optimizer calls of the run (as given
        to `velo`); at least the calls already taken for `increase`/`reset`.
      method: 'naive', 'increase' or 'reset' (see the module docstring).
      max_training_steps: as given to `velo` (sets the calls per VeLO step).

    Returns:
      The new state. Its update reads the horizon from the state, so the
      transformation it was made with goes on working; with gradient
      accumulation, build `velo(num_steps)` for the new total (see the module
      docstring).

    Raises:
      ValueError: an unknown method, a horizon shorter than the steps taken,
        or a new total that needs another number of calls per VeLO step.

    Example:
      >>> state = velo_scale.extend_horizon(state, 20_000, "increase")  # doctest: +SKIP
    """
    if method not in METHODS:
        raise ValueError(
            f"extend_horizon method must be one of {METHODS}; got {method!r}."
        )
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}.")
    k = calls_per_step(int(num_steps), int(max_training_steps))
    single = state.accumulation is None
    if single != (k == 1):
        raise ValueError(
            f"num_steps={num_steps} needs {k} call(s) per VeLO step (max_training_"
            f"steps={max_training_steps}), but this state was made for "
            f"{'1' if single else 'more than 1'}; gradient accumulation cannot be "
            "switched on or off mid-run. Pick a num_steps on the same side of "
            "max_training_steps, or start a new run."
        )
    if method == "naive":
        return state
    horizon = int(num_steps) // k
    iteration = int(state.iteration) if not _traced(state.iteration) else None
    if iteration is not None and horizon <= iteration:
        raise ValueError(
            f"the new horizon ({horizon} VeLO steps) must exceed the {iteration} "
            f"steps already taken for method {method!r}."
        )
    if method == "increase":
        decays = loss_features.compiled_decays(horizon)
        return state._replace(
            num_steps=jnp.asarray(horizon, state.num_steps.dtype),
            loss_buffer=state.loss_buffer._replace(
                decays=jnp.asarray(decays, state.loss_buffer.decays.dtype)
            ),
        )
    if iteration is None:
        raise ValueError("extend_horizon(method='reset') needs a concrete state.")
    remaining = horizon - iteration
    return state._replace(
        iteration=jnp.zeros_like(state.iteration),
        num_steps=jnp.asarray(remaining, state.num_steps.dtype),
        loss_buffer=loss_features.init(loss_features.compiled_decays(remaining)),
    )


def _traced(x) -> bool:
    try:
        int(x)
    except Exception:  # a tracer under jit
        return True
    return False
