#!/usr/bin/env bash
# tether vs TRL side by side: builds the benchmark environment on first use, then runs bench/bench.py.
#
#   bash bench/run.sh            # full run (~25 minutes on 2 idle cores): tiny, vocab150k and mid rows, mid
#                                # ablations and LoRA rows, then bench/learning.py; writes bench/results.json,
#                                # bench/results.md and bench/learning.png
#   bash bench/run.sh --quick    # smoke run (~6 minutes): every row, 1-2 repeats, fewer steps, a short learning run
#   bash bench/run.sh --help     # every option (threads, repeats, models, workloads, levers, ablations, learning)
#   bash bench/gpu.sh            # the GPU variant (bf16, CUDA, a 0.5B shape): bench/results_gpu.json
#
# The environment is bench/.venv-trl: the CPU torch build pinned below, TRL pinned below, and tether itself
# installed editable from this checkout, so one interpreter (same torch, same transformers) runs both
# libraries; each measurement runs in its own child process that imports only one of them. TRL is never a
# tether dependency.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$HERE/.venv-trl"
PYTHON_BIN="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"   # CPU build (local wheel); never install torch unpinned
TRL_VERSION="1.16.0"     # the TRL release these numbers were measured against
STAMP="$VENV/.bench-env-$TORCH_VERSION-trl$TRL_VERSION"

if [ ! -f "$STAMP" ]; then
    echo "creating the benchmark environment in $VENV (torch $TORCH_VERSION, TRL $TRL_VERSION, tether editable)"
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" "trl==$TRL_VERSION"
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT"
    touch "$STAMP"
fi

cd "$ROOT"
exec "$VENV/bin/python" "$HERE/bench.py" "$@"
