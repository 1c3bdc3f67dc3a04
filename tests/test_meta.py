"""ES meta-gradients of VeLO (velo_scale.meta): maths, determinism, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import velo_scale
from velo_scale.meta import (
    ESConfig,
    antithetic_estimate,
    digits_mlp_task,
    es_gradient,
    meta_loss,
)

SMALL = dict(lstm_hidden_size=8, param_inits=4)
CONFIG = ESConfig(num_pairs=8, sigma=0.01, num_steps=6, last_k=2)


def _theta():
    return velo_scale.init_weights(jax.random.PRNGKey(0), **SMALL)


def _task():
    return digits_mlp_task(hidden=(8,), batch_size=16)


def test_antithetic_estimate_of_a_quadratic():
    """For f(x) = sum(c x^2) the estimate converges to 2 c x."""
    x = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[3.0]])}
    c = {"a": jnp.array([1.0, 0.5, 2.0]), "b": jnp.array([[0.1]])}

    def f(t):
        return sum(
            jnp.sum(ci * ti**2)
            for ci, ti in zip(jax.tree.leaves(c), jax.tree.leaves(t))
        )

    grad, _ = antithetic_estimate(
        f, x, jax.random.PRNGKey(1), num_pairs=20000, sigma=0.1
    )
    for g, ci, xi in zip(jax.tree.leaves(grad), jax.tree.leaves(c), jax.tree.leaves(x)):
        np.testing.assert_allclose(g, 2 * ci * xi, rtol=0.05, atol=0.05)


def test_meta_loss_trains_the_task_deterministically():
    theta, task = _theta(), _task()
    key = jax.random.PRNGKey(3)
    a = jax.jit(lambda t: meta_loss(t, task, key, CONFIG))(theta)
    b = jax.jit(lambda t: meta_loss(t, task, key, CONFIG))(theta)
    assert float(a) == float(b)
    assert np.isfinite(float(a)) and 0 < float(a) < 10


def test_es_gradient_structure_and_pairs_share_the_task():
    """With sigma -> tiny, both members of a pair see the same task (data,
    init): the estimate stays gradient-sized instead of growing as 1/sigma.
    (One compile: the full-size CONFIG runs in the meta-loss tests.)"""
    theta, task = _theta(), _task()
    tiny = ESConfig(num_pairs=2, sigma=1e-6, num_steps=4, last_k=2)
    lowered = jax.jit(lambda t, k: es_gradient(t, task, k, tiny)).lower(
        theta, jax.random.PRNGKey(5)
    )
    # Both members of every pair run under one vmap and all perturbations come
    # from one draw: the program holds one unroll's loops, plus one for the
    # draw (a copy per sign and a draw per theta leaf: 23 against 6).
    one_unroll = jax.jit(lambda t: meta_loss(t, task, jax.random.PRNGKey(5), tiny))
    loops = one_unroll.lower(theta).as_text().count("stablehlo.while")
    assert lowered.as_text().count("stablehlo.while") <= loops + 1
    grad, loss = lowered.compile()(theta, jax.random.PRNGKey(5))
    assert jax.tree.structure(grad) == jax.tree.structure(theta)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))
    assert np.isfinite(float(loss))
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grad)))
    # ~20 here, as with sigma = 0.01 (a gradient-sized estimate); pairs on
    # different tasks would differ by O(1e-2) in loss, giving ~1e5 / sigma.
    assert 0 < norm < 1e3


def test_sharded_pairs_equal_single_device():
    """Pairs split over 8 devices give the single-device estimate.

    Two inner steps: VeLO's loss features are zero for the first two updates.
    Later ones divide differences of running means that nearly cancel, so
    rounding (a batch of 1 pair per device vs 8 on one) can flip a feature
    between -1 and 1 and the meta-loss is discontinuous at that scale; ES
    estimates then agree only in distribution.
    """
    theta, task = _theta(), _task()
    config = ESConfig(num_pairs=8, sigma=0.01, num_steps=2, last_k=2)
    mesh = Mesh(np.array(jax.devices()[:8]), ("pop",), axis_types=(AxisType.Auto,))
    key = jax.random.PRNGKey(7)
    single = jax.jit(lambda t: es_gradient(t, task, key, config))(theta)
    sharded = jax.jit(
        lambda t: es_gradient(
            t, task, key, config, sharding=NamedSharding(mesh, P("pop"))
        )
    )(theta)
    # Rounding of the losses (~1e-6) is scaled by 1 / (2 sigma^2) = 5e3 in the
    # pair weights and by |eps| ~ sigma in the estimate: ~5e-5 at most.
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=5e-5)


def _meta_kw(**kw):
    base = dict(
        num_outer_steps=4,
        architecture=velo_scale.Architecture(**SMALL),
        unroll_lengths=(4,),
        num_pairs=8,
        last_k=2,
        checkpoint_every=1,
        init_theta="random",
        progress=False,
    )
    return {**base, **kw}


def _assert_moved(theta):
    """theta left the random start of `init_theta="random"` (seed 0)."""
    start = velo_scale.init_weights(jax.random.split(jax.random.PRNGKey(0))[0], **SMALL)
    assert any(
        not np.allclose(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(start), jax.tree.leaves(theta))
    )


@pytest.mark.slow  # the resampling test below covers resume + export in CI
def test_meta_train_resumes_bit_identically_and_exports(tmp_path):
    from velo_scale.meta.train import meta_train

    kw = _meta_kw(tasks=[_task()], num_outer_steps=3, unroll_lengths=(3,))
    straight = meta_train(workdir=tmp_path / "a", **kw)
    meta_train(workdir=tmp_path / "b", stop_after=1, **kw)  # "killed" after 1
    resumed = meta_train(workdir=tmp_path / "b", **kw)
    assert int(straight.step) == int(resumed.step) == 3
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # theta moved, and the export loads as VeLO weights that run.
    _assert_moved(straight.theta)
    theta = velo_scale.load_weights(tmp_path / "a" / "params")
    assert velo_scale.Architecture.of(theta) == velo_scale.Architecture(**SMALL)
    tx = velo_scale.velo(10, weights=str(tmp_path / "a" / "params"))
    params = {"w": jnp.ones((3, 2))}
    tx.update(params, tx.init(params), params, loss=1.0)
    info = (tmp_path / "a" / "params.json").read_text()
    assert '"outer_steps": 3' in info and "digits_mlp" in info


def test_estimator_compiles_once_per_static_config_and_is_deterministic():
    """Two task objects with the same configuration (equal data, equal
    hyperparameters) share one compiled ES estimator, also across the
    `estimates_per_task` estimates, and later runs in the process; a rerun
    gives bit-identical theta."""
    from velo_scale.meta import train as train_lib
    from velo_scale.meta.es import task_signature

    a, b = _task(), _task()
    other = digits_mlp_task(hidden=(4,), batch_size=16)
    assert a is not b and task_signature(a) == task_signature(b)
    assert task_signature(a) != task_signature(other)
    kw = _meta_kw(
        tasks=[a, b], num_outer_steps=2, unroll_lengths=(3,), estimates_per_task=2
    )
    train_lib.clear_compiled()
    train_lib.TRACES.clear()
    first = train_lib.meta_train(**kw)
    # 2 tasks x 2 estimates x 2 outer steps = 8 calls, one trace.
    assert dict(train_lib.TRACES) == {task_signature(a): 1}
    # A second run in this process reuses the compiled estimator and gives
    # the same theta, bit for bit.
    train_lib.TRACES.clear()
    again = train_lib.meta_train(**kw)
    assert not train_lib.TRACES
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Other ES settings are another estimator.
    train_lib.meta_train(**{**kw, "sigma": 0.02, "num_outer_steps": 1})
    assert dict(train_lib.TRACES) == {task_signature(a): 1}
    with pytest.raises(ValueError, match="estimates_per_task"):
        train_lib.meta_train(**{**kw, "estimates_per_task": 0})


def _toy_pes_fns(c, x0):
    """Inner task: gradient descent with per-coordinate step theta["lr"] on
    0.5 * sum(c x^2) from x0; per-step loss before each update."""

    def init_fn(theta, unroll_key):
        return x0

    def step_fn(theta, x, unroll_key, t):
        loss = 0.5 * jnp.sum(c * x**2)
        return x - theta["lr"] * c * x, loss

    return init_fn, step_fn


def test_pes_matches_the_full_unroll_gradient_in_expectation():
    """Summed over an unroll's truncations, PES estimates the gradient of the
    mean loss of the full unroll: its mean over unrolls agrees with the exact
    gradient and with full-unroll antithetic ES within their noise."""
    import functools

    from velo_scale.meta.es import pes_estimate, pes_init

    c, x0 = jnp.array([1.0, 0.5, 2.0]), jnp.array([1.0, -1.0, 0.5])
    theta = {"lr": jnp.array([0.3, 0.2, 0.1])}
    init_fn, step_fn = _toy_pes_fns(c, x0)
    n_steps, k, pairs, sigma, unrolls = 8, 2, 500, 0.01, 24

    def full_loss(th):
        def body(x, t):
            return step_fn(th, x, None, t)

        return jnp.mean(jax.lax.scan(body, x0, jnp.arange(n_steps))[1])

    exact = jax.grad(full_loss)(theta)["lr"]
    pes = jax.jit(
        functools.partial(
            pes_estimate,
            init_fn=init_fn,
            step_fn=step_fn,
            num_pairs=pairs,
            sigma=sigma,
            num_steps=n_steps,
            truncation_length=k,
        )
    )
    state = pes_init(theta, init_fn, jax.random.PRNGKey(0), pairs)
    per_unroll = []
    for u in range(unrolls):
        total = 0.0
        for j in range(n_steps // k):
            g, _, state = pes(theta, state, jax.random.PRNGKey(1000 * u + j))
            total = total + g["lr"]
        assert int(state.t) == 0  # the unroll ended; the next one restarts
        per_unroll.append(np.asarray(total))
    per_unroll = np.stack(per_unroll)
    mean, se = per_unroll.mean(0), per_unroll.std(0) / np.sqrt(unrolls)
    assert np.all(np.abs(mean - exact) < 5 * se + 1e-3), (mean, exact, se)
    es = jax.jit(
        lambda key: antithetic_estimate(full_loss, theta, key, pairs, sigma)[0]
    )
    es_runs = np.stack(
        [np.asarray(es(jax.random.PRNGKey(7 + u))["lr"]) for u in range(unrolls)]
    )
    es_se = es_runs.std(0) / np.sqrt(unrolls)
    assert np.all(np.abs(es_runs.mean(0) - exact) < 5 * es_se + 1e-3)
    assert np.all(np.abs(mean - es_runs.mean(0)) < 5 * np.hypot(se, es_se) + 1e-3)


@pytest.mark.slow  # CI: the PES meta_train test runs pes_gradient on a VeLO task
def test_pes_gradient_on_a_velo_task():
    from velo_scale.meta.es import pes_gradient, pes_task_init

    theta, task = _theta(), _task()
    config = ESConfig(num_pairs=2, sigma=0.01, num_steps=4, truncation_length=2)
    state = pes_task_init(theta, task, jax.random.PRNGKey(0), config)
    step = jax.jit(lambda s, k: pes_gradient(theta, task, s, k, config))
    for i, t in enumerate([2, 0, 2]):
        grad, loss, state = step(state, jax.random.PRNGKey(i))
        assert int(state.t) == t and np.isfinite(float(loss))
        assert jax.tree.structure(grad) == jax.tree.structure(theta)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))


def test_es_config_needs_truncations_that_divide_the_unroll():
    with pytest.raises(ValueError, match="truncation_length"):
        ESConfig(num_steps=5, truncation_length=2)


def _scaled_task(init_scale):
    import dataclasses

    return dataclasses.replace(_task(), init_scale=init_scale)


def test_runtime_fields_split_and_restore():
    """Tasks that differ only in their init scale have one static template;
    putting the values back (also through an AugmentedTask) rebuilds the
    same initialisation."""
    from velo_scale.meta import (
        AugmentedTask,
        split_runtime,
        task_signature,
        with_runtime,
    )

    a, b = _scaled_task(0.5), _scaled_task(2.0)
    (ta, va), (tb, vb) = split_runtime(a), split_runtime(b)
    assert va == (0.5,) and vb == (2.0,)
    assert task_signature(ta) == task_signature(tb) != task_signature(a)
    key = jax.random.PRNGKey(0)
    for task, template, values in ((a, ta, va), (b, tb, vb)):
        rebuilt = with_runtime(template, jnp.asarray(values))
        for x, y in zip(
            jax.tree.leaves(task.init(key)), jax.tree.leaves(rebuilt.init(key))
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    aug = AugmentedTask(b, param_scale=10.0)
    template, values = split_runtime(aug)
    assert values == (2.0,) and template.param_scale == 10.0
    assert with_runtime(template, values).task.init_scale == 2.0
    with pytest.raises(ValueError, match="left over"):
        with_runtime(template, (1.0, 2.0))


def test_a_class_defined_again_is_a_new_signature():
    """Compiled estimators are kept for the process by signature, so a task
    class defined anew (a notebook cell run again, perhaps edited) must not
    match the old one's, even with the same name and fields."""
    import dataclasses

    from velo_scale.meta import task_signature

    def define():
        @dataclasses.dataclass(frozen=True)
        class Task:
            size: int = 3

        return Task

    first, again = define(), define()
    assert first.__qualname__ == again.__qualname__
    assert task_signature(first()) == task_signature(first())
    assert task_signature(first()) != task_signature(again())


def test_resampled_tasks_share_a_compiled_estimator_and_resume_exactly(tmp_path):
    """resample_every draws a new task set per round from a seeded factory; a
    redraw that only changes the init scale reuses the compiled estimator;
    a run killed in the middle of a round resumes bit-identically."""
    from velo_scale.meta import train as train_lib

    seeds = []

    def factory(seed):
        seeds.append(seed)
        return [_scaled_task(0.5 + seed % 7 / 4)]

    kw = _meta_kw(tasks=factory, resample_every=2)
    train_lib.clear_compiled()
    train_lib.TRACES.clear()
    straight = train_lib.meta_train(workdir=tmp_path / "a", **kw)
    assert len(set(seeds)) == 2  # rounds 0 and 1
    assert list(train_lib.TRACES.values()) == [1]  # one compilation for both
    train_lib.meta_train(workdir=tmp_path / "b", stop_after=3, **kw)
    resumed = train_lib.meta_train(workdir=tmp_path / "b", **kw)
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The export is the final theta, loadable as VeLO weights, with provenance.
    exported = velo_scale.load_weights(tmp_path / "b" / "params")
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(resumed.theta)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    info = json.loads((tmp_path / "b" / "params.json").read_text())
    assert info["outer_steps"] == 4 and info["tasks"] == {"digits_mlp": 2}
    # Any checkpoint exports without the run's configuration.
    path = train_lib.export_checkpoint(tmp_path / "b", step=3)
    assert path.name == "params_3"
    mid = velo_scale.load_weights(path)
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(mid), jax.tree.leaves(exported))
    )
    with pytest.raises(ValueError, match="no complete checkpoint for step 9"):
        train_lib.export_checkpoint(tmp_path / "b", step=9)
    with pytest.raises(ValueError, match="factory"):
        train_lib.meta_train(**_meta_kw(tasks=[_task()], resample_every=2))


def test_pes_meta_train_checkpoints_its_states_and_resumes_exactly(tmp_path):
    """With truncation_length the PES states persist across outer steps and
    are checkpointed: stopping half-way through an unroll (t = 2 of 4) and
    resuming gives the same theta as the straight run."""
    from velo_scale.meta.train import meta_train

    kw = _meta_kw(tasks=[_task()], truncation_length=2)
    straight = meta_train(workdir=tmp_path / "a", **kw)
    assert straight.pes is not None and int(straight.pes[0].t) == 0
    stopped = meta_train(workdir=tmp_path / "b", stop_after=3, **kw)
    assert int(stopped.pes[0].t) == 2  # mid-unroll
    resumed = meta_train(workdir=tmp_path / "b", **kw)
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _assert_moved(straight.theta)
    with pytest.raises(ValueError, match="divide every unroll"):
        meta_train(**_meta_kw(tasks=[_task()], truncation_length=3))


def test_search_lr_mult_keeps_the_lowest_mean_log_meta_loss():
    from velo_scale.meta import search_lr_mult

    arch = velo_scale.Architecture(**SMALL)
    best, losses = search_lr_mult(
        [_task(), _scaled_task(2.0)],
        architecture=arch,
        candidates=(0.0, 30.0, 1e7),
        num_steps=10,
        last_k=2,
        key=jax.random.PRNGKey(0),
        log=None,
    )
    assert set(losses) == {0.0, 30.0, 1e7} and all(len(v) == 2 for v in losses.values())
    scores = {c: np.mean(np.log(v)) for c, v in losses.items()}
    assert best == min(scores, key=scores.get)
    # lr_mult 0 does not train; 1e7 diverges (counted as 1e3) or explodes.
    assert best == 30.0
    assert losses[30.0][0] < losses[0.0][0]


def test_cosine_start_wires_the_lstm_to_the_schedule():
    """The cosine start's lr_mult, read from VeLO's own per-tensor network
    for tensors with different statistics, follows the cosine schedule over
    the fraction of training, and VeLO runs with it."""
    from velo_scale._src import tensor_net
    from velo_scale.meta import normalised_momentum_theta

    arch = velo_scale.Architecture(lstm_hidden_size=16, param_inits=4)
    theta = normalised_momentum_theta(
        jax.random.PRNGKey(0), arch, lr_mult=40.0, schedule="cosine"
    )
    rng = np.random.default_rng(0)
    for x in np.linspace(0, 1, 11):
        feats = rng.normal(size=(3, 30)).astype(np.float32)  # 3 tensors
        feats[:, :9] = np.asarray(tensor_net.fraction_embedding(jnp.float32(x)))
        zeros = jnp.zeros((3, 16))
        _, lr, _, _ = tensor_net.apply(
            theta["rnn_params"], jnp.asarray(feats), zeros, zeros
        )
        want = 40.0 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * x)))
        np.testing.assert_allclose(np.asarray(lr), want, atol=0.06 * 40.0)
    loss = jax.jit(lambda t: meta_loss(t, _task(), jax.random.PRNGKey(0), CONFIG))(
        theta
    )
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="schedule"):
        normalised_momentum_theta(jax.random.PRNGKey(0), arch, schedule="linear")


@pytest.mark.slow  # CI runs the batched path in the resampling / compile-once tests
def test_tasks_of_one_configuration_are_vmapped_and_equal_separate_estimates():
    """Two tasks that differ only in init scale run as one vmapped batch;
    the outer step equals Adam on the mean of their separately computed,
    normalised ES estimates (with the keys meta_train draws)."""
    import optax

    from velo_scale.meta import normalised_momentum_theta
    from velo_scale.meta import train as train_lib
    from velo_scale.meta.es import normalise

    tasks = [_scaled_task(0.5), _scaled_task(2.0)]
    # The normalised-momentum start trains the tasks, so the loss differences
    # of the pairs are far above rounding (a random theta barely moves them).
    kw = _meta_kw(tasks=tasks, num_outer_steps=1, learning_rate=1e-3,
                  init_theta="normalised_momentum")  # fmt: skip
    train_lib.clear_compiled()
    train_lib.TRACES.clear()
    got = train_lib.meta_train(**kw)
    assert sum(train_lib.TRACES.values()) == 1
    init_key, key = jax.random.split(jax.random.PRNGKey(0))
    theta = normalised_momentum_theta(init_key, velo_scale.Architecture(**SMALL))
    _, _, *task_keys = jax.random.split(key, len(tasks) + 2)
    config = ESConfig(num_pairs=8, sigma=0.01, num_steps=4, last_k=2)
    grads = [
        normalise(
            jax.jit(lambda t, k, task=task: es_gradient(t, task, k, config)[0])(
                theta, k
            )
        )
        for task, k in zip(tasks, task_keys)
    ]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    adam = optax.adam(1e-3)
    updates, _ = adam.update(mean, adam.init(theta), theta)
    want = optax.apply_updates(theta, updates)
    # Adam's first step is lr * sign(grad). ES divides loss differences by
    # 2 sigma^2, so rounding differences between the sharded, vmapped run and
    # these separate ones flip the sign of near-zero components; every large
    # component must agree, and most components do (other keys or tasks
    # would agree on about half).
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(mean))
    same, total = 0, 0
    for x, y, g in zip(
        jax.tree.leaves(want), jax.tree.leaves(got.theta), jax.tree.leaves(mean)
    ):
        x, y, g = np.asarray(x), np.asarray(y), np.abs(np.asarray(g))
        close = np.isclose(x, y, rtol=1e-4, atol=1e-6)
        assert close[g > 0.05 * scale].all()
        same, total = same + close.sum(), total + close.size
    assert same / total > 0.9, same / total
