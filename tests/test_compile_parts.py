"""`benchmarks/compile_parts.py` (per-tensor compile time of VeLO's parts):
its CPU mode runs end to end on this host and prints one row per part."""

import re

import pytest

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def compile_parts():
    return benchmark_scripts.load("compile_parts")


def test_cpu_rows(compile_parts, capsys):
    compile_parts.main(["--topology", "cpu", "--shapes", "8x16,16", "--k", "1,2"])
    rows = [line for line in capsys.readouterr().out.splitlines()
            if re.match(r"\| (8x16|16) \|", line)]  # fmt: skip
    assert [r.split("|")[2].strip() for r in rows] == ["step", "adamw"] * 2
    for row in rows:
        k1, k2 = (float(row.split("|")[i]) for i in (3, 4))
        assert k1 > 0 and k2 > 0  # both group sizes compiled


def test_group_sizes_must_grow(compile_parts):
    with pytest.raises(ValueError, match="larger"):
        compile_parts.main(["--topology", "cpu", "--k", "4,2"])
