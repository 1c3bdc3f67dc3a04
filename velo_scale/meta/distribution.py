"""A parametric distribution of small real-data tasks (paper Sec. 3, App. C).

`sample_task(rng)` draws an architecture family (MLP classifier, ConvNet
classifier, MLP autoencoder), a dataset (digits or Fashion-MNIST), widths,
depth, activation, batch size and init scale, then optionally a task
augmentation (paper App. C.3): re-parameterising every weight tensor by a
constant (the optimizer sees p' = p / c and gradients c * g), or Gaussian
noise on the gradients. `sample_tasks` rejects draws by estimated cost so
cheap tasks are sampled more often, as the paper does to spread compute.

Every task is pure and jittable (`init`, `batch`, `loss`; see
`velo_scale.meta.tasks`), so ES can vmap and shard its unrolls.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from velo_scale.meta.tasks import ClassificationTask

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
}


@functools.cache
def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    from velo_scale.data import load_dataset

    data = load_dataset(name, "train")
    images, labels = data["image"], data["label"]
    if name == "fashion_mnist":  # a fixed 10k subset keeps tasks light
        images, labels = images[:10000], labels[:10000]
    return images, labels


@dataclasses.dataclass(frozen=True, eq=False)
class ConvTask(ClassificationTask):
    """A small ConvNet: 3x3 convs (stride 2) with `channels`, mean-pool, linear."""

    channels: Sequence[int] = (8, 16)
    activation: str = "relu"

    def init(self, key: jax.Array) -> dict[str, Any]:
        params, c_in = {}, self.images.shape[-1]
        for i, c in enumerate(self.channels):
            key, sub = jax.random.split(key)
            fan_in = 9 * c_in
            params[f"conv{i}"] = {
                "w": jax.random.normal(sub, (3, 3, c_in, c))
                * (self.init_scale / np.sqrt(fan_in)),
                "b": jnp.zeros((c,)),
            }
            c_in = c
        key, sub = jax.random.split(key)
        params["head"] = {
            "w": jax.random.normal(sub, (c_in, self.num_classes))
            * (self.init_scale / np.sqrt(c_in)),
            "b": jnp.zeros((self.num_classes,)),
        }
        return params

    def loss(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        x, act = batch["x"], ACTIVATIONS[self.activation]
        for i in range(len(self.channels)):
            layer = params[f"conv{i}"]
            x = jax.lax.conv_general_dilated(
                x,
                layer["w"],
                (2, 2),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            x = act(x + layer["b"])
        logits = x.mean(axis=(1, 2)) @ params["head"]["w"] + params["head"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"]
        ).mean()


@dataclasses.dataclass(frozen=True, eq=False)
class AutoencoderTask(ClassificationTask):
    """An MLP autoencoder through a `hidden[-1]`-wide bottleneck; MSE loss."""

    activation: str = "relu"

    def init(self, key: jax.Array) -> dict[str, Any]:
        n = int(np.prod(self.images.shape[1:]))
        sizes = (n, *self.hidden, n)
        params = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            key, sub = jax.random.split(key)
            params[f"layer{i}"] = {
                "w": jax.random.normal(sub, (a, b)) * (self.init_scale / np.sqrt(a)),
                "b": jnp.zeros((b,)),
            }
        return params

    def loss(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        target = batch["x"].reshape(batch["x"].shape[0], -1)
        x, act, n = target, ACTIVATIONS[self.activation], len(params)
        for i in range(n):
            x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
            if i < n - 1:
                x = act(x)
        return jnp.mean(jnp.square(jax.nn.sigmoid(x) - target))


@dataclasses.dataclass(frozen=True, eq=False)
class AugmentedTask:
    """A task seen through an augmentation (paper App. C.3).

    Attributes:
      task: the underlying task.
      param_scale: weights are re-parameterised as p = param_scale * p', so
        the optimizer sees p' = p / c and gradients c * dL/dp.
      grad_noise: stddev of Gaussian noise added to every gradient.
    """

    task: Any
    param_scale: float = 1.0
    grad_noise: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.task.name}[x{self.param_scale:g},noise{self.grad_noise:g}]"

    def init(self, key: jax.Array) -> Any:
        return jax.tree_util.tree_map(
            lambda p: p / self.param_scale, self.task.init(key)
        )

    def batch(self, key: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
        batch = dict(self.task.batch(key, step))
        batch["_noise_key"] = jax.random.fold_in(jax.random.fold_in(key, 7919), step)
        return batch

    def loss(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        noise_key = batch["_noise_key"]
        inner = {k: v for k, v in batch.items() if k != "_noise_key"}
        if self.grad_noise:
            params = _with_gradient_noise(params, noise_key, self.grad_noise)
        scaled = jax.tree_util.tree_map(lambda p: p * self.param_scale, params)
        return self.task.loss(scaled, inner)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _with_gradient_noise(params: Any, key: jax.Array, stddev: float) -> Any:
    """Identity on the forward pass; adds N(0, stddev^2) to the gradient."""
    return params


def _noise_fwd(params, key, stddev):
    return params, key


def _noise_bwd(stddev, key, grads):
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        g + stddev * jax.random.normal(k, g.shape, g.dtype)
        for g, k in zip(leaves, keys)
    ]
    return treedef.unflatten(noisy), None


_with_gradient_noise.defvjp(_noise_fwd, _noise_bwd)


def task_cost(task: Any) -> float:
    """Rough FLOPs of one inner step: parameters x batch size."""
    inner = getattr(task, "task", task)
    n = sum(
        int(np.prod(x.shape))
        for x in jax.tree_util.tree_leaves(
            jax.eval_shape(inner.init, jax.random.PRNGKey(0))
        )
    )
    return float(n * inner.batch_size)


def sample_task(rng: np.random.Generator) -> Any:
    """Draws one task from the distribution (see module docstring)."""
    dataset = str(rng.choice(["digits", "fashion_mnist"], p=[0.6, 0.4]))
    images, labels = _dataset(dataset)
    family = str(rng.choice(["mlp", "conv", "autoencoder"], p=[0.5, 0.3, 0.2]))
    depth = int(rng.integers(1, 3))
    width = int(rng.choice([16, 32, 64]))
    common = dict(
        images=images,
        labels=labels,
        batch_size=int(rng.choice([32, 64, 128])),
        init_scale=float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))),
    )
    if family == "mlp":
        task = ClassificationTask(
            hidden=(width,) * depth, name=f"{dataset}_mlp", **common
        )
    elif family == "conv":
        task = ConvTask(
            channels=tuple(width // 2 * 2**i for i in range(depth)),
            activation=str(rng.choice(list(ACTIVATIONS))),
            name=f"{dataset}_conv",
            **common,
        )
    else:
        task = AutoencoderTask(
            hidden=(width * 2, width // 2)[: depth + 1],
            activation=str(rng.choice(list(ACTIVATIONS))),
            name=f"{dataset}_ae",
            **common,
        )
    augmentation = rng.uniform()
    if augmentation < 0.15:
        task = AugmentedTask(task, param_scale=float(rng.choice([0.1, 10.0])))
    elif augmentation < 0.3:
        task = AugmentedTask(task, grad_noise=float(rng.choice([0.01, 0.1])))
    return task


def sample_tasks(
    rng: np.random.Generator, n: int, *, max_cost: float | None = None
) -> list[Any]:
    """n tasks, accepting each draw with probability sqrt(min(1, c0 / cost))
    where c0 is the cheapest of 32 pilot draws (cheap tasks are sampled more
    often, expensive ones still appear), and never above `max_cost`."""
    pilot = [task_cost(sample_task(rng)) for _ in range(32)]
    c0 = min(pilot)
    tasks: list[Any] = []
    while len(tasks) < n:
        task = sample_task(rng)
        cost = task_cost(task)
        if max_cost is not None and cost > max_cost:
            continue
        if rng.uniform() < min(1.0, c0 / cost) ** 0.5:
            tasks.append(task)
    return tasks


def task_distribution(
    n: int = 8, *, seed: int = 0, max_cost: float | None = None
) -> list[Any]:
    """`sample_tasks` with a seeded generator (gin: `meta_train.tasks =
    @task_distribution()`); each task gets one ES estimate per outer step."""
    return sample_tasks(np.random.default_rng(seed), n, max_cost=max_cost)
