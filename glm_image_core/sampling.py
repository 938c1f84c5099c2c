"""DiT denoising with classifier-free guidance, as the reference pipeline's loop (reference §2 steps 5-6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dit import GlmImageTransformer2DModel, ReferenceKV


@dataclass
class DitCondition:
    """What one CFG branch feeds the DiT besides the latent.

    glyph: [B, T, C] glyph embeddings; glyph_mask: bool [B, T] (True = real token) or None when nothing is padded.
    prior_token_id: long [B, N] the AR visual tokens on the DiT's patch grid; drop_prior: the unconditional branch
    zeroes every prior embedding. reference_kv: reference-image keys/values (conditional branch of editing).
    """

    glyph: torch.Tensor
    prior_token_id: torch.Tensor
    drop_prior: bool = False
    glyph_mask: torch.Tensor | None = None
    reference_kv: ReferenceKV | None = None


def pad_glyphs(glyphs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [B_i, T_i, C] glyph batches to one [sum B_i, max T, C] tensor and its bool mask. Padded positions are
    masked out of attention (never repeated: repeating tokens changes joint self-attention)."""
    length = max(g.shape[1] for g in glyphs)
    padded = torch.cat([F.pad(g, (0, 0, 0, length - g.shape[1])) for g in glyphs])
    mask = torch.cat([torch.arange(length, device=g.device)[None].expand(g.shape[0], -1) < g.shape[1] for g in glyphs])
    return padded, mask


def predict_velocity(
    dit: GlmImageTransformer2DModel,
    latent: torch.Tensor,
    timestep: torch.Tensor,
    condition: DitCondition,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """One DiT pass for one branch. latent: [B, 16, h, w]; timestep: [B] unshifted t - 1; image_size: (H, W) px."""
    b = latent.shape[0]
    prior = condition.prior_token_id.expand(b, -1)
    drop = torch.full((b,), condition.drop_prior, dtype=torch.bool, device=latent.device)
    target = torch.tensor([image_size], dtype=torch.float32, device=latent.device).expand(b, 2)
    glyph = condition.glyph.expand(b, -1, -1)
    mask = None if condition.glyph_mask is None else condition.glyph_mask.expand(b, -1)
    return dit(
        latent.to(dit.dtype or latent.dtype),
        glyph,
        prior,
        drop,
        timestep,
        target,
        torch.zeros_like(target),
        encoder_attention_mask=mask,
        reference_kv=condition.reference_kv,
    ).float()


def denoise(
    dit: GlmImageTransformer2DModel,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    cond: DitCondition,
    uncond: DitCondition | None,
    guidance: float,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler flow matching from pure noise to the normalised latent.

    noise: [B, 16, H/8, W/8]; sigmas: [steps+1] shifted, ending at 0; timesteps: [steps] unshifted t - 1 (see
    schedule.glm_schedule). CFG runs when guidance > 1: v = v_u + guidance * (v_c - v_u). callback(step, steps,
    latent) runs after each step and may raise to stop. Returns the float32 latent.
    """
    latent = noise.float()
    b, _, h, w = latent.shape
    image_size = (h * 8, w * 8)
    steps = len(timesteps)
    for i in range(steps):
        t = timesteps[i].expand(b).to(latent.device)
        velocity = predict_velocity(dit, latent, t, cond, image_size)
        if uncond is not None and guidance > 1:
            v_uncond = predict_velocity(dit, latent, t, uncond, image_size)
            velocity = v_uncond + guidance * (velocity - v_uncond)
        latent = latent + (sigmas[i + 1] - sigmas[i]) * velocity
        if callback is not None:
            callback(i + 1, steps, latent)
    return latent
