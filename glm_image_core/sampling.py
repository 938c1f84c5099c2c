"""DiT denoising with classifier-free guidance, as the reference pipeline's loop (docs/how-it-works.md, steps 5-6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .defaults import VAE_SCALE
from .dit import GlmImageTransformer2DModel, ReferenceKV
from .glyph import pad_glyphs


@dataclass
class DitCondition:
    """What one CFG branch feeds the DiT besides the latent.

    glyph: [B, T, C] glyph embeddings; glyph_mask: bool [B, T] (True = real token) or None when nothing is padded.
    prior_token_id: long [B, N] the AR visual tokens on the DiT's patch grid; drop_prior: the unconditional branch
    zeroes every prior embedding (a bool, or bool [B] per row). reference_kv: reference-image keys/values
    (conditional branch of editing). B may be 1 for any of them: it is expanded to the latent batch.
    """

    glyph: torch.Tensor
    prior_token_id: torch.Tensor
    drop_prior: bool | torch.Tensor = False
    glyph_mask: torch.Tensor | None = None
    reference_kv: ReferenceKV | None = None


def stack_conditions(conditions: list[DitCondition], batch: int) -> DitCondition:
    """Several branches as one batch for a single DiT pass: each condition expanded to ``batch`` rows, glyphs
    right-padded to one length with a real mask (the DiT then attends each run of rows to its own real tokens).
    Reference K/V cannot be stacked (only the conditional branch has them)."""
    if any(c.reference_kv is not None for c in conditions):
        raise ValueError("conditions with reference K/V run as separate passes")
    glyphs = [c.glyph.expand(batch, -1, -1) for c in conditions]
    glyph, mask = pad_glyphs(glyphs)
    if any(c.glyph_mask is not None for c in conditions):  # a condition's own mask also applies
        length = glyph.shape[1]
        own = [
            mask.new_ones(batch, length)
            if c.glyph_mask is None
            else F.pad(c.glyph_mask.expand(batch, -1).bool(), (0, length - c.glyph.shape[1]))
            for c in conditions
        ]
        mask = mask & torch.cat(own)
    drop = torch.cat(
        [torch.as_tensor(c.drop_prior, dtype=torch.bool, device=glyph.device).expand(batch) for c in conditions]
    )
    prior = torch.cat([c.prior_token_id.expand(batch, -1) for c in conditions])
    return DitCondition(glyph, prior, drop, None if bool(mask.all()) else mask)


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
    drop = torch.as_tensor(condition.drop_prior, dtype=torch.bool, device=latent.device).expand(b)
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
    batched_cfg: bool = True,
) -> torch.Tensor:
    """Euler flow matching from pure noise to the normalised latent.

    noise: [B, 16, H/8, W/8]; sigmas: [steps+1] shifted, ending at 0; timesteps: [steps] unshifted t - 1 (see
    schedule.glm_schedule). CFG runs when guidance > 1: v = v_u + guidance * (v_c - v_u). batched_cfg: cond and
    uncond go through the DiT as one batch of 2B (glyphs padded with a real mask: the same velocities as two
    passes, within float rounding), except for editing, whose reference K/V belong to the conditional branch only:
    then two passes. callback(step, steps, latent) runs after each step and may raise to stop. Returns the float32
    latent.
    """
    latent = noise.float()
    b, _, h, w = latent.shape
    image_size = (h * VAE_SCALE, w * VAE_SCALE)
    steps = len(timesteps)
    cfg = uncond is not None and guidance > 1
    pair = None
    if cfg and batched_cfg and cond.reference_kv is None and uncond.reference_kv is None:
        pair = stack_conditions([cond, uncond], b)
    for i in range(steps):
        t = timesteps[i].expand(b).to(latent.device)
        if pair is not None:
            both = predict_velocity(dit, latent.repeat(2, 1, 1, 1), t.repeat(2), pair, image_size)
            v_cond, v_uncond = both.chunk(2)
            velocity = v_uncond + guidance * (v_cond - v_uncond)
        else:
            velocity = predict_velocity(dit, latent, t, cond, image_size)
            if cfg:
                v_uncond = predict_velocity(dit, latent, t, uncond, image_size)
                velocity = v_uncond + guidance * (velocity - v_uncond)
        latent = latent + (sigmas[i + 1] - sigmas[i]) * velocity
        if callback is not None:
            callback(i + 1, steps, latent)
    return latent
