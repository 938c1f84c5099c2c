"""Writing files so that an interrupted write leaves nothing under the final name, and the one rule for names that a
downloaded file (a shard index, a tokenizer config) gives for other files.

Every file the pack writes (visual tokens, the 8-bit AR export, single-file exports) goes through ``written_to``:
the data goes to a hidden temporary name in the same folder and is renamed onto the final name only once complete,
so a crash, a full disk or a Cancel half way leaves the old file (or none), never a truncated one that a loader
would list.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors.torch import save_file

PARTIAL_SUFFIX = ".partial"  # no loader lists it: ComfyUI lists .safetensors, Load Visual Tokens .glm_tokens


@contextlib.contextmanager
def written_to(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; rename it onto ``path`` when the block completes, delete
    it when the block raises (including KeyboardInterrupt and ComfyUI's interrupt)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield partial
        os.replace(partial, path)  # atomic on one file system, and the temporary name is in the same folder
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through ``written_to``: complete under ``path``, or not there at all."""
    path = Path(path)
    with written_to(path) as partial:
        save_file(tensors, partial, metadata=metadata)
    return path


def outside_name_reason(name: object) -> str | None:
    """Why ``name`` (read from a file inside a model folder) does not name a file inside that folder, or None.

    A name must be a plain relative path ("model-00001-of-00002.safetensors", "sub/file.json"): not empty, not
    absolute (on any system: "/x", "C:\\x", "\\\\server\\x"), with no ".." part. Symlinks on disk are not this
    rule's business: the machine's owner made them; what a downloaded file says is checked here."""
    if not isinstance(name, str) or not name.strip():
        return f"{name!r} is not a file name"
    if "\0" in name:
        return f"{name!r} contains a NUL character"
    windows = PureWindowsPath(name)
    if PurePosixPath(name).is_absolute() or windows.anchor:
        return f"{name!r} is an absolute path"
    if ".." in PurePosixPath(name).parts or ".." in windows.parts:
        return f"{name!r} climbs out of the folder with '..'"
    return None
