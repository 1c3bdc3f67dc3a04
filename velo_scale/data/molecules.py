"""Molecular graphs, padded per example: B3DB (small, rdkit) and OGBG-molpcba.

Every example is one molecule as a fixed-size graph (the batch format of
`velo_scale.workloads.molecules.MoleculeClassification`):

  node_feat:  int32[max_nodes, 9]  OGB atom features (`atom_features`)
  edge_feat:  int32[max_edges, 3]  OGB bond features of directed edges
  senders:    int32[max_edges]     local index of each edge's source atom
  receivers:  int32[max_edges]     local index of each edge's target atom
  node_mask:  bool[max_nodes]      True for real atoms (the first n)
  edge_mask:  bool[max_edges]      True for real edges (the first 2m)
  labels:     float32[num_tasks]   0/1 (0 where missing)
  label_mask: float32[num_tasks]   1 where the label exists

Each bond appears as two directed edges, i -> j and j -> i, with the same
features (as AlgoPerf's input pipeline makes them). Padding rows are zeros
(senders/receivers 0) and masked out.

Datasets:
  - `load_b3db`: the 7,807 molecules of B3DB's classification set (Meng et
    al. 2021, package `qc-B3DB`) with their blood-brain-barrier label
    (BBB+ = 1), one task. SMILES are featurised with rdkit as OGB's
    `smiles2graph` does. A seeded permutation of the 7,807 rows puts 20% in
    "test"; then molecules rdkit cannot parse (2) or larger than the caps
    (`B3DB_MAX_NODES` atoms / `B3DB_MAX_EDGES` directed edges; 104 molecules,
    1.3%) are dropped from either split: 6,167 train / 1,534 test.
    Featurisation takes a few seconds and is cached under
    `~/.cache/velo_scale` (or `$VELO_SCALE_CACHE`).
  - `load_ogbg_molpcba`: AlgoPerf's OGBG-molpcba (128 tasks, 350,343 train,
    43,793 validation graphs) from a prepared TFDS directory, converted per
    record; "test" reads TFDS "validation", the split of AlgoPerf's target.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from velo_scale.data import cache as cache_lib

MOLECULES_MISSING_MSG = (
    "The 'b3db' dataset needs rdkit and the qc-B3DB package (which ships "
    "B3DB_classification.tsv). Install them with "
    "`pip install 'velo-scale[molecules]'`."
)
OGBG_MISSING_MSG = (
    "No prepared TFDS 'ogbg_molpcba' (version 0.1.3, as AlgoPerf) under "
    "{where}. Prepare it with tensorflow-datasets in array_record format: "
    "`tfds build ogbg_molpcba --data_dir=DATA_DIR --file_format=array_record` "
    "(or AlgoPerf's `python datasets/dataset_setup.py --ogbg`, converted to "
    "array_record), then set `train.data_dir = 'DATA_DIR'`."
)

# OGB's allowable atom/bond values (`ogb.utils.features`); anything else maps
# to the last entry ("misc").
_MISC = "misc"
ATOM_FEATURE_VALUES: tuple[tuple[Any, ...], ...] = (
    (*range(1, 119), _MISC),  # atomic number
    ("CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER",
     _MISC),  # chirality tag
    (*range(11), _MISC),  # total degree
    (*range(-5, 6), _MISC),  # formal charge
    (*range(9), _MISC),  # total number of Hs
    (*range(5), _MISC),  # radical electrons
    ("SP", "SP2", "SP3", "SP3D", "SP3D2", _MISC),  # hybridisation
    (False, True),  # aromatic
    (False, True),  # in ring
)  # fmt: skip
BOND_FEATURE_VALUES: tuple[tuple[Any, ...], ...] = (
    ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", _MISC),  # bond type
    # Bond stereo; OGB has no "misc" here. Newer rdkit values (atropisomers)
    # map to the last entry, as every other unknown value does.
    ("STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY"),
    (False, True),  # conjugated
)
NUM_ATOM_FEATURES = len(ATOM_FEATURE_VALUES)
NUM_BOND_FEATURES = len(BOND_FEATURE_VALUES)

B3DB_FILE = "B3DB_classification.tsv"
B3DB_NUM_MOLECULES = 7807
B3DB_SEED = 0
B3DB_TEST_FRACTION = 0.2
# Caps: 99th percentile of B3DB is 72 atoms / 76 bonds; larger ones dropped.
B3DB_MAX_NODES = 64
B3DB_MAX_EDGES = 160  # directed, i.e. 80 bonds
_B3DB_CACHE_VERSION = 1

# OGBG-molpcba: average 26 atoms / 28 bonds per molecule. Per-example padding
# to a fixed size; the rare larger molecule is truncated to its first
# OGBG_MAX_NODES atoms and the bonds among them (at most OGBG_MAX_EDGES / 2).
OGBG_NAME = "ogbg_molpcba"
OGBG_NUM_TASKS = 128
OGBG_MAX_NODES = 128
OGBG_MAX_EDGES = 288
OGBG_SPLITS = {"train": "train", "test": "validation"}


def _index(values: Sequence[Any], value: Any) -> int:
    try:
        return values.index(value)
    except ValueError:
        return len(values) - 1


def atom_features(atom) -> list[int]:
    """OGB's 9 categorical atom features of an rdkit atom (indices into
    `ATOM_FEATURE_VALUES`)."""
    raw = (
        atom.GetAtomicNum(),
        str(atom.GetChiralTag()),
        atom.GetTotalDegree(),
        atom.GetFormalCharge(),
        atom.GetTotalNumHs(),
        atom.GetNumRadicalElectrons(),
        str(atom.GetHybridization()),
        atom.GetIsAromatic(),
        atom.IsInRing(),
    )
    return [_index(v, x) for v, x in zip(ATOM_FEATURE_VALUES, raw)]


def bond_features(bond) -> list[int]:
    """OGB's 3 categorical bond features of an rdkit bond."""
    raw = (str(bond.GetBondType()), str(bond.GetStereo()), bond.GetIsConjugated())
    return [_index(v, x) for v, x in zip(BOND_FEATURE_VALUES, raw)]


def smiles_to_graph(smiles: str) -> dict[str, np.ndarray] | None:
    """A molecule's graph (heavy atoms, both directions of every bond), or
    None if rdkit cannot parse `smiles`.

    Returns:
      `{"node_feat": int32[n, 9], "edge_feat": int32[2m, 3], "senders":
      int32[2m], "receivers": int32[2m]}`; edge 2k is bond k as i -> j and
      edge 2k + 1 the same bond j -> i.
    """
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    nodes = np.array([atom_features(a) for a in mol.GetAtoms()], np.int32).reshape(
        -1, NUM_ATOM_FEATURES
    )
    edges, senders, receivers = [], [], []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        feat = bond_features(bond)
        edges += [feat, feat]
        senders += [i, j]
        receivers += [j, i]
    return {
        "node_feat": nodes,
        "edge_feat": np.array(edges, np.int32).reshape(-1, NUM_BOND_FEATURES),
        "senders": np.array(senders, np.int32),
        "receivers": np.array(receivers, np.int32),
    }


def pad_graph(
    graph: Mapping[str, np.ndarray], max_nodes: int, max_edges: int
) -> dict[str, np.ndarray]:
    """Pads one graph (as from `smiles_to_graph`) to `max_nodes` / `max_edges`.

    Raises:
      ValueError: the graph is larger than the caps.
    """
    n, e = len(graph["node_feat"]), len(graph["senders"])
    if n > max_nodes or e > max_edges:
        raise ValueError(
            f"graph with {n} nodes / {e} edges exceeds the caps "
            f"max_nodes={max_nodes} / max_edges={max_edges}."
        )
    out = {
        "node_feat": np.zeros((max_nodes, NUM_ATOM_FEATURES), np.int32),
        "edge_feat": np.zeros((max_edges, NUM_BOND_FEATURES), np.int32),
        "senders": np.zeros((max_edges,), np.int32),
        "receivers": np.zeros((max_edges,), np.int32),
        "node_mask": np.zeros((max_nodes,), bool),
        "edge_mask": np.zeros((max_edges,), bool),
    }
    out["node_feat"][:n] = graph["node_feat"]
    out["edge_feat"][:e] = graph["edge_feat"]
    out["senders"][:e] = graph["senders"]
    out["receivers"][:e] = graph["receivers"]
    out["node_mask"][:n] = True
    out["edge_mask"][:e] = True
    return out


# -- B3DB --------------------------------------------------------------------


def _b3db_file() -> pathlib.Path:
    spec = importlib.util.find_spec("B3DB")
    try:
        import rdkit  # noqa: F401
    except ImportError as e:
        raise ImportError(MOLECULES_MISSING_MSG) from e
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(MOLECULES_MISSING_MSG)
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / B3DB_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the qc-B3DB install; reinstall it with "
            "`pip install --force-reinstall qc-B3DB`."
        )
    return path


def _featurise_b3db(
    path: pathlib.Path, max_nodes: int, max_edges: int
) -> dict[str, np.ndarray]:
    """All kept molecules, padded, with their row in the file (`row`)."""
    from rdkit import RDLogger

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if len(rows) != B3DB_NUM_MOLECULES:
        raise ValueError(
            f"{path} has {len(rows)} molecules; expected {B3DB_NUM_MOLECULES} "
            "(qc-B3DB 1.1). Reinstall with `pip install 'qc-B3DB>=1.1'`."
        )
    RDLogger.DisableLog("rdApp.*")  # Unparsable SMILES are counted, not logged.
    try:
        examples, kept = [], []
        for i, row in enumerate(rows):
            label = row["BBB+/BBB-"]
            if label not in ("BBB+", "BBB-"):
                raise ValueError(f"{path} row {i}: unknown BBB label {label!r}.")
            graph = smiles_to_graph(row["SMILES"])
            if graph is None:
                continue
            if len(graph["node_feat"]) > max_nodes or len(graph["senders"]) > max_edges:
                continue
            example = pad_graph(graph, max_nodes, max_edges)
            example["labels"] = np.array([label == "BBB+"], np.float32)
            examples.append(example)
            kept.append(i)
    finally:
        RDLogger.EnableLog("rdApp.*")
    out = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
    out["row"] = np.array(kept, np.int32)
    return out


def load_b3db(
    split: str,
    data_dir: str | None = None,
    *,
    max_nodes: int = B3DB_MAX_NODES,
    max_edges: int = B3DB_MAX_EDGES,
) -> dict[str, np.ndarray]:
    """B3DB blood-brain-barrier permeability, as padded molecular graphs.

    Args:
      split: "train" (80% of the 7,807 rows before dropping) or "test" (20%).
      data_dir: ignored (the data ship inside the qc-B3DB package).
      max_nodes, max_edges: padding caps; larger molecules are dropped.

    Returns:
      The module's batch format (see the module docstring) with one task:
      `labels`/`label_mask` float32 `[n, 1]`; 6,167 train / 1,534 test
      molecules with the default caps.

    Raises:
      ImportError: rdkit or qc-B3DB is not installed.
    """
    del data_dir
    if split not in OGBG_SPLITS:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    path = _b3db_file()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    cache = (
        cache_lib.cache_dir()
        / f"b3db_v{_B3DB_CACHE_VERSION}_{digest}_{max_nodes}x{max_edges}.npz"
    )
    data = None
    if cache.exists():
        try:
            with np.load(cache) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError):  # A corrupt cache is rebuilt.
            data = None
    if data is None:
        with cache_lib.preparing("B3DB molecules (RDKit featurisation)", "~1 min"):
            data = _featurise_b3db(path, max_nodes, max_edges)
            cache_lib.save_npz_atomic(cache, data)
    order = np.random.default_rng(B3DB_SEED).permutation(B3DB_NUM_MOLECULES)
    test_rows = order[: int(round(B3DB_TEST_FRACTION * B3DB_NUM_MOLECULES))]
    in_test = np.isin(data["row"], test_rows)
    keep = in_test if split == "test" else ~in_test
    out = {k: v[keep] for k, v in data.items() if k != "row"}
    out["label_mask"] = np.ones_like(out["labels"])
    return out


# -- OGBG-molpcba ------------------------------------------------------------


def ogbg_record_to_example(
    record: Mapping[str, Any],
    max_nodes: int = OGBG_MAX_NODES,
    max_edges: int = OGBG_MAX_EDGES,
) -> dict[str, np.ndarray]:
    """One TFDS `ogbg_molpcba` record in the padded batch format.

    The record holds `node_feat` float[n, 9], `edge_feat` float[m, 3],
    `edge_index` int[m, 2] (each bond once), `labels` float[128] (NaN:
    missing), `num_nodes`, `num_edges`. Bonds become two directed edges
    (as AlgoPerf's `_to_jraph`); NaN labels become 0 with `label_mask` 0. A
    molecule above the caps keeps its first `max_nodes` atoms and the first
    `max_edges // 2` bonds among them.
    """
    nodes = np.asarray(record["node_feat"]).astype(np.int32)
    edge_feat = np.asarray(record["edge_feat"]).astype(np.int32).reshape(-1, 3)
    index = np.asarray(record["edge_index"]).astype(np.int32).reshape(-1, 2)
    labels = np.asarray(record["labels"], np.float32)
    nodes = nodes[:max_nodes]
    inside = (index < len(nodes)).all(axis=1)
    index, edge_feat = (
        index[inside][: max_edges // 2],
        edge_feat[inside][: max_edges // 2],
    )
    graph = {
        "node_feat": nodes,
        "edge_feat": np.concatenate([edge_feat, edge_feat]),
        "senders": np.concatenate([index[:, 0], index[:, 1]]),
        "receivers": np.concatenate([index[:, 1], index[:, 0]]),
    }
    out = pad_graph(graph, max_nodes, max_edges)
    missing = np.isnan(labels)
    out["labels"] = np.where(missing, 0.0, labels).astype(np.float32)
    out["label_mask"] = (~missing).astype(np.float32)
    return out


def load_ogbg_molpcba(split: str, data_dir: str | None = None):
    """AlgoPerf's OGBG-molpcba from a prepared TFDS directory, read on demand.

    Args:
      split: "train" (350,343 graphs) or "test" (TFDS "validation", 43,793
        graphs: AlgoPerf's validation target is measured there).
      data_dir: the TFDS data dir holding `ogbg_molpcba/<version>/`.

    Returns:
      A random-access source of examples in the padded format (see
      `ogbg_record_to_example`; caps `OGBG_MAX_NODES`, `OGBG_MAX_EDGES`).

    Raises:
      FileNotFoundError: no prepared dataset (the message says how to build it).
      ImportError: tensorflow_datasets is not installed.
    """
    from velo_scale.data.datasets import MappedSource, load_tfds

    if split not in OGBG_SPLITS:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    if data_dir is None:
        raise FileNotFoundError(OGBG_MISSING_MSG.format(where="train.data_dir (unset)"))
    root = pathlib.Path(data_dir).expanduser()
    if not (root / OGBG_NAME).is_dir() and not (root / "dataset_info.json").exists():
        raise FileNotFoundError(OGBG_MISSING_MSG.format(where=str(root)))
    source = load_tfds(
        OGBG_NAME, OGBG_SPLITS[split], data_dir=str(root), normalize=False
    )
    return MappedSource(source, ogbg_record_to_example)
