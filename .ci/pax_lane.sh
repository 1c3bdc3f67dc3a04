#!/usr/bin/env bash
# Pax lane: velo_scale against real praxis 1.4.0 and paxml 1.4.0 (PyPI).
#
# praxis/paxml 1.4.0 need Python 3.10 (lingvo 0.12.7 has no 3.11 wheels) and
# pin jax 0.4.26 with a jaxlib that does not match it, so the venv gets
# velo_scale's minimum pins and praxis' own pinned dependencies
# (.ci/pax-requirements.txt), then praxis, paxml and seqio with --no-deps
# (.ci/pax-requirements-nodeps.txt); pip prints a resolver complaint there and
# exits 0. The venv (~2.7 GB, ~4 min cold) is cached under
# $VELO_SCALE_CACHE (default ~/.cache/velo_scale) as pax-venv-<hash of both
# files>; velo_scale itself is reinstalled (--no-deps) on every run.
#
# Then it runs tests/pax (collected only when VELO_SCALE_PAX_LANE=1): a praxis
# TransformerLm on 8 fake CPU devices trained by paxml's own train step with
# VeLOLearner + VeLO, and paxml's trainer (paxml.main) on a tiny experiment.
#
# Usage: bash .ci/pax_lane.sh [pytest args]   (run from any directory)
set -euo pipefail
cd "$(dirname "$0")/.."

lane_start=$(date +%s)
REQ=.ci/pax-requirements.txt
REQ_NODEPS=.ci/pax-requirements-nodeps.txt
PYENV_ROOT_DIR="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
PY310="${VELO_SCALE_PY310:-$PYENV_ROOT_DIR/versions/3.10.13/bin/python3.10}"
KEY="$(cat "$REQ" "$REQ_NODEPS" | sha256sum | cut -c1-16)"
CACHE="${VELO_SCALE_CACHE:-$HOME/.cache/velo_scale}"
VENV="${VELO_SCALE_PAX_VENV:-$CACHE/pax-venv-$KEY}"

if [ ! -x "$PY310" ]; then
  echo "pax lane: Python 3.10 not found at $PY310 (set VELO_SCALE_PY310)." >&2
  exit 1
fi

if [ ! -f "$VENV/.complete" ]; then
  echo "pax lane: building $VENV (cold, ~4 min)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY310" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$REQ"
  # praxis/paxml/seqio's own pins conflict with the ones above: pip prints a
  # resolver complaint and exits 0.
  "$VENV/bin/python" -m pip install -q --no-deps -r "$REQ_NODEPS"
  "$VENV/bin/python" -c "import jax, praxis.optimizers, paxml.main; assert jax.__version__ == '0.4.30', jax.__version__"
  touch "$VENV/.complete"
else
  echo "pax lane: using cached $VENV"
fi
venv_done=$(date +%s)

"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall .
"$VENV/bin/python" -c "import velo_scale.integrations.pax_learner"

VELO_SCALE_PAX_LANE=1 "$VENV/bin/python" -m pytest tests/pax -p no:cacheprovider "$@"
lane_end=$(date +%s)
echo "pax lane: venv $((venv_done - lane_start)) s, tests $((lane_end - venv_done)) s, total $((lane_end - lane_start)) s"
