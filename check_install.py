"""Check a GLM-Image install: run from the ComfyUI folder with ComfyUI's Python,

    python custom_nodes/glm-image-nodes/check_install.py

It prints the versions that matter (Python, ComfyUI, torch, transformers and what comes with it), whether transformers
has GlmImage (else the upgrade command), the GLM-Image nodes that ComfyUI loads from this folder (loaded as ComfyUI
loads a custom node pack, on the CPU, without starting the server) and the model folders it will list. Exit status 0:
everything is in place; 1: something is missing, said above. `--comfyui DIR` names the ComfyUI folder when this pack
does not sit in its custom_nodes/.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import logging
import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parent
PACKAGES = ("torch", "transformers", "huggingface_hub", "tokenizers", "safetensors", "numpy", "pillow")


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_pack_nodes(comfyui: Path) -> tuple[list[str], list[str]]:
    """The node ids ComfyUI registers from this folder, and the warnings and errors it logged meanwhile."""
    sys.path[:] = [str(comfyui)] + [p for p in sys.path if Path(p or ".").resolve() != PACK]  # `nodes` = ComfyUI's
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: a check needs no GPU
    extra_config = importlib.import_module("utils.extra_config")  # ComfyUI's utils/, before nodes.py shadows it
    if (comfyui / "extra_model_paths.yaml").is_file():  # as main.py does
        extra_config.load_extra_path_config(str(comfyui / "extra_model_paths.yaml"))
    import nodes

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    before = dict(nodes.NODE_CLASS_MAPPINGS)
    try:
        asyncio.run(nodes.load_custom_node(str(PACK), ignore=set(before), module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(handler)
    found = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v)
    return found, [r.getMessage() for r in records]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, default=PACK.parents[1], help="the ComfyUI folder")
    comfyui = parser.parse_args(argv).comfyui.resolve()
    ok = True
    print(f"GLM-Image pack: {PACK}")
    print(f"Python {sys.version.split()[0]}: {sys.executable}")
    if not (comfyui / "comfy" / "sd.py").is_file():
        print(f"ComfyUI: not found at {comfyui} (pass --comfyui DIR)")
        return 1
    version_file = comfyui / "comfyui_version.py"
    comfyui_version = version_file.read_text().split('"')[1] if version_file.is_file() else "unknown version"
    print(f"ComfyUI {comfyui_version}: {comfyui}")
    print("Packages: " + ", ".join(f"{p} {version_of(p)}" for p in PACKAGES))

    sys.path.insert(0, str(PACK))
    from glm_image_core.dependencies import transformers_problem

    problem = transformers_problem()
    print(f"transformers: {'has GlmImage' if problem is None else problem}")
    ok &= problem is None

    found, logged = load_pack_nodes(comfyui)
    print(f"{len(found)} GLM-Image nodes loaded: {', '.join(found) or 'none'}")
    for message in logged:
        if problem is None or message != problem:
            print(f"ComfyUI logged: {message}")
    ok &= bool(found)

    import folder_paths

    for root in folder_paths.get_folder_paths("glm_image"):
        models = sorted(d for d in os.listdir(root) if (Path(root) / d).is_dir()) if os.path.isdir(root) else []
        print(f"Model folder {root}: {', '.join(models) if models else 'empty (download GLM-Image here)'}")
    print("OK" if ok else "NOT OK: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
