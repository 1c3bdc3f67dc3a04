#!/usr/bin/env bash
# Pax lane: velo_scale against real praxis 1.4.0 and paxml 1.4.0 (PyPI), on
# Python 3.10 with jax 0.4.30 (the venv: .ci/pax_venv.sh, cached).
#
# Runs tests/pax (collected only when VELO_SCALE_PAX_LANE=1): a praxis
# TransformerLm on 8 fake CPU devices trained by paxml's own train step with
# VeLOLearner + VeLO (loss decreasing, one compile, state specs = params',
# checkpoint/resume with paxml's checkpointer, a model of repeated layers
# only), paxml's trainer (paxml.main) on a tiny experiment, and the praxis
# parts of the main lane's Pax tests.
#
# Usage: bash .ci/pax_lane.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

lane_start=$(date +%s)
VENV="$(bash .ci/pax_venv.sh)"
venv_done=$(date +%s)
VELO_SCALE_PAX_LANE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider \
  tests/pax tests/test_integrations_pax.py \
  "tests/test_integrations_t5x.py::test_init_partition_spec_with_praxis" "$@"
lane_end=$(date +%s)
echo "pax lane: venv $((venv_done - lane_start)) s, tests $((lane_end - venv_done)) s, total $((lane_end - lane_start)) s"
