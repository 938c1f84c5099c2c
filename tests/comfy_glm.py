"""The tiny GLM-Image DiT as a ComfyUI MODEL and GLM-Image conditionings for it: what the host tests of wrappers,
patches, caching, LoRA, compile, weight formats and memory share. Import after `comfy_host.require_comfyui()`."""

from __future__ import annotations

import json

import comfy.sample
import torch

from glm_image_core.loading import read_state_dict
from tests import comfy_host

dit_loading = comfy_host.import_pack_module("nodes.dit_loading")
model_sampling = comfy_host.import_pack_module("nodes.model_sampling")


def tiny_patcher(tiny_model_dir, width: int, height: int, weight_dtype: str = "default", model_options=None):
    """The tiny DiT through the pack's loader, with the model sampling of this image size."""
    folder = tiny_model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    patcher = dit_loading.load_dit_patcher(read_state_dict(folder), config, weight_dtype, model_options=model_options)
    patcher.add_object_patch("model_sampling", model_sampling.model_sampling_for_size(width, height))
    return patcher


def conditionings(width: int, height: int, seed: int = 0, glyph_len: int = 6, references=None):
    """(positive, negative) as GLM-Image Encode makes them: random glyph embeddings and visual tokens."""
    g = torch.Generator().manual_seed(seed)
    glyph = torch.randn(1, glyph_len, 64, generator=g)
    empty = torch.randn(1, 1, 64, generator=g)
    prior = torch.randint(0, 16384, (1, (height // 16) * (width // 16)), generator=g)
    extras = {"glm_prior_token_ids": prior, "glm_empty_glyph": empty}
    positive = dict(extras, glm_references=references) if references else dict(extras)
    return [[glyph, positive]], [[empty, extras]]


def reference(width: int, height: int, seed: int = 0) -> dict:
    """One reference image as GLM-Image Encode stores it: raw VAE latent, its visual tokens and its pixel size."""
    g = torch.Generator().manual_seed(seed)
    return {
        "latent": torch.randn(1, 16, height // 8, width // 8, generator=g),
        "prior_token_ids": torch.randint(0, 16384, (1, (height // 16) * (width // 16)), generator=g),
        "image_size": (height, width),
    }


def sample(
    patcher, width: int, height: int, steps: int = 3, cfg: float = 1.5, seed: int = 0, references=None, callback=None
):
    """KSampler's path (comfy.sample.sample, euler + simple) on one latent of this size; ``callback(step, x0, x,
    total_steps)`` after each step."""
    positive, negative = conditionings(width, height, seed, references=references)
    noise = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed + 1))
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        "euler",
        "simple",
        positive,
        negative,
        torch.zeros_like(noise),
        callback=callback,
        seed=seed,
    )
