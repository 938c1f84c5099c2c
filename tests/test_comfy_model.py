"""The DiT as a ComfyUI MODEL: ComfyUI's own KSampler must reproduce the core's reference-equal denoising loop."""

import json

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()

import comfy.sample  # noqa: E402

from glm_image_core.loading import load_transformer, read_state_dict  # noqa: E402
from glm_image_core.sampling import DitCondition, denoise  # noqa: E402
from glm_image_core.schedule import glm_schedule  # noqa: E402

model_nodes = comfy_host.import_pack_module("nodes.model")
HEIGHT, WIDTH = 512, 768


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    folder = tiny_model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    patcher = model_nodes.load_dit_patcher(read_state_dict(folder), config)
    patcher = patcher.clone()
    patcher.add_object_patch("model_sampling", model_nodes.model_sampling_for_size(WIDTH, HEIGHT))
    return patcher, load_transformer(folder, dtype=torch.float32)


def make_conds(seed=0):
    g = torch.Generator().manual_seed(seed)
    glyph = torch.randn(1, 6, 64, generator=g)
    empty = torch.randn(1, 1, 64, generator=g)
    prior = torch.randint(0, 16384, (1, (HEIGHT // 16) * (WIDTH // 16)), generator=g)
    extras = {"glm_prior_token_ids": prior, "glm_empty_glyph": empty}
    return glyph, empty, prior, [[glyph, dict(extras)]], [[torch.zeros_like(glyph), dict(extras)]]


@pytest.mark.parametrize("steps", [1, 10])
def test_ksampler_euler_simple_equals_reference_loop(models, steps):
    patcher, core_dit = models
    glyph, empty, prior, positive, negative = make_conds()
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(1))
    latent = torch.zeros_like(noise)
    out = comfy.sample.sample(patcher, noise, steps, 1.5, "euler", "simple", positive, negative, latent)

    sigmas, timesteps = glm_schedule(steps, HEIGHT, WIDTH)
    expected = denoise(
        core_dit, noise, sigmas, timesteps, DitCondition(glyph, prior), DitCondition(empty, prior, drop_prior=True), 1.5
    )
    expected = patcher.model.process_latent_out(expected)  # KSampler returns raw VAE latents
    diff = (out - expected).abs().max()
    assert diff <= 5e-5, diff  # latents of magnitude ~10: float32 rounding in CFG on denoised
