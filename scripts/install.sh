#!/usr/bin/env bash
# Install tether and what it needs. An installed torch (e.g. a CUDA build) is left alone; with no torch,
# the CPU build is pinned so pip does not pull several GB of CUDA packages.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
