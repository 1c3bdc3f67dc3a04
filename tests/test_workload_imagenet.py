"""ImageNet workloads: ResNet-50 (BatchNorm) and ViT-S/16, ViT-B/16.

Full-scale recipes are built abstractly (published parameter counts); the
ImageNet preprocessing runs on a real JPEG (matplotlib's Grace Hopper photo)
and real Fashion-MNIST images; the small recipes train on Fashion-MNIST
through the trainer, including BatchNorm statistics and their checkpoint.
"""

import io
import pathlib
import sys
import types

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from tests.reference_data import CHECKPOINT
from velo_scale import cli
from velo_scale.data import BatchIterator, imagenet, load_dataset
from velo_scale.models.resnet import RESNET50_NUM_PARAMS, ResNet
from velo_scale.workloads.base import abstract_variables, count_params
from velo_scale.workloads.classification import Classification

REPO = pathlib.Path(__file__).resolve().parent.parent
VELO = f"velo.weights='{CHECKPOINT}'"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # Recipes include gin_configs/ by relative path.


def _workload(recipe: str, *bindings: str):
    cli.parse_gin([f"recipes/{recipe}.gin"], list(bindings))
    return cli.configured_value("train.workload")


# --- full-scale recipes -------------------------------------------------------


@pytest.mark.parametrize(
    "recipe,num_params,step_hint,target",
    [
        ("imagenet_resnet50", 25_557_032, 195_999, 0.22569),
        ("imagenet_vit_s16", 22_122_472, 167_999, 0.22691),
        ("imagenet_vit_b16", 86_567_656, None, None),
    ],
)
def test_full_scale_recipe_parameter_counts(recipe, num_params, step_hint, target):
    workload = _workload(recipe)
    variables = abstract_variables(workload)
    assert count_params(variables["params"]) == num_params
    assert gin.query_parameter("train.data") == "imagenet2012"
    assert gin.query_parameter("train.batch_size") == 1024
    assert workload.image_shape == (224, 224, 3)
    assert workload.label_smoothing == 0.1
    facts = workload.full_scale
    if step_hint is None:  # ViT-B/16: the paper's task, no AlgoPerf target.
        assert facts is None
        assert gin.query_parameter("train.num_steps") == 150_000
        return
    assert facts.num_params == num_params
    assert facts.step_hint == step_hint == gin.query_parameter("train.num_steps")
    assert (facts.target_metric, facts.target_value) == ("error", target)
    assert not facts.higher_is_better and facts.batch_size == 1024


def test_resnet50_matches_algoperf_layout():
    workload = _workload("imagenet_resnet50")
    assert workload.train_flag  # BatchNorm: train=True/False and batch_stats.
    variables = abstract_variables(workload)
    params, stats = variables["params"], variables["batch_stats"]
    assert count_params(params) == RESNET50_NUM_PARAMS
    # Bottleneck stages [3, 4, 6, 3]; 53 BatchNorms (mean + var each).
    blocks = sorted(k for k in params if k.startswith("stage"))
    assert [sum(b.startswith(f"stage{i}_") for b in blocks) for i in range(4)] == [
        3, 4, 6, 3,
    ]  # fmt: skip
    assert count_params(stats) == 2 * 26_560
    assert params["conv_init"]["kernel"].shape == (7, 7, 3, 64)
    assert params["stage3_block0"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
    assert params["stage3_block0"]["conv_proj"]["kernel"].shape == (1, 1, 1024, 2048)
    assert params["head"]["kernel"].shape == (2048, 1000)
    # Basic blocks: ResNet-18's published count (torchvision's 11,689,512).
    resnet18 = Classification(
        ResNet(**ResNet.R18), train_flag=True, image_shape=(224, 224, 3)
    )
    assert count_params(abstract_variables(resnet18)["params"]) == 11_689_512


def test_resnet_init_zero_last_bn_scale_and_needs_train_flag():
    model = ResNet(stage_sizes=(1, 1), num_filters=4, num_classes=3)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), images, train=False))
    params = variables["params"]
    for block in ("stage0_block0", "stage1_block0"):
        assert np.all(np.asarray(params[block]["bn3"]["scale"]) == 0.0)
        assert np.all(np.asarray(params[block]["bn1"]["scale"]) == 1.0)
        assert "conv_proj" in params[block]  # 4 -> 16 channels, then stride 2.
    assert "bias" not in params["conv_init"]
    logits, new = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    moved = new["batch_stats"]["bn_init"]["mean"]
    assert not np.allclose(moved, 0.0)
    with pytest.raises(ValueError, match="train_flag"):
        model.apply(variables, images)


# --- ImageNet preprocessing -----------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_bytes():
    from matplotlib import cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return pathlib.Path(path).read_bytes()  # A real 512x600 (w x h) RGB JPEG.


def test_decode_bytes_and_arrays(jpeg_bytes):
    image = imagenet.decode_image(jpeg_bytes)
    assert image.mode == "RGB" and image.size == (512, 600)
    pixels = np.asarray(image)
    assert pixels.shape == (600, 512, 3) and pixels.dtype == np.uint8
    assert np.asarray(imagenet.decode_image(pixels)).tolist() == pixels.tolist()
    grey = load_dataset("fashion_mnist", "test")["image"][0, ..., 0]
    grey = np.round(grey * 255).astype(np.uint8)
    rgb = np.asarray(imagenet.decode_image(grey[..., None]))
    assert rgb.shape == (28, 28, 3)
    assert np.array_equal(rgb[..., 0], grey) and np.array_equal(rgb[..., 2], grey)
    with pytest.raises(ValueError, match="uint8"):
        imagenet.decode_image(grey.astype(np.float32))


def test_normalize_and_center_box_hand_values():
    mean = np.array(imagenet.MEAN_RGB, np.float32)
    assert np.allclose(imagenet.normalize(mean), 0.0, atol=1e-6)
    white = imagenet.normalize(np.full((1, 1, 3), 255, np.uint8))[0, 0]
    want = [(255 - 123.675) / 58.395, (255 - 116.28) / 57.12, (255 - 103.53) / 57.375]
    assert np.allclose(white, want, atol=1e-5)
    # 600 x 512: side 224 / 256 * 512 = 448, centred: top 76, left 32.
    assert imagenet.center_crop_box(600, 512) == (76, 32, 448, 448)
    assert imagenet.center_crop_box(256, 256) == (16, 16, 224, 224)


def test_eval_preprocessing_is_resize_256_center_crop_224(jpeg_bytes):
    from PIL import Image

    out = imagenet.preprocess_eval(jpeg_bytes)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    assert np.array_equal(out, imagenet.preprocess_eval(jpeg_bytes))
    # Reference: shorter side to 256 (600 x 512 -> 300 x 256), centre 224 crop.
    image = Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")
    resized = np.asarray(image.resize((256, 300), Image.Resampling.BICUBIC))
    top, left = (300 - 224) // 2, (256 - 224) // 2
    reference = imagenet.normalize(resized[top : top + 224, left : left + 224])
    assert np.mean(np.abs(out - reference)) < 0.05  # ~1 grey level in 255.
    lo = (0 - np.array(imagenet.MEAN_RGB)) / imagenet.STDDEV_RGB
    hi = (255 - np.array(imagenet.MEAN_RGB)) / imagenet.STDDEV_RGB
    assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)


def test_random_crop_boxes_respect_area_and_aspect_ranges():
    rng = np.random.default_rng(0)
    boxes = [imagenet.random_crop_box(600, 512, rng) for _ in range(500)]
    assert all(b is not None for b in boxes)
    top, left, h, w = np.array(boxes).T
    area = h * w / (600 * 512)
    assert np.all((top >= 0) & (left >= 0) & (top + h <= 600) & (left + w <= 512))
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    assert np.all((w / h >= 0.75 * 0.97) & (w / h <= 4 / 3 * 1.03))
    assert area.min() < 0.2 and area.max() > 0.7  # The range is covered.
    # A 1-pixel-high strip fits no crop: fall back (None).
    assert imagenet.random_crop_box(1, 1000, rng) is None


def test_train_preprocessing_is_deterministic_per_seed_and_index(jpeg_bytes):
    def crop(seed, index):
        return imagenet.preprocess_train(jpeg_bytes, imagenet.record_rng(seed, index))

    a = crop(0, 7)
    assert a.shape == (224, 224, 3) and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    assert np.array_equal(a, crop(0, 7))
    assert not np.array_equal(a, crop(0, 8))
    assert not np.array_equal(a, crop(1, 7))
    # Half of the crops are mirrored: same box, flipped columns.
    flips = []
    for index in range(40):
        rng = imagenet.record_rng(0, index)
        imagenet.random_crop_box(600, 512, rng)
        flips.append(rng.uniform() < 0.5)
    assert 5 < sum(flips) < 35


def _records(jpeg_bytes):
    """Raw TFDS-style records: the JPEG as bytes and Fashion-MNIST uint8 images."""
    fm = load_dataset("fashion_mnist", "test")
    grey = np.round(fm["image"][:3, ..., 0] * 255).astype(np.uint8)
    records = [{"image": jpeg_bytes, "label": np.int64(817)}]
    records += [{"image": g, "label": np.int64(y)} for g, y in zip(grey, fm["label"])]
    return records


def test_imagenet_source_feeds_the_batch_iterator(jpeg_bytes):
    records = _records(jpeg_bytes)
    train = imagenet.ImageNetSource(records, train=True, seed=3)
    batch = next(BatchIterator(train, 4, seed=0))
    assert batch["image"].shape == (4, 224, 224, 3)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert sorted(batch["label"].tolist()) == sorted(
        [817, *[r["label"] for r in records[1:]]]
    )
    again = train.__getitems__([0, 2])
    assert np.array_equal(again[0]["image"], train[0]["image"])
    evaluation = imagenet.ImageNetSource(records, train=False)
    assert np.array_equal(evaluation[0]["image"], imagenet.preprocess_eval(jpeg_bytes))


# --- the real loader's wiring and errors ----------------------------------------


def test_load_imagenet_names_the_tfds_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="--file_format=array_record"):
        load_dataset("imagenet2012", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds build imagenet2012"):
        imagenet.load_imagenet("test", None)
    with pytest.raises(ValueError, match="split"):
        imagenet.load_imagenet("validation", str(tmp_path))


def test_load_imagenet_reads_prepared_tfds(monkeypatch, tmp_path, jpeg_bytes):
    records = _records(jpeg_bytes)
    opened = []

    class Builder:
        def __init__(self, path):
            self.path = path

        def as_data_source(self, split):
            opened.append((self.path, split))
            return records

    fake = types.ModuleType("tensorflow_datasets")
    fake.builder_from_directory = Builder
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    prepared = tmp_path / "imagenet2012" / "5.1.0"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")

    test = load_dataset("imagenet2012", "test", data_dir=str(tmp_path))
    train = load_dataset("imagenet2012", "train", data_dir=str(tmp_path))
    assert opened == [(str(prepared), "validation"), (str(prepared), "train")]
    assert len(test) == len(records) and not test.train and train.train
    assert test[0]["image"].shape == (224, 224, 3)
    assert int(test[0]["label"]) == 817


# --- the metric -------------------------------------------------------------------


def test_error_and_smoothed_loss_hand_values():
    workload = Classification(ResNet(num_classes=2), train_flag=True)
    metrics = workload.eval_finalize({"loss": 2.0, "correct": 3.0, "count": 4.0})
    assert metrics == {"loss": 0.5, "accuracy": 0.75, "error": 0.25}
    # Two classes, logits (0, log 3): p = (1/4, 3/4). Smoothing 0.1 targets
    # (0.05, 0.95) for label 1: loss = -0.05 log(1/4) - 0.95 log(3/4).
    smoothed = Classification(ResNet(num_classes=2), label_smoothing=0.1)
    logits = np.array([[0.0, np.log(3.0)]], np.float32)
    loss = float(smoothed._losses(logits, np.array([1]))[0])
    assert loss == pytest.approx(-0.05 * np.log(0.25) - 0.95 * np.log(0.75), 1e-6)


# --- the small recipes through the trainer ----------------------------------------


def _subset(split, n):
    data = load_dataset("fashion_mnist", split)
    return {k: v[:n] for k, v in data.items()}


def test_small_resnet_batch_stats_train_checkpoint_and_eval(tmp_path):
    cli.parse_gin(
        ["recipes/imagenet_resnet50_small.gin"],
        [
            "train.optimizer = @adamw",  # Compiles faster than VeLO; same BN path.
            "train.mesh_shape = (1, 1)",
            "ResNet.stage_sizes = (1, 1)",
            "ResNet.num_filters = 8",
        ],
    )
    train = gin.get_configurable("train")
    workload = cli.configured_value("train.workload")
    kwargs = dict(
        data=_subset("train", 1024),
        eval_data=_subset("test", 500),
        num_steps=4,
        batch_size=64,
        eval_batch_size=250,
        eval_every=2,
        progress=False,
        workdir=tmp_path,
    )
    first = train(**kwargs, stop_after=2)
    assert int(first.state.step) == 2 and 0.0 <= first.eval_metrics["error"] <= 1.0
    stats = jax.device_get(first.state.model_state["batch_stats"])
    init = jax.device_get(
        workload.init(jax.random.PRNGKey(0), workload.dummy_batch(2))["batch_stats"]
    )
    assert not np.allclose(stats["bn_init"]["mean"], init["bn_init"]["mean"])
    assert not np.allclose(stats["bn_init"]["var"], init["bn_init"]["var"])

    # Resuming restores the statistics exactly (no step runs: already at 2).
    resumed = train(**kwargs, stop_after=2)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        stats,
        jax.device_get(resumed.state.model_state["batch_stats"]),
    )
    # Evaluation normalises with them (train=False): the trainer's eval equals
    # ours with the trained statistics, and fresh statistics change the logits.
    params = resumed.state.params
    source = _subset("test", 500)
    with_stats = workload.evaluate(params, resumed.state.model_state, source, 250)
    assert with_stats["loss"] == pytest.approx(first.eval_metrics["loss"], rel=1e-5)

    def logits(model_state):
        variables = {"params": params, **model_state}
        return np.asarray(
            workload.model.apply(variables, source["image"][:64], train=False)
        )

    trained = logits(resumed.state.model_state)
    fresh = logits({"batch_stats": init})
    assert np.abs(trained - fresh).max() > 1e-3 * np.abs(trained).max()


def test_small_vit_recipe_trains_and_evaluates():
    cli.parse_gin(
        ["recipes/imagenet_vit_s16_small.gin"],
        ["train.optimizer = @adamw", "train.mesh_shape = (1, 1)"],
    )
    result = gin.get_configurable("train")(
        data=_subset("train", 512),
        eval_data=_subset("test", 500),
        num_steps=3,
        batch_size=64,
        eval_batch_size=250,
        progress=False,
    )
    assert int(result.state.step) == 3 and np.isfinite(result.final_loss)
    assert set(result.eval_metrics) == {"loss", "accuracy", "error"}
    assert result.eval_metrics["error"] == pytest.approx(
        1.0 - result.eval_metrics["accuracy"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe", ["imagenet_resnet50_small", "imagenet_vit_s16_small"]
)
def test_small_recipes_train_with_velo_on_eight_devices(recipe, tmp_path):
    """The recipes as written (VeLO, the default mesh over 8 CPU devices), a few
    steps on the full Fashion-MNIST training set and the first 1,000 test
    images, through the CLI's gin bindings."""
    cli.parse_gin([f"recipes/{recipe}.gin"], [VELO])
    result = gin.get_configurable("train")(
        num_steps=4,
        eval_data=_subset("test", 1000),
        progress=False,
        workdir=tmp_path,
    )
    assert int(result.state.step) == 4 and np.isfinite(result.final_loss)
    assert 0.0 <= result.eval_metrics["error"] <= 1.0
    if recipe == "imagenet_resnet50_small":
        stats = result.state.model_state["batch_stats"]["bn_init"]["mean"]
        assert not np.allclose(jax.device_get(stats), 0.0)
