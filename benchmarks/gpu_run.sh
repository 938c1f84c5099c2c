#!/usr/bin/env bash
# On a GPU machine, from the repo root; prepare first on a machine with pip access (benchmarks/gpu_prepare.sh):
#   bash benchmarks/gpu_run.sh                     gpu_check.py: every CUDA-only claim, then the speed rows (< 8 min)
#   bash benchmarks/gpu_run.sh run_all.py [ARGS]   the whole benchmark (~5 min; --compile adds 2-4)
# Installs the carried wheels (.whl/) into /tmp/site, points the script at the carried ComfyUI (.comfyui/) and writes
# its JSON (gpu_check.json, or bench.json + bench.md) and its log to $OUT (default: the repo root). Without .whl/ it
# runs on the machine's own packages; gpu_check.py lists what is missing first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
script=gpu_check.py
if [[ "${1:-}" == *.py ]]; then
    script="$1"
    shift
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/ here: running on this machine's packages (benchmarks/gpu_prepare.sh brings the missing ones)" >&2
fi
[ -d .configs ] && export GLM_IMAGE_CONFIGS="$PWD/.configs"
[ -f .comfyui/comfy/model_management.py ] && export COMFYUI_PATH="$PWD/.comfyui"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
case "$script" in
    gpu_check.py) outputs=(--json "$OUT/gpu_check.json") ;;
    run_all.py) outputs=(--out "$OUT/bench.md" --json "$OUT/bench.json") ;;
    *) outputs=() ;;
esac
PYTHONUNBUFFERED=1 python3 "benchmarks/$script" "${outputs[@]}" "$@" 2>&1 | tee "$OUT/${script%.py}_log.txt"
