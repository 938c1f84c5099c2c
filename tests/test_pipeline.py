"""End to end: our pipeline against diffusers' GlmImagePipeline for the same prior tokens and initial noise."""

import numpy as np
import pytest
import torch
from diffusers import GlmImagePipeline

from glm_image_core import ar
from glm_image_core.pipeline import generate, initial_noise, load_models

HEIGHT, WIDTH, STEPS, SEED = 512, 768, 3, 7
PROMPT = 'A shop sign that reads "OPEN" and \u201cDaily\u201d, with 「你好」 below'


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return load_models(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_pipeline(tiny_model_dir):
    return GlmImagePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)


def test_text_to_image_equals_glm_image_pipeline(models, reference_pipeline):
    ours = np.asarray(generate(models, PROMPT, HEIGHT, WIDTH, steps=STEPS, seed=SEED), dtype=np.float32)

    # The same tokens (our AR with the same seed) and the same noise through the reference.
    inputs = ar.build_ar_inputs(models.processor, PROMPT, HEIGHT, WIDTH)
    tokens = ar.generate_prior_tokens(models.ar_model, inputs, [torch.Generator().manual_seed(SEED)])
    expected = reference_pipeline(
        prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=1.5,
        prior_token_ids=tokens.prior_token_ids, latents=initial_noise(1, HEIGHT, WIDTH, SEED), output_type="np",
    ).images[0]  # fmt: skip
    assert ours.shape == (HEIGHT, WIDTH, 3)
    diff = np.abs(ours - np.round(expected * 255)).max()
    assert diff <= 1, diff  # uint8 rounding of values equal to float tolerance
    assert ours.std() > 1  # a real picture, not a constant
