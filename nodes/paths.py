"""Where GLM-Image files live in ComfyUI, and the one way a node turns a file choice into a path.

- `models/glm_image/<name>/`: the published folder exactly as downloaded (model_index.json, transformer/, vae/, ...).
  Extra roots come from `glm_image:` in extra_model_paths.yaml.
- Single `.safetensors` files of the DiT, the glyph encoder and the VAE in the usual folders (`diffusion_models`,
  `text_encoders`, `vae`).
- Visual token files: directly in input/, and in output/glm_tokens/ (where Save Visual Tokens writes).
- AR LoRA adapters in `models/loras`: single `.safetensors` files and PEFT adapter folders (adapter_config.json).

A loader's choice is a folder name (no extension) or a file name (with its .safetensors extension).

Every file-valued input resolves through `resolve`: the value must be one of the input's own current options, and
its real path (symlinks followed) must lie inside one of the folders registered for it. ComfyUI does not check a
V3 combo value against its options (0.3.64), and a prompt can be queued by anyone who reaches the server, so a
value such as "../../etc/passwd [output]" must be refused here before any file is opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths

from ..glm_image_core import ar_lora, loading
from ..glm_image_core.errors import GlmImageError, InvalidInputError

GLM_IMAGE_FOLDER = "glm_image"
TOKENS_EXTENSION = ".glm_tokens"  # a safetensors file with the grids and their prompt, size and seed
TOKENS_OUTPUT_FOLDER = "glm_tokens"  # under the output directory


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


@dataclass(frozen=True)
class ModelFiles:
    """A loader input: GLM-Image folders that hold the component's sub-folder, then (if `file_folder` is set) the
    single .safetensors files of that ComfyUI model folder."""

    component: loading.Component
    file_folder: str | None = None

    def options(self) -> list[str]:
        files = []
        if self.file_folder is not None:
            files = [f for f in folder_paths.get_filename_list(self.file_folder) if f.endswith(".safetensors")]
        return model_folders(self.component.subfolder) + files

    def locations(self, choice: str) -> tuple[list[str], list[str]]:
        """The folders registered for `choice`, and the paths it names in them in ComfyUI's search order."""
        roots = folder_paths.get_folder_paths(self.file_folder if self.is_file(choice) else GLM_IMAGE_FOLDER)
        return roots, [os.path.join(root, choice) for root in roots]

    def is_file(self, choice: str) -> bool:
        return self.file_folder is not None and choice.endswith(".safetensors")

    def describe(self) -> str:
        where = f"GLM-Image folders with {self.component.subfolder}/ in {GLM_IMAGE_FOLDER}"
        if self.file_folder is not None:
            where += f" and .safetensors files in {self.file_folder}"
        return f"{self.component.label} ({where})"

    def check(self, path: str) -> None:
        loading.check_files(path, self.component)


@dataclass(frozen=True)
class TokenFiles:
    """Visual token files directly in input/, and in output/glm_tokens/ annotated " [output]" as ComfyUI names
    output files. Only these two folders are listed: this runs whenever the node list is served."""

    def folders(self) -> dict[str, tuple[str, str]]:
        """annotation -> (the folder listed names are relative to, the folder listed)."""
        input_dir, output_dir = folder_paths.get_input_directory(), folder_paths.get_output_directory()
        return {"": (input_dir, input_dir), " [output]": (output_dir, os.path.join(output_dir, TOKENS_OUTPUT_FOLDER))}

    def options(self) -> list[str]:
        found = []
        for annotation, (base, folder) in self.folders().items():
            if os.path.isdir(folder):
                found += [os.path.relpath(os.path.join(folder, f), base).replace(os.sep, "/") + annotation
                          for f in os.listdir(folder) if f.endswith(TOKENS_EXTENSION)]  # fmt: skip
        return sorted(found)

    def locations(self, choice: str) -> tuple[list[str], list[str]]:
        annotation = " [output]" if choice.endswith(" [output]") else ""
        base, folder = self.folders()[annotation]
        return [folder], [os.path.join(base, choice.removesuffix(annotation))]

    def describe(self) -> str:
        return f"visual token files (*{TOKENS_EXTENSION} in input/ and output/{TOKENS_OUTPUT_FOLDER}/)"

    def check(self, path: str) -> None:
        pass  # read whole when the node runs; the file is small


@dataclass(frozen=True)
class FolderFiles:
    """The files of one ComfyUI model folder (e.g. "loras") whose names end in `suffix`; with a component, checked
    like a loader's files when the prompt is queued, else only when they are read."""

    folder: str
    suffix: str = ".safetensors"
    component: loading.Component | None = None

    def options(self) -> list[str]:
        return sorted(f for f in folder_paths.get_filename_list(self.folder) if f.endswith(self.suffix))

    def locations(self, choice: str) -> tuple[list[str], list[str]]:
        roots = folder_paths.get_folder_paths(self.folder)
        return roots, [os.path.join(root, choice) for root in roots]

    def describe(self) -> str:
        return f"*{self.suffix} files in {self.folder}"

    def check(self, path: str) -> None:
        if self.component is not None:
            loading.check_files(path, self.component)


@dataclass(frozen=True)
class AdapterFiles:
    """AR LoRA adapters in one ComfyUI model folder: single .safetensors files, and PEFT adapter folders (with
    adapter_config.json) named by their path relative to the folder. Checked when the prompt is queued."""

    folder: str

    def options(self) -> list[str]:
        files = [f for f in folder_paths.get_filename_list(self.folder) if f.endswith(".safetensors")]
        adapters = set()
        for root in folder_paths.get_folder_paths(self.folder):
            for current, _, names in os.walk(root, followlinks=True):
                if ar_lora.ADAPTER_CONFIG in names and current != root:
                    adapters.add(os.path.relpath(current, root).replace(os.sep, "/"))
        return sorted(files) + sorted(adapters)

    def locations(self, choice: str) -> tuple[list[str], list[str]]:
        roots = folder_paths.get_folder_paths(self.folder)
        return roots, [os.path.join(root, choice) for root in roots]

    def describe(self) -> str:
        return f"AR LoRA adapters (.safetensors files and PEFT adapter folders) in {self.folder}"

    def check(self, path: str) -> None:
        """An adapter folder's files must lie in the registered folders too (a symlink inside it may point out)."""
        if os.path.isdir(path):
            roots = [os.path.realpath(root) for root in folder_paths.get_folder_paths(self.folder)]
            for name in (ar_lora.ADAPTER_CONFIG, ar_lora.ADAPTER_WEIGHTS):
                real = os.path.realpath(os.path.join(path, name))
                if os.path.exists(real) and not any(is_inside(real, root) for root in roots):
                    raise InvalidInputError(
                        f"{name} of the adapter {os.path.basename(path)} leads to {real}, outside the folders "
                        f"registered for {self.folder}: files are read only from those folders."
                    )
        ar_lora.check_adapter(path)


DIT = ModelFiles(loading.TRANSFORMER, "diffusion_models")
VAE = ModelFiles(loading.VAE, "vae")
GLYPH_ENCODER = ModelFiles(loading.TEXT_ENCODER, "text_encoders")
AR_MODEL = ModelFiles(loading.AR_MODEL)  # a folder only: transformers loads it with its processor
TOKENS = TokenFiles()
LORAS = FolderFiles("loras")
AR_LORAS = AdapterFiles("loras")
AR_INT8 = FolderFiles(GLM_IMAGE_FOLDER, loading.AR_INT8_SUFFIX, loading.AR_MODEL)  # export-ar-int8's files


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (both already real paths)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # Windows: another drive
        return False


def resolve(files: ModelFiles | TokenFiles | FolderFiles | AdapterFiles, choice: str) -> str:
    """The real path of `choice`, one of `files.options()`, inside a folder registered for it; InvalidInputError
    for anything else (another value, a path that climbs out, a symlink that points out)."""
    if not isinstance(choice, str) or choice not in files.options():
        raise InvalidInputError(
            f"{choice!r} is not one of the choices for {files.describe()}. Pick one from the list; if you have just "
            "added it, refresh the node definitions (press R in ComfyUI)."
        )
    roots, candidates = files.locations(choice)
    for path in candidates:
        if not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        if not any(is_inside(real, os.path.realpath(root)) for root in roots):
            raise InvalidInputError(
                f"{choice!r} leads to {real}, outside the folders registered for it ({', '.join(roots)}): a symlink "
                "points out of them. Files are read only from those folders: register the folder it points to (in "
                "extra_model_paths.yaml) or move the files there."
            )
        return real
    raise InvalidInputError(f"{choice!r} ({files.describe()}) was removed after the list was made; refresh (press R).")


def check_output_prefix(prefix: str) -> None:
    """InvalidInputError unless files saved under `prefix` land inside the output folder (symlinks followed; ComfyUI
    itself checks the path without following them, and only when saving)."""
    output = os.path.realpath(folder_paths.get_output_directory())
    target = os.path.realpath(os.path.join(output, os.path.dirname(os.path.normpath(prefix))))
    if not is_inside(target, output):
        raise InvalidInputError(
            f"filename_prefix {prefix!r} would save to {target}, outside the output folder {output}; use a path "
            "inside it, such as glm_tokens/tokens."
        )


def validate(files: ModelFiles | TokenFiles | FolderFiles | AdapterFiles, choice: str | None) -> bool | str:
    """For validate_inputs: True, or what is wrong with the choice (also what the files' cheap checks find, e.g. a
    missing or truncated shard). A linked value (None here) is resolved when the node runs."""
    if choice is None:
        return True
    try:
        files.check(resolve(files, choice))
    except GlmImageError as e:
        return str(e)
    return True
