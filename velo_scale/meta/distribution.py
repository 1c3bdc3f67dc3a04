"""A parametric distribution of small real-data tasks (paper Sec. 3, App. C).

`sample_task(rng)` draws an architecture family (`FAMILY_PROBS`: MLP
classifier, ConvNet classifier, MLP autoencoder, tiny ViT classifier
(`velo_scale.meta.vit_tasks`), or a character-level LSTM / transformer
language model on Bible text (`velo_scale.meta.lm_tasks`)), a dataset
(digits or Fashion-MNIST) for the image families, widths, depth, activation,
batch size and init scale, then optionally one task augmentation
(`AUGMENTATION_PROBS`, paper App. C.3): re-parameterising every weight
tensor by a constant (the optimizer sees p' = p / c and gradients c * g),
Gaussian noise on the gradients, gradients estimated in a random low-rank
subspace, or the inner forward/backward pass in bfloat16. `sample_tasks` rejects draws by estimated cost so
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


def conv3x3_stride2(x: jax.Array, w: jax.Array) -> jax.Array:
    """`SAME` 3x3 convolution with stride 2, x: [N, H, W, C], w: [3, 3, C, D]
    (HWIO) -> [N, ceil(H/2), ceil(W/2), D], as patches @ matrix.

    Equal to `lax.conv_general_dilated`, but a matmul: ES vmaps the inner
    training over perturbations, and XLA:CPU runs the vmapped kernel
    gradient of a convolution (a grouped convolution) ~100x slower than
    this form.
    """
    patches = jax.lax.conv_general_dilated_patches(
        x, (3, 3), (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # features ordered (C, kh, kw)
    return patches @ jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, w.shape[-1])


@dataclasses.dataclass(frozen=True, eq=False)
class ConvTask(ClassificationTask):
    """A small ConvNet: 3x3 convs (stride 2) with `channels`, mean-pool, linear."""

    channels: Sequence[int] = (8, 16)
    activation: str = "relu"

    @property
    def tokens_per_example(self) -> int:
        """Output positions of the first convolution (for `task_cost`)."""
        h, w = self.images.shape[1:3]
        return -(-h // 2) * -(-w // 2)

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
            x = act(conv3x3_stride2(x, layer["w"]) + layer["b"])
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
    """A task seen through augmentations (paper App. C.3, "task augmentation").

    The augmentations compose (applied in this order inside `loss`): gradient
    noise and the random subspace act on the gradient w.r.t. the optimizer's
    parameters p', the re-parameterisation maps p' to the task's p, and the
    precision casts p and the batch before the task's forward pass.

    Attributes:
      task: the underlying task.
      param_scale: weights are re-parameterised as p = param_scale * p', so
        the optimizer sees p' = p / c and gradients c * dL/dp.
      grad_noise: stddev of Gaussian noise added to every gradient.
      subspace_rank: r > 0 estimates every gradient in a random subspace
        (`_subspace_bwd` has the exact rule): each tensor's gradient, seen as
        a matrix g: [m, n] with n its last dimension (a vector is [1, n]), is
        replaced by g Q Q^T, with Q: [n, r] an orthonormal basis of a uniformly
        random r-dimensional subspace of R^n, fresh for every tensor and every
        inner step. Tensors with n <= r keep their gradient. The loss is
        unchanged; the gradient has rank <= r per tensor and is not rescaled
        (E[Q Q^T] = (r / n) I, so its expected value is (r / n) g).
      compute_dtype: "float32" (default) or "bfloat16": the task's forward and
        backward pass run in that dtype (params and floating-point batch
        entries are cast on the way in; the f32 master params and the
        gradient the optimizer sees stay float32, and the loss is returned as
        float32).
    """

    task: Any
    param_scale: float = 1.0
    grad_noise: float = 0.0
    subspace_rank: int = 0
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"compute_dtype must be 'float32' or 'bfloat16'; got "
                f"{self.compute_dtype!r}."
            )
        if self.subspace_rank < 0:
            raise ValueError(f"subspace_rank must be >= 0; got {self.subspace_rank}.")

    @property
    def name(self) -> str:
        parts = []
        if self.param_scale != 1.0:
            parts.append(f"x{self.param_scale:g}")
        if self.grad_noise:
            parts.append(f"noise{self.grad_noise:g}")
        if self.subspace_rank:
            parts.append(f"subspace{self.subspace_rank}")
        if self.compute_dtype != "float32":
            parts.append(self.compute_dtype)
        return f"{self.task.name}[{','.join(parts)}]"

    @property
    def batch_size(self) -> int:
        return self.task.batch_size

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
        if self.subspace_rank:
            params = _in_random_subspace(
                params, jax.random.fold_in(noise_key, 1), self.subspace_rank
            )
        scaled = jax.tree_util.tree_map(lambda p: p * self.param_scale, params)
        if self.compute_dtype == "float32":
            return self.task.loss(scaled, inner)
        dtype = jnp.dtype(self.compute_dtype)
        scaled = jax.tree_util.tree_map(lambda p: p.astype(dtype), scaled)
        inner = {
            k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
            for k, v in inner.items()
        }
        return self.task.loss(scaled, inner).astype(jnp.float32)


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


def random_subspace_basis(key: jax.Array, n: int, rank: int) -> jax.Array:
    """f32[n, rank] orthonormal basis of a uniformly random rank-dim subspace
    of R^n (QR of a standard normal matrix, signs fixed by R's diagonal)."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, rank), jnp.float32))
    return q * jnp.sign(jnp.diagonal(r))


def project_to_subspace(g: jax.Array, key: jax.Array, rank: int) -> jax.Array:
    """g: [..., n] -> g Q Q^T with Q = `random_subspace_basis(key, n, rank)`;
    g itself when n <= rank or g is a scalar."""
    if g.ndim == 0 or g.shape[-1] <= rank:
        return g
    q = random_subspace_basis(key, g.shape[-1], rank)
    flat = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
    return ((flat @ q) @ q.T).reshape(g.shape).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _in_random_subspace(params: Any, key: jax.Array, rank: int) -> Any:
    """Identity on the forward pass; projects each tensor's gradient onto a
    random `rank`-dim subspace of its last axis (`project_to_subspace`, one
    key per tensor folded from `key`, which changes every inner step)."""
    return params


def _subspace_fwd(params, key, rank):
    return params, key


def _subspace_bwd(rank, key, grads):
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    keys = jax.random.split(key, max(len(leaves), 1))
    projected = [project_to_subspace(g, k, rank) for g, k in zip(leaves, keys)]
    return treedef.unflatten(projected), None


_in_random_subspace.defvjp(_subspace_fwd, _subspace_bwd)


def task_cost(task: Any) -> float:
    """Rough FLOPs of one inner step: parameters x batch size x tokens per
    example (1 for MLPs, ConvNets and autoencoders; patches + 1 for ViTs;
    the sequence length for language models)."""
    inner = task
    while isinstance(inner, AugmentedTask):
        inner = inner.task
    n = sum(
        int(np.prod(x.shape))
        for x in jax.tree_util.tree_leaves(
            jax.eval_shape(inner.init, jax.random.PRNGKey(0))
        )
    )
    return float(n * inner.batch_size * getattr(inner, "tokens_per_example", 1))


# P(family) of `sample_task`; "lm" is a character LM on Bible text (no image
# dataset), the others draw digits (p = 0.6) or Fashion-MNIST (p = 0.4).
FAMILY_PROBS = {"mlp": 0.35, "conv": 0.2, "autoencoder": 0.15, "vit": 0.1, "lm": 0.2}
# P(augmentation) of `sample_task` (at most one per task; none with p = 0.5):
# (probability, kind, values drawn uniformly).
AUGMENTATION_PROBS = (
    (0.15, "param_scale", (0.1, 10.0)),
    (0.15, "grad_noise", (0.01, 0.1)),
    (0.1, "subspace_rank", (1, 2, 4, 8)),
    (0.1, "compute_dtype", ("bfloat16",)),
)


def sample_task(
    rng: np.random.Generator,
    families: Sequence[str] | None = None,
    augmentations: Sequence[str] | None = None,
) -> Any:
    """Draws one task from the distribution.

    Args:
      rng: the generator (the draw is a deterministic function of its state).
      families: restrict to these keys of `FAMILY_PROBS` (renormalised);
        all by default.
      augmentations: the augmentation kinds of `AUGMENTATION_PROBS` allowed
        (all by default); a draw of another kind leaves the task as it is
        (e.g. `("param_scale", "grad_noise", "subspace_rank")` drops
        bfloat16, which XLA:CPU emulates slowly).

    The family follows `FAMILY_PROBS`; image families draw a dataset, depth in
    {1, 2}, width in {16, 32, 64} (ViTs: `vit_tasks.sample_vit_task`), batch
    size in {32, 64, 128} and a log-uniform init scale in [0.5, 2]; language
    models follow `lm_tasks.sample_lm_task`. Then at most one augmentation is
    drawn from `AUGMENTATION_PROBS` (`AugmentedTask`).
    """
    names = list(FAMILY_PROBS) if families is None else list(families)
    unknown = set(names) - set(FAMILY_PROBS)
    if unknown or not names:
        raise ValueError(
            f"families must be a non-empty subset of {list(FAMILY_PROBS)}; "
            f"got {families!r}."
        )
    probs = np.array([FAMILY_PROBS[f] for f in names])
    family = str(rng.choice(names, p=probs / probs.sum()))
    if family == "lm":
        from velo_scale.meta.lm_tasks import sample_lm_task

        task = sample_lm_task(rng)
    else:
        task = _sample_image_task(rng, family)
    allowed = {k for _, k, _ in AUGMENTATION_PROBS}
    if augmentations is not None:
        unknown = set(augmentations) - allowed
        if unknown:
            raise ValueError(
                f"unknown augmentations {sorted(unknown)}; known: {sorted(allowed)}."
            )
        allowed = set(augmentations)
    u, edge = rng.uniform(), 0.0
    for prob, kind, values in AUGMENTATION_PROBS:
        edge += prob
        if u < edge and kind not in allowed:
            return task
        if u < edge:
            value = values[int(rng.integers(len(values)))]
            return AugmentedTask(task, **{kind: value})
    return task


def _sample_image_task(rng: np.random.Generator, family: str) -> Any:
    dataset = str(rng.choice(["digits", "fashion_mnist"], p=[0.6, 0.4]))
    images, labels = _dataset(dataset)
    if family == "vit":
        from velo_scale.meta.vit_tasks import sample_vit_task

        return sample_vit_task(rng, images, labels, name=f"{dataset}_vit")
    depth = int(rng.integers(1, 3))
    width = int(rng.choice([16, 32, 64]))
    common = dict(
        images=images,
        labels=labels,
        batch_size=int(rng.choice([32, 64, 128])),
        init_scale=float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))),
    )
    if family == "mlp":
        return ClassificationTask(
            hidden=(width,) * depth, name=f"{dataset}_mlp", **common
        )
    if family == "conv":
        return ConvTask(
            channels=tuple(width // 2 * 2**i for i in range(depth)),
            activation=str(rng.choice(list(ACTIVATIONS))),
            name=f"{dataset}_conv",
            **common,
        )
    return AutoencoderTask(
        hidden=(width * 2, width // 2)[: depth + 1],
        activation=str(rng.choice(list(ACTIVATIONS))),
        name=f"{dataset}_ae",
        **common,
    )


def sample_tasks(
    rng: np.random.Generator,
    n: int,
    *,
    max_cost: float | None = None,
    families: Sequence[str] | None = None,
    augmentations: Sequence[str] | None = None,
) -> list[Any]:
    """n tasks, accepting each draw with probability sqrt(min(1, c0 / cost))
    where c0 is the cheapest of 32 pilot draws (cheap tasks are sampled more
    often, expensive ones still appear), and never above `max_cost` (FLOPs,
    `task_cost`). `families`, `augmentations` as in `sample_task`."""
    pilot = [task_cost(sample_task(rng, families)) for _ in range(32)]
    c0 = min(pilot)
    tasks: list[Any] = []
    while len(tasks) < n:
        task = sample_task(rng, families, augmentations)
        cost = task_cost(task)
        if max_cost is not None and cost > max_cost:
            continue
        if rng.uniform() < min(1.0, c0 / cost) ** 0.5:
            tasks.append(task)
    return tasks


def task_distribution(
    n: int = 8,
    *,
    seed: int = 0,
    max_cost: float | None = None,
    families: Sequence[str] | None = None,
    augmentations: Sequence[str] | None = None,
) -> list[Any]:
    """`sample_tasks` with a seeded generator (gin: `meta_train.tasks =
    @task_distribution()`); each task gets `meta_train.estimates_per_task` ES
    estimates per outer step."""
    return sample_tasks(
        np.random.default_rng(seed),
        n,
        max_cost=max_cost,
        families=families,
        augmentations=augmentations,
    )
