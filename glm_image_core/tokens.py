"""Visual tokens: what the AR stage hands to the DiT, and their file (``.glm_tokens``, what Save Visual Tokens writes).

The file is a safetensors file: the grids as integer tensors, and in its metadata (key ``glm_image_tokens``) a JSON
object with the prompt, size, seed, each grid's generator seed and the reference count. Anyone who reaches a ComfyUI
server can upload such a file (``/upload/image`` takes any name), and an id outside the VQ codebook would index past
the DiT's embedding table (on a GPU a device-side assert that breaks CUDA for the whole server process). So
``read_tokens`` checks every rule below before any tensor leaves the file, and a file that breaks one is an
``InvalidInputError`` naming the file and the rule.

- metadata: exactly ``format`` ("glm_image_tokens/2"), ``prompt`` (text), ``height``/``width`` (a valid image size),
  ``seed`` (0..2**64-1), ``sample_seeds`` (one 0..2**64-1 per grid: the seed each grid was sampled with,
  ``ar.sample_seeds``) and ``references`` (a count). Files of format "glm_image_tokens/1" (written before the
  sample seeds were hashed) have no ``sample_seeds``: their grid i was sampled with seed + i, which is what they read
  back with;
- tensors: exactly ``prior_token_ids``, ``target_ids``, ``preview_ids`` and per reference i ``reference.{i}.pixels``
  and ``reference.{i}.prior_token_ids``;
- shapes from the size: prior [N, (H/16)*(W/16)], target [N, (H/32)*(W/32)], preview [N, ph*pw] (text-to-image, the
  AR's preview grid) or [N, 0], N >= 1 the same for all three; reference pixels [1, h, w, 3] (h, w multiples of 32,
  at most the processor's 2048*2048 pixels) with prior ids [1, (h/16)*(w/16)];
- dtypes and values: ids are integers inside the VQ codebook (0..16383), pixels are floats in 0..1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .ar import ar_geometry, sample_seeds
from .defaults import AR_GRID_STRIDE, MAX_SIDE, NUM_VQ_CODES, PATCH_STRIDE
from .errors import GlmImageError, InvalidInputError
from .files import save_safetensors
from .sizes import check_image_size

FORMAT = "glm_image_tokens/2"
FORMAT_1 = "glm_image_tokens/1"  # still read: no sample_seeds, grid i was sampled with seed + i
METADATA_KEY = "glm_image_tokens"
MAX_SEED = 2**64 - 1
MAX_REFERENCE_PIXELS = MAX_SIDE * MAX_SIDE  # the processor's max_pixels: it never resizes a reference beyond it
ID_DTYPES = {"I16": torch.int16, "I32": torch.int32, "I64": torch.int64}  # safetensors names; read as int64
PIXEL_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass
class Reference:
    """One reference image of an edit: the pixels the VAE encodes and the AR's prior ids for it."""

    pixels: torch.Tensor  # [1, H, W, 3] in 0..1 at the size its prior grid implies (H, W multiples of 32)
    prior_token_ids: torch.Tensor  # long [1, (H/16)*(W/16)]


@dataclass
class VisualTokens:
    """The AR output for one prompt: one or several sampled grids, and what made them."""

    prior_token_ids: torch.Tensor  # long [N, (H/16)*(W/16)]: the target grid upsampled x2 (the DiT's input)
    target_ids: torch.Tensor  # long [N, (H/32)*(W/32)]
    preview_ids: torch.Tensor  # long [N, ph*pw] (text-to-image), [N, 0] for editing
    height: int
    width: int
    prompt: str
    seed: int
    references: list[Reference] = field(default_factory=list)
    sample_seeds: list[int] | None = None  # the generator seed of each grid; None: ar.sample_seeds(seed, N)

    def generator_seeds(self) -> list[int]:
        """The seed each grid was sampled with: a batch of 1 at one of them makes that grid again."""
        if self.sample_seeds is not None:
            return list(self.sample_seeds)
        return sample_seeds(self.seed, self.prior_token_ids.shape[0])


def write_tokens(tokens: VisualTokens, path: str | Path) -> Path:
    """Write ``tokens`` as a .glm_tokens file (complete, or not at all: ``files.save_safetensors``)."""
    tensors = {
        "prior_token_ids": tokens.prior_token_ids.contiguous(),
        "target_ids": tokens.target_ids.contiguous(),
        "preview_ids": tokens.preview_ids.contiguous(),
    }
    for i, ref in enumerate(tokens.references):
        tensors[f"reference.{i}.pixels"] = ref.pixels.contiguous()
        tensors[f"reference.{i}.prior_token_ids"] = ref.prior_token_ids.contiguous()
    info = {
        "prompt": tokens.prompt,
        "height": tokens.height,
        "width": tokens.width,
        "seed": tokens.seed,
        "sample_seeds": tokens.generator_seeds(),
        "references": len(tokens.references),
        "format": FORMAT,
    }
    return save_safetensors(tensors, path, metadata={METADATA_KEY: json.dumps(info)})


class _Refused(Exception):
    """One broken rule; ``read_tokens`` turns it into the InvalidInputError that names the file."""


def read_tokens(path: str | Path) -> VisualTokens:
    """The visual tokens of a .glm_tokens file, after every check in the module docstring; InvalidInputError (and
    nothing else) for a file that breaks one."""
    name = os.path.basename(path)
    try:
        return _read_checked(path)
    except _Refused as e:
        raise InvalidInputError(
            f"{name} is not a valid GLM-Image tokens file: {e}. Only files written by 'GLM-Image Save Visual "
            "Tokens' load; make the tokens again with 'GLM-Image Generate Visual Tokens'."
        ) from None
    except GlmImageError as e:  # the size rule (check_image_size) says what is wrong with the size
        raise InvalidInputError(f"{name} is not a valid GLM-Image tokens file: {e}") from None


def _read_checked(path: str | Path) -> VisualTokens:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            info = _check_metadata(f.metadata())
            shapes = {key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in f.keys()}
            _check_tensor_layout(shapes, info)
            tensors = {key: f.get_tensor(key) for key in shapes}
    except (_Refused, GlmImageError):
        raise
    except Exception as e:  # safetensors raises its own types (and OSError) for a file that is not one of its own
        raise _Refused(f"it cannot be read as a safetensors file ({type(e).__name__}: {e})") from None
    for key, tensor in tensors.items():
        if key.endswith("pixels"):
            if not (tensor.isfinite().all() and tensor.min() >= 0 and tensor.max() <= 1):  # shapes are never empty
                raise _Refused(f"{key} holds values outside 0..1 (pixels are floats in 0..1)")
        elif tensor.numel() and (tensor.min() < 0 or tensor.max() >= NUM_VQ_CODES):
            raise _Refused(
                f"{key} holds ids from {int(tensor.min())} to {int(tensor.max())}; visual token ids are the VQ codes "
                f"0..{NUM_VQ_CODES - 1}"
            )
    references = [
        Reference(tensors[f"reference.{i}.pixels"].float(), tensors[f"reference.{i}.prior_token_ids"].to(torch.int64))
        for i in range(info["references"])
    ]
    return VisualTokens(
        tensors["prior_token_ids"].to(torch.int64),
        tensors["target_ids"].to(torch.int64),
        tensors["preview_ids"].to(torch.int64),
        info["height"],
        info["width"],
        info["prompt"],
        info["seed"],
        references,
        info["sample_seeds"],
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata(metadata: dict[str, str] | None) -> dict:
    """The metadata's JSON object, checked: exactly the expected keys, each of its type and range."""
    if not metadata or METADATA_KEY not in metadata:
        raise _Refused(f"its metadata has no {METADATA_KEY!r} entry")
    try:
        info = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise _Refused(f"its {METADATA_KEY!r} metadata is not valid JSON ({type(e).__name__})") from None
    if not isinstance(info, dict):
        raise _Refused(f"its {METADATA_KEY!r} metadata is a JSON {type(info).__name__}, not an object")
    expected = {"format", "prompt", "height", "width", "seed", "references"}
    if info.get("format") != FORMAT_1:
        expected.add("sample_seeds")
    if set(info) != expected:
        wrong = sorted(expected - set(info)) or sorted(set(info) - expected)
        what = "lacks the entry" if wrong[0] in expected else "has an unexpected entry"
        raise _Refused(
            f"its {METADATA_KEY!r} metadata {what} {wrong[0][:40]!r} (expected {', '.join(sorted(expected))})"
        )
    if info["format"] not in (FORMAT, FORMAT_1):
        raise _Refused(f"its format is {str(info['format'])[:40]!r}, expected {FORMAT!r} (or {FORMAT_1!r})")
    if not isinstance(info["prompt"], str):
        raise _Refused(f"its prompt is a {type(info['prompt']).__name__}, not text")
    for key in ("height", "width", "seed", "references"):
        if not _is_int(info[key]):
            raise _Refused(f"its {key} is {str(info[key])[:40]!r}, not a whole number")
    check_image_size(info["height"], info["width"])
    if not 0 <= info["seed"] <= MAX_SEED:
        raise _Refused(f"its seed {info['seed']} is outside 0..2**64-1")
    seeds = info.get("sample_seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds)):
        raise _Refused(f"its sample_seeds {str(seeds)[:60]} are not a list of seeds in 0..2**64-1")
    if info["references"] < 0:
        raise _Refused(f"its reference count {info['references']} is negative")
    return info


def _check_tensor_layout(shapes: dict[str, tuple[str, tuple[int, ...]]], info: dict) -> None:
    """Exactly the expected tensors, each with its dtype and the shape the metadata's size implies."""
    count = info["references"]
    if len(shapes) != 3 + 2 * count:  # before naming the expected tensors: a hostile count could be huge
        raise _Refused(f"it holds {len(shapes)} tensors; its metadata ({count} references) implies {3 + 2 * count}")
    expected = {"prior_token_ids", "target_ids", "preview_ids"}
    expected |= {f"reference.{i}.{part}" for i in range(count) for part in ("pixels", "prior_token_ids")}
    if set(shapes) != expected:
        odd = sorted(set(shapes) - expected)[0]
        raise _Refused(f"it holds a tensor {odd[:60]!r} and lacks {sorted(expected - set(shapes))[0]!r}")
    for key, (dtype, _) in shapes.items():
        allowed = PIXEL_DTYPES if key.endswith("pixels") else ID_DTYPES
        if dtype not in allowed:
            kind = "floats" if key.endswith("pixels") else "integers"
            raise _Refused(f"{key} is {dtype}; it must hold {kind} ({', '.join(sorted(allowed))})")

    height, width = info["height"], info["width"]
    size = f"a {width}x{height} file"
    prior = shapes["prior_token_ids"][1]
    cells = (height // PATCH_STRIDE) * (width // PATCH_STRIDE)
    if len(prior) != 2 or prior[0] < 1 or prior[1] != cells:
        raise _Refused(f"prior_token_ids has shape {list(prior)}; {size} needs [N, {cells}] with N >= 1 grids")
    n = prior[0]
    if info["format"] == FORMAT_1:
        info["sample_seeds"] = [(info["seed"] + i) % 2**64 for i in range(n)]  # the rule those files were made with
    elif len(info["sample_seeds"]) != n:
        raise _Refused(f"it lists {len(info['sample_seeds'])} sample_seeds for its {n} grids")
    geometry = ar_geometry(height, width, image_to_image=count > 0)
    previews = [(n, geometry.num_preview_tokens), (n, 0)] if geometry.num_preview_tokens else [(n, 0)]
    _check_shape(shapes, "target_ids", [(n, geometry.grid_h * geometry.grid_w)], f"{size} with {n} grids")
    _check_shape(shapes, "preview_ids", previews, f"{size} with {n} grids and {count} references")
    for i in range(count):
        pixels = shapes[f"reference.{i}.pixels"][1]
        if len(pixels) != 4 or pixels[0] != 1 or pixels[3] != 3:
            raise _Refused(f"reference.{i}.pixels has shape {list(pixels)}; expected [1, height, width, 3]")
        h, w = pixels[1], pixels[2]
        if h <= 0 or w <= 0 or h % AR_GRID_STRIDE or w % AR_GRID_STRIDE or h * w > MAX_REFERENCE_PIXELS:
            raise _Refused(
                f"reference {i} is {w}x{h} pixels; references are multiples of {AR_GRID_STRIDE} of at most "
                f"{MAX_REFERENCE_PIXELS} pixels"
            )
        ids = (1, (h // PATCH_STRIDE) * (w // PATCH_STRIDE))
        _check_shape(shapes, f"reference.{i}.prior_token_ids", [ids], f"a {w}x{h} reference")


def _check_shape(shapes, key: str, allowed: list[tuple[int, ...]], what: str) -> None:
    shape = shapes[key][1]
    if shape not in allowed:
        options = " or ".join(str(list(s)) for s in allowed)
        raise _Refused(f"{key} has shape {list(shape)}; {what} needs {options}")
