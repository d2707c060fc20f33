#!/usr/bin/env bash
# Install tether and what it needs. An installed torch (e.g. a CUDA build) is left alone. With no torch:
#   - a visible NVIDIA GPU (nvidia-smi lists one): `pip install torch==2.13.0`, the default (CUDA) build;
#   - no GPU: the CPU build from PyTorch's CPU wheel index, so pip does not pull several GB of nvidia-* wheels.
#     If that index cannot be reached within a few seconds (an offline mirror, CI behind a proxy), plain
#     `pip install torch==2.13.0` from the configured index instead (a mirror serving CPU wheels gives the CPU build).
# TETHER_INSTALL_DRY_RUN=1 prints the pip commands instead of running them (tests/test_install.py).
set -euo pipefail
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
CPU_INDEX=${TETHER_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

pip_install() {
    if [ "${TETHER_INSTALL_DRY_RUN:-0}" = 1 ]; then
        echo "pip install $*"
    else  # up to 3 tries: a download cut short (a hash mismatch) on a flaky network is not a reason to stop
        "$PY" -m pip install --quiet "$@" || "$PY" -m pip install --quiet "$@" || "$PY" -m pip install --quiet "$@"
    fi
}

has_gpu() {  # an NVIDIA GPU this machine can use
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"
}

reachable() {  # the URL answers within 5 s (any HTTP answer counts; no answer, DNS failure or refusal does not)
    "$PY" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)
except urllib.error.HTTPError:
    pass
PY
}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if has_gpu; then
        echo "install.sh: no torch; a GPU is visible: installing torch==$TORCH_VERSION (default build, with CUDA)"
        pip_install "torch==$TORCH_VERSION"
    elif reachable "$CPU_INDEX"; then
        echo "install.sh: no torch, no GPU: installing the CPU build of torch==$TORCH_VERSION from $CPU_INDEX"
        pip_install "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"
    else
        echo "install.sh: no torch, no GPU, $CPU_INDEX unreachable: installing torch==$TORCH_VERSION from the configured index"
        pip_install "torch==$TORCH_VERSION"
    fi
fi
pip_install -e ".[test]"
