"""Where GLM-Image files live in ComfyUI.

- `models/glm_image/<name>/`: the published folder exactly as downloaded (model_index.json, transformer/, vae/, ...).
  Extra roots come from `glm_image:` in extra_model_paths.yaml.
- Single `.safetensors` files of the DiT, the glyph encoder and the VAE in the usual folders (`diffusion_models`,
  `text_encoders`, `vae`).

A loader's choice is a folder name (no extension) or a file name (with its .safetensors extension).
"""

from __future__ import annotations

import os

import folder_paths

from ..glm_image_core.loading import AR_INT8_SUFFIX

GLM_IMAGE_FOLDER = "glm_image"


def register_model_folder() -> None:
    """Add `models/glm_image`, keeping paths extra_model_paths.yaml already registered (main.py loads it first)."""
    paths, _ = folder_paths.folder_names_and_paths.get(GLM_IMAGE_FOLDER, ([], set()))
    default = os.path.join(folder_paths.models_dir, GLM_IMAGE_FOLDER)
    folder_paths.folder_names_and_paths[GLM_IMAGE_FOLDER] = (
        [default] + [p for p in paths if p != default],
        {".safetensors"},
    )


def model_folders(component: str) -> list[str]:
    """Names (relative to a glm_image root) of folders that hold `<component>/` (e.g. "transformer")."""
    found = set()
    for root in folder_paths.get_folder_paths(GLM_IMAGE_FOLDER):
        if not os.path.isdir(root):
            continue
        for current, dirs, _ in os.walk(root, followlinks=True):
            if os.path.isdir(os.path.join(current, component)):
                found.add(os.path.relpath(current, root).replace(os.sep, "/"))
                dirs.clear()  # a GLM-Image folder does not nest another
    return sorted(found)


def choices(component: str, single_file_folder: str | None = None) -> list[str]:
    """Loader options: GLM-Image folders with that component, then single .safetensors files."""
    files = []
    if single_file_folder is not None:
        files = [f for f in folder_paths.get_filename_list(single_file_folder) if f.endswith(".safetensors")]
    return model_folders(component) + files


def resolve(choice: str, single_file_folder: str | None = None) -> str:
    """The path of a loader choice: a folder under a glm_image root, or a single file."""
    if choice.endswith(".safetensors") and single_file_folder is not None:
        return folder_paths.get_full_path_or_raise(single_file_folder, choice)
    for root in folder_paths.get_folder_paths(GLM_IMAGE_FOLDER):
        path = os.path.join(root, choice)
        if os.path.isdir(path):
            return path
    roots = ", ".join(folder_paths.get_folder_paths(GLM_IMAGE_FOLDER))
    raise FileNotFoundError(f"GLM-Image folder '{choice}' not found under {roots}.")


def ar_int8_files() -> list[str]:
    """8-bit AR exports (``*.ar_int8.safetensors``, from `python -m glm_image_core export-ar-int8`) anywhere under
    the glm_image roots, as paths relative to their root."""
    return sorted(f for f in folder_paths.get_filename_list(GLM_IMAGE_FOLDER) if f.endswith(AR_INT8_SUFFIX))


def resolve_file(name: str) -> str:
    return folder_paths.get_full_path_or_raise(GLM_IMAGE_FOLDER, name)
