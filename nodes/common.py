"""What several node modules share: the schema with the pack's search aliases, the size widgets and their check, the
dtype choice. Node modules import these from here, never from each other."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..glm_image_core.defaults import AR_GRID_STRIDE, DEFAULT_SIDE, MAX_SIDE, MIN_SIDE
from ..glm_image_core.errors import InvalidInputError
from ..glm_image_core.sizes import check_image_size
from .types import GlmTokens

# Names a user may type in the node search to find any GLM-Image node (Zhipu AI / Z.ai made GLM-Image).
PACK_SEARCH_ALIASES = ["glm", "glm-image", "glm image", "zhipu", "z.ai", "智谱"]


def schema(*, search_aliases: list[str], **fields) -> io.Schema:
    """io.Schema with the pack's and the node's search aliases, where this ComfyUI's schema has the field (0.33 has,
    0.3.64 has not: its Schema refuses unknown fields)."""
    if "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {}):
        fields["search_aliases"] = [*PACK_SEARCH_ALIASES, *search_aliases]
    return io.Schema(**fields)


SIZE_WIDGET = dict(default=DEFAULT_SIDE, min=MIN_SIDE, max=MAX_SIDE, step=AR_GRID_STRIDE)  # an io.Int width/height
SIZE_RULE = f"Multiple of {AR_GRID_STRIDE}, {MIN_SIDE}..{MAX_SIDE}."


def size_inputs(tooltip: str = SIZE_RULE) -> list:
    return [
        io.Int.Input("width", tooltip=tooltip, **SIZE_WIDGET),
        io.Int.Input("height", tooltip=tooltip, **SIZE_WIDGET),
    ]


def tokens_size_input():
    return GlmTokens.Input(
        "tokens", optional=True, tooltip="Take width/height from these tokens (overrides the widgets)."
    )


def size_of(width: int, height: int, tokens=None) -> tuple[int, int]:
    """The size a node works at: the tokens' when connected, else its widgets' (checked here: linked widget values
    are only known when the node runs)."""
    if tokens is not None:
        width, height = tokens.width, tokens.height
    check_image_size(height, width)
    return width, height


def validate_size(width, height):
    """For validate_inputs: linked (not yet known) sizes pass here and are checked in execute.

    A node's validate_inputs must name only width and height (no **kwargs): ComfyUI skips its own min/max and combo
    checks for every input the validator accepts."""
    if width is None or height is None:
        return True
    try:
        check_image_size(height, width)
    except InvalidInputError as e:
        return str(e)
    return True


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """A loader's dtype widget ("auto", "bf16", "fp32") -> the dtype; auto is bf16 where the device supports it."""
    if choice == "auto":
        return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]


def file_input(name: str, files, tooltip: str) -> io.Combo.Input:
    """A loader's file choice: the choices `files` (a `paths.FileChoices`) lists; the node's validate_inputs checks the
    value with `paths.validate` and its execute turns it into a path with `paths.resolve`."""
    return io.Combo.Input(name, options=files.options(), tooltip=tooltip)
