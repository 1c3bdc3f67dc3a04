"""Prepare AlgoPerf's TFDS datasets offline from real data shipped here.

AlgoPerf's workloads read TFDS datasets that its `dataset_setup.py` downloads.
On a machine without internet, two of them can be built from real data that
the package registries ship, in the exact on-disk format the TFDS builders
read, so the real runner can be exercised end to end:

* `mnist`: Debian's `dataset-fashion-mnist` files are in MNIST's IDX format
  (same names, shapes and dtypes); the TFDS `mnist` builder reads them as is.
* `ogbg_molpcba`: the TFDS builder reads OGB's raw CSV layout
  (`pcba/raw/*.csv.gz`, `pcba/split/scaffold/*.csv.gz`). `write_ogbg_raw`
  writes that layout from the B3DB molecules (`velo_scale.data.molecules`,
  rdkit featurisation as OGB's): 9 atom and 3 bond features, each bond once,
  and 128 label columns of which task 0 holds the blood-brain-barrier label
  and the other 127 are missing (NaN, masked by AlgoPerf's loss and mAP).

The data are real molecules, but the labels are not PCBA's: a run on them
checks the workload's code path (input pipeline, model, loss, mAP, the
submission, checkpoints), not the published target.

Usage (the second step in AlgoPerf's environment, which has
tensorflow-datasets):

  python -m velo_scale.integrations.algoperf.offline_data ogbg-raw RAW_DIR
  python -m velo_scale.integrations.algoperf.offline_data tfds ogbg_molpcba RAW_DIR DATA_DIR
  python -m velo_scale.integrations.algoperf.offline_data tfds mnist /usr/share/datasets/fashion-mnist DATA_DIR
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence

import numpy as np

OGBG_NUM_TASKS = 128
# Fractions of the molecules in OGB's train/valid/test files (random split,
# seed 0; OGB's own split is by scaffold).
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def _write_csv_gz(path: pathlib.Path, rows: Sequence[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with gzip.open(tmp, "wt", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, path)


def ogbg_raw_arrays(max_molecules: int | None = None) -> dict[str, list]:
    """B3DB molecules in OGB's raw layout (one row per node / bond / graph).

    Returns:
      `{"edge": [[src, dst]...], "node_feat": [[9 ints]...], "edge_feat":
      [[3 ints]...], "num_nodes": [n...], "num_edges": [m...], "labels":
      [[128 floats, NaN = missing]...]}` where each bond appears once (the
      TFDS/AlgoPerf pipeline adds the reverse direction) and node indices are
      local to their molecule, as in OGB's `edge.csv`.
    """
    from velo_scale.data import molecules

    path = molecules._b3db_file()  # noqa: SLF001 (the packaged TSV)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out: dict[str, list] = {
        k: [] for k in ("edge", "node_feat", "edge_feat", "num_nodes", "num_edges")
    }
    out["labels"] = []
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")  # Unparsable SMILES are skipped, not logged.
    for row in rows:
        graph = molecules.smiles_to_graph(row["SMILES"])
        if graph is None or len(graph["node_feat"]) == 0:
            continue
        once = slice(0, None, 2)  # edge 2k is bond k as i -> j
        out["edge"] += np.stack(
            [graph["senders"][once], graph["receivers"][once]], 1
        ).tolist()
        out["edge_feat"] += graph["edge_feat"][once].tolist()
        out["node_feat"] += graph["node_feat"].tolist()
        out["num_nodes"].append(len(graph["node_feat"]))
        out["num_edges"].append(len(graph["senders"]) // 2)
        labels = [float("nan")] * OGBG_NUM_TASKS
        labels[0] = 1.0 if row["BBB+/BBB-"] == "BBB+" else 0.0
        out["labels"].append(labels)
        if max_molecules is not None and len(out["num_nodes"]) >= max_molecules:
            break
    return out


def write_ogbg_raw(raw_dir: str | os.PathLike, max_molecules: int | None = None) -> int:
    """Writes `raw_dir/pcba/{raw,split/scaffold}/*.csv.gz`; returns #graphs."""
    root = pathlib.Path(raw_dir) / "pcba"
    data = ogbg_raw_arrays(max_molecules)
    files = {
        "edge.csv.gz": data["edge"],
        "node-feat.csv.gz": data["node_feat"],
        "edge-feat.csv.gz": data["edge_feat"],
        "num-node-list.csv.gz": [[n] for n in data["num_nodes"]],
        "num-edge-list.csv.gz": [[m] for m in data["num_edges"]],
        "graph-label.csv.gz": [
            ["" if np.isnan(v) else int(v) for v in row] for row in data["labels"]
        ],
    }
    for name, rows in files.items():
        _write_csv_gz(root / "raw" / name, rows)
    n = len(data["num_nodes"])
    order = np.random.default_rng(0).permutation(n)
    cuts = np.cumsum([int(f * n) for f in SPLIT_FRACTIONS[:2]])
    for name, idx in zip(("train", "valid", "test"), np.split(order, cuts)):
        _write_csv_gz(
            root / "split" / "scaffold" / f"{name}.csv.gz", [[i] for i in sorted(idx)]
        )
    return n


def build_tfds(name: str, source_dir: str, data_dir: str) -> None:
    """Builds TFDS `name` ("mnist" or "ogbg_molpcba") under `data_dir` from
    local files instead of downloading (needs tensorflow-datasets).

    `source_dir`: for "mnist", a folder with the four MNIST-format IDX files
    (gzipped, e.g. Debian's /usr/share/datasets/fashion-mnist); for
    "ogbg_molpcba", the folder `write_ogbg_raw` wrote (holding `pcba/`).
    """
    import tensorflow_datasets as tfds

    source = pathlib.Path(source_dir)

    if name == "mnist":
        # The builder gunzips its downloads; hand it the gunzipped files.
        unzipped = pathlib.Path(data_dir) / "downloads" / "mnist_local"
        unzipped.mkdir(parents=True, exist_ok=True)
        for gz in source.glob("*-ubyte.gz"):
            with gzip.open(gz, "rb") as f, open(unzipped / gz.name[:-3], "wb") as g:
                shutil.copyfileobj(f, g)

        def local(url: object) -> str:
            return str(unzipped / os.path.basename(str(url)).removesuffix(".gz"))

    elif name == "ogbg_molpcba":
        if not (source / "pcba" / "raw").is_dir():
            raise FileNotFoundError(
                f"{source}/pcba/raw not found; write it first with "
                "`python -m velo_scale.integrations.algoperf.offline_data ogbg-raw "
                f"{source}`."
            )

        def local(url: object) -> str:
            del url
            return str(source)

    else:
        raise ValueError(f"build_tfds knows 'mnist' and 'ogbg_molpcba'; got {name!r}.")

    def fake_download(self, urls):
        del self
        if isinstance(urls, dict):
            return {k: tfds.core.Path(local(v)) for k, v in urls.items()}
        return tfds.core.Path(local(urls))

    manager = tfds.download.DownloadManager
    saved = manager.download, manager.download_and_extract
    manager.download = manager.download_and_extract = fake_download
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    finally:
        manager.download, manager.download_and_extract = saved
    print(builder.info.splits)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    raw = sub.add_parser("ogbg-raw", help="write OGB's raw CSV layout from B3DB")
    raw.add_argument("raw_dir")
    raw.add_argument("--max_molecules", type=int, default=None)
    build = sub.add_parser("tfds", help="build a TFDS dataset from local files")
    build.add_argument("name", choices=["mnist", "ogbg_molpcba"])
    build.add_argument("source_dir")
    build.add_argument("data_dir")
    args = parser.parse_args(argv)
    if args.command == "ogbg-raw":
        n = write_ogbg_raw(args.raw_dir, args.max_molecules)
        print(f"wrote {n} molecules to {args.raw_dir}/pcba")
    else:
        build_tfds(args.name, args.source_dir, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
