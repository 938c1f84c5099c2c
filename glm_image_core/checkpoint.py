"""Safetensors weight files: finding them (one file, or an index and its shards), checking their headers before
a tensor is read, and reading them.

Every check runs on the headers: missing or truncated shards, an index that lists keys its shard lacks. Each failure
is a ``ModelFilesError`` that names the file, says what was expected and what to do. Only safetensors are read
(pickled .bin/.pt files can run code when opened). Which component a file holds is ``components``' business.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import ModelFilesError
from .file_checks import display_name, read_header
from .files import outside_name_reason

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REDOWNLOAD = "re-download it from zai-org/GLM-Image"  # ends most messages: what to do


@dataclass
class WeightFiles:
    """The safetensors files of one component, read from their headers only (no tensor data yet)."""

    where: str  # how messages name them: "transformer/ (3 shards)" or "vae/diffusion_pytorch_model.safetensors"
    key_file: dict[str, Path]  # key -> the file holding it
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]  # the __metadata__ of a single file ({} for shards)
    dtypes: dict[str, str]  # key -> safetensors' dtype name ("BF16", "F8_E4M3", "I32", ...)


@dataclass
class ComponentFiles:
    """A component's validated weights and its config, where the config came from (for messages), and which
    component they are (its folder name in the published layout: "transformer", "vision_language_encoder", ...)."""

    weights: WeightFiles
    config: dict
    config_source: str
    component: str


# torch dtypes by the names safetensors headers give them
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def in_memory(state_dict: dict[str, torch.Tensor], config: dict, component: str) -> ComponentFiles:
    """ComponentFiles describing tensors already in memory, as their headers would (for the checks that read
    headers only, such as recognising a weight format; there is no file to read)."""
    shapes = {key: tuple(t.shape) for key, t in state_dict.items()}
    dtypes = {key: SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)) for key, t in state_dict.items()}
    weights = WeightFiles("the given state dict", {}, shapes, {}, dtypes)
    return ComponentFiles(weights, config, "the given config", component)


def _refuse_pickle(path: Path) -> ModelFilesError:
    return ModelFilesError(
        f"{display_name(path)} is a pickle checkpoint ({path.suffix}); only .safetensors weights are loaded, because "
        "pickle files can run code when opened. Download the .safetensors files of zai-org/GLM-Image, or convert "
        "this file with safetensors.torch.save_file in a trusted environment."
    )


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    """Tensor shapes, metadata and dtypes of one safetensors file, checked against the file (``file_checks``)."""
    header = read_header(path, f"The download was probably interrupted: delete the file and {REDOWNLOAD}.")
    return header.shapes, header.metadata, header.dtypes


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ModelFilesError(
            f"{display_name(index_path)} is not a valid shard index (expected JSON with a 'weight_map'): {e}. "
            f"Delete it and {REDOWNLOAD}."
        ) from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFilesError(f"{display_name(index_path)} has an empty 'weight_map'; {REDOWNLOAD}.")
    for key, name in weight_map.items():
        reason = outside_name_reason(name)
        if reason is not None:
            raise ModelFilesError(
                f"{display_name(index_path)} is refused: its entry {key!r} names a shard outside "
                f"{index_path.parent.name}/ ({reason}). An index may name only files inside its own folder, by a "
                f"plain relative name. The index was changed after download: delete it and {REDOWNLOAD}."
            )
    return weight_map


def _scan_sharded(folder: Path, index_path: Path) -> WeightFiles:
    weight_map = _read_index(index_path)
    shard_names = sorted(set(weight_map.values()))
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        names = ", ".join(f"{folder.name}/{name}" for name in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise ModelFilesError(
            f"{names} {verb} missing; the index {index_path.name} lists {len(shard_names)} shards. "
            f"Download the missing shard{'s' if len(missing) > 1 else ''} from zai-org/GLM-Image into {folder}."
        )
    key_file: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name in shard_names:
        shard = folder / name
        shard_shapes, _, shard_dtypes = _read_header(shard)
        listed = [key for key, file in weight_map.items() if file == name]
        absent = [key for key in listed if key not in shard_shapes]
        if absent:
            raise ModelFilesError(
                f"{display_name(shard)} lacks {len(absent)} of the {len(listed)} tensors that {index_path.name} "
                f"puts in it (e.g. {absent[0]}); the shard and the index come from different downloads. "
                f"Delete both and download them again from zai-org/GLM-Image."
            )
        for key in shard_shapes:
            key_file[key] = shard
        shapes.update(shard_shapes)
        dtypes.update(shard_dtypes)
    return WeightFiles(f"{folder.name}/ ({len(shard_names)} shards)", key_file, shapes, {}, dtypes)


def scan_weights(location: str | Path, weights_name: str | None = None) -> WeightFiles:
    """Find and validate the safetensors of a component folder (single file or index + shards) or one file."""
    location = Path(location)
    if location.is_file():
        if location.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(location)
        if location.suffix != ".safetensors":
            raise ModelFilesError(
                f"{display_name(location)} is not a .safetensors file; give a .safetensors file or a GLM-Image folder."
            )
        shapes, metadata, dtypes = _read_header(location)
        return WeightFiles(display_name(location), dict.fromkeys(shapes, location), shapes, metadata, dtypes)
    if not location.is_dir():
        raise ModelFilesError(f"{location} does not exist; expected a GLM-Image folder or a .safetensors file.")

    indexes = sorted(location.glob("*.safetensors.index.json"))
    preferred = location / f"{weights_name}.safetensors.index.json"
    if preferred.is_file() or len(indexes) == 1:
        return _scan_sharded(location, preferred if preferred.is_file() else indexes[0])
    single = location / f"{weights_name}.safetensors"
    files = sorted(location.glob("*.safetensors"))
    if single.is_file() or len(files) == 1:
        return scan_weights(single if single.is_file() else files[0])
    if files:
        raise ModelFilesError(
            f"{location.name}/ holds {len(files)} .safetensors files but no *.safetensors.index.json saying which "
            f"tensor is where; {REDOWNLOAD} (including the index)."
        )
    pickles = [p for p in sorted(location.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _refuse_pickle(pickles[0])
    expected = f"{weights_name}.safetensors" if weights_name else "a .safetensors file"
    raise ModelFilesError(
        f"{location.name}/ has no weights (expected {expected} or an index with shards); download them from "
        "zai-org/GLM-Image."
    )


def iter_tensors(weights: WeightFiles, copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every tensor of ``weights``, read one at a time, so that a caller that keeps only what it
    makes of each one holds a single tensor of the files at a time. ``copy``: each tensor is copied out of its file
    and the file closed before the next is read, so no tensor is a view of a memory-mapped shard and the pages read
    so far do not stay in the process's memory (as ``formats.int8.read_quantising`` reads)."""
    by_file: dict[Path, list[str]] = {}
    for key, file in weights.key_file.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        try:
            if copy:
                for key in keys:
                    with safe_open(file, framework="pt", device="cpu") as f:
                        tensor = f.get_tensor(key).clone()
                    yield key, tensor
                    del tensor
                continue
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in keys:
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise ModelFilesError(f"{display_name(file)} could not be read ({e}); delete it and {REDOWNLOAD}.") from e


def load_tensors(
    weights: WeightFiles, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read every tensor of ``weights``; floating-point ones are cast to ``dtype`` (None: as stored)."""
    state_dict = {}
    for key, tensor in iter_tensors(weights):
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state_dict[key] = tensor.to(device)
    return state_dict


def read_state_dict(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    weights_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of a component folder (one file or index + shards) or of one .safetensors file.

    Validates before reading: shards the index lists are present, every header is intact, every key the index
    assigns to a shard is in it. ``dtype`` casts floating-point tensors (None keeps the stored dtype).
    """
    return load_tensors(scan_weights(path, weights_name), dtype, device)
