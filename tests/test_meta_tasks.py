"""Meta-training tasks: augmentations (random subspace, bfloat16) and the ViT
and character-LM families (velo_scale.meta.{distribution,vit_tasks,lm_tasks})."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from velo_scale.meta.distribution import (
    AugmentedTask,
    _dataset,
    project_to_subspace,
    sample_task,
    task_cost,
)
from velo_scale.meta.lm_tasks import (
    VOCAB_SIZE,
    LSTMLMTask,
    TransformerLMTask,
    bible_text,
    decode,
    encode,
)
from velo_scale.meta.tasks import digits_mlp_task
from velo_scale.meta.vit_tasks import ViTTask


def _base():
    return digits_mlp_task(hidden=(8,), batch_size=16)


def _grads(task, key=None, step=0):
    key = jax.random.PRNGKey(0) if key is None else key
    params = task.init(key)
    batch = task.batch(key, step)
    return params, batch, jax.grad(task.loss)(params, batch)


# -- random-subspace gradients -------------------------------------------------


def test_subspace_gradient_is_the_documented_projection():
    base, rank = _base(), 2
    aug = AugmentedTask(base, subspace_rank=rank)
    key = jax.random.PRNGKey(3)
    params, batch, g_aug = _grads(aug, key)
    _, _, g_base = _grads(base, key)
    # The loss is unchanged.
    assert float(aug.loss(params, batch)) == float(base.loss(params, batch))
    # Exactly g Q Q^T with one key per tensor (the rule of `_subspace_bwd`).
    leaves_base = jax.tree.leaves(g_base)
    keys = jax.random.split(
        jax.random.fold_in(batch["_noise_key"], 1), len(leaves_base)
    )
    for a, b, k in zip(jax.tree.leaves(g_aug), leaves_base, keys):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(project_to_subspace(b, k, rank)), atol=1e-6
        )
        flat = np.asarray(a).reshape(-1, a.shape[-1])
        if a.shape[-1] > rank:
            # Rank <= r, and the rows lie in one r-dim subspace: projecting
            # again onto that subspace changes nothing.
            assert np.linalg.matrix_rank(flat, tol=1e-6) <= rank
            q = np.linalg.svd(flat)[2][:rank].T  # basis of the row space
            np.testing.assert_allclose(flat @ q @ q.T, flat, atol=1e-6)
            assert not np.allclose(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_subspace_changes_every_step_and_is_an_orthogonal_projection():
    aug = AugmentedTask(_base(), subspace_rank=4)
    params = aug.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    g0 = jax.grad(aug.loss)(params, aug.batch(key, 0))["layer0"]["w"]
    b1 = dict(aug.batch(key, 1))
    b1.update({k: v for k, v in aug.batch(key, 0).items() if k != "_noise_key"})
    g1 = jax.grad(aug.loss)(params, b1)["layer0"]["w"]  # same data, next step
    assert not np.allclose(np.asarray(g0), np.asarray(g1))
    # Projection: idempotent and never longer than the input.
    g = jax.random.normal(jax.random.PRNGKey(2), (5, 7))
    p = project_to_subspace(g, jax.random.PRNGKey(3), 3)
    np.testing.assert_allclose(
        project_to_subspace(p, jax.random.PRNGKey(3), 3), p, atol=1e-5
    )
    assert float(jnp.linalg.norm(p)) < float(jnp.linalg.norm(g))


# -- bfloat16 precision --------------------------------------------------------


def test_bfloat16_runs_the_task_in_bf16_with_f32_master_params():
    base = _base()
    aug = AugmentedTask(base, compute_dtype="bfloat16")
    key = jax.random.PRNGKey(4)
    params, batch, g_aug = _grads(aug, key)
    _, _, g_base = _grads(base, key)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_aug))
    loss_bf16, loss_f32 = aug.loss(params, batch), base.loss(params, batch)
    assert loss_bf16.dtype == jnp.float32
    assert float(loss_bf16) != float(loss_f32)
    np.testing.assert_allclose(float(loss_bf16), float(loss_f32), rtol=2e-2)
    for a, b in zip(jax.tree.leaves(g_aug), jax.tree.leaves(g_base)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=0.1, atol=0.05 * np.abs(b).max()
        )
    # The matmuls of forward and backward run in bfloat16.
    jaxpr = str(jax.make_jaxpr(jax.grad(aug.loss))(params, batch))
    assert "bf16" in jaxpr and "dot_general" in jaxpr
    dots = [line for line in jaxpr.splitlines() if "dot_general" in line]
    assert dots and all("bf16" in line for line in dots)


def test_augmentation_arguments_are_checked():
    with pytest.raises(ValueError, match="compute_dtype"):
        AugmentedTask(_base(), compute_dtype="float16")
    with pytest.raises(ValueError, match="subspace_rank"):
        AugmentedTask(_base(), subspace_rank=-1)


# -- character language models on Bible text -----------------------------------


def test_character_vocabulary_and_windows():
    text = bible_text()
    assert text.dtype == np.uint8 and len(text) > 50_000
    assert int(text.max()) < VOCAB_SIZE and (text == 0).mean() < 1e-3
    assert decode(encode("In the beginning, “God”")) == 'In the beginning, "God"'
    task = LSTMLMTask(text, width=8, seq_len=8, batch_size=4)
    tokens = np.asarray(task.batch(jax.random.PRNGKey(0), 3)["tokens"])
    assert tokens.shape == (4, 9)
    # Each row is the window of the text at a uniform random start.
    starts = jax.random.randint(
        jax.random.fold_in(jax.random.PRNGKey(0), 3), (4,), 0, len(text) - 9
    )
    for row, start in zip(tokens, np.asarray(starts)):
        np.testing.assert_array_equal(row, text[start : start + 9])


@pytest.mark.parametrize("cls", [LSTMLMTask, TransformerLMTask])
def test_char_lm_loss_grads_and_causality(cls):
    task = cls(bible_text(), width=8, depth=2, seq_len=8, batch_size=4)
    key = jax.random.PRNGKey(0)
    params, batch, grads = _grads(task, key)
    loss = float(task.loss(params, batch))
    assert abs(loss - np.log(VOCAB_SIZE)) < 2.0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # Causal: changing the last input changes only the last position's logits.
    inputs = batch["tokens"][:, :-1]
    changed = inputs.at[:, -1].set((inputs[:, -1] + 1) % VOCAB_SIZE)
    a, b = task.logits(params, inputs), task.logits(params, changed)
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], atol=1e-6)
    assert not np.allclose(a[:, -1], b[:, -1])
    # bfloat16 augmentation stays close to float32.
    aug = AugmentedTask(task, compute_dtype="bfloat16")
    np.testing.assert_allclose(
        float(aug.loss(params, aug.batch(key, 0))), loss, rtol=2e-2
    )


# -- tiny ViT --------------------------------------------------------------------


def test_vit_task_runs_and_costs_tokens():
    images, labels = _dataset("digits")
    task = ViTTask(
        images, labels, patch=4, width=8, num_heads=2, mlp_dim=8, batch_size=8
    )
    params, batch, grads = _grads(task)
    assert task.tokens_per_example == 5
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    loss = float(task.loss(params, batch))
    assert 0 < loss < 10
    n = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    assert task_cost(task) == n * 8 * 5
    with pytest.raises(ValueError, match="multiple of patch"):
        ViTTask(images, labels, patch=3)


def test_sample_task_draws_the_new_families():
    rng = np.random.default_rng(0)
    lm = [sample_task(rng, families=["lm"]) for _ in range(6)]
    kinds = {type(getattr(t, "task", t)).__name__ for t in lm}
    assert kinds == {"LSTMLMTask", "TransformerLMTask"}
    vit = sample_task(rng, families=["vit"])
    assert isinstance(getattr(vit, "task", vit), ViTTask)
    with pytest.raises(ValueError, match="families"):
        sample_task(rng, families=["rnn"])
    # Every augmentation is drawn.
    tasks = [sample_task(np.random.default_rng(s), families=["mlp"]) for s in range(80)]
    aug = [t for t in tasks if isinstance(t, AugmentedTask)]
    assert any(t.subspace_rank for t in aug)
    assert any(t.compute_dtype == "bfloat16" for t in aug)
    assert any(t.grad_noise for t in aug) and any(t.param_scale != 1 for t in aug)


@pytest.mark.slow
def test_meta_loss_runs_on_the_new_families_and_augmentations():
    import velo_scale
    from velo_scale.meta import ESConfig, meta_loss

    theta = velo_scale.init_weights(
        jax.random.PRNGKey(0), lstm_hidden_size=8, param_inits=4
    )
    config = ESConfig(num_pairs=2, sigma=0.01, num_steps=3, last_k=2)
    images, labels = _dataset("digits")
    text = bible_text()
    for task in (
        AugmentedTask(
            TransformerLMTask(text, width=8, seq_len=8, batch_size=4),
            compute_dtype="bfloat16",
        ),
        AugmentedTask(
            LSTMLMTask(text, width=8, seq_len=8, batch_size=4), subspace_rank=2
        ),
        ViTTask(images, labels, patch=4, width=8, mlp_dim=8, batch_size=8),
    ):
        value = meta_loss(theta, task, jax.random.PRNGKey(4), config)
        assert np.isfinite(float(value)) and float(value) < 1e3, task.name
