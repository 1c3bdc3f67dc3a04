"""Deterministic, resumable batches over in-memory arrays or random-access sources.

The order of examples depends only on `(seed, epoch)`: epoch `e` visits the
examples in the order `np.random.default_rng([seed, e]).permutation(n)` (or
`0..n-1` without shuffling). The whole position of an iterator is therefore two
ints, `{"epoch": e, "index": i}` (`i` = examples of epoch `e` already served),
which a checkpoint stores and `set_state` restores bit-exactly.

Example:
  >>> import numpy as np
  >>> data = {"x": np.arange(10, dtype=np.float32), "y": np.arange(10)}
  >>> it = BatchIterator(data, 4, seed=0)
  >>> first = next(it)
  >>> state = it.get_state()  # {'epoch': 0, 'index': 4}
  >>> second = next(it)
  >>> it2 = BatchIterator(data, 4, seed=0)
  >>> it2.set_state(state)
  >>> bool(np.array_equal(next(it2)["x"], second["x"]))
  True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

Batch = dict[str, np.ndarray]

_STATE_KEYS = ("epoch", "index")


@runtime_checkable
class RandomAccessSource(Protocol):
    """A dataset read one record at a time (e.g. a TFDS `ArrayRecordDataSource`).

    `source[i]` returns one example as a dict of arrays (no batch dimension);
    sources may also offer `__getitems__(list[int]) -> list[dict]` to read many
    records in one call, which `as_source` uses when present.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


class ArraySource:
    """In-memory dataset: a dict of equal-length arrays, gathered by index.

    Args:
      arrays: `{name: array[n, ...]}`, all with the same leading dimension `n > 0`.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        if not arrays:
            raise ValueError("source must hold at least one array; got an empty dict.")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        for k, v in arrays.items():
            if v.ndim == 0:
                raise ValueError(
                    f"source[{k!r}] must have a leading example dimension; "
                    f"got a scalar ({v.shape=})."
                )
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"source arrays must have equal length; got lengths {lengths}."
            )
        self.arrays = arrays
        self._n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._n

    def gather(self, indices: np.ndarray) -> Batch:
        """Returns `{name: array[len(indices), ...]}` (copies, never views)."""
        return {k: v[indices] for k, v in self.arrays.items()}


class RecordSource:
    """Adapts a `RandomAccessSource` to batched `gather` by stacking records."""

    def __init__(self, source: RandomAccessSource):
        self.source = source
        self._n = len(source)

    def __len__(self) -> int:
        return self._n

    def set_epoch(self, epoch: int) -> None:
        """Forwards the epoch to sources whose records depend on it (random
        augmentation)."""
        set_epoch = getattr(self.source, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def gather(self, indices: np.ndarray) -> Batch:
        """Reads `source[i]` for each index and stacks each field on axis 0."""
        keys = [int(i) for i in indices]
        getitems = getattr(self.source, "__getitems__", None)
        records = (
            getitems(keys) if getitems is not None else [self.source[i] for i in keys]
        )
        if not records:
            raise ValueError("gather needs at least one index; got none.")
        names = list(records[0])
        return {k: np.stack([np.asarray(r[k]) for r in records]) for k in names}


Source = ArraySource | RecordSource


def as_source(source: Mapping[str, np.ndarray] | RandomAccessSource | Source) -> Source:
    """Wraps a dict of arrays or a random-access source for batched reads.

    Args:
      source: `{name: array[n, ...]}`, or any object with `__len__` and
        `__getitem__(int) -> dict` (e.g. the result of `load_tfds`), or an
        already wrapped `ArraySource`/`RecordSource` (returned as is).

    Returns:
      An object with `len()` and `gather(indices: int[k]) -> {name: array[k, ...]}`.
    """
    if isinstance(source, (ArraySource, RecordSource)):
        return source
    if callable(getattr(source, "gather", None)) and hasattr(source, "__len__"):
        return source  # Reads whole batches itself (e.g. a streamed file source).
    if isinstance(source, Mapping):
        return ArraySource(source)
    if isinstance(source, np.ndarray):
        raise TypeError(
            "source must be a dict of named arrays, e.g. {'image': x, 'label': y}; "
            f"got a bare array ({source.shape=})."
        )
    if isinstance(source, RandomAccessSource):
        return RecordSource(source)
    raise TypeError(
        "source must be a dict of arrays or a random-access source with "
        f"__len__ and __getitem__(int) -> dict; got {type(source).__name__}."
    )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int; got {batch_size!r}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size=}.")


# Above this many examples an epoch's order is not materialised (an int64
# permutation of Criteo 1TB's 4.2e9 clicks would take 34 GB): blocks of
# `SHUFFLE_BLOCK` consecutive examples are visited in a random order, and the
# examples inside a block in a random affine order (a bijection of the block).
LARGE_DATASET = 1 << 26
SHUFFLE_BLOCK = 1 << 20


def _block_shuffled(n: int, seed: int, epoch: int, start: int, stop: int) -> np.ndarray:
    """Positions `[start, stop)` of the block-wise shuffled order of `range(n)`.

    The blocks (`SHUFFLE_BLOCK` consecutive examples each, the last one
    possibly shorter) are visited in a random order; inside block `b` of size
    `m`, the `o`-th example served is `(a_b * o + c_b) mod m` with `a_b`
    coprime to `m` (a bijection), so every epoch visits every example exactly
    once. Deterministic in `(seed, epoch)`.
    """
    num_blocks = -(-n // SHUFFLE_BLOCK)
    sizes = np.full(num_blocks, SHUFFLE_BLOCK, np.int64)
    sizes[-1] = n - SHUFFLE_BLOCK * (num_blocks - 1)
    rng = np.random.default_rng([seed, epoch])
    block_order = rng.permutation(num_blocks)
    mults = rng.integers(0, SHUFFLE_BLOCK // 2, size=num_blocks) * 2 + 1
    shifts = rng.integers(0, SHUFFLE_BLOCK, size=num_blocks)
    while True:  # Coprime with the (possibly short) block size.
        bad = np.gcd(mults, sizes) != 1
        if not bad.any():
            break
        mults[bad] += 2
    ends = np.cumsum(sizes[block_order])
    positions = np.arange(start, stop, dtype=np.int64)
    slots = np.searchsorted(ends, positions, side="right")
    blocks = block_order[slots]
    offsets = positions - (ends[slots] - sizes[blocks])
    inner = (mults[blocks] * offsets + shifts[blocks]) % sizes[blocks]
    return blocks * SHUFFLE_BLOCK + inner


class BatchIterator(Iterator[Batch]):
    """Endless, deterministic, resumable batches over a dataset (train use).

    Epoch `e` serves the examples in the order of
    `np.random.default_rng([seed, e]).permutation(n)` (`arange(n)` when
    `shuffle=False`), `batch_size` at a time. With `drop_remainder=True` the
    last `n % batch_size` examples of each epoch's order are skipped, so every
    batch has exactly `batch_size` examples; with `drop_remainder=False` the
    last batch of an epoch is smaller. Then the next epoch starts.

    Args:
      source: `{name: array[n, ...]}` of equal-length arrays, or a random-access
        source (`__len__`, `__getitem__(int) -> dict`; see `as_source`).
      batch_size: examples per batch, `0 < batch_size` (`<= n` when
        `drop_remainder`).
      seed: non-negative int; with the epoch it fixes the order of examples.
      shuffle: permute each epoch (True) or serve examples in order (False).
      drop_remainder: skip an epoch's incomplete last batch.

    Yields:
      `{name: array[batch_size, ...]}`, dtypes as in the source.

    Example:
      >>> it = BatchIterator({"x": np.arange(6)}, 2, seed=1)
      >>> [next(it)["x"].shape for _ in range(4)]  # crosses into epoch 1
      [(2,), (2,), (2,), (2,)]
    """

    def __init__(
        self,
        source: Mapping[str, np.ndarray] | RandomAccessSource | Source,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
    ):
        self._source = as_source(source)
        n = len(self._source)
        if n <= 0:
            raise ValueError(f"source must hold at least one example; got {n=}.")
        _check_batch_size(batch_size)
        if drop_remainder and batch_size > n:
            raise ValueError(
                f"batch_size must be <= the dataset size {n} when drop_remainder=True "
                f"(no full batch exists otherwise); got {batch_size=}."
            )
        if (
            isinstance(seed, bool)
            or not isinstance(seed, (int, np.integer))
            or seed < 0
        ):
            raise ValueError(f"seed must be a non-negative int; got {seed=!r}.")
        self.num_examples = n
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self._epoch = 0
        self._index = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches served per epoch: `n // batch_size`, rounded up if not dropping."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + int(rest > 0 and not self.drop_remainder)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices of `epoch` in serving order: int64[n].

        Only for datasets of at most `LARGE_DATASET` examples; larger ones are
        ordered block-wise without materialising the order (`_order_slice`).
        """
        if self._order is None or self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = rng.permutation(self.num_examples)
            else:
                self._order = np.arange(self.num_examples)
            self._order_epoch = epoch
        return self._order

    def _epoch_done(self, index: int) -> bool:
        remaining = self.num_examples - index
        return remaining <= 0 or (self.drop_remainder and remaining < self.batch_size)

    def __iter__(self) -> BatchIterator:
        return self

    def _order_slice(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Positions `[start, stop)` of epoch `epoch`'s serving order."""
        if self.num_examples <= LARGE_DATASET or not self.shuffle:
            if not self.shuffle:
                return np.arange(start, stop, dtype=np.int64)
            return self.epoch_order(epoch)[start:stop]
        return _block_shuffled(self.num_examples, self.seed, epoch, start, stop)

    def __next__(self) -> Batch:
        stop = min(self._index + self.batch_size, self.num_examples)
        set_epoch = getattr(self._source, "set_epoch", None)
        if set_epoch is not None:  # Per-epoch augmentation of the source.
            set_epoch(self._epoch)
        batch = self._source.gather(self._order_slice(self._epoch, self._index, stop))
        self._index = stop
        if self._epoch_done(self._index):
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def get_state(self) -> dict[str, int]:
        """The position: `{"epoch": e, "index": i}`, plain ints (JSON-friendly).

        `i` counts the examples of epoch `e` already served; at an epoch
        boundary the state is `{"epoch": e + 1, "index": 0}`.
        """
        return {"epoch": self._epoch, "index": self._index}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves to a position returned by `get_state` (ints or 0-d arrays).

        The batches that follow are exactly those served after that state by
        any iterator with the same source, batch size, seed and flags.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(
                f"state must have keys {list(_STATE_KEYS)}; missing {missing} in "
                f"{dict(state)!r}."
            )
        epoch, index = (int(np.asarray(state[k])) for k in _STATE_KEYS)
        if epoch < 0:
            raise ValueError(f"state['epoch'] must be >= 0; got {epoch=}.")
        if not 0 <= index <= self.num_examples:
            raise ValueError(
                f"state['index'] must be in [0, {self.num_examples}] (the dataset "
                f"size); got {index=}."
            )
        if self._epoch_done(index):
            epoch, index = epoch + 1, 0
        self._epoch, self._index = epoch, index


def epoch_batches(
    source: Mapping[str, np.ndarray] | RandomAccessSource | Source, batch_size: int
) -> Iterator[Batch]:
    """One ordered pass for evaluation: every example exactly once.

    Args:
      source: `{name: array[n, ...]}` or a random-access source (see `as_source`).
      batch_size: examples per batch, > 0; may exceed `n`.

    Yields:
      `{name: array[b, ...]}` with `b = batch_size`, except the last batch which
      holds the remaining `n - batch_size * (ceil(n / batch_size) - 1)` examples;
      examples in source order.

    Example:
      >>> [b["x"].tolist() for b in epoch_batches({"x": np.arange(5)}, 2)]
      [[0, 1], [2, 3], [4]]
    """
    wrapped = as_source(source)
    _check_batch_size(batch_size)  # Eagerly, not at the first next().
    n = len(wrapped)

    def batches() -> Iterator[Batch]:
        for start in range(0, n, batch_size):
            yield wrapped.gather(np.arange(start, min(start + batch_size, n)))

    return batches()
