"""Decision Transformer on Hopper: the paper's model size, causality, the
offline data (returns-to-go, windows, splits, generation), the D4RL score and
real Hopper-v5 rollouts, and the small recipe end to end."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from velo_scale import cli
from velo_scale.data import hopper, load_dataset
from velo_scale.models.decision_transformer import DecisionTransformer, num_params
from velo_scale.workloads import abstract_variables, count_params
from velo_scale.workloads import decision_transformer as dt

REPO = pathlib.Path(__file__).resolve().parent.parent
FULL = str(REPO / "recipes" / "decision_transformer.gin")
SMALL = str(REPO / "recipes" / "decision_transformer_small.gin")
TINY_MODEL = dict(
    state_dim=11, act_dim=3, embed_dim=16, num_layers=2, num_heads=2, dropout_rate=0.0
)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """The "tiny" generated dataset in a private cache (seconds)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(hopper.CACHE_ENV, str(root))
        mp.setenv(hopper.PRESET_ENV, "tiny")
        data = hopper.load_generated()
    return root, data


@pytest.fixture
def tiny_env(tiny_cache, monkeypatch):
    monkeypatch.setenv(hopper.CACHE_ENV, str(tiny_cache[0]))
    monkeypatch.setenv(hopper.PRESET_ENV, "tiny")
    return tiny_cache[1]


def _init(model, k=5, b=2, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        "returns_to_go": rng.normal(size=(b, k, 1)).astype(np.float32),
        "states": rng.normal(size=(b, k, model.state_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(b, k, model.act_dim)).astype(np.float32),
        "timesteps": np.tile(np.arange(3, 3 + k, dtype=np.int32), (b, 1)),
        "mask": np.ones((b, k), np.float32),
    }
    inputs = [
        batch[n] for n in ("returns_to_go", "states", "actions", "timesteps", "mask")
    ]
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), *inputs))
    return params, batch


def _apply(model, params, batch):
    return np.asarray(
        model.apply(
            params,
            batch["returns_to_go"],
            batch["states"],
            batch["actions"],
            batch["timesteps"],
            batch["mask"],
        )
    )


# -- the full-scale recipe -------------------------------------------------------


def test_full_scale_recipe_builds_with_the_papers_parameter_count():
    cli.parse_gin([FULL], [])
    workload = cli.configured_value("train.workload")
    assert isinstance(workload, dt.DecisionTransformerWorkload)
    params = abstract_variables(workload)["params"]
    # Embeddings 130,560 + 3 blocks x 198,272 + final LN 256 + head 387.
    d, m = 128, 512
    block = 4 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
    by_hand = (
        1000 * d + (1 + 11 + 3) * d + 3 * d + 2 * d + 3 * block + 2 * d + 3 * d + 3
    )
    assert block == 198_272
    assert count_params(params) == by_hand == num_params(11, 3) == 726_019
    facts = workload.full_scale
    assert facts.num_params == 726_019
    assert (facts.target_metric, facts.target_value) == ("normalized_return", 67.6)
    assert facts.higher_is_better
    assert cli.configured_value("train.num_steps") == facts.step_hint == 100_000
    assert cli.configured_value("train.batch_size") == facts.batch_size == 64
    assert cli.configured_value("train.data") == "hopper"
    # One head of width 128 (the paper's gym setting), MLP 4x.
    assert params["block0"]["attention"]["query"]["kernel"].shape == (128, 1, 128)
    assert params["block2"]["mlp_in"]["kernel"].shape == (128, 512)
    assert params["embed_timestep"]["embedding"].shape == (1000, 128)


# -- the model --------------------------------------------------------------------


def test_action_prediction_at_t_ignores_everything_after_t():
    model = DecisionTransformer(**TINY_MODEL)
    params, batch = _init(model, k=6)
    base = _apply(model, params, batch)
    t = 2
    later = {k: v.copy() for k, v in batch.items()}
    later["actions"][:, t:] += 5.0  # a_t itself comes after s_t.
    later["states"][:, t + 1 :] -= 3.0
    later["returns_to_go"][:, t + 1 :] *= -4.0
    later["timesteps"][:, t + 1 :] += 100
    out = _apply(model, params, later)
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
    assert np.abs(out[:, t + 1 :] - base[:, t + 1 :]).max() > 1e-4
    # ...but does depend on s_t, R_t and a_{t-1}.
    for name, delta in (("states", 3.0), ("returns_to_go", 2.0)):
        changed = {k: v.copy() for k, v in batch.items()}
        changed[name][:, t] += delta
        assert np.abs(_apply(model, params, changed)[:, t] - base[:, t]).max() > 1e-4
    changed = {k: v.copy() for k, v in batch.items()}
    changed["actions"][:, t - 1] += 1.0
    assert np.abs(_apply(model, params, changed)[:, t] - base[:, t]).max() > 1e-4


def test_padding_steps_are_not_attended_to():
    model = DecisionTransformer(**TINY_MODEL)
    params, batch = _init(model, k=5)
    batch["mask"][:, :2] = 0.0  # Left padding, as the data and rollouts use.
    base = _apply(model, params, batch)
    noisy = {k: v.copy() for k, v in batch.items()}
    for name in ("states", "actions", "returns_to_go"):
        noisy[name][:, :2] = 7.0
    out = _apply(model, params, noisy)
    np.testing.assert_allclose(out[:, 2:], base[:, 2:], atol=1e-6)
    assert np.all(np.abs(out) < 1.0)  # tanh head


# -- returns-to-go, windows, splits --------------------------------------------------


def test_returns_to_go_and_windows_by_hand():
    # Two episodes: a fall after 3 steps, then a time-out after 2.
    data = {
        "observations": np.arange(5 * 11, dtype=np.float32).reshape(5, 11),
        "actions": np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3),
        "rewards": np.array([1.0, 2.0, 3.0, 10.0, 20.0], np.float32),
        "terminals": np.array([0, 0, 1, 0, 0], bool),
        "timeouts": np.array([0, 0, 0, 0, 1], bool),
    }
    bounds = hopper.episode_bounds(data["terminals"], data["timeouts"])
    np.testing.assert_array_equal(bounds, [[0, 3], [3, 5]])
    rtg = hopper.returns_to_go(data["rewards"], bounds)
    np.testing.assert_array_equal(rtg, [6.0, 5.0, 3.0, 30.0, 20.0])

    windows = hopper.ContextWindows(
        data, np.array([0, 1]), bounds, state_mean=np.zeros(11), state_std=np.ones(11),
        context_length=4, return_scale=10.0,
    )  # fmt: skip
    assert len(windows) == 5
    w = windows[1]  # Steps 1, 2 of episode 0, left-padded by 2.
    np.testing.assert_array_equal(w["mask"], [0, 0, 1, 1])
    np.testing.assert_allclose(w["returns_to_go"][:, 0], [0, 0, 0.5, 0.3])
    np.testing.assert_array_equal(w["timesteps"], [0, 0, 1, 2])
    np.testing.assert_array_equal(w["states"][2:], data["observations"][1:3])
    np.testing.assert_array_equal(w["actions"][:2], 0.0)
    w = windows[4]  # The last step of episode 1 (its timestep 1).
    np.testing.assert_array_equal(w["mask"], [0, 0, 0, 1])
    np.testing.assert_allclose(w["returns_to_go"][-1, 0], 2.0)
    np.testing.assert_array_equal(w["timesteps"][-1], 1)
    np.testing.assert_array_equal(windows.episode_returns, [6.0, 30.0])
    # Batched reads agree with single ones.
    batch = windows.gather(np.array([1, 4]))
    np.testing.assert_array_equal(
        batch["returns_to_go"][1], windows[4]["returns_to_go"]
    )


def test_split_is_by_episode_within_each_policy():
    bounds = hopper.episode_bounds(np.zeros(40, bool), np.arange(40) % 2 == 1)
    groups = np.repeat([0, 1, 2], [10, 6, 4])
    split = hopper.split_episodes(bounds, groups)
    assert not set(split["train"]) & set(split["test"])
    assert sorted([*split["train"], *split["test"]]) == list(range(20))
    # ceil(10% of n) of each policy's episodes.
    assert np.bincount(groups[split["test"]], minlength=3).tolist() == [1, 1, 1]
    np.testing.assert_array_equal(
        split["test"], hopper.split_episodes(bounds, groups)["test"]
    )


# -- the generated data ------------------------------------------------------------


def test_generated_data_load_and_are_deterministic(tiny_env, tmp_path):
    data = tiny_env
    info = json.loads(str(data["info"]))
    assert info["env"] == "Hopper-v5" and info["generation"]["ars_iterations"] == 2
    n = len(data["rewards"])
    assert data["observations"].shape == (n, 11) and data["actions"].shape == (n, 3)
    assert np.all(np.abs(data["actions"]) <= 1.0)
    assert set(np.unique(data["policy"])) == {0, 1, 2}
    bounds = hopper.episode_bounds(data["terminals"], data["timeouts"])
    assert len(bounds) == sum(hopper.PRESETS["tiny"].episodes)
    assert (bounds[:, 1] - bounds[:, 0]).max() <= 100

    train = load_dataset("hopper", "train")
    test = load_dataset("hopper", "test")
    assert len(train) + len(test) == n and len(test) > 0
    batch = train.gather(np.arange(min(len(train), 8)))
    assert batch["states"].shape == (8, 20, 11) and batch["states"].dtype == np.float32
    assert batch["actions"].shape == (8, 20, 3)
    assert batch["returns_to_go"].shape == (8, 20, 1)
    assert batch["timesteps"].dtype == np.int32 and batch["timesteps"].max() < 1000
    assert np.all(batch["mask"][:, -1] == 1.0)
    # Both splits are normalised with the train statistics.
    np.testing.assert_array_equal(train.state_mean, test.state_mean)
    # Same recipe, same arrays (and the cache was used, not regenerated).
    again = hopper.generate_hopper_dataset(None, hopper.PRESETS["tiny"], log=None)
    for key in hopper.D4RL_KEYS:
        np.testing.assert_array_equal(again[key], data[key])
    cached = list(hopper.cache_dir().glob("*.npz"))
    assert [p.name for p in cached] == [
        hopper.generated_file_name(hopper.PRESETS["tiny"])
    ]


def test_d4rl_files_under_data_dir(tiny_env, tmp_path):
    with pytest.raises(FileNotFoundError, match="hopper-medium-v2.hdf5"):
        hopper.load_hopper("train", str(tmp_path))
    arrays = {k: tiny_env[k] for k in hopper.D4RL_KEYS}
    np.savez(tmp_path / "hopper-medium-v2.npz", **arrays)
    train = hopper.load_hopper("train", str(tmp_path))
    test = hopper.load_hopper("test", str(tmp_path / "hopper-medium-v2.npz"))
    assert len(train) + len(test) == len(arrays["rewards"])
    (tmp_path / "broken").mkdir()
    np.savez(tmp_path / "broken" / "hopper-medium-v2.npz", rewards=arrays["rewards"])
    with pytest.raises(ValueError, match="not a D4RL dataset"):
        hopper.load_hopper("train", str(tmp_path / "broken"))
    try:
        import h5py  # noqa: F401
    except ImportError:
        (tmp_path / "h5").mkdir()
        (tmp_path / "h5" / "hopper-medium-v2.hdf5").write_bytes(b"")
        with pytest.raises(ImportError, match="h5py"):
            hopper.load_hopper("train", str(tmp_path / "h5"))


# -- metrics and rollouts ------------------------------------------------------------


def test_normalized_score_and_masked_mse_by_hand():
    assert dt.normalized_score(-20.272305) == pytest.approx(0.0)
    assert dt.normalized_score(3234.3) == pytest.approx(100.0)
    assert dt.normalized_score(1607.0138475) == pytest.approx(50.0)
    # (2178.7 + 20.272305) / (3234.3 + 20.272305) = 2198.972305 / 3254.572305
    assert dt.normalized_score(2178.7) == pytest.approx(67.5656, abs=1e-4)
    predicted = jnp.array([[[0.0, 0.0], [1.0, 1.0], [0.5, 0.0]]])
    actions = jnp.array([[[9.0, 9.0], [0.0, 1.0], [0.0, 0.0]]])
    mask = jnp.array([[0.0, 1.0, 1.0]])  # The first step is padding.
    se, count = dt.masked_action_se(predicted, actions, mask)
    assert float(se) == pytest.approx(1.0 + 0.25) and float(count) == 4.0
    # The workload's loss and eval sums use it over a batch's real steps.
    workload = dt.DecisionTransformerWorkload(
        model=DecisionTransformer(**TINY_MODEL), context_length=3
    )
    params, batch = _init(workload.model, k=3)
    batch["mask"][:, 0] = 0.0
    predicted = _apply(workload.model, params, batch)
    want = np.square(predicted - batch["actions"])[:, 1:].mean()
    sums = workload.eval_sums(params["params"], {}, batch)
    assert float(sums["loss"]) / float(sums["count"]) == pytest.approx(want, rel=1e-5)
    loss, _ = workload.loss(params["params"], {}, batch, jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(want, rel=1e-5)  # dropout 0


def test_rollout_runs_in_the_simulator():
    workload = dt.DecisionTransformerWorkload(
        model=DecisionTransformer(**TINY_MODEL),
        context_length=4,
        rollout_episodes=2,
        max_episode_steps=25,
    )
    params = nn.meta.unbox(
        workload.init(jax.random.PRNGKey(0), workload.dummy_batch(2))
    )
    metrics = workload.rollouts(params["params"], {}, np.zeros(11), np.ones(11))
    assert 1 <= metrics["episode_length"] <= 25
    assert np.isfinite(metrics["return"]) and metrics["return"] != 0.0
    assert metrics["normalized_return"] == pytest.approx(
        dt.normalized_score(metrics["return"])
    )
    # Deterministic: same params and seeds, same episodes.
    assert workload.rollouts(params["params"], {}, np.zeros(11), np.ones(11)) == metrics


# -- the small recipe end to end -----------------------------------------------------


def test_small_recipe_trains_and_evaluates(tiny_env, tmp_path):
    # AdamW keeps the compile short; the VeLO runs are in results/.
    bindings = [
        "train.optimizer=@adamw",
        "train.log_every=1",
        "train.num_steps=4",
        "train.eval_every=2",
        "train.checkpoint_every=None",
        "train.batch_size=16",
        "DecisionTransformer.embed_dim=16",
        "DecisionTransformer.num_layers=1",
        "DecisionTransformerWorkload.rollout_episodes=2",
        "DecisionTransformerWorkload.max_episode_steps=20",
    ]
    args = ["train", "--gin_file", SMALL, "--workdir", str(tmp_path / "run")]
    for b in bindings:
        args += ["--gin_param", b]
    assert cli.main(args) == 0
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for row in evals:
        assert np.isfinite(row["loss"]) and 0 < row["loss"] < 4.0
        assert 1 <= row["episode_length"] <= 20
        assert row["normalized_return"] == pytest.approx(
            dt.normalized_score(row["return"]), rel=1e-5
        )
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert len(train_rows) == 4 and all(np.isfinite(r["loss"]) for r in train_rows)
