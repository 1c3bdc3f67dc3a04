#!/usr/bin/env bash
# Builds (or reuses) the Pax venv and prints its path on stdout; progress on
# stderr. Used by .ci/pax_lane.sh and .ci/paxml_trainer.sh.
#
# praxis/paxml 1.4.0 need Python 3.10 (lingvo 0.12.7 has no 3.11 wheels) and
# pin jax 0.4.26 with a jaxlib that does not match it, so the venv gets
# velo_scale's minimum pins and praxis' own pinned dependencies
# (.ci/pax-requirements.txt), then praxis, paxml and seqio with --no-deps
# (.ci/pax-requirements-nodeps.txt; pip prints a resolver complaint there and
# exits 0). The venv (~2.7 GB; ~6 min cold measured on a loaded 2-core box) is cached as
# $VELO_SCALE_CACHE/pax-venv-<hash of both files> (default cache
# ~/.cache/velo_scale); $VELO_SCALE_PAX_VENV overrides the path. velo_scale
# itself is reinstalled (--no-deps) from this checkout on every call.
set -euo pipefail
cd "$(dirname "$0")/.."

REQ=.ci/pax-requirements.txt
REQ_NODEPS=.ci/pax-requirements-nodeps.txt
PYENV_ROOT_DIR="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
PY310="${VELO_SCALE_PY310:-$PYENV_ROOT_DIR/versions/3.10.13/bin/python3.10}"
KEY="$(cat "$REQ" "$REQ_NODEPS" | sha256sum | cut -c1-16)"
CACHE="${VELO_SCALE_CACHE:-$HOME/.cache/velo_scale}"
VENV="${VELO_SCALE_PAX_VENV:-$CACHE/pax-venv-$KEY}"

if [ ! -x "$PY310" ]; then
  echo "pax venv: Python 3.10 not found at $PY310 (set VELO_SCALE_PY310)." >&2
  exit 1
fi

{
  if [ ! -f "$VENV/.complete" ]; then
    echo "pax venv: building $VENV (cold)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY310" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    "$VENV/bin/python" -m pip install -q --no-deps -r "$REQ_NODEPS"
    "$VENV/bin/python" -c "import jax, praxis.optimizers, paxml.main; assert jax.__version__ == '0.4.30', jax.__version__"
    touch "$VENV/.complete"
  else
    echo "pax venv: using cached $VENV"
  fi
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall .
} >&2
echo "$VENV"
