"""The scripts of `benchmarks/` as modules (they are not a package)."""

import importlib.util
import pathlib

_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    """`benchmarks/<name>.py`, imported."""
    spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
