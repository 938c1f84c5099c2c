"""A live picture of the AR decode: each sampled token painted as a colour, the grid filling in as it is decoded.

The AR samples VQ codebook ids (0..16383), one per 32x32 pixels: text-to-image decodes a ~16x16 preview grid first,
then the target grid (docs/how-it-works.md, step 2). A token has no colour of its own, but its codebook vector does
carry the image content the DiT will paint from, so the codebook's three principal components, scaled to 0..255,
serve as RGB (``codebook_palette``: computed once per loaded model). ``grid_image`` paints the tokens decoded so far
into the grid being decoded (cells not decoded yet are grey); ``LivePreview`` is the throttled per-token hook that
builds such an image a few times a second and copies only the tokens that are new since its last image off the
model's device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .ar import ARGeometry

PREVIEW_MAX_SIDE = 512  # pixels, long side of a preview image (ComfyUI's default --preview-size)
PREVIEW_INTERVAL_S = 0.25  # at most one image per this many seconds of decoding
UNDECODED_GREY = 128  # colour of a cell whose token is not sampled yet


def codebook_palette(codebook: torch.Tensor) -> torch.Tensor:
    """An RGB colour per codebook entry: ``[K, D]`` float -> ``[K, 3]`` uint8 on the CPU.

    The entries are L2-normalised first (the VQ quantizer compares normalised vectors), then projected onto their
    three principal components (eigenvectors of the covariance, largest variance first, each signed so that its
    largest-magnitude coefficient is positive: the same codebook always gives the same colours). Each component is
    mapped linearly from its 1st..99th percentile to 0..255 and clamped. Always on the CPU in float32, wherever the
    codebook lives: the same colours on every device, and no eigen-solver on devices that lack one (MPS long did).
    The full model's 16384 x 2048 codebook costs a second or two on a desktop CPU (a 137 GFLOP product and an
    eigen-decomposition of 2048 x 2048): the nodes compute it once per loaded model, while loading
    (``ARModel.preview_palette``).
    """
    vectors = torch.nn.functional.normalize(codebook.detach().to("cpu", torch.float32), dim=-1)  # [K, D]
    vectors = vectors - vectors.mean(dim=0)
    _, eigenvectors = torch.linalg.eigh(vectors.T @ vectors)  # ascending eigenvalues; columns [D, D]
    components = eigenvectors[:, -3:].flip(-1)  # [D, 3], largest variance first
    largest = components.abs().argmax(dim=0)  # [3]
    components = components * components[largest, torch.arange(3)].sign()
    projected = vectors @ components  # [K, 3]
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    scaled = (projected - low) / (high - low).clamp_min(1e-12) * 255
    return scaled.clamp(0, 255).round().to(torch.uint8).cpu()


def model_palette(model) -> torch.Tensor:
    """``codebook_palette`` of a transformers ``GlmImageForConditionalGeneration``'s VQ codebook (16384 entries)."""
    return codebook_palette(model.model.vqmodel.quantize.embedding.weight)


def preview_size(geometry: ARGeometry, max_side: int = PREVIEW_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of a preview image: the target's aspect ratio, long side ``max_side``."""
    scale = max_side / max(geometry.height, geometry.width)
    return max(1, round(geometry.width * scale)), max(1, round(geometry.height * scale))


def grid_image(
    token_ids: np.ndarray, geometry: ARGeometry, palette: np.ndarray, max_side: int = PREVIEW_MAX_SIDE
) -> Image.Image:
    """The grid being decoded after ``len(token_ids)`` tokens, painted cell by cell.

    token_ids: [n] the first n sampled ids in decode order (0 <= n <= ``geometry.num_grid_tokens``); palette:
    [K, 3] uint8. While the preview grid (text-to-image only) is not complete the image shows the preview grid
    (ph x pw); from the first target token on it shows the target grid (h x w). Cells are filled row-major, the
    rest stay grey. The image is ``preview_size(geometry, max_side)`` whichever grid it shows (nearest scaling:
    one flat block per token).
    """
    n = len(token_ids)
    num_preview = geometry.num_preview_tokens
    if num_preview and n <= num_preview:
        rows, cols, cells = geometry.preview_h, geometry.preview_w, token_ids
    else:
        rows, cols, cells = geometry.grid_h, geometry.grid_w, token_ids[num_preview:]
    canvas = np.full((rows * cols, 3), UNDECODED_GREY, dtype=np.uint8)
    canvas[: len(cells)] = palette[cells]
    image = Image.fromarray(canvas.reshape(rows, cols, 3))
    return image.resize(preview_size(geometry, max_side), Image.Resampling.NEAREST)


class LivePreview:
    """The AR decode loop's preview hook: call ``poll(step, tokens)`` after every token.

    It returns a ``grid_image`` of sample 0 when one is due (``interval_s`` since the last one, and always for the
    last token), else None at the cost of one clock read. Only then are the tokens that are new since the last
    image copied to the CPU: one device sync per image, none per token.
    """

    def __init__(
        self,
        geometry: ARGeometry,
        palette: torch.Tensor,
        *,
        interval_s: float = PREVIEW_INTERVAL_S,
        max_side: int = PREVIEW_MAX_SIDE,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.geometry = geometry
        self.palette = palette.numpy()  # [K, 3] uint8
        self.interval_s = interval_s
        self.max_side = max_side
        self.clock = clock
        self._ids = np.zeros(geometry.num_grid_tokens, dtype=np.int64)  # sample 0's tokens received so far
        self._received = 0
        self._last_image_at = -math.inf

    def poll(self, step: int, tokens: torch.Tensor) -> Image.Image | None:
        """step: tokens decoded so far (1..num_grid_tokens); tokens: [N, >= step] ids, on any device."""
        now = self.clock()
        if step < self.geometry.num_grid_tokens and now - self._last_image_at < self.interval_s:
            return None
        self._last_image_at = now
        self._ids[self._received : step] = tokens[0, self._received : step].cpu().numpy()
        self._received = step
        return grid_image(self._ids[:step], self.geometry, self.palette, self.max_side)
