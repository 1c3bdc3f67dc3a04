"""Tests against real praxis/paxml: collected only in the Pax lane.

praxis 1.4.0 and paxml 1.4.0 need Python 3.10 and jax 0.4.30, a venv of their
own that `.ci/pax_lane.sh` builds and runs these tests in with
`VELO_SCALE_PAX_LANE=1`. The main lane (Python 3.11, newest jax) does not
collect them: they would fail to import there. In the Pax lane every import
is real and any failure fails the lane.
"""

import os

collect_ignore_glob = [] if os.environ.get("VELO_SCALE_PAX_LANE") == "1" else ["test_*.py"]
