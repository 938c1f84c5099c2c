"""GLM-Image's model sampling: flow matching with the resolution shift, and the unshifted time the DiT is fed."""

from __future__ import annotations

import comfy.model_sampling
import torch

from ..glm_image_core.schedule import compute_mu


class GlmImageModelSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """Flow sampling with GLM's resolution shift. The DiT is conditioned on the UNSHIFTED time, so `timestep()` is
    the inverse of `sigma()` (stock FLOW feeds the shifted sigma * 1000, which drifts colours)."""

    def timestep(self, sigma):
        # float32, never float64: the sigmas are on the model's device already, and MPS has no float64
        s = sigma.float()
        t = s / (self.shift - (self.shift - 1) * s) * self.multiplier
        # float32 sigmas carry ~1e-4 of noise in t; the reference's grid is integers (exact in float32), so snap
        # values that close
        nearest = t.round()
        return torch.where((t - nearest).abs() < 1e-3, nearest, t).to(sigma.dtype)


def model_sampling_for_size(width: int, height: int) -> GlmImageModelSampling:
    sampling = GlmImageModelSampling()
    sampling.set_parameters(shift=compute_mu(height, width), multiplier=1000)
    return sampling
