"""VeLO as an MLCommons AlgoPerf submission (JAX, algorithms track).

The AlgoPerf runner imports this file as a module and calls
`get_batch_size`, `init_optimizer_state`, `update_params`, `prepare_for_eval`
and `data_selection` (AlgoPerf `algoperf/spec.py`). VeLO needs no tuning: the
self-tuning ruleset passes `hyperparameters=None` and gets
`DEFAULT_HYPERPARAMETERS`; the external ruleset's search space
(`tuning_search_space.json` here) is that same single point, so both rulesets
train identically.

What the submission does per step (`velo_update_step`): the mean training loss
of the batch from `workload.model_fn` + `workload.loss_fn`, its gradients,
one `velo_scale.velo` update with `loss=` that loss, `optax.apply_updates`.
VeLO is told `num_steps = workload.step_hint`; past VeLO's meta-training
horizon of 150k steps (ImageNet ResNet-50 195,999, ViT 167,999) velo
averages the gradients of 2 consecutive calls and steps once per 2 calls
with a horizon of `step_hint // 2` (`accumulation_steps`).

Sharding: AlgoPerf jits on `Mesh(jax.devices(), ('batch',))` and keeps
params replicated (the workloads' jitted eval takes them with a replicated
`in_shardings`, which rejects any other committed sharding), so params stay
replicated here too. VeLO's state (~5x the params: 3 momenta, rms, factored
second moments) is sharded ZeRO/FSDP-style over the 'batch' axis: each
tensor of at least `SHARD_MIN_SIZE` elements is split along its largest axis
that the device count divides (`fsdp_param_specs`), and
`velo_scale.state_shardings` derives every accumulator's sharding from that.
Params, model state and optimizer state are donated to the jitted step.

Checkpoints: the runner saves `optimizer_state[0]` (the `VeLOState`) with
flax and, on `--resume_last_run`, restores it into the state built by
`init_optimizer_state` and then `flax.jax_utils.replicate`s it (a leading
device axis, left over from pmap). The first `update_params` call of a run
undoes that and puts every array back on its sharding (`_place`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import velo_scale

MAX_TRAINING_STEPS = 150_000
BATCH_AXIS = "batch"
# Tensors smaller than this (elements) keep a replicated VeLO state: splitting
# them saves little memory and adds a collective per tensor.
SHARD_MIN_SIZE = 1 << 14
LOG_EVERY = 100

# Global batch sizes of AlgoPerf's NAdamW baselines
# (algorithms/baselines/*/jax_nadamw_full_budget.py, `get_batch_size`).
BATCH_SIZES: Mapping[str, int] = {
    "criteo1tb": 262_144,
    "fastmri": 32,
    "imagenet_resnet": 1024,
    "imagenet_resnet_silu": 512,
    "imagenet_resnet_gelu": 512,
    "imagenet_vit": 1024,
    "librispeech_conformer": 256,
    "librispeech_deepspeech": 256,
    "ogbg": 512,
    "wmt": 128,
    "mnist": 16,
}

# VeLO has no learning rate or schedule. These are the regularisers AlgoPerf
# leaves to the submission; all off (VeLO was meta-trained without them).
DEFAULT_HYPERPARAMETERS: Mapping[str, float] = {
    "weight_decay": 0.0,
    "dropout_rate": 0.0,
    "label_smoothing": 0.0,
}

UNKNOWN_WORKLOAD_MSG = (
    "No batch size for AlgoPerf workload {name!r}; known workloads: {known}. "
    "(The runner retries with the base workload's name after a ValueError.)"
)


def velo_num_steps(step_hint: int) -> int:
    """VeLO's `num_steps` for a workload: its `step_hint`.

    `step_hint` is the number of steps the NAdamW baseline takes in the
    workload's time budget; VeLO conditions on the fraction of it done.

    Args:
      step_hint: `workload.step_hint`, a positive int (e.g. OGBG 52,000).

    Returns:
      The `num_steps` to pass to `velo_scale.velo`.
    """
    if isinstance(step_hint, bool) or not isinstance(step_hint, (int, np.integer)):
        raise TypeError(f"step_hint must be an int; got {step_hint!r}.")
    if step_hint < 1:
        raise ValueError(f"step_hint must be >= 1; got {step_hint!r}.")
    return int(step_hint)


def accumulation_steps(
    num_steps: int, max_training_steps: int = MAX_TRAINING_STEPS
) -> int:
    """Calls per VeLO step: `ceil(num_steps / max_training_steps)`, at least 1.

    `velo_scale.velo` accumulates that many gradients (and losses) before
    each VeLO step when `num_steps` exceeds VeLO's meta-training horizon, e.g.
    ImageNet ResNet-50: `accumulation_steps(195_999) == 2`, 97,999 VeLO steps
    on an effective batch of 2 x 1024.
    """
    if num_steps > max_training_steps:
        return int(math.ceil(num_steps / max_training_steps))
    return 1


def batch_size_for(workload_name: str) -> int:
    """Global batch size for an AlgoPerf workload (the NAdamW baselines').

    Raises:
      ValueError: unknown name (the runner then retries with the base name,
        e.g. `ogbg_gelu` -> `ogbg`).
    """
    if workload_name not in BATCH_SIZES:
        raise ValueError(
            UNKNOWN_WORKLOAD_MSG.format(name=workload_name, known=sorted(BATCH_SIZES))
        )
    return BATCH_SIZES[workload_name]


def resolve_hyperparameters(hyperparameters: Any) -> dict[str, float]:
    """`DEFAULT_HYPERPARAMETERS` updated by the runner's `hyperparameters`.

    Args:
      hyperparameters: None (self-tuning ruleset), a namedtuple (external
        ruleset, built from the search-space JSON) or a mapping.

    Raises:
      ValueError: a name this submission does not use.
    """
    if hyperparameters is None:
        return dict(DEFAULT_HYPERPARAMETERS)
    if hasattr(hyperparameters, "_asdict"):
        hyperparameters = hyperparameters._asdict()
    given = dict(hyperparameters)
    unknown = sorted(set(given) - set(DEFAULT_HYPERPARAMETERS))
    if unknown:
        raise ValueError(
            f"Unknown hyperparameters {unknown} for the VeLO submission; it "
            f"takes {sorted(DEFAULT_HYPERPARAMETERS)} (VeLO has no learning rate)."
        )
    return {**DEFAULT_HYPERPARAMETERS, **{k: float(v) for k, v in given.items()}}


def algoperf_mesh() -> Mesh:
    """The mesh AlgoPerf's JAX workloads use: all devices on one 'batch' axis."""
    return Mesh(np.array(jax.devices()), (BATCH_AXIS,))


def _shape(x: Any) -> tuple[int, ...]:
    # AlgoPerf's `workload.param_shapes` holds `spec.ShapeTuple`s.
    return tuple(getattr(x, "shape_tuple", None) or np.shape(x))


def fsdp_param_specs(
    params: Any,
    num_devices: int,
    *,
    axis: str = BATCH_AXIS,
    min_size: int = SHARD_MIN_SIZE,
) -> Any:
    """FSDP-style `PartitionSpec`s: each tensor split along one axis.

    A tensor of at least `min_size` elements is split over mesh axis `axis`
    along its largest axis whose size `num_devices` divides (ties: the
    first); other tensors are replicated (`P()`).

    Args:
      params: pytree of arrays, `jax.ShapeDtypeStruct`s or AlgoPerf
        `ShapeTuple`s.
      num_devices: size of mesh axis `axis`.
      axis: the mesh axis name ('batch' in AlgoPerf).
      min_size: smallest tensor (in elements) that is split.

    Returns:
      A pytree like params of `PartitionSpec`s.

    Example:
      >>> fsdp_param_specs({"w": jnp.zeros((64, 256)), "b": jnp.zeros(256)}, 8)
      {'b': PartitionSpec(), 'w': PartitionSpec(None, 'batch')}
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1; got {num_devices!r}.")

    def spec(x):
        shape = _shape(x)
        if not shape or math.prod(shape) < min_size or num_devices == 1:
            return P()
        for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[i] % num_devices == 0:
                return P(*([None] * i + [axis]))
        return P()

    return jax.tree_util.tree_map(
        spec, params, is_leaf=lambda x: hasattr(x, "shape_tuple")
    )


def velo_update_step(
    tx: optax.GradientTransformationExtraArgs,
    forward: Callable[[Any, Any, Any, Any], tuple[Any, Any]],
    loss_fn: Callable[..., Mapping[str, Any]],
    params: Any,
    model_state: Any,
    opt_state: Any,
    batch: Mapping[str, Any],
    rng: Any,
    *,
    label_smoothing: float = 0.0,
) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
    """One training step: loss, gradients, VeLO update (pure, jittable).

    The loss VeLO sees is the batch mean, `summed / n_valid_examples` of
    AlgoPerf's `loss_fn` (padding masked by `batch['weights']`), the same
    quantity the NAdamW baseline differentiates.

    Args:
      tx: `velo_scale.velo(...)` (or a chain containing it).
      forward: `(params, batch, model_state, rng) -> (logits, new_model_state)`,
        e.g. `workload.model_fn` in TRAIN mode with its dropout rate bound.
      loss_fn: `workload.loss_fn(label_batch, logits_batch, mask_batch,
        label_smoothing) -> {'summed', 'n_valid_examples', ...}`.
      params, model_state, opt_state: current values.
      batch: `{'inputs', 'targets', optional 'weights'}`.
      rng: PRNG key for dropout.
      label_smoothing: passed to `loss_fn`.

    Returns:
      `(new_params, new_model_state, new_opt_state, metrics)`, metrics
      `{'loss': f32[] mean loss, 'grad_norm': f32[]}`.
    """

    def mean_loss(p):
        logits, new_model_state = forward(p, batch, model_state, rng)
        out = loss_fn(
            label_batch=batch["targets"],
            logits_batch=logits,
            mask_batch=batch.get("weights"),
            label_smoothing=label_smoothing,
        )
        loss = out["summed"] / out["n_valid_examples"]
        return loss, new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params, loss=loss)
    new_params = optax.apply_updates(params, updates)
    grad_norm = jnp.sqrt(
        sum(
            jnp.sum(jnp.square(g.astype(jnp.float32)))
            for g in jax.tree_util.tree_leaves(grads)
        )
    )
    metrics = {"loss": loss, "grad_norm": grad_norm}
    return new_params, new_model_state, new_opt_state, metrics


@dataclasses.dataclass
class VeLORuntime:
    """What the runner keeps beside the state: `optimizer_state[1]`.

    Never checkpointed (the runner saves only `optimizer_state[0]`); rebuilt
    by `init_optimizer_state` on every (re)start.
    """

    tx: optax.GradientTransformationExtraArgs
    step: Callable[..., Any]  # jitted velo_update_step, donating its state
    mesh: Mesh
    param_shardings: Any
    model_state_shardings: Any
    state_shardings: Any
    abstract: tuple[Any, Any, Any]  # ShapeDtypeStructs of params/model/opt
    hyperparameters: dict[str, float]
    num_steps: int
    accumulate: int
    placed: bool = False


def _train_mode() -> Any:
    """`algoperf.spec.ForwardPassMode.TRAIN`, or "TRAIN" without AlgoPerf."""
    try:
        from algoperf import spec
    except ImportError:  # duck-typed workloads (tests) ignore the mode
        return "TRAIN"
    return spec.ForwardPassMode.TRAIN


def build(
    workload: Any,
    model_params: Any,
    model_state: Any,
    hyperparameters: Any = None,
    *,
    weights: Any = None,
    mesh: Mesh | None = None,
    shard_state: bool = True,
    min_shard_size: int = SHARD_MIN_SIZE,
) -> tuple[Any, VeLORuntime]:
    """`init_optimizer_state` with its choices exposed (weights, mesh, sharding).

    Args:
      workload: an AlgoPerf workload (or anything with `step_hint`,
        `model_fn`, `loss_fn`).
      model_params, model_state: from `workload.init_model_fn`.
      hyperparameters: see `resolve_hyperparameters`.
      weights: VeLO's meta-parameters; None resolves `$VELO_SCALE_WEIGHTS`,
        the cache, then a download (`velo_scale.load_weights`).
      mesh: defaults to `algoperf_mesh()`.
      shard_state: False replicates the VeLO state (AlgoPerf's baseline
        layout).
      min_shard_size: see `fsdp_param_specs`.

    Returns:
      `(opt_state, runtime)`, the pair the runner calls `optimizer_state`.
    """
    hparams = resolve_hyperparameters(hyperparameters)
    num_steps = velo_num_steps(workload.step_hint)
    tx = velo_scale.velo(
        num_steps,
        weights=weights,
        weight_decay=hparams["weight_decay"],
        max_training_steps=MAX_TRAINING_STEPS,
    )
    mesh = algoperf_mesh() if mesh is None else mesh
    replicated = NamedSharding(mesh, P())
    abstract_params = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), model_params
    )
    num_devices = mesh.shape[BATCH_AXIS]
    specs = fsdp_param_specs(
        abstract_params,
        num_devices if shard_state else 1,
        min_size=min_shard_size,
    )
    state_sh = velo_scale.state_shardings(tx, abstract_params, mesh, specs)
    param_sh = jax.tree_util.tree_map(lambda _: replicated, abstract_params)
    model_state_sh = jax.tree_util.tree_map(lambda _: replicated, model_state)
    abstract = (
        abstract_params,
        jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
            model_state,
        ),
        jax.eval_shape(tx.init, abstract_params),
    )
    opt_state = jax.jit(tx.init, out_shardings=state_sh)(
        jax.device_put(model_params, param_sh)
    )

    mode = _train_mode()
    dropout_rate = hparams["dropout_rate"]

    def forward(p, batch, state, rng):
        return workload.model_fn(
            p,
            batch,
            state,
            mode,
            rng,
            update_batch_norm=True,
            dropout_rate=dropout_rate,
        )

    step = jax.jit(
        functools.partial(
            velo_update_step,
            tx,
            forward,
            workload.loss_fn,
            label_smoothing=hparams["label_smoothing"],
        ),
        donate_argnums=(0, 1, 2),
        out_shardings=(param_sh, model_state_sh, state_sh, replicated),
    )
    runtime = VeLORuntime(
        tx=tx,
        step=step,
        mesh=mesh,
        param_shardings=param_sh,
        model_state_shardings=model_state_sh,
        state_shardings=state_sh,
        abstract=abstract,
        hyperparameters=hparams,
        num_steps=num_steps,
        accumulate=accumulation_steps(num_steps),
    )
    return opt_state, runtime


def _place(tree: Any, abstract: Any, shardings: Any) -> Any:
    """Puts `tree`'s arrays on `shardings`, dropping a leading device axis.

    The runner's restore (`checkpoint_utils.maybe_restore_checkpoint`) ends
    with `flax.jax_utils.replicate`, which stacks `local_device_count` copies
    on a new axis 0; the first copy is the checkpointed value.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    refs = jax.tree_util.tree_leaves(abstract)
    targets = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    if not (len(leaves) == len(refs) == len(targets)):
        raise ValueError(
            f"Restored tree has {len(leaves)} arrays where {len(refs)} were "
            "expected; was the checkpoint written by another submission or model?"
        )
    stacked = jax.local_device_count()
    out = []
    for x, ref, target in zip(leaves, refs, targets):
        if np.shape(x) == (stacked, *ref.shape) and np.shape(x) != ref.shape:
            x = x[0]
        if np.shape(x) != ref.shape:
            raise ValueError(
                f"Restored array of shape {np.shape(x)} where {ref.shape} was expected."
            )
        if getattr(x, "sharding", None) != target:
            x = jax.device_put(jnp.asarray(x, ref.dtype), target)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


# ---- The AlgoPerf submission API (algoperf/spec.py). ----


def get_batch_size(workload_name: str) -> int:
    """Global batch size for `workload_name`; see `batch_size_for`."""
    return batch_size_for(workload_name)


def init_optimizer_state(
    workload: Any,
    model_params: Any,
    model_state: Any,
    hyperparameters: Any,
    rng: Any,
) -> tuple[Any, VeLORuntime]:
    """`(VeLOState sharded over 'batch', VeLORuntime)`; VeLO has no RNG."""
    del rng
    return build(workload, model_params, model_state, hyperparameters)


def update_params(
    workload: Any,
    current_param_container: Any,
    current_params_types: Any,
    model_state: Any,
    hyperparameters: Any,
    batch: Mapping[str, Any],
    loss_type: Any,
    optimizer_state: tuple[Any, VeLORuntime],
    eval_results: list[tuple[int, float]],
    global_step: int,
    rng: Any,
    train_state: Mapping[str, Any] | None = None,
) -> tuple[tuple[Any, VeLORuntime], Any, Any]:
    """One VeLO step; returns `((opt_state, runtime), params, model_state)`."""
    del current_params_types, hyperparameters, loss_type, eval_results
    del train_state
    opt_state, runtime = optimizer_state
    params = current_param_container
    if not runtime.placed:  # first call of this (re)start; see `_place`
        abstract_params, abstract_model_state, abstract_state = runtime.abstract
        params = _place(params, abstract_params, runtime.param_shardings)
        model_state = _place(
            model_state, abstract_model_state, runtime.model_state_shardings
        )
        opt_state = _place(opt_state, abstract_state, runtime.state_shardings)
        runtime.placed = True
    params, model_state, opt_state, metrics = runtime.step(
        params, model_state, opt_state, batch, rng
    )
    logger = getattr(workload, "metrics_logger", None)
    if logger is not None and global_step % LOG_EVERY == 0:
        logger.append_scalar_metrics(
            {k: float(v) for k, v in metrics.items()}, global_step
        )
    return (opt_state, runtime), params, model_state


def prepare_for_eval(
    workload: Any,
    current_param_container: Any,
    current_params_types: Any,
    model_state: Any,
    hyperparameters: Any,
    loss_type: Any,
    optimizer_state: tuple[Any, VeLORuntime],
    eval_results: list[tuple[int, float]],
    global_step: int,
    rng: Any,
) -> tuple[tuple[Any, VeLORuntime], Any, Any]:
    """Params as they are: replicated, as the workloads' jitted eval needs.

    VeLO keeps no separate eval weights (no EMA/averaging). Mid-accumulation
    (ResNet-50, ViT) the pending half-step is not applied.
    """
    del workload, current_params_types, hyperparameters, loss_type
    del eval_results, global_step, rng
    return optimizer_state, current_param_container, model_state


def data_selection(
    workload: Any,
    input_queue: Iterator[dict[str, Any]],
    optimizer_state: Any,
    current_param_container: Any,
    model_state: Any,
    hyperparameters: Any,
    global_step: int,
    rng: Any,
) -> dict[str, Any]:
    """The next batch of the runner's shuffled queue (no data selection)."""
    del workload, optimizer_state, current_param_container, model_state
    del hyperparameters, global_step, rng
    return next(input_queue)
