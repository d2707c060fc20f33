#!/usr/bin/env bash
# tether vs TRL on a GPU: the benchmark's workloads in bf16 on CUDA at a larger shape (qwen05b: Qwen2.5-0.5B's
# sizes, random weights; see bench/assets.py), plus tether's vLLM engine when vllm is installed. Writes
# bench/results_gpu.json and bench/results_gpu.md.
#
#   bash bench/gpu.sh                 # full GPU run (3 repeats per library; a few minutes on one H100-class GPU)
#   bash bench/gpu.sh --quick         # 1 repeat, fewer steps
#   bash bench/gpu.sh --dry-run       # check the environment and print the command, run nothing
#   bash bench/gpu.sh --help
#
# Extra arguments go to bench/bench.py (e.g. --workloads sft,grpo --repeats 2). The interpreter is $PYTHON, else
# bench/.venv-trl/bin/python when it has CUDA, else python3: it needs a CUDA build of torch, trl and peft
# (pip install trl==1.16.0 peft), and tether importable (this checkout is put first on the path). Nothing is
# downloaded: the model is built locally with random weights.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
RESULTS="$HERE/results_gpu.json"
DRY_RUN=0
PASS=()

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --results) [ $# -ge 2 ] || { echo "gpu.sh: --results needs a path" >&2; exit 2; }
                   RESULTS="$2"; shift ;;
        --results=*) RESULTS="${1#--results=}" ;;
        --device|--device=*) echo "gpu.sh: the device is always cuda here; use bench/run.sh for CPU" >&2; exit 2 ;;
        *) PASS+=("$1") ;;
    esac
    shift
done

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if [ -x "$HERE/.venv-trl/bin/python" ] && \
       "$HERE/.venv-trl/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "$HERE/.venv-trl/bin/python"; return
    fi
    echo python3
}
PY="$(pick_python)"

# What the run needs, checked before any work: one clear line per missing piece, exit 2.
missing=$("$PY" - <<'PYCHECK' 2>&1 || true
import importlib.util
problems = []
for name in ("torch", "transformers", "trl", "peft", "datasets"):
    if importlib.util.find_spec(name) is None:
        problems.append(f"python package {name!r} is not installed")
if importlib.util.find_spec("torch") is not None:
    import torch
    if not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} sees no CUDA device")
print("\n".join(problems))
PYCHECK
)
vllm=$("$PY" -c "import importlib.util; print('yes' if importlib.util.find_spec('vllm') else 'no')" 2>/dev/null || echo no)

COMMAND=("$PY" "$HERE/bench.py" --device cuda --results "$RESULTS" "${PASS[@]}")
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" = 1 ]; then
    echo "interpreter: $PY"
    echo "vLLM generation row: $vllm"
    if [ -n "$missing" ]; then echo "not ready:"; echo "$missing" | sed 's/^/  - /'; else echo "ready"; fi
    echo "would run: ${COMMAND[*]}"
    exit 0
fi
if [ -n "$missing" ]; then
    echo "gpu.sh: cannot run with $PY: $(echo "$missing" | paste -sd ';' -) (set PYTHON to an interpreter that has them)" >&2
    exit 2
fi
exec "${COMMAND[@]}"
