"""The meta-training task distribution: families, augmentations, cost sampling."""

import jax
import numpy as np
import pytest

import velo_scale
from velo_scale.meta import ESConfig, meta_loss
from velo_scale.meta.distribution import (
    AugmentedTask,
    AutoencoderTask,
    ConvTask,
    sample_task,
    sample_tasks,
    task_cost,
)
from velo_scale.meta.tasks import digits_mlp_task


def _finite_step(task):
    key = jax.random.PRNGKey(0)
    params = task.init(key)
    loss, grads = jax.value_and_grad(task.loss)(params, task.batch(key, 0))
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    return float(loss), grads


def test_sampled_tasks_cover_the_families_and_run():
    rng = np.random.default_rng(0)
    tasks = [sample_task(rng) for _ in range(40)]
    kinds = {type(getattr(t, "task", t)).__name__ for t in tasks}
    assert {"ClassificationTask", "ConvTask", "AutoencoderTask"} <= kinds
    assert {"ViTTask", "LSTMLMTask", "TransformerLMTask"} <= kinds
    assert any(isinstance(t, AugmentedTask) for t in tasks)
    for cls in (ConvTask, AutoencoderTask, AugmentedTask):
        _finite_step(
            next(
                t
                for t in tasks
                if isinstance(t, cls) or isinstance(getattr(t, "task", None), cls)
            )
        )


def test_reparameterisation_keeps_the_loss_and_scales_gradients():
    base = digits_mlp_task(hidden=(8,), batch_size=16)
    aug = AugmentedTask(base, param_scale=10.0)
    key = jax.random.PRNGKey(1)
    batch = aug.batch(key, 0)
    p_aug = aug.init(key)
    np.testing.assert_allclose(
        float(aug.loss(p_aug, batch)),
        float(base.loss(base.init(key), base.batch(key, 0))),
        rtol=1e-5,
    )
    g_aug = jax.grad(aug.loss)(p_aug, batch)
    g_base = jax.grad(base.loss)(base.init(key), base.batch(key, 0))
    for a, b in zip(jax.tree.leaves(g_aug), jax.tree.leaves(g_base)):
        np.testing.assert_allclose(
            np.asarray(a), 10.0 * np.asarray(b), rtol=1e-4, atol=1e-6
        )


def test_gradient_noise():
    base = digits_mlp_task(hidden=(8,), batch_size=16)
    aug = AugmentedTask(base, grad_noise=0.1)
    key = jax.random.PRNGKey(2)
    params, batch = aug.init(key), aug.batch(key, 0)
    noisy = jax.grad(aug.loss)(params, batch)
    clean = jax.grad(base.loss)(params, base.batch(key, 0))
    diff = np.concatenate(
        [
            np.ravel(a - b)
            for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(clean))
        ]
    )
    np.testing.assert_allclose(diff.std(), 0.1, rtol=0.1)
    assert float(aug.loss(params, batch)) == float(
        base.loss(params, base.batch(key, 0))
    )


def test_cost_rejection_prefers_cheap_tasks():
    raw = [task_cost(sample_task(np.random.default_rng(s))) for s in range(60)]
    kept = [task_cost(t) for t in sample_tasks(np.random.default_rng(123), 30)]
    assert np.median(kept) < np.median(raw)


def test_meta_loss_on_sampled_families():
    theta = velo_scale.init_weights(
        jax.random.PRNGKey(0), lstm_hidden_size=8, param_inits=4
    )
    config = ESConfig(num_pairs=2, sigma=0.01, num_steps=3, last_k=2)
    images = digits_mlp_task().images[:256]
    labels = digits_mlp_task().labels[:256]
    for task in (
        ConvTask(images, labels, channels=(4,), batch_size=8),
        AugmentedTask(
            AutoencoderTask(images, labels, hidden=(8,), batch_size=8), grad_noise=0.01
        ),
    ):
        value = meta_loss(theta, task, jax.random.PRNGKey(4), config)
        assert np.isfinite(float(value)) and float(value) < 1e3


def test_conv3x3_stride2_is_the_lax_convolution():
    from velo_scale.meta.distribution import conv3x3_stride2

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 9, 8, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 5))
    expected = jax.lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv3x3_stride2(x, w), expected, rtol=1e-5, atol=1e-5)


def test_augmentations_can_be_restricted():
    from velo_scale.meta import AugmentedTask

    rng = np.random.default_rng(0)
    tasks = [sample_task(rng, ["mlp"], augmentations=["grad_noise"]) for _ in range(40)]
    augmented = [t for t in tasks if isinstance(t, AugmentedTask)]
    assert augmented and all(t.grad_noise > 0 for t in augmented)
    with pytest.raises(ValueError, match="unknown augmentations"):
        sample_task(rng, ["mlp"], augmentations=["fp8"])
