"""The checks of a downloaded model file before anything uses it, in one place, as the visual-tokens file is checked
(``tokens``): each refusal names the file, the tensor or key, what was expected, what was found and what to do.

Everything here reads headers and configs only (no tensor data), so the loaders run it when a job is queued:

- a safetensors file (``read_header``): the 8-byte header length inside the file, the header a JSON object, every
  tensor with a known dtype, a shape whose size in bytes is its byte span, the spans inside the file, in order and
  without gaps or overlaps (as safetensors itself requires);
- the dtypes of a model's tensors (``check_dtypes``): floating weights, integers only where the weight format
  declares codes (an integer or boolean tensor where a float weight belongs would be cast to garbage);
- a config (``config_object``, ``check_config_sizes``): a JSON object, the sizes the model is built from positive
  integers no larger than anything the tensors on disk can fill (so no config makes a loader allocate more than
  the files hold, or build a model of a million layers);
- LoRA tensors (``check_lora_pairs``, ``check_lora_fits``): every layer's A with its B, both two-dimensional, ranks
  agreeing, alpha a scalar, floating dtypes; then, once the model is known, each pair's shape that of its layer
  (the layer's logical in/out features, for packed formats too);
- a PEFT adapter's config against its tensors (``check_adapter_config``): ``r`` a positive integer equal to each
  pair's rank, ``lora_alpha`` a number, ``target_modules`` naming the modules the tensors are for.

The ids of layers and the key names of each kind of file are their modules' business (``components``, ``lora``,
``ar_lora``); this module knows the rules.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInputError, ModelFilesError

# Bits per element of every dtype a safetensors header may name (safetensors' Dtype, 0.8: sub-byte floats included).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}
FLOATING = frozenset(
    {
        "F4",
        "F6_E2M3",
        "F6_E3M2",
        "F8_E5M2",
        "F8_E4M3",
        "F8_E8M0",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "F16",
        "BF16",
        "F32",
        "F64",
    }
)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class Header:
    """What a safetensors header says, checked against the file: {key: shape}, {key: dtype name}, the metadata."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


def display_name(path: Path) -> str:
    """``transformer/diffusion_pytorch_model-00002-of-00003.safetensors``: the file and the folder it sits in."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


class _Broken(Exception):
    """One broken safetensors rule; ``read_header`` turns it into the error that names the file."""


def read_header(path: str | Path, remedy: str, error: type[Exception] = ModelFilesError) -> Header:
    """The checked header of a safetensors file; ``error`` (naming the file, what is wrong and ``remedy``: what to
    do) for a file that is not a complete safetensors file. Reads the header bytes only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _Broken(f"it has {size} bytes, fewer than the 8 of a safetensors header length")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise _Broken(f"its header length says {length} bytes, the file has {size - 8} after it")
            text = f.read(length)
    except OSError as e:
        raise error(f"{display_name(path)} cannot be read: {e}") from e
    except _Broken as e:
        raise error(f"{display_name(path)} is truncated or corrupt: {e}. {remedy}") from None
    try:
        return _parsed(text, size - 8 - length)
    except _Broken as e:
        raise error(f"{display_name(path)} is truncated or corrupt: {e}. {remedy}") from None


def _parsed(text: bytes, data_bytes: int) -> Header:
    if not text.startswith(b"{"):
        raise _Broken("its header is not a JSON object (safetensors headers start with '{')")
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _Broken(f"its header is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise _Broken(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Broken(f"its {METADATA_KEY} is not an object of strings")
    shapes, dtypes, spans = {}, {}, []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise _Broken(f"its entry for {key!r} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise _Broken(f"tensor {key!r} has dtype {dtype!r}; expected one of {', '.join(DTYPE_BITS)}")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise _Broken(f"tensor {key!r} has shape {shape!r}; expected a list of sizes (integers >= 0)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) and n >= 0 for n in offsets)):
            raise _Broken(f"tensor {key!r} has data_offsets {offsets!r}; expected [begin, end] in bytes")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        expected = bits // 8
        if bits % 8 or offsets[1] - offsets[0] != expected:
            raise _Broken(
                f"tensor {key!r} is {dtype} {shape} ({expected} bytes) but its data_offsets {offsets} span "
                f"{offsets[1] - offsets[0]} bytes"
            )
        shapes[key], dtypes[key] = tuple(shape), dtype
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise _Broken(
                f"tensor {key!r} starts at byte {begin} of the data, where the previous one ends at {end}: it {what}"
            )
        end = stop
    if end != data_bytes:
        raise _Broken(f"its tensors span {end} bytes of data, the file holds {data_bytes}")
    return Header(shapes, dtypes, dict(metadata))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# A model's tensors


def check_dtypes(dtypes: Mapping[str, str], where: Mapping[str, str], codes: set[str], format_label: str) -> None:
    """ModelFilesError unless every tensor is floating, or an integer code the weight format declares (``codes``).
    ``where``: key -> the file name that holds it, for the message."""
    for key, dtype in dtypes.items():
        if dtype not in FLOATING and key not in codes:
            raise ModelFilesError(
                f"{key} is {dtype} in {where.get(key, 'the weights')}; a weight of this model in {format_label} is "
                f"a floating dtype (BF16, F16, F32, F8). An integer or boolean tensor there would be cast to "
                "meaningless values: the file was converted wrongly or damaged; download it again, or convert it "
                "again from the original weights."
            )


def config_object(config, source: str, remedy: str) -> dict:
    """``config`` if it is a JSON object, else ModelFilesError naming ``source``."""
    if not isinstance(config, dict):
        raise ModelFilesError(f"{source} is a JSON {type(config).__name__}, not an object of settings. {remedy}")
    return config


def config_value(config: dict, dotted: str):
    """The value at ``dotted`` ("text_config.hidden_size") or KeyError naming the part that is missing."""
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def check_config_sizes(
    config: dict, sizes: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]], source: str, remedy: str
) -> None:
    """ModelFilesError unless every size the model is built from (``sizes``: dotted keys, a list of sizes allowed)
    is a positive integer, and none exceeds what the tensors on disk can fill: the largest dimension of any tensor,
    or their count (a layer count). So a config never makes a loader build or allocate more than the files hold."""
    bound = max([len(shapes), *(n for shape in shapes.values() for n in shape)], default=0)
    for dotted in sizes:
        try:
            value = config_value(config, dotted)
        except KeyError:
            raise ModelFilesError(f"{source} has no {dotted!r}; the model is built from it. {remedy}") from None
        values = value if isinstance(value, list) and value else [value]
        if not all(_is_int(v) and v > 0 for v in values):
            raise ModelFilesError(
                f"{source} has {dotted} = {json.dumps(value)[:80]}; expected a positive integer"
                f"{' (or a list of them)' if isinstance(value, list) else ''}. {remedy}"
            )
        if max(values) > bound:
            raise ModelFilesError(
                f"{source} has {dotted} = {max(values)}, more than the weights on disk can fill (their largest "
                f"dimension is {bound} over {len(shapes)} tensors): the config is not the one of these weights. "
                f"{remedy}"
            )


# ---------------------------------------------------------------------------------------------------------------
# LoRA tensors


@dataclass
class LoraTensors:
    """One layer's LoRA tensor keys in a file: A (down), B (up), alpha, and the first of any other adapter tensors
    (LoHa's hada_*, LoKr's lokr_*, DoRA's dora_scale, a full diff: what ComfyUI's LoRA code reads and checks)."""

    down: str | None = None
    up: str | None = None
    alpha: str | None = None
    other: str | None = None


def check_lora_pairs(source: str, header: Header, layers: Mapping[str, LoraTensors], what_to_do: str) -> None:
    """InvalidInputError unless every layer with A or B has both, A [r, in] and B [out, r] of one rank r > 0 in a
    floating dtype, alpha (where given) is one number, and no layer has an alpha alone. A layer of another adapter
    kind (``other`` tensors without A or B) is the host's to read."""
    for layer, keys in layers.items():
        if keys.alpha is not None:
            shape, dtype = header.shapes[keys.alpha], header.dtypes[keys.alpha]
            if math.prod(shape) != 1 or dtype == "BOOL":
                raise InvalidInputError(
                    f"{source}: {keys.alpha} is {dtype} {list(shape)}; alpha is one number (a scalar). {what_to_do}"
                )
        if keys.down is None and keys.up is None and keys.other is not None:
            continue
        if keys.down is None or keys.up is None:
            have, lacks = (
                (keys.down, "B (lora_B / lora_up)") if keys.up is None else (keys.up, "A (lora_A / lora_down)")
            )
            raise InvalidInputError(
                f"{source}: {layer} has {have or 'only an alpha'} but no {lacks}: a LoRA updates a layer with both. "
                f"{what_to_do}"
            )
        for key in (keys.down, keys.up):
            if header.dtypes[key] not in FLOATING:
                raise InvalidInputError(
                    f"{source}: {key} is {header.dtypes[key]}; LoRA weights are floating (BF16, F16, F32). {what_to_do}"
                )
        down, up = header.shapes[keys.down], header.shapes[keys.up]
        if len(down) != 2 or len(up) != 2 or down[0] == 0 or up[1] != down[0]:
            raise InvalidInputError(
                f"{source}: {layer} has A {list(down)} and B {list(up)}; expected A [r, in] and B [out, r] of one "
                f"rank r > 0. {what_to_do}"
            )


def check_lora_fits(
    source: str,
    pairs: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
    features: Mapping[str, tuple[int, int]],
    what_to_do: str,
) -> None:
    """InvalidInputError unless each layer's (A shape, B shape) is [r, in] and [out, r] for the layer's logical
    (out, in) features in ``features`` (for packed layers: the weight they stand for, not the codes)."""
    for layer, (down, up) in pairs.items():
        out_features, in_features = features[layer]
        if down[1] != in_features or up[0] != out_features:
            raise InvalidInputError(
                f"{source}: {layer} has A {list(down)} and B {list(up)}, so it updates a [{up[0]}, {down[1]}] "
                f"weight; the layer of this model is [{out_features}, {in_features}]. {what_to_do}"
            )


def check_lora_alpha_values(source: str, alphas: Mapping[str, float]) -> None:
    """InvalidInputError for an alpha that is not finite (seen only when reading: it would scale a layer to NaN)."""
    for key, value in alphas.items():
        if not math.isfinite(value):
            raise InvalidInputError(f"{source}: {key} is {value}; alpha is a finite number. Save the LoRA again.")


# ---------------------------------------------------------------------------------------------------------------
# A PEFT adapter's config against its tensors


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def adapter_value(config: dict, pattern_key: str, key: str, module: str, default):
    """A PEFT setting for one module: its ``pattern_key`` (rank_pattern, alpha_pattern) entry, else ``key``."""
    return _pattern_value(config.get(pattern_key) or {}, module, config.get(key, default))


def targets(target_modules, module: str) -> bool:
    """Whether PEFT's ``target_modules`` (a regex matched against the whole name, or a list of names matched
    against its end) takes ``module``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def check_adapter_config(source: str, config: dict, ranks: Mapping[str, int], what_to_do: str) -> None:
    """InvalidInputError unless the PEFT config agrees with the tensors (``ranks``: module -> the rank of its pair),
    as PEFT requires when it loads the adapter: ``r`` (and ``rank_pattern``) positive integers equal to each pair's
    rank, ``lora_alpha`` (and ``alpha_pattern``) numbers, ``target_modules`` taking every module."""
    config_object(config, source, what_to_do)
    r = config.get("r", 8)  # PEFT's default
    if not (_is_int(r) and r > 0):
        raise InvalidInputError(f"{source} has r = {json.dumps(r)}; PEFT's rank is a positive integer. {what_to_do}")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise InvalidInputError(f"{source} has lora_alpha = {json.dumps(alpha)}; expected a number. {what_to_do}")
    for key, check, expected in (
        ("rank_pattern", lambda v: _is_int(v) and v > 0, "positive integers"),
        ("alpha_pattern", _is_number, "numbers"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(check(v) for v in patterns.values()):
            raise InvalidInputError(
                f"{source} has {key} = {json.dumps(patterns)[:80]}; expected an object of module patterns to "
                f"{expected}. {what_to_do}"
            )
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidInputError(
                    f"{source}: {key} pattern {pattern!r} is not a regex ({e}). {what_to_do}"
                ) from None
    target_modules = config.get("target_modules")
    if target_modules is not None:
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as e:
                raise InvalidInputError(
                    f"{source} has target_modules {target_modules!r}, not a regex ({e}). {what_to_do}"
                ) from None
        elif not (isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules)):
            raise InvalidInputError(
                f"{source} has target_modules = {json.dumps(target_modules)[:80]}; expected a list of module "
                f"names or a regex. {what_to_do}"
            )
    if not isinstance(config.get("use_rslora", False), bool):
        raise InvalidInputError(
            f"{source} has use_rslora = {json.dumps(config['use_rslora'])}; expected true or false."
        )
    for module, rank in ranks.items():
        expected_rank = adapter_value(config, "rank_pattern", "r", module, 8)
        if rank != expected_rank:
            raise InvalidInputError(
                f"{source} gives {module} rank {expected_rank} (r / rank_pattern), its lora_A and lora_B have rank "
                f"{rank}: the config and the weights come from different adapters. {what_to_do}"
            )
        if target_modules is not None and not targets(target_modules, module):
            raise InvalidInputError(
                f"{source} has target_modules {json.dumps(target_modules)[:120]}, which does not take {module}, a "
                f"module the weights update: the config and the weights come from different adapters. {what_to_do}"
            )
