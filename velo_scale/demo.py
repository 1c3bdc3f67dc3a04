"""The quick-start job: an MLP on Fashion-MNIST trained with VeLO (or AdamW).

Small enough for 2 CPU cores in about a minute; the gin-configured trainer in
`velo_scale.train` is the full engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from velo_scale._src.velo import velo
from velo_scale.data.fashion_mnist import load_fashion_mnist


def _init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, Any]:
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (n_in, n_out)) * np.sqrt(2.0 / n_in),
            "bias": jnp.zeros((n_out,)),
        }
    return params


def _logits(params: dict[str, Any], x: jax.Array) -> jax.Array:
    n = len(params)
    for i in range(n):
        layer = params[f"dense{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def _loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y).mean()


def run_demo(
    *,
    optimizer: str = "velo",
    num_steps: int = 500,
    batch_size: int = 128,
    hidden: tuple[int, ...] = (128,),
    weights: Any = None,
    seed: int = 0,
    log_every: int = 50,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Trains the MLP; returns final train loss, test loss and test accuracy."""
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    x_train = train.images.reshape(len(train.images), -1).astype(np.float32) / 255.0
    x_test = test.images.reshape(len(test.images), -1).astype(np.float32) / 255.0
    params = _init_mlp(jax.random.PRNGKey(seed), (784, *hidden, 10))
    if optimizer == "velo":
        tx = velo(num_steps, weights=weights)
    elif optimizer == "adamw":
        tx = optax.adamw(
            optax.cosine_decay_schedule(1e-3, num_steps), weight_decay=1e-4
        )
    else:
        raise ValueError(f"optimizer must be 'velo' or 'adamw'; got {optimizer!r}.")
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    start, losses = time.time(), []
    for i in range(num_steps):
        lo = (i * batch_size) % (len(order) - batch_size)
        idx = order[lo : lo + batch_size]
        params, state, loss = step(params, state, x_train[idx], train.labels[idx])
        losses.append(float(loss))
        if log_every and ((i + 1) % log_every == 0 or i == 0):
            rate = (i + 1) / (time.time() - start)
            log(f"step {i + 1:5d}/{num_steps}  loss {loss:.4f}  {rate:.1f} steps/s")
    logits = jax.jit(_logits)(params, x_test)
    test_loss = float(_loss(params, x_test, test.labels))
    accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
    result = {
        "train_loss": float(np.mean(losses[-20:])),
        "test_loss": test_loss,
        "test_accuracy": accuracy,
        "seconds": time.time() - start,
    }
    log(
        f"done: {optimizer}, {num_steps} steps, train loss {result['train_loss']:.4f}, "
        f"test loss {test_loss:.4f}, test accuracy {accuracy:.4f} "
        f"({result['seconds']:.0f} s)"
    )
    return result
