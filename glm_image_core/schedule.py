"""GLM-Image's flow-matching schedule (docs/how-it-works.md, The algorithm, step 5).

The DiT is conditioned on the UNSHIFTED integer timestep minus one, while the Euler steps move between the SHIFTED
sigmas. `mu` grows with the number of 16-pixel patches, so larger images spend longer at high noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .defaults import MAX_SIDE, MIN_SIDE, PATCH_STRIDE

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


def glm_schedule_shift(sigmas: torch.Tensor) -> float | None:
    """The shift ``mu`` for which ``sigmas`` are GLM-Image's schedule (``glm_schedule`` of ``len(sigmas) - 1`` steps
    for an image size GLM-Image takes, 512x512..2048x2048: mu in 1.75..6.25), or None when they are not such a
    schedule: another scheduler's, a part of one (denoise below 1, split sigmas), or fewer than 3 steps (one interior
    sigma fits every shift, so two steps of any scheduler would read as a GLM-Image schedule).

    The shift is read from the middle sigma (the best conditioned), where the integer grid puts the unshifted time s:
    sigma = mu*s / (1 + (mu-1)*s) gives mu = sigma*(1-s) / (s*(1-sigma)); then every sigma must be that schedule's
    (within float32 noise)."""
    steps = len(sigmas) - 1
    if steps < 3:
        return None
    values = sigmas.detach().float().cpu()
    unshifted = glm_timesteps(steps) / NUM_TRAIN_TIMESTEPS  # [steps], 1.0 first
    sigma, s = values[steps // 2].item(), unshifted[steps // 2].item()
    if values[-1].item() != 0 or not 0 < sigma < 1:
        return None
    mu = sigma * (1 - s) / (s * (1 - sigma))
    in_range = compute_mu(MIN_SIDE, MIN_SIDE) - 1e-3 <= mu <= compute_mu(MAX_SIDE, MAX_SIDE) + 1e-3
    if not in_range or not torch.allclose(values[:-1], shift_sigmas(unshifted, mu), rtol=0, atol=1e-5):
        return None
    return mu
