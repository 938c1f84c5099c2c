#!/usr/bin/env bash
# The whole benchmark on a GPU machine, from the repo root (prepare with benchmarks/gpu_prepare.sh first):
# installs the carried wheels into /tmp/site, then runs run_all.py; the table, the rows and the log go to $OUT.
# Extra arguments go to run_all.py (e.g. --compile, --reference-e2e).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d .configs ] && export GLM_IMAGE_CONFIGS="$PWD/.configs"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
comfy=()
[ -f .comfyui/comfy/model_management.py ] && comfy=(--comfyui .comfyui)
PYTHONUNBUFFERED=1 python3 benchmarks/run_all.py "${comfy[@]}" --out "$OUT/bench.md" --json "$OUT/bench.json" "$@" \
    2>&1 | tee "$OUT/bench_log.txt"
