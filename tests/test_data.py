"""The data layer: real datasets by name and deterministic, resumable batches."""

import json
import sys
import types

import numpy as np
import pytest

from velo_scale.data import (
    BatchIterator,
    epoch_batches,
    load_dataset,
    load_fashion_mnist,
    load_tfds,
)

# Class counts of the 1,797 UCI digits that scikit-learn ships.
DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def _indexed(n: int = 103) -> dict[str, np.ndarray]:
    """A dict source whose "index" field tells which example a row is."""
    return {
        "index": np.arange(n, dtype=np.int64),
        "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3) / 7.0,
    }


def _take(it, k: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(k)]


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


# --- Datasets ---------------------------------------------------------------


def test_digits_is_real_and_split_deterministically():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train["image"].shape == (1500, 8, 8, 1)
    assert test["image"].shape == (297, 8, 8, 1)
    for split in (train, test):
        assert split["image"].dtype == np.float32
        assert split["label"].dtype == np.int32
        assert split["image"].min() == 0.0 and split["image"].max() == 1.0
        assert set(np.unique(split["label"]).tolist()) == set(range(10))
    labels = np.concatenate([train["label"], test["label"]])
    assert np.bincount(labels).tolist() == DIGITS_CLASS_COUNTS  # 1,797 in all
    # The two splits partition scikit-learn's images (a permutation of them).
    from sklearn.datasets import load_digits

    full = load_digits().images.reshape(1797, 64) / 16.0
    ours = np.concatenate([train["image"], test["image"]]).reshape(1797, 64)
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(full, axis=0))
    again = load_dataset("digits", "train")
    np.testing.assert_array_equal(again["image"], train["image"])
    np.testing.assert_array_equal(again["label"], train["label"])


def test_fashion_mnist_through_load_dataset():
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    assert train["image"].shape == (60000, 28, 28, 1)
    assert test["image"].shape == (10000, 28, 28, 1)
    assert train["image"].dtype == test["image"].dtype == np.float32
    assert train["label"].dtype == test["label"].dtype == np.int32
    assert 0.0 <= train["image"].min() and train["image"].max() <= 1.0
    assert np.bincount(test["label"]).tolist() == [1000] * 10
    raw = load_fashion_mnist("test")
    np.testing.assert_array_equal(test["image"][..., 0] * 255.0, raw.images)
    assert 70 / 255 < train["image"].mean() < 80 / 255  # mean pixel ~72.9


def test_missing_files_name_their_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", "train", data_dir=str(tmp_path))


def test_unknown_dataset_lists_known_and_close_names():
    with pytest.raises(ValueError, match="Unknown dataset 'fashion-mnist'") as e:
        load_dataset("fashion-mnist", "train")
    assert "Did you mean 'fashion_mnist'" in str(e.value)
    assert "'digits', 'fashion_mnist'" in str(e.value)  # the known names
    with pytest.raises(ValueError, match="Did you mean 'digits'"):
        load_dataset("digit", "train")
    with pytest.raises(ValueError, match="split of 'digits' must be one of"):
        load_dataset("digits", "validation")


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_dataset("digits", "train")


def test_load_tfds_without_tfds_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        load_tfds("mnist", "train", data_dir=str(tmp_path))


def _fake_tfds(records: list[dict], opened: list[str]) -> types.ModuleType:
    """A stand-in for tensorflow_datasets' builder_from_directory API."""

    class Builder:
        def __init__(self, path: str):
            opened.append(path)

        def as_data_source(self, split: str):
            assert split == "train"
            return records  # A list is a random-access source.

    module = types.ModuleType("tensorflow_datasets")
    module.builder_from_directory = Builder
    return module


def test_load_tfds_wiring_feeds_the_iterator(monkeypatch, tmp_path):
    # Real records (digits) in TFDS's raw format: uint8 images, int64 labels.
    digits = load_dataset("digits", "test")
    images = np.round(digits["image"] * 255).astype(np.uint8)
    records = [
        {"image": im, "label": np.int64(lb)} for im, lb in zip(images, digits["label"])
    ]
    for version in ("1.0.0", "3.0.1", "3.0.0"):
        (tmp_path / "mnist" / version).mkdir(parents=True)
        (tmp_path / "mnist" / version / "dataset_info.json").write_text("{}")
    opened: list[str] = []
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(records, opened))

    source = load_tfds("mnist", "train", data_dir=str(tmp_path))
    assert opened == [str(tmp_path / "mnist" / "3.0.1")]  # The newest version.
    assert len(source) == 297
    assert (
        source[0]["image"].dtype == np.float32 and source[0]["label"].dtype == np.int32
    )

    as_arrays = {"image": images.astype(np.float32) / 255.0, "label": digits["label"]}
    _assert_same_batches(
        _take(BatchIterator(source, 32, seed=3), 12),
        _take(BatchIterator(as_arrays, 32, seed=3), 12),
    )
    with pytest.raises(FileNotFoundError, match="tensorflow-datasets"):
        load_tfds("imagenet2012", "train", data_dir=str(tmp_path))


# --- BatchIterator ----------------------------------------------------------


def test_same_seed_same_batches_different_seed_different():
    data = _indexed()
    a = _take(BatchIterator(data, 10, seed=7), 25)
    b = _take(BatchIterator(data, 10, seed=7), 25)
    c = _take(BatchIterator(data, 10, seed=8), 25)
    _assert_same_batches(a, b)
    assert all(x["index"].shape == (10,) and x["x"].shape == (10, 3) for x in a)
    assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))


def test_order_depends_only_on_seed_and_epoch():
    data = _indexed()
    it = BatchIterator(data, 10, seed=5)
    for epoch in range(3):
        got = np.concatenate([b["index"] for b in _take(it, 10)])
        want = np.random.default_rng([5, epoch]).permutation(103)[:100]
        np.testing.assert_array_equal(got, want)
        assert it.get_state() == {"epoch": epoch + 1, "index": 0}


def test_every_example_once_per_epoch():
    data = _indexed()
    keep = BatchIterator(data, 10, seed=1, drop_remainder=False)
    assert keep.batches_per_epoch == 11
    for _ in range(2):
        batches = _take(keep, 11)
        assert [len(b["index"]) for b in batches] == [10] * 10 + [3]
        seen = np.concatenate([b["index"] for b in batches])
        np.testing.assert_array_equal(np.sort(seen), np.arange(103))
    drop = BatchIterator(data, 10, seed=1)
    assert drop.batches_per_epoch == 10
    seen = np.concatenate([b["index"] for b in _take(drop, 10)])
    assert len(np.unique(seen)) == 100  # No repeats; 3 dropped this epoch.
    # Rows stay aligned across fields.
    batch = next(BatchIterator(data, 10, seed=1))
    np.testing.assert_array_equal(batch["x"], data["x"][batch["index"]])


@pytest.mark.parametrize("consumed", [0, 3, 8, 9, 10, 23])
def test_resume_is_bit_identical(consumed):
    data = _indexed()
    original = BatchIterator(data, 11, seed=42)  # 9 batches per epoch.
    _take(original, consumed)
    state = json.loads(json.dumps(original.get_state()))  # As a checkpoint would.
    assert set(state) == {"epoch", "index"}
    assert all(type(v) is int for v in state.values())
    fresh = BatchIterator(data, 11, seed=42)
    fresh.set_state(state)
    _assert_same_batches(_take(fresh, 5), _take(original, 5))


def test_resume_from_array_state():
    data = _indexed()
    original = BatchIterator(data, 10, seed=0, drop_remainder=False)
    _take(original, 10)  # The next batch is the epoch's short last one.
    state = {k: np.asarray(v) for k, v in original.get_state().items()}
    fresh = BatchIterator(data, 10, seed=0, drop_remainder=False)
    fresh.set_state(state)
    expect = _take(original, 5)
    assert len(expect[0]["index"]) == 3
    _assert_same_batches(_take(fresh, 5), expect)


def test_epoch_boundary_crossing():
    data = _indexed(25)
    it = BatchIterator(data, 10, seed=9)  # 2 full batches, 5 dropped per epoch.
    batches = _take(it, 5)
    assert it.get_state() == {"epoch": 2, "index": 10}
    perm0 = np.random.default_rng([9, 0]).permutation(25)
    perm1 = np.random.default_rng([9, 1]).permutation(25)
    np.testing.assert_array_equal(batches[2]["index"], perm1[:10])
    np.testing.assert_array_equal(batches[1]["index"], perm0[10:20])
    assert not np.array_equal(perm0[:20], perm1[:20])


def test_no_shuffle_serves_in_order():
    it = BatchIterator(_indexed(7), 3, seed=0, shuffle=False, drop_remainder=False)
    got = [b["index"].tolist() for b in _take(it, 4)]
    assert got == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]


def test_random_access_source_matches_arrays():
    data = _indexed(31)
    records = [{k: v[i] for k, v in data.items()} for i in range(31)]
    _assert_same_batches(
        _take(BatchIterator(records, 4, seed=2), 20),
        _take(BatchIterator(data, 4, seed=2), 20),
    )


def test_epoch_batches_covers_every_example_once_in_order():
    data = _indexed()
    batches = list(epoch_batches(data, 10))
    assert [len(b["index"]) for b in batches] == [10] * 10 + [3]
    np.testing.assert_array_equal(
        np.concatenate([b["index"] for b in batches]), np.arange(103)
    )
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data["x"])
    (whole,) = epoch_batches(data, 1000)
    np.testing.assert_array_equal(whole["index"], np.arange(103))


def test_iterator_over_real_digits():
    train = load_dataset("digits", "train")
    it = BatchIterator(train, 128, seed=0)
    batch = next(it)
    assert batch["image"].shape == (128, 8, 8, 1) and batch["label"].shape == (128,)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32


# --- Errors -----------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, -4])
def test_non_positive_batch_size_is_refused(batch_size):
    with pytest.raises(
        ValueError, match=f"batch_size must be positive; got batch_size={batch_size}"
    ):
        BatchIterator(_indexed(), batch_size, seed=0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        epoch_batches(_indexed(), batch_size)


def test_batch_larger_than_dataset_is_refused_when_dropping():
    with pytest.raises(ValueError, match=r"<= the dataset size 103 .*batch_size=104"):
        BatchIterator(_indexed(), 104, seed=0)
    it = BatchIterator(_indexed(), 104, seed=0, drop_remainder=False)
    assert next(it)["index"].shape == (103,)


def test_bad_sources_and_states_are_explained():
    with pytest.raises(
        ValueError, match=r"equal length; got lengths \{'a': 3, 'b': 4\}"
    ):
        BatchIterator({"a": np.zeros(3), "b": np.zeros(4)}, 1, seed=0)
    with pytest.raises(ValueError, match="empty dict"):
        BatchIterator({}, 1, seed=0)
    with pytest.raises(TypeError, match="bare array"):
        BatchIterator(np.zeros(5), 1, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        BatchIterator(_indexed(), 1, seed=-1)
    it = BatchIterator(_indexed(), 10, seed=0)
    with pytest.raises(ValueError, match=r"missing \['index'\]"):
        it.set_state({"epoch": 1})
    with pytest.raises(ValueError, match=r"state\['index'\] must be in \[0, 103\]"):
        it.set_state({"epoch": 0, "index": 500})


@pytest.mark.parametrize("n", [64, 70, 9])
def test_large_dataset_order_is_blockwise_permutation_and_resumable(monkeypatch, n):
    # Datasets too large to materialise a permutation (Criteo: 4.2e9 clicks)
    # are shuffled block-wise; every epoch is still a permutation, the order
    # differs between epochs, and resuming mid-epoch continues it exactly.
    from velo_scale.data import iterator as iterator_lib

    monkeypatch.setattr(iterator_lib, "LARGE_DATASET", 4)
    monkeypatch.setattr(iterator_lib, "SHUFFLE_BLOCK", 8)
    data = {"x": np.arange(n)}
    it = iterator_lib.BatchIterator(data, 3, seed=5, drop_remainder=False)
    per_epoch = -(-n // 3)
    epoch0 = np.concatenate([next(it)["x"] for _ in range(per_epoch)])
    epoch1 = np.concatenate([next(it)["x"] for _ in range(per_epoch)])
    assert sorted(epoch0.tolist()) == list(range(n))
    assert sorted(epoch1.tolist()) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, np.arange(n))
    resumed = iterator_lib.BatchIterator(data, 3, seed=5, drop_remainder=False)
    resumed.set_state({"epoch": 0, "index": 6})
    np.testing.assert_array_equal(next(resumed)["x"], epoch0[6:9])


def test_sources_with_epoch_dependent_records_get_the_epoch():
    # Random augmentation that changes every epoch (ImageNet crops) must see
    # the epoch; resuming restores it with the position.
    from velo_scale.data.iterator import BatchIterator

    class Augmented:
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"x": np.asarray(10 * self.epoch + i)}

        def set_epoch(self, epoch):
            self.epoch = epoch

    it = BatchIterator(Augmented(), 4, seed=0, shuffle=False)
    assert next(it)["x"].tolist() == [0, 1, 2, 3]
    assert next(it)["x"].tolist() == [10, 11, 12, 13]
    resumed = BatchIterator(Augmented(), 4, seed=0, shuffle=False)
    resumed.set_state({"epoch": 2, "index": 0})
    assert next(resumed)["x"].tolist() == [20, 21, 22, 23]
