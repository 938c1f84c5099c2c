"""Image sizes GLM-Image accepts: one rule shared by the AR stage, the DiT and every node."""

from __future__ import annotations

from .errors import InvalidInputError

SIZE_MULTIPLE = 32  # the AR grid has one token per 32x32 pixels
MIN_SIDE = 512
MAX_SIDE = 2048
VAE_SCALE = 8  # pixels per latent cell
LATENT_CHANNELS = 16


def check_image_size(height: int, width: int) -> None:
    """Raise InvalidInputError unless both sides are multiples of 32 within 512..2048 pixels."""
    for name, side in (("height", height), ("width", width)):
        if side % SIZE_MULTIPLE:
            lower = side // SIZE_MULTIPLE * SIZE_MULTIPLE
            raise InvalidInputError(
                f"{name} {side} is not a multiple of {SIZE_MULTIPLE}; GLM-Image needs multiples of {SIZE_MULTIPLE} "
                f"(try {lower} or {lower + SIZE_MULTIPLE})."
            )
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidInputError(f"{name} {side} is outside GLM-Image's range {MIN_SIDE}..{MAX_SIDE} pixels.")


def latent_size(height: int, width: int) -> tuple[int, int]:
    return height // VAE_SCALE, width // VAE_SCALE
