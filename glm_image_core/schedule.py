"""GLM-Image's flow-matching schedule (docs/how-it-works.md, The algorithm, step 5).

The DiT is conditioned on the UNSHIFTED integer timestep minus one, while the Euler steps move between the SHIFTED
sigmas. `mu` grows with the number of 16-pixel patches, so larger images spend longer at high noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .defaults import PATCH_STRIDE

NUM_TRAIN_TIMESTEPS = 1000


def compute_mu(
    height: int, width: int, base_seq_len: int = 256, base_shift: float = 0.25, max_shift: float = 0.75
) -> float:
    """The resolution-dependent shift: 1024x1024 -> 3.25, 512x512 -> 1.75 (defaults from scheduler_config.json)."""
    seq_len = (height // PATCH_STRIDE) * (width // PATCH_STRIDE)
    return math.sqrt(seq_len / base_seq_len) * max_shift + base_shift


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """diffusers' "linear" time shift, mu*s / (1 + (mu-1)*s), in the same float32 arithmetic as the reference."""
    return mu / (mu + (1 / sigmas - 1))


def glm_timesteps(steps: int) -> torch.Tensor:
    """The reference's integer grid int(linspace(1000, 1, steps+1)[:-1]) as float32: 1000, 980, ... for 50 steps."""
    # numpy's float64 on the host, as the reference computes it (its truncation decides each integer); no float64
    # tensor is made, for devices without float64 (MPS)
    grid = np.linspace(NUM_TRAIN_TIMESTEPS, 1.0, steps + 1)[:-1].astype(np.int64)
    return torch.from_numpy(grid).to(torch.float32)


def glm_schedule(steps: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps+1] ending in 0, dit_timesteps [steps]) for an image of height x width pixels.

    Step k moves the latent from sigmas[k] to sigmas[k+1] with velocity v = DiT(latent, dit_timesteps[k]).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    timesteps = glm_timesteps(steps)
    sigmas = shift_sigmas(timesteps / NUM_TRAIN_TIMESTEPS, compute_mu(height, width))
    return torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps - 1
