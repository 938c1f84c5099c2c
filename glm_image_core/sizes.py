"""Image sizes GLM-Image accepts: one rule shared by the AR stage, the DiT and every node."""

from __future__ import annotations

from .defaults import AR_GRID_STRIDE, MAX_SIDE, MIN_SIDE, VAE_SCALE
from .errors import InvalidInputError


def check_image_size(height: int, width: int) -> None:
    """Raise InvalidInputError unless both sides are multiples of 32 within 512..2048 pixels."""
    for name, side in (("height", height), ("width", width)):
        if side % AR_GRID_STRIDE:
            lower = side // AR_GRID_STRIDE * AR_GRID_STRIDE
            raise InvalidInputError(
                f"{name} {side} is not a multiple of {AR_GRID_STRIDE}; GLM-Image needs multiples of {AR_GRID_STRIDE} "
                f"(try {lower} or {lower + AR_GRID_STRIDE})."
            )
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidInputError(f"{name} {side} is outside GLM-Image's range {MIN_SIDE}..{MAX_SIDE} pixels.")


MAX_REFERENCE_ASPECT = 4  # transformers' GlmImage smart_resize refuses a long side over 4 times the short one


def check_reference_size(height: int, width: int, min_side: int, name: str = "The reference image") -> None:
    """Raise InvalidInputError for a reference image GLM-Image's processor refuses (transformers' GlmImage
    ``smart_resize``, with a raw ValueError): a side under ``min_side`` pixels (its patch_size * merge_size, 16 for
    the published processor) or an aspect ratio over 4:1. Any other size is resized by the processor."""
    short, long = sorted((height, width))
    if short < min_side:
        raise InvalidInputError(
            f"{name} is {width}x{height} pixels: its {short} px side is under the {min_side} px GLM-Image's processor "
            f"needs on each side. Use a larger image (scale it up to at least {min_side} px on its short side)."
        )
    if long > MAX_REFERENCE_ASPECT * short:
        fit = (MAX_REFERENCE_ASPECT * height, height) if width > height else (width, MAX_REFERENCE_ASPECT * width)
        raise InvalidInputError(
            f"{name} is {width}x{height} pixels: its aspect ratio {long / short:.2f}:1 is over the "
            f"{MAX_REFERENCE_ASPECT}:1 GLM-Image's processor takes. Crop it to at most {MAX_REFERENCE_ASPECT}:1 "
            f"(e.g. {fit[0]}x{fit[1]}) or pad its short side."
        )


def latent_size(height: int, width: int) -> tuple[int, int]:
    return height // VAE_SCALE, width // VAE_SCALE
