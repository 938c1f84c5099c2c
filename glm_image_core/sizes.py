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


def latent_size(height: int, width: int) -> tuple[int, int]:
    return height // VAE_SCALE, width // VAE_SCALE
