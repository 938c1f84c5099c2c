"""Our VAE against diffusers' AutoencoderKL on the same tiny vae/ weights, and its latent normalisation."""

import pytest
import torch
from diffusers import AutoencoderKL as ReferenceVAE

from glm_image_core.errors import InvalidInputError
from glm_image_core.loading import load_vae


@pytest.fixture(scope="module")
def vaes(tiny_model_dir):
    reference = ReferenceVAE.from_pretrained(tiny_model_dir / "vae", torch_dtype=torch.float32).eval()
    return load_vae(tiny_model_dir, dtype=torch.float32), reference


def test_encode_is_the_posterior_mode_and_decode_matches(vaes):
    ours, reference = vaes
    image = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected_latent = reference.encode(image).latent_dist.mode()
        latent = ours.encode(image)
        assert latent.shape == (1, 16, 16, 24)
        assert (latent - expected_latent).abs().max() <= 1e-5
        assert (ours.decode(latent) - reference.decode(expected_latent).sample).abs().max() <= 1e-5


def test_normalisation_uses_the_config_statistics_and_inverts(vaes):
    ours, reference = vaes
    latent = torch.randn(2, 16, 4, 4)
    mean = torch.tensor(reference.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, -1, 1, 1)
    assert torch.allclose(ours.normalize(latent), (latent - mean) / std)
    assert torch.allclose(ours.denormalize(ours.normalize(latent)), latent, atol=1e-6)


def test_float16_is_refused_because_the_vae_overflows(tiny_model_dir):
    with pytest.raises(InvalidInputError, match="float16"):
        load_vae(tiny_model_dir, dtype=torch.float16)
