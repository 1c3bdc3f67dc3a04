"""Real datasets by name, as in-memory arrays or random-access sources.

`load_dataset` returns small real datasets whole, in memory, in one format:
`{"image": float32[n, h, w, c] in [0, 1], "label": int32[n]}`. Full-size
datasets (ImageNet, ...) come from a prepared TFDS directory through
`load_tfds`, which reads records on demand (array_record files, no TensorFlow).
Both feed `BatchIterator` and `epoch_batches`. Nothing here ever makes up data:
a missing file is an error that names the package providing it.

Example:
  >>> train = load_dataset("digits", "train")
  >>> train["image"].shape, train["label"].shape
  ((1500, 8, 8, 1), (1500,))
"""

from __future__ import annotations

import difflib
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from velo_scale.data.fashion_mnist import load_fashion_mnist
from velo_scale.data.iterator import RandomAccessSource

SPLITS = ("train", "test")
DIGITS_SEED = 0
DIGITS_NUM_TRAIN = 1500  # Of 1,797; the remaining 297 are the test split.

SKLEARN_MISSING_MSG = (
    "The 'digits' dataset ships inside scikit-learn, which is not installed. "
    "Install it with `pip install scikit-learn`, or the `data` extra: "
    "`pip install -e '.[data]'` in a checkout (`pip install 'velo-scale[data]'`)."
)
TFDS_MISSING_MSG = (
    "load_tfds needs tensorflow_datasets (TensorFlow itself is not needed). "
    "Install it with `pip install tensorflow-datasets array_record`."
)


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split of {name!r} must be one of {SPLITS}; got {split!r}.")


def _fashion_mnist(split: str, data_dir: str | None) -> dict[str, np.ndarray]:
    """Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey images, 10 classes."""
    images, labels = load_fashion_mnist(split, data_dir=data_dir)
    return {
        "image": (images.astype(np.float32) / 255.0)[..., None],
        "label": labels.astype(np.int32),
    }


def _digits(split: str, data_dir: str | None) -> dict[str, np.ndarray]:
    """UCI optical digits (scikit-learn copy): 1,797 8x8 images, 16 grey levels.

    `data_dir` is ignored: the data ships inside the scikit-learn package.
    """
    del data_dir
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(SKLEARN_MISSING_MSG) from e
    try:
        digits = load_digits()
    except OSError as e:  # A broken install without its data files.
        raise FileNotFoundError(
            "scikit-learn's bundled digits data could not be read; reinstall it "
            "with `pip install --force-reinstall scikit-learn`."
        ) from e
    order = np.random.default_rng(DIGITS_SEED).permutation(len(digits.target))
    keep = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
    return {
        "image": (digits.images[keep].astype(np.float32) / 16.0)[..., None],
        "label": digits.target[keep].astype(np.int32),
    }


_LOADERS: dict[str, Callable[[str, str | None], Any]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
}
# Datasets defined in their own modules ("module:function", imported on first
# use so that optional packages are only needed by the datasets that use
# them). Each function takes `(split, data_dir)` and returns a dict of equal-
# length arrays or a random-access source, in its workload's batch format.
_LAZY_LOADERS: dict[str, str] = {
    # Small real data shipped in registry packages (the `_small` recipes).
    "bible_en_es": "velo_scale.data.bible:load_translation",
    "b3db": "velo_scale.data.molecules:load_b3db",
    "hopper": "velo_scale.data.hopper:load_hopper",
    "asterisk_speech": "velo_scale.data.speech:load_asterisk",
    "adult_clicks": "velo_scale.data.tabular:load_adult",
    "movielens_clicks": "velo_scale.data.tabular:load_movielens",
    "mricron_mri": "velo_scale.data.mri:load_mricron",
    # Full-size datasets (prepared on disk under `data_dir`).
    "imagenet2012": "velo_scale.data.imagenet:load_imagenet",
    "wmt17_de_en": "velo_scale.data.bible:load_wmt",
    "ogbg_molpcba": "velo_scale.data.molecules:load_ogbg_molpcba",
    "librispeech": "velo_scale.data.speech:load_librispeech",
    "criteo1tb": "velo_scale.data.tabular:load_criteo",
    "fastmri": "velo_scale.data.mri:load_fastmri",
}
DATASETS = tuple(sorted({*_LOADERS, *_LAZY_LOADERS}))


def _loader(name: str) -> Callable[[str, str | None], Any] | None:
    if name in _LOADERS:
        return _LOADERS[name]
    target = _LAZY_LOADERS.get(name)
    if target is None:
        return None
    import importlib

    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def load_dataset(name: str, split: str, *, data_dir: str | None = None) -> Any:
    """Loads a split of a real dataset (small ones whole, into memory).

    Datasets:
      - `"fashion_mnist"`: Fashion-MNIST (Xiao et al. 2017), 28x28x1, 10
        classes; "train" 60,000, "test" 10,000. Files from Debian's
        `dataset-fashion-mnist` (or `data_dir` / `$VELO_SCALE_FASHION_MNIST`).
      - `"digits"`: UCI handwritten digits as shipped by scikit-learn, 8x8x1,
        10 classes; a fixed permutation (seed 0) of the 1,797 images puts the
        first 1,500 in "train" and the other 297 in "test". `data_dir` is ignored.

    Args:
      name: one of `DATASETS`.
      split: "train" or "test".
      data_dir: directory holding the dataset's files, where it has files.

      The other names (`_LAZY_LOADERS`) live in their own modules of
      `velo_scale.data`, whose docstrings give their formats.

    Returns:
      For the image datasets `{"image": float32[n, h, w, 1] in [0, 1],
      "label": int32[n] in [0, 10)}`; others a dict of arrays or a
      random-access source in their workload's format.

    Raises:
      ValueError: unknown `name` (the message lists known and close names) or
        `split`.
      FileNotFoundError: the files are missing; the message names the package.
      ImportError: the package that holds the data is not installed.
    """
    loader = _loader(name)
    if loader is None:
        close = difflib.get_close_matches(str(name), DATASETS, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown dataset {name!r}; known datasets: {list(DATASETS)}.{hint} "
            "Full-size datasets load with load_tfds(name, split, data_dir=...)."
        )
    _check_split(name, split)
    return loader(split, data_dir)


class MappedSource:
    """A random-access source whose records pass through `fn` when read."""

    def __init__(
        self,
        source: RandomAccessSource,
        fn: Callable[[Mapping[str, Any]], dict[str, np.ndarray]],
    ):
        self.source = source
        self.fn = fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.fn(self.source[index])

    def __getitems__(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
        getitems = getattr(self.source, "__getitems__", None)
        records = getitems(indices) if getitems else [self.source[i] for i in indices]
        return [self.fn(r) for r in records]


def normalize_record(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Puts one TFDS record in `load_dataset`'s format.

    A uint8 `image` becomes float32 in [0, 1] (divided by 255), an integer
    `label` int32; other fields pass through as arrays.
    """
    out = {k: np.asarray(v) for k, v in record.items()}
    if "image" in out and out["image"].dtype == np.uint8:
        out["image"] = out["image"].astype(np.float32) / 255.0
    if "label" in out and np.issubdtype(out["label"].dtype, np.integer):
        out["label"] = out["label"].astype(np.int32)
    return out


_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _builder_dir(name: str, data_dir: str) -> pathlib.Path:
    """Finds the prepared TFDS builder directory (the one with dataset_info.json).

    Looks at `data_dir/name` (name may carry a config and version, e.g.
    "imagenet2012/5.1.0"), then at its newest version subdirectory, then at
    `data_dir` itself.
    """
    root = pathlib.Path(data_dir)
    base = root / name
    if (base / "dataset_info.json").exists():
        return base
    if base.is_dir():
        versions = [
            d
            for d in base.iterdir()
            if _VERSION.match(d.name) and (d / "dataset_info.json").exists()
        ]
        if versions:
            return max(versions, key=lambda d: tuple(map(int, d.name.split("."))))
    if (root / "dataset_info.json").exists():
        return root
    raise FileNotFoundError(
        f"No prepared TFDS dataset {name!r} under {root} (looked for "
        f"{base}/[<version>/]dataset_info.json). Prepare it with the "
        "tensorflow-datasets package in array_record format, e.g. "
        f"`tfds build {name} --data_dir={root} --file_format=array_record`."
    )


def load_tfds(
    name: str, split: str, *, data_dir: str, normalize: bool = True
) -> RandomAccessSource:
    """Opens a prepared TFDS dataset for random access (array_record, no TF).

    Calls `tfds.builder_from_directory(dir).as_data_source(split)`; records are
    read and decoded on demand, so the dataset never has to fit in memory.
    The result feeds `BatchIterator` and `epoch_batches` directly.

    Args:
      name: dataset name, optionally with config/version ("mnist",
        "imagenet2012/5.1.0"); it names a folder under `data_dir`.
      split: TFDS split expression ("train", "test", "train[:90%]", ...).
      data_dir: the TFDS data directory (holding `<name>/<version>/`), or a
        prepared builder directory itself.
      normalize: pass records through `normalize_record` (uint8 image ->
        float32 in [0, 1], label -> int32), matching `load_dataset`.

    Returns:
      A source with `len(source) = n` and `source[i] -> {field: array}` (one
      example, no batch dimension).

    Raises:
      ImportError: tensorflow_datasets is not installed.
      FileNotFoundError: no prepared dataset is found.

    Example:
      >>> src = load_tfds("mnist", "train", data_dir="~/tensorflow_datasets")  # doctest: +SKIP
      >>> it = BatchIterator(src, 128, seed=0)  # doctest: +SKIP
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(TFDS_MISSING_MSG) from e
    builder_dir = _builder_dir(name, str(pathlib.Path(data_dir).expanduser()))
    source = tfds.builder_from_directory(str(builder_dir)).as_data_source(split)
    return MappedSource(source, normalize_record) if normalize else source
