"""`benchmarks/update_step.py` (VeLO vs AdamW update on CPU)."""

import pytest

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def update_step():
    return benchmark_scripts.load("update_step")


def test_worker_times_one_optimizer(update_step):
    result = update_step.run_worker(
        "adamw", "1m", repeats=2, weights=str(update_step.DEFAULT_WEIGHTS)
    )
    assert result["params"] == 4 * 512 * 512 + 4 * 512
    assert result["update_ms"] > 0 and len(result["update_ms_all"]) == 2
    assert result["compile_s"] > 0


def test_paired_worker_times_both_side_by_side(update_step):
    paired = update_step.run_paired(
        "1m", repeats=2, weights=str(update_step.DEFAULT_WEIGHTS)
    )
    assert set(paired) == {
        "adamw_ms", "adamw_donated_ms", "velo_ms", "velo_donated_ms"
    }  # fmt: skip
    assert all(ms > 0 for ms in paired.values())
    row = {"adamw": {"update_ms": 1.0}, "velo": {"update_ms": 2.0}}
    update_step.add_paired(row, paired)
    assert row["velo"]["update_ms_alone"] == 2.0
    assert row["velo"]["update_ms"] == paired["velo_ms"]
    assert row["adamw"]["update_donated_ms"] == paired["adamw_donated_ms"]


def test_tables_report_the_donated_ratio(update_step):
    def row(tree, adamw_ms, velo_ms):
        base = dict(tree=tree, params=10, tensors=2, compile_s=1.0, peak_rss_mb=1.0,
                    temp_bytes_per_param=5.0)  # fmt: skip
        return {
            "adamw": dict(base, update_ms=adamw_ms[0], update_donated_ms=adamw_ms[1]),
            "velo": dict(base, update_ms=velo_ms[0], update_donated_ms=velo_ms[1]),
        }

    rows = [row("10m", (10.0, 20.0), (90.0, 100.0))]
    table = update_step.markdown_table(rows)
    assert "| 9.00x | 20.00 / 100.00, 5.00x |" in table
    targets = update_step.targets_table(rows)
    # Not donated 9x: missed; donated 5x: met.
    assert "| update <= 8x AdamW at 10.5M | 10m | 9.00x | **missed** |" in targets
    assert "| the same, state donated (a train step) | 10m | 5.00x | met |" in targets
