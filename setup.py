"""Build hook: ships gin_configs/ and recipes/ inside the wheel.

All metadata is in pyproject.toml. A built wheel gets copies of the
repository's `gin_configs/` and `recipes/` as `velo_scale/share/gin_configs`
and `velo_scale/share/recipes` (package data), so that a pip-installed
velo_scale finds `recipes/digits_mlp.gin` or `gin_configs/t5x/velo.gin` by
name (`velo-scale configs` prints where). An editable install
(`pip install -e .`) copies nothing: the CLI reads the checkout's folders.
The two folders stay the single source; nothing is symlinked.
"""

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
CONFIG_DIRS = ("gin_configs", "recipes")


def copy_configs(build_lib: str | pathlib.Path) -> list[pathlib.Path]:
    """Copies the *.gin files of CONFIG_DIRS into build_lib/velo_scale/share."""
    written = []
    for name in CONFIG_DIRS:
        for src in sorted((ROOT / name).rglob("*.gin")):
            dst = pathlib.Path(build_lib) / "velo_scale" / "share" / src.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            copy_configs(self.build_lib)


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithConfigs})
