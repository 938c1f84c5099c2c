#!/usr/bin/env bash
# Run on a machine with pip access before benchmarking on a GPU machine that may have no network. Fills two
# folders of the repo that git ignores, to copy to the GPU machine with the repo:
#   .whl/      transformers 5.23.0 and diffusers 0.42.1 wheels (pure Python); a GPU image may have an older
#              transformers and no diffusers
#   .comfyui/  ComfyUI without its git history, node packs and models (~14 MB), from $COMFYUI_PATH (default
#              /opt/ComfyUI), for the ComfyUI/fp8 rows; skipped if there is none
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
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.23.0 diffusers==0.42.1

[ -n "${GLM_IMAGE_CONFIGS:-}" ] && rm -rf .configs && cp -r "$GLM_IMAGE_CONFIGS" .configs

comfyui="${COMFYUI_PATH:-/opt/ComfyUI}"
rm -rf .comfyui
if [ -f "$comfyui/comfy/model_management.py" ]; then
    mkdir .comfyui
    (cd "$comfyui" && tar cf - --exclude=__pycache__ --exclude=.git --exclude=./tests --exclude=./tests-unit \
        --exclude=./models --exclude=./output --exclude=./input --exclude=./custom_nodes --exclude=./comfy_api_nodes \
        --exclude=./comfy_extras --exclude=./app --exclude=./api_server --exclude=./alembic_db --exclude=./middleware \
        --exclude=./script_examples .) | tar xf - -C .comfyui
else
    echo "no ComfyUI at $comfyui: the ComfyUI/fp8 rows will be skipped" >&2
fi
du -sh .whl .comfyui .configs 2>/dev/null || true
