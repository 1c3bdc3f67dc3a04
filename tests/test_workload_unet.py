"""fastMRI U-Net: model size, k-space and masks, SSIM, the MRI data sets and
the small recipe end to end."""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from tests.reference_data import CHECKPOINT
from velo_scale import cli
from velo_scale.data import load_dataset, mri
from velo_scale.models.unet import UNet, unet_num_params
from velo_scale.train import optimizers, train
from velo_scale.workloads import abstract_variables, count_params
from velo_scale.workloads.fastmri import (
    FASTMRI,
    FastMRI,
    ssim,
    structural_similarity,
    zero_filled_metrics,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
FULL = str(REPO / "recipes" / "fastmri_unet.gin")
SMALL = str(REPO / "recipes" / "fastmri_unet_small.gin")


@pytest.fixture(scope="module")
def mricron_test():
    return load_dataset("mricron_mri", "test")


@pytest.fixture(scope="module")
def mricron_train():
    return load_dataset("mricron_mri", "train")


# -- model ------------------------------------------------------------------
def test_full_recipe_builds_algoperf_unet_with_exact_param_count():
    cli.parse_gin([FULL], [])
    workload = cli.configured_value("train.workload")
    assert isinstance(workload, FastMRI) and isinstance(workload.model, UNet)
    assert workload.full_scale == FASTMRI
    assert FASTMRI.target_value == 0.723653 and FASTMRI.step_hint == 18_094
    assert cli.configured_value("train.num_steps") == FASTMRI.step_hint
    assert cli.configured_value("train.batch_size") == FASTMRI.batch_size == 32
    assert cli.configured_value("train.data") == "fastmri"
    variables = abstract_variables(workload)  # eval_shape: no allocation.
    assert set(variables) == {"params"}  # Instance norm: no statistics.
    params = variables["params"]
    # 32-64-128-256 down, 512 bottleneck, 4 transposed convs, 1x1 head.
    assert count_params(params) == 7_756_097 == unet_num_params(32, 4)
    assert count_params(params) == FASTMRI.num_params
    assert params["down0"]["conv0"]["kernel"].shape == (3, 3, 1, 32)
    assert params["bottleneck"]["conv1"]["kernel"].shape == (3, 3, 512, 512)
    assert params["up_transpose0"]["conv_transpose"]["kernel"].shape == (
        2, 2, 512, 256,
    )  # fmt: skip
    assert params["up3"]["conv0"]["kernel"].shape == (3, 3, 64, 32)
    assert params["head"]["bias"].shape == (1,)
    assert "bias" not in params["down0"]["conv0"]
    out = jax.eval_shape(
        lambda v, x: workload.model.apply(v, x),
        variables,
        jax.ShapeDtypeStruct((2, 320, 320), jnp.float32),
    )
    assert out.shape == (2, 320, 320) and out.dtype == jnp.float32


def test_unet_kernels_carry_logical_axes_and_odd_sizes_work():
    model = UNet(num_channels=4, num_pool_layers=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 19, 22)), jnp.float32)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    spec = nn.get_partition_spec(boxed)["params"]
    assert spec["down1"]["conv0"]["kernel"] == jax.sharding.PartitionSpec(
        None, None, "conv_in", "conv_out"
    )
    apply = jax.jit(model.apply)
    y = apply(nn.meta.unbox(boxed), x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    # Bias-free convs + instance norm: the output ignores the input's scale.
    y2 = apply(nn.meta.unbox(boxed), 3.0 * x)
    np.testing.assert_allclose(y, y2, atol=2e-4)


# -- k-space and masks --------------------------------------------------------
def test_fft_round_trip_parseval_and_centred_dc(mricron_test):
    image = mricron_test["targets"][10].astype(np.float64)
    kspace = mri.fft2c(image)
    np.testing.assert_allclose(mri.ifft2c(kspace).real, image, atol=1e-10)
    np.testing.assert_allclose(np.abs(mri.ifft2c(kspace).imag).max(), 0, atol=1e-10)
    np.testing.assert_allclose((np.abs(kspace) ** 2).sum(), (image**2).sum())
    dc = mri.fft2c(np.ones((6, 8)))
    assert np.argmax(np.abs(dc)) == np.ravel_multi_index((3, 4), (6, 8))
    np.testing.assert_allclose(dc[3, 4], np.sqrt(48))
    # A full mask reconstructs the image exactly.
    full = mri.zero_filled(kspace, np.ones(64, bool), (64, 64))
    np.testing.assert_allclose(full, np.abs(image), atol=1e-5)


@pytest.mark.parametrize("num_cols", [64, 368, 372])
def test_random_mask_centre_lines_and_acceleration(num_cols):
    first, count = mri.center_lines(num_cols, 0.08)
    assert count == int(num_cols * 0.08)
    assert first == (num_cols - count + 1) // 2  # Centred on num_cols // 2.
    assert first <= num_cols // 2 < first + count
    fractions = []
    for seed in range(400):
        mask = mri.random_mask(num_cols, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (num_cols,)
        assert mask[first : first + count].all()
        fractions.append(mask.mean())
    # N / acceleration columns on average: 4x.
    assert abs(np.mean(fractions) - 0.25) < 0.01


@pytest.mark.parametrize("num_cols", [64, 368])
def test_equispaced_mask_centre_lines_spacing_and_acceleration(num_cols):
    first, count = mri.center_lines(num_cols, 0.08)
    spacing = 4 * (count - num_cols) / (count * 4 - num_cols)
    for seed in range(20):
        mask = mri.equispaced_mask(num_cols, np.random.default_rng(seed))
        assert mask[first : first + count].all()
        outer = np.flatnonzero(np.delete(mask, np.arange(first, first + count)))
        assert abs(mask.sum() - num_cols / 4) <= 2
        # Outside the centre lines the samples are (rounded) equispaced.
        kept = np.flatnonzero(mask)
        lines = kept[(kept < first) | (kept >= first + count)]
        gaps = np.diff(lines[lines < first])
        assert len(outer) > 0 and set(gaps) <= {int(spacing), int(spacing) + 1}


def test_masks_are_deterministic_per_seed_and_mask_type_is_checked():
    a = mri.random_mask(368, np.random.default_rng([1, 2]))
    b = mri.random_mask(368, np.random.default_rng([1, 2]))
    c = mri.random_mask(368, np.random.default_rng([1, 3]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="mask_type"):
        mri.make_mask("poisson", 64, np.random.default_rng(0))


def test_fastmri_example_matches_algoperf_geometry(mricron_test):
    # fastMRI k-space covers a 2x oversampled field of view (640 x cols); the
    # target is the centre crop. A real slice embedded like that:
    target = mricron_test["targets"][20] * mricron_test["std"][20]
    target = target + mricron_test["mean"][20]
    big = np.zeros((128, 72))
    big[32:96, 4:68] = target
    kspace = mri.fft2c(big).astype(np.complex64)
    full = mri.fastmri_example(kspace, target, 200.0, np.ones(72, bool))
    np.testing.assert_allclose(full["inputs"], full["targets"], atol=1e-4)
    mask = mri.random_mask(72, np.random.default_rng(0))
    ex = mri.fastmri_example(kspace, target, 200.0, mask)
    assert ex["inputs"].shape == (64, 64) and ex["volume_max"] == 200.0
    zf = mri.zero_filled(kspace, mask, (64, 64))
    np.testing.assert_allclose(ex["mean"], zf.mean(), rtol=1e-5)
    np.testing.assert_allclose(ex["std"], zf.std(), rtol=1e-5)  # Population std.
    np.testing.assert_allclose(
        ex["inputs"], np.clip((zf - zf.mean()) / zf.std(), -6, 6), atol=1e-5
    )
    assert not np.allclose(ex["inputs"], ex["targets"], atol=0.1)  # Aliased.


# -- SSIM ---------------------------------------------------------------------
def _skimage_ssim(x, y, data_range):
    """skimage.metrics.structural_similarity's defaults (scipy uniform filter,
    reflect padding, sample covariance), written out with scipy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    f = lambda a: ndimage.uniform_filter(a, size=7, mode="reflect")  # noqa: E731
    ux, uy = f(x), f(y)
    cov = 49 / 48
    vx, vy = cov * (f(x * x) - ux * ux), cov * (f(y * y) - uy * uy)
    vxy = cov * (f(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s[3:-3, 3:-3].mean()


def test_ssim_identical_is_one_and_constant_images_by_hand():
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 5, (2, 16, 16)), jnp.float32)
    np.testing.assert_allclose(structural_similarity(x, x, 5.0), [1, 1], atol=1e-6)
    # Constant images a, b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, L = 2.0, 3.0, 10.0
    c1 = (0.01 * L) ** 2
    got = structural_similarity(jnp.full((1, 12, 12), a), jnp.full((1, 12, 12), b), L)
    np.testing.assert_allclose(got, [(2 * a * b + c1) / (a**2 + b**2 + c1)], rtol=1e-6)


def test_ssim_single_window_by_hand():
    # 7x7 images: one valid pixel, whose window is the whole image (no padding).
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1, (7, 7)), rng.uniform(0, 1, (7, 7))
    L = 1.0
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(ddof=1), y.var(ddof=1)
    vxy = ((x - mx) * (y - my)).sum() / 48
    want = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = structural_similarity(jnp.asarray(x[None]), jnp.asarray(y[None]), L)
    np.testing.assert_allclose(got, [want], rtol=1e-5, atol=1e-6)


def test_ssim_matches_scipy_reference_on_real_slices(mricron_test):
    d = mricron_test
    idx = [0, 30, 60]
    raw_in = d["inputs"][idx] * d["std"][idx, None, None] + d["mean"][idx, None, None]
    raw_tg = d["targets"][idx] * d["std"][idx, None, None] + d["mean"][idx, None, None]
    want = [
        _skimage_ssim(a, b, v) for a, b, v in zip(raw_in, raw_tg, d["volume_max"][idx])
    ]
    got = ssim(
        *(
            jnp.asarray(d[k][idx])
            for k in ("inputs", "targets", "mean", "std", "volume_max")
        )
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert 0.2 < min(want) and max(want) < 0.9  # Zero-filled: clearly imperfect.


def test_ssim_clips_and_handles_zero_volume_max():
    # y = 1 - x: equal local means, opposite structure -> SSIM near -1.
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(1, 10, 10)), jnp.float32)
    ones = jnp.ones((1,))
    got = ssim(x, 1 - x, 0 * ones, ones, 0 * ones)  # volume_max 0 -> range 1.
    want = structural_similarity(x, 1 - x, 1.0)
    np.testing.assert_allclose(got, np.clip(want, -1, 1), atol=1e-6)
    assert -1.0 <= float(got[0]) < -0.8


# -- data ---------------------------------------------------------------------
def test_mricron_loads_real_slices_split_by_subject(mricron_train, mricron_test):
    for d, n in ((mricron_train, 397 * 4), (mricron_test, 80)):
        assert set(d) == {"inputs", "targets", "mean", "std", "volume_max"}
        assert d["inputs"].shape == d["targets"].shape == (n, 64, 64)
        assert all(v.dtype == np.float32 for v in d.values())
        assert d["mean"].shape == d["std"].shape == d["volume_max"].shape == (n,)
        assert np.all(np.abs(d["inputs"]) <= 6) and np.all(np.abs(d["targets"]) <= 6)
        assert np.all(d["std"] > 0) and np.all(np.isfinite(d["inputs"]))
        # Inputs normalised by their own statistics (before clamping).
        assert np.abs(d["inputs"].mean(axis=(1, 2))).max() < 0.05
        raw = d["targets"] * d["std"][:, None, None] + d["mean"][:, None, None]
        assert np.all(raw.max(axis=(1, 2)) <= d["volume_max"] * (1 + 1e-4))
    assert set(mri.MRICRON_TRAIN_VOLUMES).isdisjoint(mri.MRICRON_TEST_VOLUMES)
    train_raw = mricron_train["targets"] * mricron_train["std"][:, None, None]
    test_raw = mricron_test["targets"] * mricron_test["std"][:, None, None]
    train_keys = {
        np.round(t + m, 2).tobytes() for t, m in zip(train_raw, mricron_train["mean"])
    }
    assert not any(
        np.round(t + m, 2).tobytes() in train_keys
        for t, m in zip(test_raw, mricron_test["mean"])
    )
    # Each training slice appears under 4 different masks, same target.
    t0 = train_raw[:4] + mricron_train["mean"][:4, None, None]
    np.testing.assert_allclose(t0[1:], np.broadcast_to(t0[0], t0[1:].shape), atol=1e-3)
    assert not np.allclose(mricron_train["inputs"][0], mricron_train["inputs"][1])


def test_mricron_is_deterministic_and_equispaced_variant(mricron_test):
    again = mri.load_mricron("test")
    for k, v in mricron_test.items():
        np.testing.assert_array_equal(again[k], v)
    eq = mri.load_mricron("test", mask_type="equispaced")
    # Same slices (where neither normalised target is clamped at 6) ...
    raw = lambda d: d["targets"] * d["std"][:, None, None] + d["mean"][:, None, None]  # noqa: E731
    unclamped = (np.abs(eq["targets"]) < 6) & (np.abs(mricron_test["targets"]) < 6)
    np.testing.assert_allclose(
        raw(eq)[unclamped], raw(mricron_test)[unclamped], rtol=1e-4, atol=1e-3
    )
    # ... under different masks.
    assert not np.allclose(eq["inputs"], mricron_test["inputs"])


def test_zero_filled_baseline_ssim(mricron_test):
    base = zero_filled_metrics(mricron_test)
    assert 0.4 < base["ssim"] < 0.7 and base["loss"] > 0.1
    perfect = dict(mricron_test, inputs=mricron_test["targets"])
    assert zero_filled_metrics(perfect)["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_missing_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="mricron-data"):
        mri.load_mricron("test", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fastmri.med.nyu.edu"):
        load_dataset("fastmri", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="knee_singlecoil_val"):
        mri.load_fastmri("test", None)
    with pytest.raises(ValueError, match="split"):
        mri.load_fastmri("dev", str(tmp_path))
    # With files present but h5py missing: an ImportError naming the package.
    folder = tmp_path / mri.FASTMRI_VAL_DIR
    folder.mkdir()
    (folder / "file1000000.h5").write_bytes(b"")
    assert mri.fastmri_files("test", str(tmp_path)) == [folder / "file1000000.h5"]
    assert mri.fastmri_files("heldout", str(tmp_path)) == []
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        mri.load_fastmri("test", str(tmp_path))


class _FakeH5File:
    """Stands in for `h5py.File` (not installed here): fastMRI's fields from
    an .npz written under an .h5 name."""

    def __init__(self, path, mode="r"):
        data = np.load(path)
        self._fields = {k: data[k] for k in ("kspace", "reconstruction_esc")}
        self.attrs = {"max": float(data["max"])}

    def __getitem__(self, key):
        return self._fields[key]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fastmri_source_reads_slices_like_algoperf(tmp_path, monkeypatch, mricron_test):
    # Two fake "volumes" of 3 slices: 2x oversampled k-space of real slices.
    raw = mricron_test["targets"] * mricron_test["std"][:, None, None]
    raw = raw + mricron_test["mean"][:, None, None]
    for split_dir in (mri.FASTMRI_TRAIN_DIR, mri.FASTMRI_VAL_DIR):
        (tmp_path / split_dir).mkdir()
        for v in range(2):
            targets = raw[3 * v : 3 * v + 3]
            big = np.zeros((3, 128, 72))
            big[:, 32:96, 4:68] = targets
            with open(tmp_path / split_dir / f"file{v}.h5", "wb") as f:
                np.savez(
                    f,
                    kspace=mri.fft2c(big).astype(np.complex64),
                    reconstruction_esc=targets,
                    max=targets.max(),
                )
    fake = type(sys)("h5py")
    fake.File = _FakeH5File
    monkeypatch.setitem(sys.modules, "h5py", fake)
    source = load_dataset("fastmri", "test", data_dir=str(tmp_path))
    assert len(source) == 6
    ex = source[4]  # Volume 1, slice 1.
    assert set(ex) == {"inputs", "targets", "mean", "std", "volume_max"}
    assert ex["inputs"].shape == ex["targets"].shape == (64, 64)
    np.testing.assert_allclose(ex["volume_max"], raw[3:6].max(), rtol=1e-6)
    unclamped = np.abs(ex["targets"]) < 6
    np.testing.assert_allclose(
        (ex["targets"] * ex["std"] + ex["mean"])[unclamped],
        raw[4][unclamped],
        atol=1e-3,
    )
    # Fixed per-slice masks: the same example twice, different slices differ.
    again = load_dataset("fastmri", "test", data_dir=str(tmp_path))[4]
    np.testing.assert_array_equal(again["inputs"], ex["inputs"])
    assert not np.allclose(source[3]["inputs"], ex["inputs"])
    mask_seed = np.random.default_rng(mri._seed("test", "file1.h5", 1, "random"))
    mask = mri.random_mask(72, mask_seed)
    want = mri.fastmri_example(
        mri.fft2c(np.pad(raw[4], ((32, 32), (4, 4)))), raw[4], raw[3:6].max(), mask
    )
    np.testing.assert_allclose(ex["inputs"], want["inputs"], atol=1e-4)


# -- training -----------------------------------------------------------------
def test_small_recipe_trains_and_evaluates(tmp_path, mricron_train, mricron_test):
    # The recipe's U-Net is 8 channels x 4 pool layers; a thinner, shallower
    # one keeps the compile (VeLO's per-tensor ops) short.
    cli.parse_gin([SMALL], ["UNet.num_channels = 4", "UNet.num_pool_layers = 1"])
    workload = cli.configured_value("train.workload")
    assert cli.configured_value("train.data") == "mricron_mri"
    assert cli.configured_value("train.batch_size") == 16
    assert count_params(abstract_variables(workload)["params"]) == unet_num_params(4, 1)
    result = train(
        workload=workload,
        optimizer=lambda num_steps: optimizers.velo(num_steps, weights=str(CHECKPOINT)),
        num_steps=4,
        data={k: v[:256] for k, v in mricron_train.items()},
        eval_data=mricron_test,
        batch_size=16,
        eval_batch_size=80,
        eval_every=2,
        mesh_shape=(8, 1),
        progress=False,
        workdir=tmp_path,
    )
    assert set(result.eval_metrics) == {"loss", "ssim"}
    assert np.isfinite(result.final_loss) and np.isfinite(result.eval_metrics["loss"])
    assert -1 <= result.eval_metrics["ssim"] <= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum('"eval"' in line for line in lines) == 2


@pytest.mark.slow
def test_small_recipe_beats_zero_filled_with_adamw(mricron_train, mricron_test):
    cli.parse_gin([SMALL], [])
    result = train(
        workload=cli.configured_value("train.workload"),
        optimizer=lambda num_steps: optimizers.adamw(num_steps, learning_rate=3e-3),
        num_steps=150,
        data=mricron_train,
        eval_data=mricron_test,
        batch_size=16,
        eval_batch_size=80,
        progress=False,
    )
    assert result.eval_metrics["ssim"] > zero_filled_metrics(mricron_test)["ssim"]
