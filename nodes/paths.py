"""Where GLM-Image files live in ComfyUI, and the one way a node turns a file choice into a path.

- `models/glm_image/<name>/`: the published folder exactly as downloaded (model_index.json, transformer/, vae/, ...).
  Extra roots come from `glm_image:` in extra_model_paths.yaml.
- Single `.safetensors` files of the DiT, the glyph encoder and the VAE in the usual folders (`diffusion_models`,
  `text_encoders`, `vae`); DiT folders there too (a transformer/ folder, or a folder holding one, whose config.json
  names the DiT: how 4-bit re-uploads such as Intel/GLM-Image-int4-AutoRound are kept).
- Visual token files: directly in input/, and in output/glm_tokens/ (where Save Visual Tokens writes).
- AR LoRA adapters in `models/loras`: single `.safetensors` files and PEFT adapter folders (adapter_config.json).

A loader's choice is a folder name (no extension) or a file name (with its .safetensors extension).

Every file-valued input resolves through `resolve`: the value must be one of the input's own current options, and
the path it names must lie inside one of the folders registered for it. ComfyUI does not check a V3 combo value
against its options (0.3.64), and a prompt can be queued by anyone who reaches the server, so a value such as
"../../etc/passwd [output]" must be refused here before any file is opened. Symlinks that exist on disk inside the
registered folders are followed, as ComfyUI follows them (a model folder linked from another disk is the machine
owner's choice); names read from inside a model folder (shard indexes, tokenizer configs) are checked by the core
(`glm_image_core.files.outside_name_reason`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import folder_paths

from ..glm_image_core import ar_lora, loading, lora
from ..glm_image_core.errors import GlmImageError, InvalidInputError
from ..glm_image_core.tokens import read_tokens

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


class FileChoices(Protocol):
    """A loader's file input: the choices it lists, where a choice lives, and the cheap checks made when the prompt
    is queued (ModelFiles, TokenFiles, FolderFiles, AdapterFiles)."""

    def options(self) -> list[str]: ...

    def locations(self, choice: str) -> list[tuple[str, str]]:
        """(a folder registered for `choice`, the path it names there), in search order."""
        ...

    def describe(self) -> str: ...

    def check(self, path: str) -> None: ...


class ModelFolderListing:
    """The GLM-Image folders under the roots of one ComfyUI model folder (glm_image), by the component sub-folders
    they hold. With `config_checked` (a folder for all kinds of models, such as diffusion_models) a folder counts only
    where the config names the component's class, and a component's own folder (transformer/ placed alone) counts
    too.

    Listed whenever ComfyUI serves the node definitions, so the tree is walked again only when it changed: the
    walk remembers the modification time of every folder it looked into (a folder added or removed anywhere changes
    its parent's), as ComfyUI's own filename cache does. The walk follows symlinks, stops at a GLM-Image folder (one
    does not nest another) and skips a link back into the folders it came through, so a symlink loop ends it."""

    MAX_DEPTH = 8  # below a root; the Hugging Face cache layout (models--org--name/snapshots/<hash>/) needs 3

    def __init__(self, folder_name: str = GLM_IMAGE_FOLDER, config_checked: bool = False):
        self.folder_name, self.config_checked = folder_name, config_checked
        self._cache: tuple[tuple[str, ...], dict[str, int], dict[str, set[str]]] | None = None  # roots, mtimes, found

    def folders(self, component: str) -> list[str]:
        """Names (relative to a root, "/"-separated) of folders that hold `<component>/` (or, config-checked, are
        one)."""
        roots = tuple(folder_paths.get_folder_paths(self.folder_name))
        if self._cache is None or self._cache[0] != roots or not self._unchanged(self._cache[1]):
            self._cache = (roots, *self._walk(roots))
        return sorted(self._cache[2].get(component, ()))

    @staticmethod
    def _unchanged(mtimes: dict[str, int]) -> bool:
        try:
            return all(os.stat(folder).st_mtime_ns == mtime for folder, mtime in mtimes.items())
        except OSError:  # removed since
            return False

    def _walk(self, roots) -> tuple[dict[str, int], dict[str, set[str]]]:
        mtimes: dict[str, int] = {}
        found: dict[str, set[str]] = {}
        for root in roots:
            if not os.path.isdir(root):
                continue
            chains = {root: {os.path.realpath(root)}}  # folder -> the real paths of the folders it was reached through
            for current, dirs, _ in os.walk(root, followlinks=True):
                mtimes[current] = os.stat(current).st_mtime_ns
                held = self._components(current, dirs)
                for component in held:
                    found.setdefault(component, set()).add(os.path.relpath(current, root).replace(os.sep, "/"))
                depth = 0 if current == root else os.path.relpath(current, root).count(os.sep) + 1
                if held or depth >= self.MAX_DEPTH:
                    dirs.clear()
                    continue
                kept = []
                for name in dirs:
                    path, real = os.path.join(current, name), os.path.realpath(os.path.join(current, name))
                    if real not in chains[current]:
                        chains[path] = chains[current] | {real}
                        kept.append(name)
                dirs[:] = kept
        return mtimes, found

    def _components(self, folder: str, subfolders: list[str]) -> set[str]:
        """The sub-folder names of the components `folder` holds (or, config-checked, is)."""
        if not self.config_checked:
            return {c.subfolder for c in loading.COMPONENTS}.intersection(subfolders)
        return {
            c.subfolder
            for c in loading.COMPONENTS
            if self._names(os.path.join(folder, "config.json"), c)
            or (c.subfolder in subfolders and self._names(os.path.join(folder, c.subfolder, "config.json"), c))
        }

    @staticmethod
    def _names(config_file: str, component: loading.Component) -> bool:
        """Whether `config_file` is a config of `component` (a missing or unreadable file is not)."""
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and config.get(component.config_field) == component.config_value


MODEL_FOLDERS = ModelFolderListing()
DIFFUSION_MODEL_FOLDERS = ModelFolderListing("diffusion_models", config_checked=True)


@dataclass(frozen=True)
class ModelFiles:
    """A loader input: GLM-Image folders that hold the component's sub-folder, then (if `file_folder` is set) the
    single .safetensors files of that ComfyUI model folder, and (with `file_folder_listing`) the GLM-Image folders
    there too."""

    component: loading.Component
    file_folder: str | None = None
    file_folder_listing: ModelFolderListing | None = None

    def options(self) -> list[str]:
        folders, files = MODEL_FOLDERS.folders(self.component.subfolder), []
        if self.file_folder_listing is not None:
            folders += [f for f in self.file_folder_listing.folders(self.component.subfolder) if f not in folders]
        if self.file_folder is not None:
            files = [f for f in folder_paths.get_filename_list(self.file_folder) if f.endswith(".safetensors")]
        return folders + files

    def locations(self, choice: str) -> list[tuple[str, str]]:
        """(a folder registered for `choice`, the path it names there), in ComfyUI's search order; a folder name is
        looked for under the glm_image roots first."""
        if self.is_file(choice):
            roots = folder_paths.get_folder_paths(self.file_folder)
        else:
            roots = folder_paths.get_folder_paths(GLM_IMAGE_FOLDER)
            if self.file_folder_listing is not None:
                roots = roots + folder_paths.get_folder_paths(self.file_folder_listing.folder_name)
        return [(root, os.path.join(root, choice)) for root in roots]

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
                found += [
                    os.path.relpath(os.path.join(folder, f), base).replace(os.sep, "/") + annotation
                    for f in os.listdir(folder)
                    if f.endswith(TOKENS_EXTENSION)
                ]
        return sorted(found)

    def locations(self, choice: str) -> list[tuple[str, str]]:
        annotation = " [output]" if choice.endswith(" [output]") else ""
        base, folder = self.folders()[annotation]
        return [(folder, os.path.join(base, choice.removesuffix(annotation)))]

    def describe(self) -> str:
        return f"visual token files (*{TOKENS_EXTENSION} in input/ and output/{TOKENS_OUTPUT_FOLDER}/)"

    def check(self, path: str) -> None:
        read_tokens(path)  # every rule of the file, before a prompt that loads it is queued (small files: cheap)


@dataclass(frozen=True)
class FolderFiles:
    """The files of one ComfyUI model folder (e.g. "loras") whose names end in `suffix`, checked when the prompt is
    queued: like a loader's files (`component`), or by the core's check of such a file (`check_file`)."""

    folder: str
    suffix: str = ".safetensors"
    component: loading.Component | None = None
    check_file: Callable[[str], None] | None = None

    def options(self) -> list[str]:
        return sorted(f for f in folder_paths.get_filename_list(self.folder) if f.endswith(self.suffix))

    def locations(self, choice: str) -> list[tuple[str, str]]:
        return [(root, os.path.join(root, choice)) for root in folder_paths.get_folder_paths(self.folder)]

    def describe(self) -> str:
        return f"*{self.suffix} files in {self.folder}"

    def check(self, path: str) -> None:
        if self.component is not None:
            loading.check_files(path, self.component)
        if self.check_file is not None:
            self.check_file(path)


@dataclass(frozen=True)
class AdapterFiles:
    """AR LoRA adapters in one ComfyUI model folder: single .safetensors files, and PEFT adapter folders (with
    adapter_config.json) named by their path relative to the folder. Checked when the prompt is queued."""

    folder: str

    def options(self) -> list[str]:
        files = [f for f in folder_paths.get_filename_list(self.folder) if f.endswith(".safetensors")]
        adapters = set()
        for root in folder_paths.get_folder_paths(self.folder):
            seen = set()  # real paths walked: a symlink loop ends the walk
            for current, dirs, names in os.walk(root, followlinks=True):
                real = os.path.realpath(current)
                if real in seen:
                    dirs.clear()
                    continue
                seen.add(real)
                if ar_lora.ADAPTER_CONFIG in names and current != root:
                    adapters.add(os.path.relpath(current, root).replace(os.sep, "/"))
        return sorted(files) + sorted(adapters)

    def locations(self, choice: str) -> list[tuple[str, str]]:
        return [(root, os.path.join(root, choice)) for root in folder_paths.get_folder_paths(self.folder)]

    def describe(self) -> str:
        return f"AR LoRA adapters (.safetensors files and PEFT adapter folders) in {self.folder}"

    def check(self, path: str) -> None:
        ar_lora.check_adapter(path)


DIT = ModelFiles(loading.TRANSFORMER, "diffusion_models", DIFFUSION_MODEL_FOLDERS)  # folders: 4-bit re-uploads
VAE = ModelFiles(loading.VAE, "vae")
GLYPH_ENCODER = ModelFiles(loading.TEXT_ENCODER, "text_encoders")
AR_MODEL = ModelFiles(loading.AR_MODEL)  # a folder only: transformers loads it with its processor
TOKENS = TokenFiles()
LORAS = FolderFiles("loras", check_file=lora.check_dit_lora_file)
AR_LORAS = AdapterFiles("loras")
AR_INT8 = FolderFiles(GLM_IMAGE_FOLDER, loading.AR_INT8_SUFFIX, loading.AR_MODEL)  # export-ar-int8's files


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (both already real paths)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # Windows: another drive
        return False


def resolve(files: FileChoices, choice: str) -> str:
    """The path of `choice`, one of `files.options()`, in the first folder registered for it that has it;
    InvalidInputError for anything else (another value, a path that climbs out). Symlinks on disk inside those
    folders are followed, as ComfyUI does: they are the machine owner's choice, a prompt's value is not."""
    if not isinstance(choice, str) or choice not in files.options():
        raise InvalidInputError(
            f"{choice!r} is not one of the choices for {files.describe()}. Pick one from the list; if you have just "
            "added it, refresh the node definitions (press R in ComfyUI)."
        )
    for root, path in files.locations(choice):
        path = os.path.abspath(path)
        if not is_inside(path, os.path.abspath(root)):  # a listed name never climbs; a value that does is refused
            raise InvalidInputError(f"{choice!r} leads out of {root}; pick one from the list.")
        if os.path.exists(path):
            return path
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


def validate(files: FileChoices, choice: str | None) -> bool | str:
    """For validate_inputs: True, or what is wrong with the choice (also what the files' cheap checks find, e.g. a
    missing or truncated shard). A linked value (None here) is resolved when the node runs."""
    if choice is None:
        return True
    try:
        files.check(resolve(files, choice))
    except GlmImageError as e:
        return str(e)
    return True
