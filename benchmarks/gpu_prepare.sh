#!/usr/bin/env bash
# Run on a machine with pip access before a GPU machine without network runs benchmarks/gpu_run.sh. Fills folders of
# the repo that git ignores, to travel with the repo (about 35 MB together):
#   .whl/      wheels of what a bare CUDA image may lack (pure Python): transformers 5.23.0 (the tested version),
#              diffusers 0.42.1 (the reference columns), torchsde 0.2.6 + trampoline (ComfyUI's samplers)
#   .comfyui/  ComfyUI without its git history, tests, models, server app and API nodes (~15 MB), from $COMFYUI_PATH
#              (default /opt/ComfyUI), for the fp8 and TorchCompileModel checks; skipped if there is none. ComfyUI
#              0.3.64 imports with the GPU image's packages (av is stubbed: only its video types import it); 0.33+
#              also needs comfy-kitchen, a 58 MB wheel that does not fit beside the rest under a 64 MiB transfer
#   .configs/  only when GLM_IMAGE_CONFIGS is set: those configs (default: glm_image_core/published, in the repo)
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.comfyui/ /.configs/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"
done

rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.23.0 diffusers==0.42.1 torchsde==0.2.6 trampoline==0.1.2

[ -n "${GLM_IMAGE_CONFIGS:-}" ] && rm -rf .configs && cp -r "$GLM_IMAGE_CONFIGS" .configs

comfyui="${COMFYUI_PATH:-/opt/ComfyUI}"
rm -rf .comfyui
if [ -f "$comfyui/comfy/model_management.py" ]; then
    mkdir .comfyui
    (cd "$comfyui" && tar cf - --exclude=__pycache__ --exclude=.git --exclude=./tests --exclude=./tests-unit \
        --exclude=./models --exclude=./output --exclude=./input --exclude=./custom_nodes --exclude=./comfy_api_nodes \
        --exclude=./app --exclude=./api_server --exclude=./alembic_db --exclude=./middleware \
        --exclude=./script_examples .) | tar xf - -C .comfyui
else
    echo "no ComfyUI at $comfyui: the fp8 and TorchCompileModel checks will be skipped" >&2
fi
du -sh .whl .comfyui .configs 2>/dev/null || true
