"""`benchmarks/tpu_aot.py`'s HBM-traffic count on hand-written HLO text: the
figure BENCHMARKS.md's "HBM bytes" column rests on."""

import pytest

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def tpu_aot():
    return benchmark_scripts.load("tpu_aot")


HLO = """HloModule m

%commit (p.1: (f32[256], f32[256])) -> (f32[256]) {
  %p.1 = (f32[256], f32[256]) parameter(0)
  %a = f32[256] get-tuple-element(%p.1), index=0
  %b = f32[256] get-tuple-element(%p.1), index=1
  %sum = f32[256] add(%a, %b)
  ROOT %t = (f32[256]) tuple(%sum)
}

%keep (p.2: (f32[256], f32[256])) -> (f32[256]) {
  %p.2 = (f32[256], f32[256]) parameter(0)
  %a.2 = f32[256] get-tuple-element(%p.2), index=0
  ROOT %t.2 = (f32[256]) tuple(%a.2)
}

ENTRY %main (x: f32[256], y: f32[256], v: f32[256], c: pred[]) -> (f32[256]) {
  %x = f32[256] parameter(0)
  %y = f32[256] parameter(1)
  %v = f32[256]{0:S(1)} parameter(2)
  %c = pred[] parameter(3)
  %m = f32[256] multiply(%x, %y)
  %w = f32[256] add(%m, %v)
  %ops = (f32[256], f32[256]) tuple(%w, %y)
  ROOT %r = (f32[256]) conditional(%c, %ops), branch_computations={%keep, %commit}
}
"""


LATE = """HloModule late

ENTRY %main (m: f32[256], g: f32[256], ok: s32[1]) -> f32[256] {
  %m = f32[256] parameter(0)
  %g = f32[256] parameter(1)
  %ok = s32[1]{0:S(2)} parameter(2)
  %u = f32[256] negate(%g)
  ROOT %c = f32[256] custom-call(%ok, %g, %m), custom_call_target="tpu_custom_call", output_to_operand_aliasing={{}: (2, {})}, metadata={op_name="jit(step)/velo_late_commit/pallas_call"}
}
"""


def test_late_commit_kernel_counts_only_in_the_worst_step(tpu_aot):
    """The late-commit kernel moves data only when its flag is set: nothing
    in the usual step, its operands and result in the worst one."""
    kib = 1024
    assert tpu_aot.hbm_traffic(LATE) == 2 * kib  # the negate
    # (the flag is in SMEM, S(2): not counted)
    assert tpu_aot.hbm_traffic(LATE, conditional="max") == 2 * kib + 3 * kib


def test_hbm_traffic_counts_hbm_operands_and_one_branch(tpu_aot):
    kib = 1024  # one f32[256]
    # multiply: x, y, result; add: m and its result (v is in VMEM, S(1));
    # then the conditional as its cheapest branch (keep: nothing) or its
    # dearest (commit: the add reads 2 and writes 1).
    assert tpu_aot.hbm_traffic(HLO) == 5 * kib
    assert tpu_aot.hbm_traffic(HLO, conditional="max") == 8 * kib
