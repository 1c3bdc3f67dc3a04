#!/usr/bin/env bash
# Runs paxml's own trainer (python -m paxml.main) on a velo_scale example
# experiment, with VeLO, in the Pax venv (.ci/pax_venv.sh; built if needed).
#
#   bash .ci/paxml_trainer.sh                      # BibleLmVeLOTiny, 40 steps
#   bash .ci/paxml_trainer.sh BibleLmVeLO /tmp/lm  # 1000 steps, a few CPU minutes
#
# Needs the KJV Bible (Debian: apt-get install sword-text-kjv). Prints the
# training loss paxml logs every summary step; checkpoints and TensorBoard
# summaries go to the job log dir (default: a fresh temp dir). On a small CPU
# the compile dominates a tiny run: XLA_FLAGS=--xla_backend_optimization_level=0
# makes it several times faster (the CI lane's test does that).
set -euo pipefail
cd "$(dirname "$0")/.."

EXP="${1:-BibleLmVeLOTiny}"
LOG_DIR="${2:-$(mktemp -d /tmp/paxml_velo.XXXXXX)}"
mkdir -p "$LOG_DIR"
VENV="$(bash .ci/pax_venv.sh)"
start=$(date +%s)
set +e
XLA_FLAGS="${XLA_FLAGS:-}" "$VENV/bin/python" -m paxml.main \
  --exp="velo_scale.integrations.pax_experiments.$EXP" \
  --job_log_dir="$LOG_DIR" --mode=train --alsologtostderr 2>&1 \
  | tee "$LOG_DIR/paxml_main.log" | grep --line-buffered -E "training loss|Traceback|^[A-Za-z.]*Error"
status=${PIPESTATUS[0]}
set -e
echo "paxml.main $EXP: exit $status, $(( $(date +%s) - start )) s, log $LOG_DIR/paxml_main.log"
exit "$status"
