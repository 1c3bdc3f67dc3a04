"""VeLO on a 2x4 mesh of fake CPU devices: state sharding derived from the
params, partitioned computation, and the collectives in the compiled update."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import velo_scale
from tests.reference_data import Case, flat

# No all-reduce may carry more than this many elements (independent of the
# parameters' size: per-tensor statistics and factored row/column sums).
MAX_ALL_REDUCE_ELEMENTS = 64 * 1024


def _mesh(axis_type=AxisType.Auto):
    if len(jax.devices()) < 8:
        pytest.fail(
            "sharding tests need 8 devices: XLA_FLAGS is set in tests/conftest.py"
        )
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    return Mesh(devices, ("data", "model"), axis_types=(axis_type,) * 2)


def _transformer_tree(d=64, heads=4, layers=2, vocab=96):
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))

    def normal(shape, scale=0.05):
        return scale * jax.random.normal(next(keys), shape)

    tree = {"embed": normal((vocab, d)), "final_norm": jnp.ones((d,))}
    for i in range(layers):
        tree[f"layer{i}"] = {
            "qkv": normal((d, 3, heads, d // heads)),
            "out": normal((heads, d // heads, d)),
            "mlp_in": normal((d, 4 * d)),
            "mlp_in_bias": jnp.zeros((4 * d,)),
            "mlp_out": normal((4 * d, d)),
            "norm": jnp.ones((d,)),
        }
    return tree


def _layout(name, params):
    """Partition specs for a named layout of the transformer-like tree."""

    def spec(path, x):
        path = jax.tree_util.keystr(path)
        if name == "replicated" or x.ndim == 0:
            return P()
        if name == "fsdp":  # largest axis over all devices
            axis = int(np.argmax(x.shape))
            entries = [None] * x.ndim
            entries[axis] = ("data", "model")
            return P(*entries)
        if name == "tensor_parallel":  # model axis on one dim, data replicated
            if "embed" in path or "mlp_out" in path or "'out'" in path:
                return P("model", *([None] * (x.ndim - 1)))
            return P(*([None] * (x.ndim - 1)), "model")
        if name == "mixed":  # FSDP on data + tensor parallel on model
            if x.ndim == 1:
                return P("model")
            entries = [None] * x.ndim
            entries[0], entries[-1] = "data", "model"
            return P(*entries)
        raise ValueError(name)

    return jax.tree_util.tree_map_with_path(spec, params)


def _put(tree, specs, mesh):
    return jax.tree_util.tree_map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs
    )


def _grads(params, seed):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


def _collectives(hlo: str) -> dict[str, list[int]]:
    """Element counts of every collective in compiled HLO text, by kind."""
    out = {}
    for kind in (
        "all-gather",
        "all-to-all",
        "collective-permute",
        "all-reduce",
        "reduce-scatter",
    ):
        sizes = []
        for m in re.finditer(rf"= (\(.*?\)|\S+) {kind}(?:-start)?\(", hlo):
            shapes = re.findall(r"\[([0-9,]*)\]", m.group(1))
            sizes += [
                int(np.prod([int(d) for d in s.split(",") if d] or [1])) for s in shapes
            ]
        out[kind] = sizes
    return out


@pytest.fixture(scope="module")
def tx(theta):
    return velo_scale.velo(100, weights=theta)


def _loss(k: int) -> jax.Array:
    return jnp.float32(3.0 - 0.3 * k)


@pytest.fixture(scope="module")
def unsharded_run(tx):
    """Params and state after 3 unsharded updates of `_transformer_tree`
    (gradients `_grads(params, k)`, loss `_loss(k)`): the reference every
    layout is compared with, compiled once for all of them."""
    update = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))
    params = _transformer_tree()
    state = tx.init(params)
    for k in range(3):
        updates, state = update(_grads(params, k), state, params, _loss(k))
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize(
    "layout",
    [
        # Nothing sharded: the unsharded reference itself, up to the mesh.
        pytest.param("replicated", marks=pytest.mark.slow),
        "fsdp",
        "tensor_parallel",
        "mixed",
    ],
)
def test_sharded_equals_unsharded_and_keeps_shardings(tx, unsharded_run, layout):
    mesh = _mesh()
    params = _transformer_tree()
    specs = _layout(layout, params)
    shardings = velo_scale.state_shardings(tx, params, mesh, specs)
    param_shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)

    sharded_params = _put(params, specs, mesh)
    state = jax.jit(tx.init, out_shardings=shardings)(sharded_params)
    update = jax.jit(
        lambda g, s, p, loss: tx.update(g, s, p, loss=loss),
        out_shardings=(param_shardings, shardings),
    )
    compiled = update.lower(
        _put(_grads(params, 0), specs, mesh), state, sharded_params, jnp.float32(0)
    ).compile()
    for k in range(3):
        grads = _put(_grads(params, k), specs, mesh)
        updates, state = compiled(grads, state, sharded_params, _loss(k))
        sharded_params = optax.apply_updates(sharded_params, updates)
    ref_params, ref_state = unsharded_run

    for a, b in zip(
        jax.tree_util.tree_leaves(sharded_params), jax.tree_util.tree_leaves(ref_params)
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state)
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)
    # Shardings survive init -> update -> jit.
    for s, expected in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)
    ):
        assert s.sharding.is_equivalent_to(expected, s.ndim), (s.sharding, expected)
    for u, expected in zip(
        jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(param_shardings)
    ):
        assert u.sharding.is_equivalent_to(expected, u.ndim)

    collectives = _collectives(compiled.as_text())
    for kind in ("all-gather", "all-to-all", "collective-permute"):
        assert not collectives[kind], f"{layout}: {kind} {collectives[kind]}"
    assert max(collectives["all-reduce"] + [0]) <= MAX_ALL_REDUCE_ELEMENTS
    if layout != "replicated":
        assert collectives["all-reduce"], "sharded tensors need per-tensor all-reduces"


def test_accumulators_follow_their_parameter(tx):
    params = {
        "w": jnp.ones((16, 32)),
        "conv": jnp.ones((3, 3, 8, 16)),
        "b": jnp.ones((32,)),
    }
    specs = {
        "w": P("data", "model"),
        "conv": P(None, None, "data", "model"),
        "b": P("model"),
    }
    out = velo_scale.state_partition_specs(tx, params, specs)
    assert out.momentum["w"] == P("data", "model", None)
    assert out.rms["conv"] == P(None, None, "data", "model", None)
    # w (16, 32): factored over (d1, d0) = (0, 1); v_row drops axis 1, v_col axis 0.
    assert out.factored.v_row["w"] == P("data", None)
    assert out.factored.v_col["w"] == P("model", None)
    assert out.factored.v_diag["w"] is None  # unused slot
    # conv (3, 3, 8, 16): factored over (2, 3).
    assert out.factored.v_row["conv"] == P(None, None, "data", None)
    assert out.factored.v_col["conv"] == P(None, None, "model", None)
    assert out.factored.v_diag["b"] == P("model", None)
    assert out.factored.v_row["b"] is None
    for replicated in (
        out.lstm_hidden,
        out.lstm_cell,
        out.iteration,
        out.loss_buffer.means,
    ):
        assert replicated == P()


def test_chain_and_accumulation_states(theta):
    params = {"w": jnp.ones((16, 32))}
    specs = {"w": P("data", "model")}
    tx = optax.chain(
        optax.scale_by_adam(),
        velo_scale.velo(1000, weights=theta, max_training_steps=400),
    )
    adam_specs, velo_specs = velo_scale.state_partition_specs(tx, params, specs)
    assert adam_specs.mu["w"] == P("data", "model")  # other optax states: like params
    assert adam_specs.count == P()
    assert velo_specs.accumulation.grad_sum["w"] == P("data", "model")
    assert velo_specs.accumulation.loss_sum == P()


@pytest.mark.parametrize("name", ["mlp", "shapes"])
def test_golden_cases_sharded(theta, name):
    """The reference trajectories, run with every divisible axis sharded."""
    case = Case(name)
    mesh = _mesh()
    params = case.params(0)

    def spec(x):
        entries = [None] * x.ndim
        if x.ndim and x.shape[-1] % 4 == 0:
            entries[-1] = "model"
        if x.ndim > 1 and x.shape[0] % 2 == 0:
            entries[0] = "data"
        return P(*entries)

    specs = jax.tree_util.tree_map(spec, params)
    tx = velo_scale.velo(case.num_steps, weights=theta)
    shardings = velo_scale.state_shardings(tx, params, mesh, specs)
    state = jax.jit(tx.init, out_shardings=shardings)(_put(params, specs, mesh))
    update = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))
    params = _put(params, specs, mesh)
    for k in range(1, case.steps + 1):
        grads = _put(case.grads(k), specs, mesh)
        updates, state = update(grads, state, params, np.float32(case.losses[k - 1]))
        params = optax.apply_updates(params, updates)
        ours = flat(params)
        for leaf in case.order:
            np.testing.assert_allclose(
                ours[leaf], case[f"step{k}/params/{leaf}"], rtol=1e-5, atol=1e-6
            )


def test_explicit_axis_types(tx):
    mesh = _mesh(AxisType.Explicit)
    params = {"w": jnp.ones((16, 32)) * 0.1, "b": jnp.zeros((32,))}
    specs = {"w": P("data", "model"), "b": P("model")}
    shardings = velo_scale.state_shardings(tx, params, mesh, specs)
    with jax.set_mesh(mesh):
        sharded = _put(params, specs, mesh)
        state = jax.jit(tx.init, out_shardings=shardings)(sharded)
        updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=1.0))(
            sharded, state, sharded
        )
    ref, _ = tx.update(params, tx.init(params), params, loss=1.0)
    np.testing.assert_allclose(
        np.asarray(updates["w"]), np.asarray(ref["w"]), rtol=1e-5, atol=1e-7
    )
    assert state.momentum["w"].sharding.spec == P("data", "model", None)


def test_specs_from_sharded_arrays(tx):
    mesh = _mesh()
    params = _put({"w": jnp.ones((16, 32))}, {"w": P("model", "data")}, mesh)
    out = velo_scale.state_partition_specs(tx, params)
    assert out.momentum["w"] == P("model", "data", None)


def test_flax_logical_axes(tx):
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            )
            return nn.Dense(32, kernel_init=init)(x)

    boxed = Mlp().init(jax.random.PRNGKey(0), jnp.ones((1, 16)))
    rules = (("embed", "data"), ("mlp", "model"))
    shardings = velo_scale.state_shardings(tx, boxed, _mesh(), logical_axis_rules=rules)
    kernel = shardings.momentum["params"]["Dense_0"]["kernel"]
    assert kernel.spec == P("data", "model", None)
    assert shardings.momentum["params"]["Dense_0"]["bias"].spec == P(None, None)


def test_bad_specs_name_the_parameter(tx):
    params = {"enc": {"w": jnp.ones((16, 32))}, "b": jnp.ones((10,))}
    with pytest.raises(velo_scale.ShardingError, match="enc/w has 2 axes"):
        velo_scale.state_partition_specs(
            tx, params, {"enc": {"w": P("data", "model", None)}, "b": P()}
        )
    with pytest.raises(
        velo_scale.ShardingError, match="enc/w: mesh axis 'data' is used twice"
    ):
        velo_scale.state_partition_specs(
            tx, params, {"enc": {"w": P("data", "data")}, "b": P()}
        )
    mesh = _mesh()
    with pytest.raises(velo_scale.ShardingError, match="enc/w.*'pipeline'"):
        velo_scale.state_shardings(
            tx, params, mesh, {"enc": {"w": P("pipeline")}, "b": P()}
        )
    # Indivisible: 10 elements over the 4-way model axis.
    specs = {"enc": {"w": P()}, "b": P("model")}
    with pytest.raises(
        velo_scale.ShardingError, match=r"parameter b \(shape \(10,\)\).*4 ways"
    ):
        velo_scale.state_shardings(tx, params, mesh, specs)
    relaxed = velo_scale.state_shardings(
        tx, params, mesh, specs, replicate_indivisible=True
    )
    assert relaxed.momentum["b"].spec == P(None, None)


def test_readme_sharded_example(theta, monkeypatch):
    """The README's sharded example runs as written (8 fake devices)."""
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Sharded training", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    real_velo = velo_scale.velo
    env = {
        "jax": jax,
        "np": np,
        "nn": nn,
        "velo_scale": velo_scale,
        "init": nn.initializers.lecun_normal(),
        "key": jax.random.PRNGKey(0),
        "x": jnp.ones((2, 64)),
    }
    monkeypatch.setattr(
        velo_scale,
        "velo",
        lambda num_steps, **kw: real_velo(num_steps, weights=theta, **kw),
    )
    exec(compile(code, "README.md", "exec"), env)
    params, opt_state, step = env["params"], env["opt_state"], env["step"]
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, opt_state = step(grads, opt_state, params, 1.0)
    kernel_state = opt_state.momentum["params"]["kernel"]
    assert kernel_state.sharding.spec == P("data", "model", None)
    assert updates["params"]["kernel"].sharding.spec == P("data", "model")


def _fsdp_tp_tree(d=256, mlp=1024, heads=4, head_dim=128, vocab=512, layers=2):
    """A T5X/MaxText-like tree and its FSDP x TP specs (embed on 'data', mlp /
    heads / vocab on 'model'), every matrix at least 16K elements per device."""
    shapes = {"embed": ((vocab, d), P("model", "data")), "norm": ((d,), P("data"))}
    for i in range(layers):
        shapes |= {
            f"l{i}/qkv": ((d, 3, heads, head_dim), P("data", None, "model")),
            f"l{i}/out": ((heads, head_dim, d), P("model", None, "data")),
            f"l{i}/wi": ((d, mlp), P("data", "model")),
            f"l{i}/wo": ((mlp, d), P("model", "data")),
            f"l{i}/norm": ((d,), P("data")),
        }
    params = {n: jnp.full(s, 0.01) for n, (s, _) in shapes.items()}
    return params, {n: spec for n, (_, spec) in shapes.items()}


def test_fsdp_tp_update_has_only_small_all_reduces(tx):
    """Issue 13 item 3, on the CPU mesh: the donated, jitted VeLO step with
    params FSDP x TP sharded communicates only per-tensor statistics and the
    factored row/column sums; nothing parameter-sized ever crosses devices.

    The bound: a factored accumulator's row (or column) sum over a sharded
    axis is an all-reduce of its v_row/v_col shard, here at most 256 rows x 3
    decays = 768 elements (the code at 4b07bfb: 14 of 128-384 elements, the
    rest 1-6); per-tensor statistics are a few floats per tensor (all
    tensors' 30 channels in one all-reduce would be 360). Every sharded
    matrix holds >= 16,384 elements per device, so 4096 is 4x below any
    parameter shard and >= 32x below any whole matrix: a parameter-sized
    all-reduce (e.g. a replicated update) fails.
    """
    _check_only_small_all_reduces(tx, _mesh(), *_fsdp_tp_tree())


def _check_only_small_all_reduces(tx, mesh, params, specs):
    """Compiles the donated step; asserts its collectives; returns it."""
    param_sh = {n: NamedSharding(mesh, s) for n, s in specs.items()}
    state_sh = velo_scale.state_shardings(tx, params, mesh, specs)
    min_shard = min(
        int(np.prod(param_sh[n].shard_shape(x.shape)))
        for n, x in params.items()
        if x.ndim > 1
    )
    assert min_shard >= 16_384

    def step(p, s, g, loss):
        updates, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, updates), s

    def abstract(tree, shardings):
        return jax.tree_util.tree_map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            tree,
            shardings,
        )

    p = abstract(params, param_sh)
    s = abstract(jax.eval_shape(tx.init, params), state_sh)
    compiled = (
        jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_sh, state_sh))
        .lower(p, s, p, jax.ShapeDtypeStruct((), jnp.float32))
        .compile()
    )
    collectives = _collectives(compiled.as_text())
    for kind in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        assert not collectives[kind], f"{kind}: {collectives[kind]}"
    assert collectives["all-reduce"], "sharded tensors need per-tensor all-reduces"
    assert max(collectives["all-reduce"]) <= 4096, sorted(collectives["all-reduce"])
    assert 4 * max(collectives["all-reduce"]) <= min_shard
    return compiled, param_sh, state_sh


def test_pallas_fsdp_tp_update_has_only_small_all_reduces(theta):
    """The same for `implementation="pallas"` (kernels in Pallas' interpreter,
    per tensor inside `shard_map`, each device on its block): only the
    per-tensor sums are all-reduced. The sharded step also gives the
    unsharded XLA path's numbers (the parity tolerances)."""
    from tests.test_parity import TOL

    mesh = _mesh()
    params, specs = _fsdp_tp_tree(layers=1)
    rng = np.random.default_rng(0)
    params = {n: jnp.asarray(0.05 * rng.normal(size=x.shape), jnp.float32)
              for n, x in params.items()}  # fmt: skip
    grads = {n: jnp.asarray(0.01 * rng.normal(size=x.shape), jnp.float32)
             for n, x in params.items()}  # fmt: skip
    tx = velo_scale.velo(
        100, weights=theta, implementation="pallas", pallas_interpret=True,
        mesh=mesh, param_specs=specs,
    )  # fmt: skip
    compiled, param_sh, state_sh = _check_only_small_all_reduces(tx, mesh, params, specs)

    ref_tx = velo_scale.velo(100, weights=theta)
    state = ref_tx.init(params)
    ref_u, ref_s = jax.jit(lambda g, s, p: ref_tx.update(g, s, p, loss=jnp.float32(1.0)))(
        grads, state, params
    )
    ref_p = optax.apply_updates(params, ref_u)
    got_p, got_s = compiled(
        jax.device_put(params, param_sh),
        jax.device_put(state, state_sh),
        jax.device_put(grads, param_sh),
        jnp.float32(1.0),
    )
    for n in params:
        assert got_p[n].sharding.spec == param_sh[n].spec, n
        np.testing.assert_allclose(got_p[n], ref_p[n], **TOL["params"], err_msg=n)
        np.testing.assert_allclose(
            got_s.momentum[n], ref_s.momentum[n], **TOL["mom"], err_msg=n
        )
        np.testing.assert_allclose(got_s.rms[n], ref_s.rms[n], **TOL["rms"], err_msg=n)
    for a, b in zip(
        jax.tree_util.tree_leaves(got_s.factored), jax.tree_util.tree_leaves(ref_s.factored)
    ):
        np.testing.assert_allclose(a, b, **TOL["fac"])
    np.testing.assert_allclose(got_s.lstm_hidden, ref_s.lstm_hidden, **TOL["lstm"])
