"""The GLM-Image latent space as ComfyUI sees it: 16 channels, per-channel (z - mean) / std.

The sampler works on normalised latents; the VAE does not normalise. ComfyUI applies `process_in` to the input latent
before sampling and `process_out` to the result, so KSampler's LATENT output is raw VAE space and the stock
VAEDecode / VAEEncode nodes need no knowledge of the statistics.
"""

import torch
from comfy import latent_formats

from ..glm_image_core.defaults import PUBLISHED_LATENTS_MEAN, PUBLISHED_LATENTS_STD


class GlmImageLatentFormat(latent_formats.LatentFormat):
    """`process_in(z) = (z - mean) / std`, `process_out(z) = z * std + mean`, per channel (the VAE config's
    `scaling_factor` 0.18215 is not used by GLM-Image).

    `latent_rgb_factors` stays None until factors are fitted on real decoded images: ComfyUI then shows no latent
    preview for this model instead of a wrong one.
    """

    latent_channels = 16
    latent_dimensions = 2
    latent_rgb_factors = None
    latent_rgb_factors_bias = None
    taesd_decoder_name = None

    def __init__(self, latents_mean=PUBLISHED_LATENTS_MEAN, latents_std=PUBLISHED_LATENTS_STD):
        self.latents_mean = torch.tensor(latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.latents_std = torch.tensor(latents_std, dtype=torch.float32).view(1, -1, 1, 1)

    def process_in(self, latent):  # raw VAE latent -> model space
        mean = self.latents_mean.to(latent.device, latent.dtype)
        std = self.latents_std.to(latent.device, latent.dtype)
        return (latent - mean) / std

    def process_out(self, latent):  # model space -> raw VAE latent
        mean = self.latents_mean.to(latent.device, latent.dtype)
        std = self.latents_std.to(latent.device, latent.dtype)
        return latent * std + mean
