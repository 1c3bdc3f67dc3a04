"""Tests against real praxis/paxml: collected only in the Pax lane.

praxis 1.4.0 and paxml 1.4.0 need Python 3.10 and jax 0.4.30, a venv of their
own that `.ci/pax_lane.sh` builds and runs these tests in with
`VELO_SCALE_PAX_LANE=1`. The main lane (Python 3.11, newest jax) does not
collect them: they would fail to import there. In the Pax lane every import
is real and any failure fails the lane.
"""

import os

PAX_LANE = os.environ.get("VELO_SCALE_PAX_LANE") == "1"
collect_ignore_glob = [] if PAX_LANE else ["test_*.py"]

# XLA's CPU backend at -O0: the sharded LM train step compiles in ~40 s
# instead of ~5 min on a loaded 2-core machine; the steps themselves are tiny.
# (jax is not imported yet: tests/conftest.py only sets the device count.)
FAST_COMPILE = "--xla_backend_optimization_level=0"
if PAX_LANE and FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE
    ).strip()
