"""Shared test set-up: 8 fake CPU devices and the reference VeLO data."""

import os

# Must be set before jax is imported anywhere (sharding tests use a 2x4 mesh).
# CPU only: with libtpu installed (the tpu-aot extra) jax would otherwise try
# the TPU backend and take libtpu's machine-wide lockfile in every test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for the test session, inherited by the
# tests' subprocesses (the CLI runs, the multi-process tests): a program
# compiled again, e.g. the same train step in a resumed run or in the next
# test, is loaded instead of compiled. Every program is still compiled once
# per session; the cache starts empty and is removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="velo_scale_test_jax_cache_")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402

REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "reference" / "velo"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def theta():
    from tests import reference_data

    return reference_data.load_theta()
