"""VeLO's implicit schedule (paper Sec. 7), read from its state and updates.

VeLO has no learning rate, but it learns a step size per tensor and per step:
the update of a tensor is `d * exp(0.001 a) * 0.001 * lr_mult * rms(p)` with
`(d, a)` the per-parameter MLP's outputs, `rms(p) = sqrt(mean(p**2) + 1e-9)`
and `lr_mult` the per-tensor LSTM's step-size head. Two per-tensor scalars make
that schedule visible, both without an extra per-parameter pass:

* `lr_mult`: the step-size head applied to the LSTM hidden state the state
  holds, i.e. the multiplier of the last VeLO step taken (on a fresh state:
  the head's value at the learned initial LSTM state, not a step taken).
* the effective step size `rms(update) / rms(p)`, with VeLO's own `rms(p)`
  above; for VeLO it is `0.001 * lr_mult * rms(d * exp(0.001 a))`. It is
  defined for any optimizer (for AdamW it shows the warm-up and decay).

Tensors are grouped by role, the name of their leaf (`kernel`, `bias`,
`scale`, `embedding`, ...), as the paper's figure colours them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from velo_scale._src import tensor_net
from velo_scale._src import weights as weights_lib
from velo_scale._src.state import VeLOState
from velo_scale._src.velo import is_trained

# VeLO's parameter scale: `sqrt(mean(p**2) + RMS_EPS)` (param_net.step_scale).
RMS_EPS = 1e-9
LR_MULT = "lr_mult"
STEP_SIZE = "step_size"
# One key of a `keystr` path: ['name'], .name or [index].
_KEY = re.compile(r"\['([^']*)'\]|\.(\w+)|\[(\d+)\]")


def lr_mult(state: VeLOState, weights: Any = "auto") -> Any:
    """Per-tensor `lr_mult` of the last VeLO step, from `state.lstm_hidden`.

    Args:
      state: a `VeLOState` (concrete or traced).
      weights: the VeLO meta-parameters the state was trained with, as
        `velo(weights=...)` takes them (a theta dict, 'auto', 'official',
        'project', a path).

    Returns:
      A pytree like the params the state was made for: f32[] per tensor VeLO
      trains, None for the others.
    """
    if not isinstance(state, VeLOState):
        raise TypeError(
            f"lr_mult reads a VeLOState (velo_scale.velo's state); got "
            f"{type(state).__name__}. For a chain, pass the VeLO entry "
            "(see find_velo_states)."
        )
    head = weights_lib.resolve(weights)["rnn_params"]["step_size"]
    # The step-size head exactly as the step applies it (tensor_net.apply).
    values = tensor_net.linear(
        jax.tree_util.tree_map(jnp.asarray, head),
        jnp.asarray(state.lstm_hidden, jnp.float32),
    )[:, 0]
    # Rows follow the tensors VeLO trains in tree order: the non-None leaves
    # of any per-parameter field.
    leaves, treedef = jax.tree_util.tree_flatten(state.rms)
    if len(leaves) != values.shape[0]:
        raise ValueError(
            f"state has {values.shape[0]} LSTM rows but {len(leaves)} trained "
            "tensors: not a state made by velo_scale.velo."
        )
    return treedef.unflatten([values[k] for k in range(len(leaves))])


def effective_step_size(updates: Any, params: Any) -> Any:
    """Per-tensor `rms(update) / sqrt(mean(p**2) + 1e-9)`.

    Args:
      updates: the step applied (`params_new - params`), a pytree like params.
      params: the params the step was applied to.

    Returns:
      A pytree like params: f32[] per float, non-empty tensor, None otherwise.
    """

    def ratio(u, p):
        if not is_trained(p):
            return None
        u = jnp.asarray(u, jnp.float32)
        p = jnp.asarray(p, jnp.float32)
        return jnp.sqrt(jnp.mean(u * u)) / jnp.sqrt(jnp.mean(p * p) + RMS_EPS)

    return jax.tree_util.tree_map(ratio, updates, params)


def find_velo_states(opt_state: Any) -> list[VeLOState]:
    """Every `VeLOState` inside an optimizer state (e.g. an `optax.chain`)."""
    found = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, VeLOState)
    )
    return [x for x in found if isinstance(x, VeLOState)]


def role(path: str) -> str:
    """The role of a tensor from its `keystr` path: the last name in it.

    `"['params']['Dense_0']['kernel']"` -> `"kernel"`; a path of indices only
    (a list of arrays) -> `"param"`.
    """
    names = [a or b for a, b, _ in _KEY.findall(path) if a or b]
    return names[-1] if names else "param"


def per_tensor(tree: Any) -> dict[str, jax.Array]:
    """`{keystr(path): value}` of the non-None leaves of `tree`."""
    path_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): x for path, x in path_leaves}


def by_role(values: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """`{role: mean over its tensors}` of `{keystr path: f32[]}` values."""
    groups: dict[str, list[jax.Array]] = {}
    for path, x in values.items():
        groups.setdefault(role(path), []).append(x)
    return {name: jnp.mean(jnp.stack(xs)) for name, xs in sorted(groups.items())}


def schedule(
    updates: Any,
    params: Any,
    opt_state: Any = None,
    weights: Any = None,
) -> dict[str, dict[str, jax.Array]]:
    """Per-tensor step sizes, and VeLO's `lr_mult` when it can be read.

    Args:
      updates, params: as `effective_step_size`.
      opt_state: the optimizer state after the step; with `weights`, each
        `VeLOState` in it gives `lr_mult` of its tensors.
      weights: VeLO's meta-parameters (as `velo(weights=...)`), or None to
        leave `lr_mult` out.

    Returns:
      `{"step_size": {path: f32[]}, "lr_mult": {path: f32[]}}` (no
      "lr_mult" key without VeLO state or weights).
    """
    out = {STEP_SIZE: per_tensor(effective_step_size(updates, params))}
    states = find_velo_states(opt_state) if weights is not None else []
    if states:
        theta = weights_lib.resolve(weights)
        out[LR_MULT] = {}
        for state in states:
            out[LR_MULT].update(per_tensor(lr_mult(state, theta)))
    return out


def schedule_metrics(
    updates: Any,
    params: Any,
    opt_state: Any = None,
    weights: Any = None,
) -> dict[str, jax.Array]:
    """Flat scalars `{"step_size/<role>": mean, "lr_mult/<role>": mean}` for a
    metrics writer (TensorBoard, T5X/CLU, the trainer's JSONL).

    Args: as `schedule`.
    """
    return {
        f"{kind}/{name}": value
        for kind, values in schedule(updates, params, opt_state, weights).items()
        for name, value in by_role(values).items()
    }
