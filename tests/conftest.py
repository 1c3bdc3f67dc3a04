"""Shared test set-up: 8 fake CPU devices and the reference VeLO data."""

import os

# Must be set before jax is imported anywhere (sharding tests use a 2x4 mesh).
# CPU only: with libtpu installed (the tpu-aot extra) jax would otherwise try
# the TPU backend and take libtpu's machine-wide lockfile in every test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "reference" / "velo"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def theta():
    from tests import reference_data

    return reference_data.load_theta()
