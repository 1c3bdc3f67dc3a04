"""ImageNet (ILSVRC 2012) for the AlgoPerf image workloads, read from a
prepared TFDS `imagenet2012` directory and preprocessed per record on the host
(numpy + PIL, no TensorFlow).

AlgoPerf's preprocessing, 224x224 RGB:

* train: an Inception-style random crop covering 8%-100% of the image area
  with aspect ratio (width / height) in [3/4, 4/3] (10 attempts, else the
  centre crop below), resized to 224x224 (bicubic), and a random horizontal
  flip. The randomness is a function of `(seed, index)` only, so a record
  gets the same crop in every epoch and after a resume.
* eval: the central square of side `224 / 256` of the shorter side, resized
  to 224x224 (bicubic), i.e. resize to 256 then centre-crop 224.
* both: `(pixel - MEAN_RGB) / STDDEV_RGB` on the 0..255 scale.

Differences from AlgoPerf's tf.data pipeline: the crop sampler is ours (TF's
`sample_distorted_bounding_box` draws boxes differently), PIL's bicubic
resize antialiases, a record's crop does not change between epochs, and
RandAugment and mixup (AlgoPerf's ViT training pipeline) are not applied.

Prepare the data once with tensorflow-datasets (the ILSVRC2012 tars go in
its manual directory, `<data_dir>/downloads/manual/`):

  tfds build imagenet2012 --data_dir=DATA_DIR --file_format=array_record
"""

from __future__ import annotations

import io
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

TFDS_NAME = "imagenet2012"
NUM_CLASSES = 1000
NUM_TRAIN = 1_281_167
NUM_VALIDATION = 50_000
IMAGE_SIZE = 224
RESIZE_SIZE = 256
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
TFDS_SPLITS = {"train": "train", "test": "validation"}

PREPARE_MSG = (
    "Prepare ImageNet once with tensorflow-datasets (put ILSVRC2012_img_train.tar "
    "and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/), then run "
    "`tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record` "
    "and set train.data_dir = '<data_dir>'."
)

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels.


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "ImageNet preprocessing needs Pillow (`pip install pillow`; it comes "
            "with matplotlib)."
        ) from e
    return Image


def decode_image(value: Any):
    """An RGB `PIL.Image` from encoded bytes (JPEG/PNG), a uint8 array
    `[H, W]`, `[H, W, 1]` or `[H, W, 3]`, or a PIL image (grey, CMYK and
    palette images are converted to RGB)."""
    image_lib = _pil()
    if isinstance(value, image_lib.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, np.bytes_)) or (
        isinstance(value, np.ndarray) and value.dtype.kind in "SO"
    ):
        data = value.item() if isinstance(value, np.ndarray) else value
        image = image_lib.open(io.BytesIO(bytes(data)))
    else:
        array = np.asarray(value)
        if array.dtype != np.uint8:
            raise ValueError(
                f"an ImageNet image array must be uint8; got {array.dtype} "
                f"{array.shape}."
            )
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
            raise ValueError(
                f"an ImageNet image array must be [H, W], [H, W, 1] or [H, W, 3]; "
                f"got {array.shape}."
            )
        image = image_lib.fromarray(array)
    return image.convert("RGB") if image.mode != "RGB" else image


def random_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    area_range: tuple[float, float] = AREA_RANGE,
    aspect_ratio_range: tuple[float, float] = ASPECT_RATIO_RANGE,
    attempts: int = CROP_ATTEMPTS,
) -> Box | None:
    """A random crop `(top, left, h, w)` whose area is a uniform fraction of
    `area_range` of the image and whose aspect ratio w / h is log-uniform in
    `aspect_ratio_range`; None when no attempt fits in the image."""
    log_lo, log_hi = (math.log(r) for r in aspect_ratio_range)
    for _ in range(attempts):
        area = rng.uniform(*area_range) * height * width
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        h = int(round(math.sqrt(area / ratio)))
        w = int(round(math.sqrt(area * ratio)))
        if 0 < h <= height and 0 < w <= width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return None


def center_crop_box(
    height: int,
    width: int,
    *,
    image_size: int = IMAGE_SIZE,
    resize_size: int = RESIZE_SIZE,
) -> Box:
    """The central square of side `image_size / resize_size * min(h, w)`:
    resizing it to `image_size` equals resizing the shorter side to
    `resize_size` and cropping the centre `image_size` square."""
    side = max(1, int(image_size / resize_size * min(height, width)))
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def normalize(image: np.ndarray) -> np.ndarray:
    """`(image - MEAN_RGB) / STDDEV_RGB` as float32; image: [..., 3] in 0..255."""
    mean = np.asarray(MEAN_RGB, np.float32)
    std = np.asarray(STDDEV_RGB, np.float32)
    return (np.asarray(image, np.float32) - mean) / std


def _crop_resize(image, box: Box, size: int) -> np.ndarray:
    top, left, h, w = box
    resample = _pil().Resampling.BICUBIC
    out = image.resize((size, size), resample, box=(left, top, left + w, top + h))
    return np.asarray(out, np.uint8)


def preprocess_train(
    image: Any, rng: np.random.Generator, *, image_size: int = IMAGE_SIZE
) -> np.ndarray:
    """Random crop + bicubic resize + random horizontal flip + normalise.

    Args:
      image: encoded bytes, a uint8 array or a PIL image (see `decode_image`).
      rng: the record's generator (crop box, then flip).
      image_size: output side in pixels.

    Returns:
      float32[image_size, image_size, 3], normalised by MEAN_RGB/STDDEV_RGB.
    """
    image = decode_image(image)
    width, height = image.size
    box = random_crop_box(height, width, rng) or center_crop_box(
        height, width, image_size=image_size
    )
    pixels = _crop_resize(image, box, image_size)
    if rng.uniform() < 0.5:
        pixels = pixels[:, ::-1]
    return normalize(pixels)


def preprocess_eval(
    image: Any, *, image_size: int = IMAGE_SIZE, resize_size: int = RESIZE_SIZE
) -> np.ndarray:
    """Centre crop (`center_crop_box`) + bicubic resize + normalise:
    float32[image_size, image_size, 3]."""
    image = decode_image(image)
    width, height = image.size
    box = center_crop_box(height, width, image_size=image_size, resize_size=resize_size)
    return normalize(_crop_resize(image, box, image_size))


def record_rng(seed: int, index: int, epoch: int = 0) -> np.random.Generator:
    """The generator of record `index`'s augmentation in epoch `epoch`."""
    return np.random.default_rng([seed, index] if epoch == 0 else [seed, index, epoch])


class ImageNetSource:
    """Random-access ImageNet: `source[i] -> {"image": float32[224, 224, 3],
    "label": int32}`, preprocessed on read.

    Args:
      records: a random-access source of raw TFDS records (`image`: encoded
        bytes or uint8 [H, W, 3]; `label`: int).
      train: random crop + flip (deterministic per `(seed, index, epoch)`;
        `BatchIterator` sets the epoch with `set_epoch`) or the eval centre
        crop.
      seed: augmentation seed.
      image_size: output side in pixels.
    """

    def __init__(
        self,
        records: Any,
        *,
        train: bool,
        seed: int = 0,
        image_size: int = IMAGE_SIZE,
    ):
        self.records = records
        self.train = train
        self.seed = seed
        self.image_size = image_size
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """New crops and flips every epoch (called by `BatchIterator`)."""
        self.epoch = int(epoch)

    def _process(self, index: int, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self.train:
            rng = record_rng(self.seed, index, self.epoch)
            image = preprocess_train(record["image"], rng, image_size=self.image_size)
        else:
            image = preprocess_eval(record["image"], image_size=self.image_size)
        return {"image": image, "label": np.asarray(record["label"], np.int32)}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._process(int(index), self.records[int(index)])

    def __getitems__(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
        getitems = getattr(self.records, "__getitems__", None)
        records = getitems(indices) if getitems else [self.records[i] for i in indices]
        return [self._process(int(i), r) for i, r in zip(indices, records)]


def load_imagenet(split: str, data_dir: str | None, *, seed: int = 0) -> ImageNetSource:
    """ImageNet 2012 from a prepared TFDS directory (array_record files).

    Args:
      split: "train" (1,281,167 images, augmented) or "test" (TFDS
        "validation", 50,000 images, centre crop).
      data_dir: the TFDS data directory holding `imagenet2012/<version>/`.
      seed: the training augmentation seed.

    Returns:
      An `ImageNetSource`: `source[i] -> {"image": float32[224, 224, 3]
      (normalised), "label": int32 in [0, 1000)}`.

    Raises:
      FileNotFoundError: no prepared dataset under `data_dir` (the message
        gives the `tfds build` command).
      ImportError: tensorflow-datasets / array_record are not installed.
    """
    if split not in TFDS_SPLITS:
        raise ValueError(f"split must be one of {tuple(TFDS_SPLITS)}; got {split!r}.")
    if data_dir is None:
        raise FileNotFoundError(
            f"imagenet2012 needs train.data_dir (a TFDS data directory). {PREPARE_MSG}"
        )
    from velo_scale.data import datasets

    data_dir = str(pathlib.Path(data_dir).expanduser())
    try:  # Before importing tensorflow_datasets: a missing dataset says so.
        datasets._builder_dir(TFDS_NAME, data_dir)  # noqa: SLF001
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} {PREPARE_MSG}") from None
    records = datasets.load_tfds(
        TFDS_NAME, TFDS_SPLITS[split], data_dir=data_dir, normalize=False
    )
    return ImageNetSource(records, train=split == "train", seed=seed)
