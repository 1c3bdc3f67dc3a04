"""Single-coil MRI reconstruction data in fastMRI's (and AlgoPerf's) format.

Every example is one 2-D slice, transformed as AlgoPerf's fastMRI pipeline
does: a 1-D column mask (4x acceleration, 8% fully sampled centre lines) is
applied to the slice's centred k-space, the zero-filled reconstruction
`|ifft2c(masked k-space)|` (centre-cropped to the target size) is normalised
by its own mean and (population) standard deviation and clamped to [-6, 6],
and the fully sampled target image is normalised with the same mean and std
and clamped too. Batches:

  {"inputs": float32[n, h, w],   # normalised zero-filled reconstruction
   "targets": float32[n, h, w],  # normalised fully sampled magnitude image
   "mean": float32[n], "std": float32[n],  # to undo the normalisation
   "volume_max": float32[n]}     # max of the slice's volume: SSIM data range

Two sources:

* `load_mricron` (`"mricron_mri"`): real T1-weighted brain volumes shipped in
  Debian's `mricron-data` (`/usr/share/mricron/templates`), read with nibabel.
  Axial slices are cropped to the head, padded to a square, resized to
  `image_size` pixels and Fourier transformed: the single-coil k-space is
  simulated (a real magnitude image; no coil sensitivities, no phase, no
  noise). Split by subject: "train" holds the human Colin27 volumes (`ch2`,
  1 mm with scalp; `ch2better`, 0.5 mm brain), "test" the rhesus macaque INIA19
  T1 template (`inia19-t1-brain`), so no anatomy is shared (the only human
  subject in the package is Colin27, and its volumes are not independent).
* `load_fastmri` (`"fastmri"`): the real fastMRI knee single-coil files
  (`knee_singlecoil_train/*.h5`, `knee_singlecoil_val/*.h5`: `kspace`
  complex64[slices, 640, cols], `reconstruction_esc` float32[slices, 320, 320],
  attribute `max`), read with h5py, slice by slice.

Masks are deterministic: each example's mask comes from
`np.random.default_rng(seed tuple of (split, volume, slice, draw))`. As in
AlgoPerf (which seeds a training mask with the example's position in its file
stream, the same in every epoch) a training slice keeps its masks across
epochs; `load_mricron` draws `masks_per_slice` different masks per training
slice (each its own example) so that an epoch shows every slice under
several masks.
"""

from __future__ import annotations

import os
import pathlib
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from velo_scale.data import cache as cache_lib

ACCELERATION = 4
CENTER_FRACTION = 0.08
CLIP = 6.0
MASK_TYPES = ("random", "equispaced")

MRICRON_DIR = "/usr/share/mricron/templates"
MRICRON_ENV = "VELO_SCALE_MRICRON"
# Real anatomical intensity volumes (the package's other files are label atlases).
MRICRON_TRAIN_VOLUMES = ("ch2", "ch2better")  # Colin27 (human), 1 mm and 0.5 mm.
MRICRON_TEST_VOLUMES = ("inia19-t1-brain",)  # INIA19 rhesus macaque T1 template.
MRICRON_IMAGE_SIZE = 64
MRICRON_MASKS_PER_SLICE = 4
# Slices kept: at least this fraction of the (square) slice is head/brain,
# i.e. brighter than FOREGROUND_LEVEL x the volume's max.
FOREGROUND_LEVEL = 0.1
MIN_FOREGROUND_FRACTION = 0.15
CACHE_VERSION = 1

FASTMRI_TRAIN_DIR = "knee_singlecoil_train"
FASTMRI_VAL_DIR = "knee_singlecoil_val"
FASTMRI_NUM_VALIDATION_FILES = 100  # AlgoPerf: sorted val files [:100] / [100:].

NIBABEL_MISSING_MSG = (
    "The 'mricron_mri' dataset reads NIfTI volumes with nibabel, which is not "
    "installed. Install it with `pip install nibabel scipy` (or `pip install "
    "velo-scale[recipes]`)."
)
H5PY_MISSING_MSG = (
    "The 'fastmri' dataset reads the fastMRI .h5 files with h5py, which is not "
    "installed. Install it with `pip install h5py`."
)
FASTMRI_MISSING_MSG = (
    "fastMRI knee single-coil files not found: expected {path}/*.h5. Request "
    "access at https://fastmri.med.nyu.edu/, download knee_singlecoil_train.tar.xz "
    "and knee_singlecoil_val.tar.xz and unpack both into train.data_dir (giving "
    f"{FASTMRI_TRAIN_DIR}/ and {FASTMRI_VAL_DIR}/), as AlgoPerf's "
    "dataset_setup.py --fastmri does."
)


# -- k-space ---------------------------------------------------------------
def fft2c(image: np.ndarray) -> np.ndarray:
    """Centred, orthonormal 2-D FFT over the last two axes (image -> k-space,
    DC at index `n // 2`), as fastMRI's `fft2c`."""
    x = np.fft.ifftshift(image, axes=(-2, -1))
    return np.fft.fftshift(np.fft.fft2(x, norm="ortho"), axes=(-2, -1))


def ifft2c(kspace: np.ndarray) -> np.ndarray:
    """Inverse of `fft2c`: complex image from centred k-space."""
    x = np.fft.ifftshift(kspace, axes=(-2, -1))
    return np.fft.fftshift(np.fft.ifft2(x, norm="ortho"), axes=(-2, -1))


def center_lines(
    num_cols: int, center_fraction: float = CENTER_FRACTION
) -> tuple[int, int]:
    """`(first, count)` of the fully sampled centre columns.

    `count = int(num_cols * center_fraction)` (AlgoPerf truncates; fastMRI
    rounds, identical for its widths at 8%), starting at
    `(num_cols - count + 1) // 2`.
    """
    count = int(num_cols * center_fraction)
    return (num_cols - count + 1) // 2, count


def random_mask(
    num_cols: int,
    rng: np.random.Generator,
    acceleration: float = ACCELERATION,
    center_fraction: float = CENTER_FRACTION,
) -> np.ndarray:
    """fastMRI's `RandomMaskFunc`: the centre columns plus every other column
    with probability `(N / acceleration - N_low) / (N - N_low)`, so that
    `N / acceleration` columns are sampled on average. bool[num_cols]."""
    first, count = center_lines(num_cols, center_fraction)
    prob = (num_cols / acceleration - count) / (num_cols - count)
    mask = rng.uniform(size=num_cols) < prob
    mask[first : first + count] = True
    return mask


def equispaced_mask(
    num_cols: int,
    rng: np.random.Generator,
    acceleration: float = ACCELERATION,
    center_fraction: float = CENTER_FRACTION,
) -> np.ndarray:
    """fastMRI's `EquispacedMaskFunc`: the centre columns plus columns at a
    spacing adjusted for them, `a' = a (N_low - N) / (N_low a - N)`, from a
    random offset in `[0, round(a'))` (rounded to the nearest column).
    bool[num_cols]."""
    first, count = center_lines(num_cols, center_fraction)
    mask = np.zeros(num_cols, bool)
    mask[first : first + count] = True
    spacing = acceleration * (count - num_cols) / (count * acceleration - num_cols)
    offset = rng.integers(0, round(spacing))
    mask[np.around(np.arange(offset, num_cols - 1, spacing)).astype(int)] = True
    return mask


def make_mask(
    mask_type: str,
    num_cols: int,
    rng: np.random.Generator,
    acceleration: float = ACCELERATION,
    center_fraction: float = CENTER_FRACTION,
) -> np.ndarray:
    """`random_mask` or `equispaced_mask` by name."""
    if mask_type == "random":
        return random_mask(num_cols, rng, acceleration, center_fraction)
    if mask_type == "equispaced":
        return equispaced_mask(num_cols, rng, acceleration, center_fraction)
    raise ValueError(f"mask_type must be one of {MASK_TYPES}; got {mask_type!r}.")


def _center_crop(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    h, w = x.shape[-2:]
    top, left = (h - shape[0]) // 2, (w - shape[1]) // 2
    if top < 0 or left < 0:
        raise ValueError(f"cannot centre-crop an image of {(h, w)} to {tuple(shape)}.")
    return x[..., top : top + shape[0], left : left + shape[1]]


def zero_filled(
    kspace: np.ndarray, mask: np.ndarray, target_shape: Sequence[int]
) -> np.ndarray:
    """Magnitude of the zero-filled reconstruction of masked k-space.

    Args:
      kspace: complex[..., rows, cols], centred (as `fft2c` gives).
      mask: bool[cols], the sampled columns.
      target_shape: `(h, w)` the complex image is centre-cropped to.

    Returns:
      float32[..., h, w].
    """
    image = _center_crop(ifft2c(kspace * mask), target_shape)
    return np.abs(image).astype(np.float32)


def normalize_example(
    zero_filled_image: np.ndarray, target: np.ndarray, volume_max: float
) -> dict[str, np.ndarray]:
    """AlgoPerf's normalisation: both images minus the input's mean, over its
    (population) std, clamped to [-6, 6]; keeps `mean`, `std`, `volume_max`."""
    mean = np.float32(zero_filled_image.mean())
    std = np.float32(zero_filled_image.std())
    if not std > 0:
        raise ValueError("the zero-filled image is constant; cannot normalise it.")
    return {
        "inputs": np.clip((zero_filled_image - mean) / std, -CLIP, CLIP).astype(
            np.float32
        ),
        "targets": np.clip((target - mean) / std, -CLIP, CLIP).astype(np.float32),
        "mean": mean,
        "std": std,
        "volume_max": np.float32(volume_max),
    }


def fastmri_example(
    kspace: np.ndarray, target: np.ndarray, volume_max: float, mask: np.ndarray
) -> dict[str, np.ndarray]:
    """One training/eval example from a slice's centred k-space.

    Args:
      kspace: complex[rows, cols] (fastMRI knee: [640, ~368]).
      target: float32[h, w], the fully sampled magnitude image
        (`reconstruction_esc`, [320, 320]).
      volume_max: max of the slice's volume (`attrs["max"]`).
      mask: bool[cols], from `random_mask` / `equispaced_mask`.
    """
    image = zero_filled(kspace, mask, target.shape)
    return normalize_example(image, np.asarray(target, np.float32), volume_max)


def _seed(*parts: int | str) -> list[int]:
    return [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]


def _stack(examples: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# -- mricron-data: real brain volumes, simulated single-coil k-space -------
def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Area-style downsampling of a square image to `size x size` (Gaussian
    anti-aliasing, then linear interpolation on the pixel grid)."""
    from scipy import ndimage

    factor = image.shape[0] / size
    if factor > 1:
        image = ndimage.gaussian_filter(image, sigma=0.5 * factor, mode="constant")
    out = ndimage.zoom(image, 1 / factor, order=1, mode="grid-constant", grid_mode=True)
    return np.maximum(out[:size, :size], 0).astype(np.float32)


def _volume_slices(path: pathlib.Path, image_size: int) -> np.ndarray:
    """The kept axial slices of a NIfTI volume: float32[n, size, size].

    The volume (reoriented to RAS) is cropped to the bounding box of its
    foreground (plus a 4% margin) so that head or brain fills the square
    field of view; each axial slice is shown with anterior up, padded to a
    square and resized. Slices with under `MIN_FOREGROUND_FRACTION` of
    foreground pixels (the top and bottom of the head) are dropped.
    """
    try:
        import nibabel as nib
    except ImportError as e:
        raise ImportError(NIBABEL_MISSING_MSG) from e
    image = nib.as_closest_canonical(nib.load(str(path)))
    volume = np.asarray(image.dataobj, dtype=np.float32)  # [x (R), y (A), z (S)]
    foreground = volume > FOREGROUND_LEVEL * volume.max()
    lo = np.argwhere(foreground).min(0)
    hi = np.argwhere(foreground).max(0) + 1
    margin = (0.04 * (hi - lo)).astype(int)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, volume.shape)
    volume = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    slices = np.flip(np.transpose(volume, (2, 1, 0)), axis=1)  # [z, rows (P->A up), x]
    side = max(slices.shape[1:])
    pad_r, pad_c = side - slices.shape[1], side - slices.shape[2]
    slices = np.pad(
        slices,
        ((0, 0), (pad_r // 2, pad_r - pad_r // 2), (pad_c // 2, pad_c - pad_c // 2)),
    )
    out = np.stack([_resize(s, image_size) for s in slices])
    level = FOREGROUND_LEVEL * out.max()
    keep = (out > level).mean(axis=(1, 2)) >= MIN_FOREGROUND_FRACTION
    return out[keep]


def mricron_volume(name: str, data_dir: str | None, image_size: int) -> np.ndarray:
    """Cached `_volume_slices` of `<data_dir>/<name>.nii.gz`."""
    root = pathlib.Path(data_dir or os.environ.get(MRICRON_ENV) or MRICRON_DIR)
    path = root / f"{name}.nii.gz"
    if not path.exists():
        raise FileNotFoundError(
            f"MRI volume {path} not found. Install the real brain volumes with "
            "`apt-get install mricron-data` (Debian/Ubuntu; files in "
            f"{MRICRON_DIR}) or set ${MRICRON_ENV} / train.data_dir to a folder "
            f"holding {', '.join(MRICRON_TRAIN_VOLUMES + MRICRON_TEST_VOLUMES)}"
            ".nii.gz."
        )
    stat = path.stat()
    key = f"{name}-{image_size}-{stat.st_size}-{int(stat.st_mtime)}-v{CACHE_VERSION}"
    cache = cache_lib.cache_dir("mricron_mri") / f"{key}.npy"
    if cache.exists():
        return np.load(cache)
    with cache_lib.preparing(f"MRI slices of {name}"):
        slices = _volume_slices(path, image_size)
        cache_lib.save_npy_atomic(cache, slices)
    return slices


def load_mricron(
    split: str,
    data_dir: str | None = None,
    *,
    image_size: int = MRICRON_IMAGE_SIZE,
    mask_type: str = "random",
    masks_per_slice: int | None = None,
    acceleration: float = ACCELERATION,
    center_fraction: float = CENTER_FRACTION,
) -> dict[str, np.ndarray]:
    """Real brain MRI slices with simulated, undersampled single-coil k-space.

    Args:
      split: "train" (Colin27 volumes `ch2`, `ch2better`) or "test" (INIA19
        macaque `inia19-t1-brain`).
      data_dir: folder of the `.nii.gz` volumes (default `$VELO_SCALE_MRICRON`
        or `/usr/share/mricron/templates`).
      image_size: side of the square slices (a multiple of 16 for a 4-pool
        U-Net).
      mask_type: "random" (AlgoPerf) or "equispaced".
      masks_per_slice: examples (mask draws) per slice; default
        `MRICRON_MASKS_PER_SLICE` for "train", 1 for "test".
      acceleration, center_fraction: of the column masks.

    Returns:
      The module's batch format: "inputs", "targets" float32[n, s, s];
      "mean", "std", "volume_max" float32[n]. Deterministic.

    Raises:
      FileNotFoundError: the volumes are missing (`apt-get install mricron-data`).
      ImportError: nibabel or scipy is missing.
    """
    if split not in ("train", "test"):
        raise ValueError(
            f"split of 'mricron_mri' must be 'train' or 'test'; got {split!r}."
        )
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}; got {mask_type!r}.")
    names = MRICRON_TRAIN_VOLUMES if split == "train" else MRICRON_TEST_VOLUMES
    draws = masks_per_slice or (MRICRON_MASKS_PER_SLICE if split == "train" else 1)
    examples = []
    for name in names:
        slices = mricron_volume(name, data_dir, image_size)
        volume_max = float(slices.max())
        kspace = fft2c(slices.astype(np.float64))
        for i, (target, k) in enumerate(zip(slices, kspace)):
            for draw in range(draws):
                rng = np.random.default_rng(_seed(split, name, i, draw, mask_type))
                mask = make_mask(
                    mask_type, image_size, rng, acceleration, center_fraction
                )
                examples.append(fastmri_example(k, target, volume_max, mask))
    return _stack(examples)


# -- fastMRI knee single-coil .h5 files -------------------------------------
class FastMRISource:
    """The slices of fastMRI single-coil `.h5` files, read on demand.

    `len(source)` slices; `source[i]` is one example in the module's format
    (inputs/targets [320, 320]), its mask drawn from a seed fixed by the split
    and the slice (AlgoPerf also fixes each example's mask).
    """

    def __init__(self, paths: Sequence[pathlib.Path], split: str, mask_type: str):
        try:
            import h5py
        except ImportError as e:
            raise ImportError(H5PY_MISSING_MSG) from e
        self._h5py = h5py
        self.split, self.mask_type = split, mask_type
        self.index: list[tuple[pathlib.Path, int]] = []
        for path in paths:
            with h5py.File(path, "r") as f:
                self.index += [(path, s) for s in range(f["kspace"].shape[0])]

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, path: pathlib.Path):
        files = self.__dict__.setdefault("_files", {})
        if path not in files:
            files[path] = self._h5py.File(path, "r")
        return files[path]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        path, s = self.index[i]
        f = self._file(path)  # Kept open: reads are per slice.
        kspace = f["kspace"][s]
        target = f["reconstruction_esc"][s]
        volume_max = float(f.attrs.get("max", 0.0))
        rng = np.random.default_rng(_seed(self.split, path.name, s, self.mask_type))
        mask = make_mask(self.mask_type, kspace.shape[-1], rng)
        return fastmri_example(kspace, target, volume_max, mask)


def fastmri_files(split: str, data_dir: str | None) -> list[pathlib.Path]:
    """The `.h5` files of a split, as AlgoPerf picks them.

    "train": `knee_singlecoil_train/*.h5`; "test" (= AlgoPerf's validation
    split, the one its SSIM target refers to; alias "validation"): the first
    100 sorted `knee_singlecoil_val/*.h5`; "heldout" (AlgoPerf's test split):
    the other val files.
    """
    if split not in ("train", "test", "validation", "heldout"):
        raise ValueError(
            "split of 'fastmri' must be 'train', 'test' (= AlgoPerf validation), "
            f"'validation' or 'heldout'; got {split!r}."
        )
    if data_dir is None:
        raise FileNotFoundError(
            FASTMRI_MISSING_MSG.format(path="<train.data_dir>/" + FASTMRI_TRAIN_DIR)
        )
    root = pathlib.Path(data_dir).expanduser()
    folder = root / (FASTMRI_TRAIN_DIR if split == "train" else FASTMRI_VAL_DIR)
    paths = sorted(folder.glob("*.h5"))
    if not paths:
        raise FileNotFoundError(FASTMRI_MISSING_MSG.format(path=folder))
    if split in ("test", "validation"):
        paths = paths[:FASTMRI_NUM_VALIDATION_FILES]
    elif split == "heldout":
        paths = paths[FASTMRI_NUM_VALIDATION_FILES:]
    return paths


def load_fastmri(
    split: str, data_dir: str | None, *, mask_type: str = "random"
) -> FastMRISource:
    """The real fastMRI knee single-coil data (AlgoPerf's fastMRI workload).

    Args:
      split: "train", "test" (AlgoPerf's validation split: 100 val volumes,
        3,554 slices), "validation" (same) or "heldout" (AlgoPerf's test).
      data_dir: folder holding `knee_singlecoil_train/` and
        `knee_singlecoil_val/`.
      mask_type: "random" (AlgoPerf) or "equispaced".

    Returns:
      A random-access source (`len`, `source[i]`) of examples in the module's
      format, 320x320 images.

    Raises:
      FileNotFoundError: no `.h5` files (the message says how to get them).
      ImportError: h5py is not installed.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}; got {mask_type!r}.")
    return FastMRISource(fastmri_files(split, data_dir), split, mask_type)
