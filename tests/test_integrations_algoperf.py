"""The AlgoPerf submission on 8 fake CPU devices, with a duck-typed workload.

A tiny MLP on scikit-learn's digits (real data) stands in for an AlgoPerf
workload: `step_hint`, `init_model_fn`, `model_fn`, `loss_fn`,
`param_shapes`, as `algoperf/spec.py` defines them. The test that needs the
real `algoperf` package skips without it.
"""

import collections
import inspect
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.reference_data import CHECKPOINT
from velo_scale.integrations.algoperf import submission

SEARCH_SPACE = pathlib.Path(submission.__file__).parent / "tuning_search_space.json"
BATCH = 64


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(256)(x))  # kernel (64, 256): state sharded
        return nn.Dense(10)(x)  # kernel (256, 10): small, replicated


class DigitsWorkload:
    """Duck-typed AlgoPerf workload (the attributes the submission uses)."""

    metrics_logger = None

    def __init__(self, step_hint=1000):
        self.step_hint = step_hint
        self._model = _MLP()
        self._param_shapes = None

    @property
    def param_shapes(self):
        return self._param_shapes

    def init_model_fn(self, rng):
        params = self._model.init(rng, jnp.zeros((1, 8, 8, 1)))["params"]
        self._param_shapes = jax.tree_util.tree_map(jnp.shape, params)
        return params, None

    def model_fn(
        self, params, batch, model_state, mode, rng, update_batch_norm, dropout_rate
    ):
        del mode, rng, update_batch_norm, dropout_rate
        return self._model.apply({"params": params}, batch["inputs"]), model_state

    def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
        targets = optax.smooth_labels(jax.nn.one_hot(label_batch, 10), label_smoothing)
        per_example = optax.softmax_cross_entropy(logits_batch, targets)
        if mask_batch is not None:
            per_example = per_example * mask_batch
            n_valid = mask_batch.sum()
        else:
            n_valid = len(per_example)
        return {
            "summed": per_example.sum(),
            "n_valid_examples": n_valid,
            "per_example": per_example,
        }


@pytest.fixture(scope="module")
def batches():
    from velo_scale.data import load_dataset

    data = load_dataset("digits", "train")
    mesh = submission.algoperf_mesh()
    sharding = NamedSharding(mesh, P(submission.BATCH_AXIS))
    out = []
    for i in range(4):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        batch = {"inputs": data["image"][sl], "targets": data["label"][sl]}
        out.append(jax.device_put(batch, sharding))
    return out


@pytest.fixture
def weights_env(monkeypatch):
    monkeypatch.setenv("VELO_SCALE_WEIGHTS", str(CHECKPOINT))


def _run(workload, batches, optimizer_state, params, model_state, steps):
    for step in range(steps):
        optimizer_state, params, model_state = submission.update_params(
            workload=workload,
            current_param_container=params,
            current_params_types=None,
            model_state=model_state,
            hyperparameters=None,
            batch=batches[step],
            loss_type=None,
            optimizer_state=optimizer_state,
            eval_results=[],
            global_step=step,
            rng=jax.random.PRNGKey(step),
        )
    return optimizer_state, params, model_state


def _copy(tree):
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def test_helpers():
    assert submission.velo_num_steps(52_000) == 52_000
    with pytest.raises(ValueError, match="step_hint"):
        submission.velo_num_steps(0)
    hints = {"imagenet_resnet": 195_999, "imagenet_vit": 167_999, "wmt": 120_000}
    assert {k: submission.accumulation_steps(v) for k, v in hints.items()} == {
        "imagenet_resnet": 2,
        "imagenet_vit": 2,
        "wmt": 1,
    }
    assert submission.batch_size_for("ogbg") == 512
    assert submission.batch_size_for("imagenet_resnet_silu") == 512
    assert submission.get_batch_size("mnist") % 8 == 0
    with pytest.raises(ValueError, match="ogbg_gelu"):
        submission.batch_size_for("ogbg_gelu")  # the runner retries "ogbg"
    specs = submission.fsdp_param_specs(
        {"w": jnp.zeros((64, 256)), "b": jnp.zeros(256), "odd": jnp.zeros((7, 4099))},
        8,
        min_size=256,
    )
    assert specs == {"w": P(None, "batch"), "b": P("batch"), "odd": P()}


def test_search_space_is_one_point_of_the_defaults():
    space = json.loads(SEARCH_SPACE.read_text())
    assert isinstance(space, list) and len(space) == 1
    point = collections.namedtuple("Hyperparameters", space[0])(**space[0])
    assert submission.resolve_hyperparameters(point) == dict(
        submission.DEFAULT_HYPERPARAMETERS
    )
    assert submission.resolve_hyperparameters(None) == dict(
        submission.DEFAULT_HYPERPARAMETERS
    )
    with pytest.raises(ValueError, match="learning_rate"):
        submission.resolve_hyperparameters({"learning_rate": 1e-3})


def test_sharded_training_matches_replicated(batches, weights_env):
    workload = DigitsWorkload()
    params, model_state = workload.init_model_fn(jax.random.PRNGKey(0))
    init = submission.init_optimizer_state(
        workload, _copy(params), model_state, None, jax.random.PRNGKey(1)
    )
    opt_state, runtime = init
    # FSDP over 'batch' for the big kernel's state, replicated elsewhere.
    assert opt_state.momentum["Dense_0"]["kernel"].sharding.spec == P(
        None, "batch", None
    )
    assert opt_state.momentum["Dense_1"]["kernel"].sharding.is_fully_replicated
    assert opt_state.lstm_hidden.sharding.is_fully_replicated

    loss_iteration = int(opt_state.loss_buffer.iteration)
    first = jax.device_put(_copy(params), runtime.param_shardings)
    (opt_state, runtime), new_params, _ = _run(
        workload, batches, init, first, model_state, 3
    )
    assert first["Dense_0"]["kernel"].is_deleted()  # donated
    # The loss reached VeLO (its loss buffer advanced once per step).
    assert int(opt_state.loss_buffer.iteration) == loss_iteration + 3
    assert int(opt_state.iteration) == 3
    assert opt_state.momentum["Dense_0"]["kernel"].sharding.spec == P(
        None, "batch", None
    )
    assert new_params["Dense_0"]["kernel"].sharding.is_fully_replicated
    change = jax.tree_util.tree_map(
        lambda a, b: jnp.abs(a - b).max(), new_params, params
    )
    assert all(float(c) > 0 for c in jax.tree_util.tree_leaves(change))

    ref_init = submission.build(
        workload,
        _copy(params),
        model_state,
        None,
        weights=CHECKPOINT,
        shard_state=False,
    )
    assert ref_init[0].momentum["Dense_0"]["kernel"].sharding.is_fully_replicated
    _, ref_params, _ = _run(workload, batches, ref_init, _copy(params), None, 3)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6),
        new_params,
        ref_params,
    )

    # prepare_for_eval hands back replicated params unchanged.
    _, eval_params, _ = submission.prepare_for_eval(
        workload, new_params, None, None, None, None, (opt_state, runtime), [], 3, None
    )
    assert eval_params is new_params


def test_accumulation_past_velo_horizon(weights_env):
    workload = DigitsWorkload(step_hint=195_999)  # ImageNet ResNet-50's hint
    params, model_state = workload.init_model_fn(jax.random.PRNGKey(0))
    opt_state, runtime = submission.init_optimizer_state(
        workload, params, model_state, None, jax.random.PRNGKey(1)
    )
    assert runtime.accumulate == 2
    assert opt_state.accumulation is not None
    assert int(opt_state.num_steps) == 195_999 // 2
    grad_sum = opt_state.accumulation.grad_sum["Dense_0"]["kernel"]
    assert grad_sum.sharding.spec == P(None, "batch")


def test_resume_from_runner_style_checkpoint(batches, weights_env, tmp_path):
    """Save/restore as `algoperf/checkpoint_utils.py` does, then keep training."""
    from flax import jax_utils
    from flax.training import checkpoints

    workload = DigitsWorkload()
    params, model_state = workload.init_model_fn(jax.random.PRNGKey(0))
    init = submission.init_optimizer_state(
        workload, _copy(params), model_state, None, None
    )
    (opt_state, _), params, model_state = _run(
        workload, batches, init, _copy(params), model_state, 2
    )
    saved = {"model_params": params, "optimizer_state": opt_state, "global_step": 2}
    checkpoints.save_checkpoint(tmp_path, target=saved, step=2, overwrite=True)
    # A restart: fresh init, restore into it, replicate (leading device axis).
    fresh = submission.init_optimizer_state(workload, _copy(params), None, None, None)
    target = {
        "model_params": _copy(params),
        "optimizer_state": fresh[0],
        "global_step": -1,
    }
    restored = checkpoints.restore_checkpoint(tmp_path, target=target)
    expected_state, expected_params, _ = _run(
        workload, batches[2:], (opt_state, init[1]), params, model_state, 1
    )

    assert restored["global_step"] == 2
    restored = jax_utils.replicate(
        {k: restored[k] for k in ("model_params", "optimizer_state")}
    )
    assert restored["model_params"]["Dense_0"]["bias"].ndim == 2
    resumed_state, resumed_params, _ = _run(
        workload,
        batches[2:],
        (restored["optimizer_state"], fresh[1]),
        restored["model_params"],
        None,
        1,
    )
    assert int(resumed_state[0].iteration) == 3
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        resumed_params,
        expected_params,
    )


@pytest.mark.integration
def test_matches_installed_algoperf_api():
    spec = pytest.importorskip(
        "algoperf.spec", reason="AlgoPerf is not on the package registries"
    )
    assert submission._train_mode() is spec.ForwardPassMode.TRAIN
    for name in (
        "init_optimizer_state",
        "update_params",
        "prepare_for_eval",
        "data_selection",
        "get_batch_size",
    ):
        ours = inspect.signature(getattr(submission, name)).parameters
        theirs = inspect.signature(getattr(spec, name)).parameters
        assert list(ours) == list(theirs), name


def test_ogbg_raw_layout_from_real_molecules(tmp_path):
    # The files AlgoPerf's TFDS ogbg_molpcba builder reads, written from B3DB
    # molecules: consistent counts, each bond once, 128 tasks with task 0 set.
    pd = pytest.importorskip("pandas")
    pytest.importorskip("rdkit")
    from velo_scale.integrations.algoperf import offline_data

    n = offline_data.write_ogbg_raw(tmp_path, max_molecules=40)
    assert n == 40
    raw = tmp_path / "pcba" / "raw"
    read = lambda name: pd.read_csv(raw / name, compression="gzip", header=None).values  # noqa: E731
    num_nodes, num_edges = (
        read("num-node-list.csv.gz")[:, 0],
        read("num-edge-list.csv.gz")[:, 0],
    )
    edges, node_feat = read("edge.csv.gz"), read("node-feat.csv.gz")
    edge_feat, labels = read("edge-feat.csv.gz"), read("graph-label.csv.gz")
    assert node_feat.shape == (num_nodes.sum(), 9)
    assert edges.shape == edge_feat.shape[:1] + (2,) == (num_edges.sum(), 2)
    assert labels.shape == (40, 128)
    assert set(np.unique(labels[:, 0])) <= {0.0, 1.0}
    assert np.isnan(labels[:, 1:]).all()
    # Local node indices, each undirected bond listed once.
    start = 0
    for nodes, m in zip(num_nodes, num_edges):
        block = edges[start : start + m]
        assert (block >= 0).all() and (block < nodes).all()
        pairs = {tuple(sorted(e)) for e in block.tolist()}
        assert len(pairs) == m  # no bond twice
        start += m
    splits = [
        pd.read_csv(
            tmp_path / "pcba" / "split" / "scaffold" / f"{s}.csv.gz", header=None
        )
        .values[:, 0]
        .tolist()
        for s in ("train", "valid", "test")
    ]
    assert sorted(sum(splits, [])) == list(range(40))
