"""The one-pass tensor-wide sums of VeLO's phase A (`_src/reductions.py`):
equal to `jnp.sum`, partitioned without gathering a sharded tensor, batched
under vmap, and the CPU step they give has no parameter-sized temporaries."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import velo_scale
from velo_scale._src import reductions


def _arrays(shape, seed=0):
    x = np.random.RandomState(seed).randn(*shape).astype(np.float32)
    return [x * x, x, np.abs(x) + 1.0]


def _exact(xs):
    return np.array([np.sum(x.astype(np.float64)) for x in xs])


@pytest.mark.parametrize(
    "shape", [(1024, 1024), (7,), (4096,), (50_000,), (50_021,), (4, 3, 5, 7), (300, 1)]
)
def test_one_pass_sums_equal_float64_sums(shape):
    xs = _arrays(shape)
    got = np.asarray(jax.jit(lambda *a: jnp.stack(reductions.sums(list(a))))(*xs))
    # The first two are sums of positives, the third has cancellation: compare
    # against the sum of magnitudes.
    scale = np.array([np.sum(np.abs(x.astype(np.float64))) for x in xs])
    np.testing.assert_array_less(np.abs(got - _exact(xs)) / scale, 2e-5)
    plain = np.array([np.sum(x) for x in xs])
    np.testing.assert_allclose(got, plain, rtol=2e-5, atol=1e-6 * scale.max())


_NEEDS_ONE_PASS = pytest.mark.skipif(
    not reductions.ONE_PASS_SUPPORTED,
    reason="this jax's custom_partitioning takes no Shardy rule (plain sums)",
)


@_NEEDS_ONE_PASS
def test_cpu_path_is_one_variadic_reduction():
    xs = [jax.ShapeDtypeStruct((256, 512), jnp.float32)] * 3
    hlo = jax.jit(lambda *a: reductions.sums(list(a))).lower(*xs).compile().as_text()
    # One reduction with three outputs, the row sums (then the small sums of
    # the rows), not three reductions over [256, 512].
    assert re.search(
        r"= \(f32\[256\]\{0\}, f32\[256\]\{0\}, f32\[256\]\{0\}\) reduce\(", hlo
    )
    assert not re.search(r"= f32\[\] reduce\(\S+ f32\[256,512\]", hlo)


@pytest.mark.parametrize(
    "shape,spec",
    [
        ((64, 1024), P(None, ("data", "model"))),
        ((64, 1024), P("data", "model")),
        ((1024, 64), P(("data", "model"), None)),
        ((8192,), P(("data", "model"))),
        ((1024,), P("model")),
        ((64, 1024), P()),
    ],
)
def test_sharded_sums_are_partitioned(shape, spec):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    xs = _arrays(shape, seed=1)
    sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]
    fn = jax.jit(lambda *a: jnp.stack(reductions.sums(list(a))))
    compiled = fn.lower(*sharded).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    if spec != P():
        assert "all-reduce" in hlo
    scale = np.array([np.sum(np.abs(x.astype(np.float64))) for x in xs])
    np.testing.assert_array_less(
        np.abs(np.asarray(compiled(*sharded)) - _exact(xs)) / scale, 2e-5
    )


def test_sums_under_vmap():
    xs = [np.stack([a, 2 * a]) for a in _arrays((32, 128), seed=2)]
    got = jax.jit(jax.vmap(lambda *a: jnp.stack(reductions.sums(list(a)))))(*xs)
    want = np.stack([_exact([x[b] for x in xs]) for b in range(2)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # One operand batched, the others not.
    got = jax.vmap(lambda a, b: jnp.stack(reductions.sums([a, b])), in_axes=(0, None))(
        xs[0], xs[1][0]
    )
    np.testing.assert_allclose(
        np.asarray(got[:, 1]), np.full(2, np.sum(xs[1][0])), rtol=1e-5
    )


@_NEEDS_ONE_PASS
def test_cpu_update_keeps_no_parameter_sized_temporaries():
    # Phase A's sums read their inputs in one pass and phase C recomputes its
    # inputs behind a barrier: XLA:CPU's temporary buffer then holds about
    # one parameter-sized array (the update before the non-finite check),
    # where before it held ~12 (48 B/param).
    shapes = {"w0": (512, 512), "w1": (512, 512), "b0": (512,), "b1": (512,)}
    params = {k: jnp.full(s, 0.01, jnp.float32) for k, s in shapes.items()}
    tx = velo_scale.velo(
        num_steps=100,
        weights=velo_scale.init_weights(
            jax.random.PRNGKey(0), velo_scale.Architecture()
        ),
    )
    state = tx.init(params)
    compiled = (
        jax.jit(lambda g, s, p: tx.update(g, s, p, loss=jnp.float32(1.0)))
        .lower(params, state, params)
        .compile()
    )
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert compiled.memory_analysis().temp_size_in_bytes / n <= 8.0


def _phase_a_inputs(shape, seed=3):
    from velo_scale._src import accumulators, param_net

    rng = np.random.RandomState(seed)
    p = jnp.asarray(rng.randn(*shape), jnp.float32)
    g = jnp.asarray(rng.randn(*shape) * 0.1, jnp.float32)
    acc = param_net.Accumulators(*accumulators.init_all(jnp.zeros_like(p)))
    # A few steps so that every accumulator (factored or diagonal) is nonzero.
    for _ in range(3):
        acc = param_net.update_accumulators(g, acc)
    return p, g, acc


@pytest.mark.parametrize("shape", [(48, 80), (6, 5, 16), (200,), (1,)])
def test_channel_mean_squares_cpu_form_equals_per_channel_form(shape):
    # The CPU and GPU form reduces the small channels of one shape stacked
    # and assembles one vector; XLA:TPU takes one mean per channel.
    from velo_scale._src import param_net

    p, g, acc = _phase_a_inputs(shape)
    chans = param_net.feature_channels(p, g, acc)
    stacked = jax.jit(lambda *c: param_net._mean_squares_stacked(*c))(*chans)
    each = jax.jit(lambda *c: param_net._mean_squares_each(*c))(*chans)
    want = [np.mean(np.square(np.asarray(c, np.float64))) for c in chans]
    assert stacked.shape == (30,)
    np.testing.assert_allclose(np.asarray(stacked), want, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(stacked), np.asarray(each), rtol=2e-6)


@_NEEDS_ONE_PASS
def test_cpu_phase_a_is_a_few_kernels_per_tensor():
    # XLA:CPU compiles every fusion separately: phase A of one factored
    # tensor was ~80 of them (a reduction and a division per channel mean),
    # now the sums and the per-tensor arithmetic stay vectors.
    from velo_scale._src import param_net, tensor_net

    def phase_a(p, g, acc):
        new = param_net.update_accumulators(g, acc)
        return (
            tensor_net.tensor_statistics(p, acc.m, acc.v),
            param_net.channel_mean_squares(p, g, new),
        )

    p, g, acc = _phase_a_inputs((320, 1280))
    hlo = jax.jit(phase_a).lower(p, g, acc).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    assert len(re.findall(r" fusion\(", entry)) <= 35


def _passes_reading(hlo: str, shape: str) -> int:
    """How many kernels of the compiled entry read an entry parameter of
    `shape` (e.g. "f32[320,1280,3]")."""
    entry = hlo[hlo.index("\nENTRY") :]
    params = re.findall(r"%([\w.-]+) = " + re.escape(shape) + r"\{[\d,]*\} parameter", entry)
    assert params, f"no parameter of {shape}"
    kernels = [
        line for line in entry.splitlines() if " fusion(" in line or " reduce(" in line
    ]
    return sum(
        any(re.search(rf"%{re.escape(p)}\b[,)]", line) for p in params) for line in kernels
    )


@_NEEDS_ONE_PASS
@pytest.mark.parametrize("shape", [(320, 1280), (6, 5, 16), (200,), (1,)])
def test_cpu_phase_a_merged_is_the_same_sums_in_two_passes(shape):
    # On CPU, velo_step's phase A sums the LSTM statistics' centred sums and
    # the channels' sums of squares in one reduction: the same values, bit
    # for bit, and the momentum is read twice per step, not three times.
    from velo_scale._src import param_net
    from velo_scale._src import velo as velo_lib

    p, g, acc = _phase_a_inputs(shape)
    new = param_net.update_accumulators(g, acc)
    merged = jax.jit(velo_lib._phase_a_sums_merged)
    apart = jax.jit(velo_lib._phase_a_sums)
    for x, y in zip(merged(p, g, acc, new), apart(p, g, acc, new)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if shape == (320, 1280):

        def phase_a(sums, p, g, acc):
            return sums(p, g, acc, param_net.update_accumulators(g, acc))

        m_shape = "f32[320,1280,3]"
        for sums, passes in ((velo_lib._phase_a_sums_merged, 2), (velo_lib._phase_a_sums, 3)):
            hlo = jax.jit(phase_a, static_argnums=0).lower(sums, p, g, acc).compile().as_text()
            assert _passes_reading(hlo, m_shape) == passes


@pytest.mark.parametrize(
    "shape", [(1024, 1024), (7,), (300, 1), (4, 3, 5, 7), (70_000,), (65_536,)]
)
def test_gpu_sums_equal_float64_sums(shape):
    # The GPU form (run here on CPU): small arrays as one stacked reduction,
    # large ones as the one-pass variadic reduction.
    xs = _arrays(shape)
    got = np.asarray(jax.jit(lambda *a: reductions._sums_gpu(list(a)))(*xs))
    scale = np.array([np.sum(np.abs(x.astype(np.float64))) for x in xs])
    assert got.shape == (3,)
    np.testing.assert_array_less(np.abs(got - _exact(xs)) / scale, 2e-5)


@pytest.mark.parametrize("big", [False, True])
def test_gpu_sums_of_sharded_arrays_gather_nothing(big):
    shape = (1024, 512) if big else (64, 32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    sharding = NamedSharding(mesh, P("fsdp", "tensor"))
    xs = [jax.device_put(x, sharding) for x in _arrays(shape)]
    fn = jax.jit(lambda *a: reductions._sums_gpu(list(a)))
    hlo = fn.lower(*xs).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    scale = np.array([np.sum(np.abs(np.asarray(x, np.float64))) for x in xs])
    err = np.abs(np.asarray(fn(*xs)) - _exact([np.asarray(x) for x in xs])) / scale
    np.testing.assert_array_less(err, 2e-5)


def _with(x, index, value):
    x = np.array(x)
    x.reshape(-1)[index] = value
    return x


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
@pytest.mark.parametrize("where", [0, 1, 2, 3])
def test_gpu_finite_check_flags_every_nonfinite_leaf(bad, where):
    # `x * 0` summed (the GPU form) is finite exactly when every element
    # is: finite extremes give no false alarm, one bad element anywhere in
    # any leaf (large, small, bf16, of a shape shared with another) is seen.
    from velo_scale._src import velo as velo_lib

    rng = np.random.RandomState(where)
    f32max = np.finfo(np.float32).max
    leaves = [
        rng.uniform(-1, 1, (512, 300)).astype(np.float32) * f32max,
        np.full((7,), f32max, np.float32),
        jnp.asarray(rng.randn(64, 3), jnp.bfloat16),
        rng.randn(7).astype(np.float32),
    ]
    leaves[0][0, 0] = -f32max
    if bad is not None:
        size = int(np.prod(leaves[where].shape))
        leaves[where] = _with(np.asarray(leaves[where], np.float32), size // 2 + 1, bad)
        if where == 2:
            leaves[2] = jnp.asarray(leaves[2], jnp.bfloat16)
    got = bool(jax.jit(lambda *a: velo_lib._all_finite_summed(*a))(*leaves))
    assert got == (bad is None)
    if bad is None:  # a finite float64 beyond float32's range is finite
        with jax.enable_x64(True):
            big = jnp.full((3,), 1e300, jnp.float64)
            assert bool(jax.jit(velo_lib._all_finite_summed)(big))
    assert got == bool(jax.jit(lambda *a: velo_lib._all_finite_each(*a))(*leaves))
