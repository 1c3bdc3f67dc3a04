"""The OGBG graph-network workload: AlgoPerf's parameter count, B3DB molecules
featurised as OGB does, the mAP / ROC AUC metric, the model's invariances
(node order, padding) and the small recipe end to end on real data."""

import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.reference_data import CHECKPOINT
from velo_scale import cli
from velo_scale.data import load_dataset
from velo_scale.data import molecules as mol_data
from velo_scale.models.gnn import GNN
from velo_scale.workloads import abstract_variables, count_params
from velo_scale.workloads import molecules as mol_wl

REPO = pathlib.Path(__file__).resolve().parent.parent
GRAPH_KEYS = mol_wl.GRAPH_KEYS


@pytest.fixture(scope="module")
def b3db():
    return load_dataset("b3db", "train"), load_dataset("b3db", "test")


# -- (a) the full-scale recipe -------------------------------------------------


def test_full_recipe_builds_with_algoperf_parameter_count(monkeypatch):
    import gin

    monkeypatch.chdir(REPO)
    cli.parse_gin(["recipes/ogbg_gnn.gin"], [])
    workload = cli.configured_value("train.workload")
    assert isinstance(workload, mol_wl.MoleculeClassification)
    assert workload.full_scale == mol_wl.OGBG_FULL_SCALE
    assert gin.query_parameter("train.num_steps") == 52_000
    assert gin.query_parameter("train.batch_size") == 512
    assert gin.query_parameter("train.data") == "ogbg_molpcba"
    params = abstract_variables(workload)["params"]
    # AlgoPerf's jraph GNN: 2,560 + 1,024 embeddings, 624,896 for the first
    # block (its global starts 128 wide), 4 x 723,200, decoder 32,896.
    assert count_params(params) == 3_554_176 == workload.full_scale.num_params
    assert params["block0"]["edge_mlp"]["dense0"]["kernel"].shape == (896, 256)
    assert params["block1"]["global_mlp"]["dense0"]["kernel"].shape == (768, 256)
    assert params["node_embedding"]["kernel"].shape == (9, 256)


# -- (b) the small data ----------------------------------------------------------


def test_b3db_loads_padded_ogb_graphs(b3db):
    train, test = b3db
    assert (len(train["labels"]), len(test["labels"])) == (6167, 1534)
    n, e = mol_data.B3DB_MAX_NODES, mol_data.B3DB_MAX_EDGES
    for split in (train, test):
        assert split["node_feat"].shape[1:] == (n, 9)
        assert split["edge_feat"].shape[1:] == (e, 3)
        assert split["node_feat"].dtype == split["senders"].dtype == np.int32
        assert split["node_mask"].dtype == split["edge_mask"].dtype == bool
        assert split["labels"].shape[1:] == split["label_mask"].shape[1:] == (1,)
        assert set(np.unique(split["labels"])) == {0.0, 1.0}
        assert np.all(split["label_mask"] == 1)
        for i, vocab in enumerate(mol_data.ATOM_FEATURE_VALUES):
            assert 0 <= split["node_feat"][..., i].min()
            assert split["node_feat"][..., i].max() < len(vocab)
        nodes = split["node_mask"].sum(1)
        edges = split["edge_mask"].sum(1)
        assert nodes.min() >= 1 and np.all(edges % 2 == 0)
        # Masks are prefixes; edges connect real atoms; padding is zero.
        assert np.array_equal(split["node_mask"], np.arange(n) < nodes[:, None])
        assert np.array_equal(split["edge_mask"], np.arange(e) < edges[:, None])
        real = split["edge_mask"]
        assert np.all(split["senders"][real] < np.repeat(nodes, edges))
        assert np.all(split["receivers"][real] < np.repeat(nodes, edges))
        assert not split["node_feat"][~split["node_mask"]].any()
    # BBB+ is ~64% of B3DB in both splits.
    assert 0.6 < train["labels"].mean() < 0.68 and 0.6 < test["labels"].mean() < 0.68


def test_b3db_split_is_a_seeded_disjoint_partition(b3db, tmp_path, monkeypatch):
    train, test = b3db
    # Featurised afresh into an empty cache, written atomically (one file).
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path))
    again = mol_data.load_b3db("test")
    (cache,) = tmp_path.iterdir()
    assert cache.suffix == ".npz"
    np.testing.assert_array_equal(again["edge_feat"], test["edge_feat"])
    with np.load(cache) as f:
        rows, node_feat = f["row"], f["node_feat"]
    # 7,807 rows = 7,701 kept + 2 unparsable + 104 above the caps.
    assert len(rows) == 7701 and np.all(np.diff(rows) > 0)
    order = np.random.default_rng(mol_data.B3DB_SEED).permutation(7807)
    in_test = np.isin(rows, order[:1561])  # 20% of the rows
    assert in_test.sum() == len(test["labels"])
    assert (~in_test).sum() == len(train["labels"])
    np.testing.assert_array_equal(node_feat[in_test], test["node_feat"])
    np.testing.assert_array_equal(node_feat[~in_test], train["node_feat"])


def test_ogb_features_match_ogb_reference():
    # The example in ogb/utils/features.py: chiral carbon and the E double bond.
    from rdkit import Chem

    mol = Chem.MolFromSmiles("Cl[C@H](/C=C/C)Br")
    assert mol_data.atom_features(mol.GetAtomWithIdx(1)) == [5, 2, 4, 5, 1, 0, 2, 0, 0]
    assert mol_data.bond_features(mol.GetBondWithIdx(2)) == [1, 2, 0]
    graph = mol_data.smiles_to_graph("CCO")  # 3 atoms, 2 bonds -> 4 edges
    assert graph["node_feat"].shape == (3, 9)
    np.testing.assert_array_equal(graph["senders"], [0, 1, 1, 2])
    np.testing.assert_array_equal(graph["receivers"], [1, 0, 2, 1])
    assert mol_data.smiles_to_graph("not a smiles") is None


def test_missing_packages_and_data_raise_clear_errors(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "B3DB" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install 'velo-scale\[molecules\]'"):
        mol_data.load_b3db("train")
    with pytest.raises(FileNotFoundError, match="tfds build ogbg_molpcba"):
        load_dataset("ogbg_molpcba", "train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset("ogbg_molpcba", "test", data_dir=str(tmp_path))


def test_ogbg_record_conversion():
    record = {  # TFDS ogbg_molpcba layout: float features, bonds once.
        "node_feat": np.array([[5, 0, 4, 5, 3, 0, 2, 0, 0]] * 3, np.float32),
        "edge_feat": np.array([[0, 0, 0], [1, 0, 1]], np.float32),
        "edge_index": np.array([[0, 1], [1, 2]], np.int64),
        "labels": np.r_[np.nan, 1.0, 0.0, np.full(125, np.nan)].astype(np.float32),
        "num_nodes": np.array([3]),
        "num_edges": np.array([2]),
    }
    ex = mol_data.ogbg_record_to_example(record, max_nodes=4, max_edges=6)
    np.testing.assert_array_equal(ex["senders"], [0, 1, 1, 2, 0, 0])
    np.testing.assert_array_equal(ex["receivers"], [1, 2, 0, 1, 0, 0])
    np.testing.assert_array_equal(ex["edge_feat"][:4, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(ex["node_mask"], [1, 1, 1, 0])
    assert ex["node_feat"].dtype == np.int32 and ex["node_feat"][0, 0] == 5
    assert ex["labels"][:3].tolist() == [0, 1, 0] and not np.isnan(ex["labels"]).any()
    assert ex["label_mask"][:4].tolist() == [0, 1, 1, 0] and ex["label_mask"].sum() == 2
    # Above the caps: first 2 atoms and the bond among them.
    small = mol_data.ogbg_record_to_example(record, max_nodes=2, max_edges=6)
    assert small["node_mask"].sum() == 2 and small["edge_mask"].sum() == 2


# -- (c) the metric ----------------------------------------------------------------


def test_average_precision_and_roc_auc_hand_checked():
    labels = np.array([1, 0, 1, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # Recall steps of 1/3 at precisions 1, 2/3, 3/4.
    assert mol_wl.average_precision(labels, scores) == pytest.approx(
        (1 + 2 / 3 + 3 / 4) / 3
    )
    # 4 of the 6 (positive, negative) pairs are ordered correctly.
    assert mol_wl.roc_auc(labels, scores) == pytest.approx(4 / 6)
    # Tied scores are one threshold.
    assert mol_wl.average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert mol_wl.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    # Tasks: 0 as above; 1 has a missing label and only positives among the
    # labeled (excluded); 2 is perfectly ranked once the masked row is dropped.
    y = np.stack([labels, [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]], axis=1)
    s = np.stack([scores, scores, [0.9, 0.8, 0.1, 0.2, 0.0]], axis=1)
    mask = np.ones_like(y)
    mask[4, 1:] = 0
    expected = ((1 + 2 / 3 + 3 / 4) / 3 + 1.0) / 2
    assert mol_wl.mean_average_precision(y, s, mask) == pytest.approx(expected)
    assert mol_wl.mean_roc_auc(y, s, mask) == pytest.approx((4 / 6 + 1) / 2)
    assert np.isnan(mol_wl.mean_average_precision(y[:, 1:2], s[:, 1:2], mask[:, 1:2]))


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # with ties
    assert mol_wl.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores)
    )
    assert mol_wl.roc_auc(labels, scores) == pytest.approx(
        roc_auc_score(labels, scores)
    )


def test_loss_ignores_missing_labels():
    workload = mol_wl.MoleculeClassification(
        GNN(num_outputs=3, latent_dim=8, hidden_dims=(8,), num_message_passing_steps=1)
    )
    batch = workload.dummy_batch(2)
    batch["node_mask"][:, :2] = True
    batch["labels"][:] = [[1, 0, 1], [0, 1, 1]]
    batch["label_mask"][:] = [[1, 1, 0], [1, 0, 0]]
    variables = nn.meta.unbox(workload.init(jax.random.PRNGKey(0), batch))
    loss, _ = workload.loss(variables["params"], {}, batch, jax.random.PRNGKey(1))
    batch2 = {**batch, "labels": np.where(batch["label_mask"] > 0, batch["labels"], 1)}
    logits = workload.predict(variables["params"], {}, batch)
    x, y = np.asarray(logits, np.float64), batch["labels"]
    bce = np.log1p(np.exp(-x)) * y + np.log1p(np.exp(x)) * (1 - y)
    expected = (bce * batch["label_mask"]).sum() / 3
    # Dropout is on in `loss`; compare its eval-mode value through `metrics`.
    metrics = workload.metrics(y, np.asarray(logits), batch["label_mask"])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(float(loss))
    loss2, _ = workload.loss(variables["params"], {}, batch2, jax.random.PRNGKey(1))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


# -- the model's invariances -----------------------------------------------------


def _graph_batch(smiles, max_nodes, max_edges, rng=None):
    examples = []
    for s in smiles:
        ex = mol_data.pad_graph(mol_data.smiles_to_graph(s), max_nodes, max_edges)
        if rng is not None:  # Garbage in the padding rows.
            n, e = ex["node_mask"].sum(), ex["edge_mask"].sum()
            ex["node_feat"][n:] = rng.integers(0, 2, ex["node_feat"][n:].shape)
            ex["edge_feat"][e:] = rng.integers(0, 2, ex["edge_feat"][e:].shape)
            ex["senders"][e:] = rng.integers(0, max_nodes, max_edges - e)
            ex["receivers"][e:] = rng.integers(0, max_nodes, max_edges - e)
        examples.append(ex)
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


SMILES = ["CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1"]  # aspirin, nicotine


@pytest.mark.parametrize("embedding", ["dense", "one_hot"])
def test_gnn_invariant_to_node_order_and_padding(embedding):
    model = GNN(
        num_outputs=4, latent_dim=16, hidden_dims=(16,),
        num_message_passing_steps=2, embedding=embedding,
    )  # fmt: skip
    apply = jax.jit(model.apply)
    batch = _graph_batch(SMILES, 16, 32)
    args = lambda b: [b[k] for k in GRAPH_KEYS]  # noqa: E731
    variables = model.init(jax.random.PRNGKey(0), *args(batch))
    ref = np.asarray(apply(variables, *args(batch)))
    # More padding, filled with garbage: same logits.
    padded = _graph_batch(SMILES, 24, 48, rng=np.random.default_rng(0))
    np.testing.assert_allclose(apply(variables, *args(padded)), ref, atol=1e-5)
    # Atoms renumbered (and edges shuffled) within each graph: same logits.
    rng = np.random.default_rng(1)
    permuted = {k: v.copy() for k, v in batch.items()}
    for i in range(len(SMILES)):
        n, e = batch["node_mask"][i].sum(), batch["edge_mask"][i].sum()
        new = rng.permutation(n)  # old atom j becomes atom new[j]
        permuted["node_feat"][i, new] = batch["node_feat"][i, :n]
        edge_order = rng.permutation(e)
        for key in ("senders", "receivers"):
            permuted[key][i, :e] = new[batch[key][i, :e]][edge_order]
        permuted["edge_feat"][i, :e] = batch["edge_feat"][i, :e][edge_order]
    assert not np.array_equal(permuted["node_feat"], batch["node_feat"])
    np.testing.assert_allclose(apply(variables, *args(permuted)), ref, atol=1e-5)
    # Not trivially constant: the two molecules differ.
    assert np.abs(ref[0] - ref[1]).max() > 1e-3


# -- (d) the small recipe end to end ---------------------------------------------


def _train_small_recipe(workdir, optimizer_bindings):
    import gin

    cli.parse_gin(
        ["recipes/ogbg_gnn_small.gin"],
        [
            *optimizer_bindings,
            "train.num_steps = 6",
            "train.eval_every = 3",
            "train.batch_size = 16",
            "train.progress = False",
            "GNN.latent_dim = 16",
            "GNN.hidden_dims = (16,)",
            "GNN.num_message_passing_steps = 1",
        ],
    )
    result = gin.get_configurable("train")(workdir=str(workdir))
    assert int(result.state.step) == 6 and np.isfinite(result.final_loss)
    metrics = result.eval_metrics
    assert set(metrics) == {"loss", "mean_average_precision", "roc_auc", "accuracy"}
    # BBB+ is 64% of the test set: any ranking has AP well above 0.3.
    assert 0.3 < metrics["mean_average_precision"] <= 1.0
    assert 0.0 <= metrics["roc_auc"] <= 1.0 and np.isfinite(metrics["loss"])
    rows = (workdir / "metrics.jsonl").read_text()
    assert rows.count('"mean_average_precision"') == 2  # steps 3 and 6


def test_small_recipe_trains_and_evaluates_on_b3db(tmp_path, monkeypatch):
    # AdamW keeps this fast (VeLO's compile alone takes ~25 s on 2 cores);
    # the recipe's own optimizer runs in the slow test below.
    monkeypatch.chdir(REPO)
    _train_small_recipe(tmp_path, ["train.optimizer = @adamw"])


@pytest.mark.slow
def test_small_recipe_with_velo(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    _train_small_recipe(tmp_path, [f"velo.weights = '{CHECKPOINT}'"])
