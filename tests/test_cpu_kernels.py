"""`benchmarks/cpu_kernels.py` (where a compiled update's CPU time goes)."""

import jax
import jax.numpy as jnp
import pytest

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def cpu_kernels():
    return benchmark_scripts.load("cpu_kernels")


def test_kernel_names_read_the_hlo_metadata(cpu_kernels):
    fn = jax.jit(lambda x: jnp.sum(jnp.exp(x) * 2.0))
    text = fn.lower(jnp.ones(64)).compile().as_text()
    names = cpu_kernels.kernel_names(text)
    # Every instruction of the compiled module is named, with its op_name
    # where the HLO has one.
    assert len(names) == text.count(" = ")
    fusions = {n: op for n, op in names.items() if "fusion" in n}
    assert fusions
    assert any(op.startswith("jit(<lambda>)/") for op in fusions.values())


@pytest.mark.parametrize("donate", [False, True], ids=["undonated", "donated"])
def test_profile_groups_add_up_to_the_kernel_time(cpu_kernels, donate):
    compiled, args = cpu_kernels.compile_update(
        "velo", "1m", str(cpu_kernels.update_step.DEFAULT_WEIGHTS), donate
    )
    state = args[1]
    result = cpu_kernels.profile(compiled, args, repeats=1, donate=donate)
    # The caller's state is never donated (the profile donates a copy).
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state))
    groups = result["groups"]
    assert groups and result["wall_ms"] > 0
    assert sum(g["thread_ms"] for g in groups) == pytest.approx(result["kernel_ms"])
    # A group's covered wall time is at most its thread time, and all of
    # them together at most the step's (the trace only holds the steps).
    for g in groups:
        assert 0 < g["covered_ms"] <= g["thread_ms"] * (1 + 1e-9)
    assert result["covered_ms"] <= result["wall_ms"] * (1 + 1e-9)
    # The per-parameter MLP's fusion (it ends in the update's negation) is
    # among the kernels and takes a real share of the step.
    mlp = [g for g in groups if g["op_name"].endswith("/neg")]
    assert mlp and max(g["thread_ms"] for g in mlp) > 0


def test_repeats_must_be_positive(cpu_kernels):
    with pytest.raises(SystemExit):
        cpu_kernels.main(["--tree", "1m", "--repeats", "0"])


@pytest.mark.parametrize(
    "intervals, covered",
    [
        ([], 0.0),
        ([(0, 2)], 2.0),
        ([(0, 2), (1, 3)], 3.0),  # overlapping: counted once
        ([(5, 6), (0, 2), (1, 1.5)], 3.0),  # unsorted, nested, disjoint
        ([(0, 1), (1, 2)], 2.0),  # touching
    ],
)
def test_covered_is_the_union_of_the_spans(cpu_kernels, intervals, covered):
    assert cpu_kernels.covered_us(intervals) == pytest.approx(covered)
