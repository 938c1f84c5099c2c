"""End to end: our pipeline against diffusers' GlmImagePipeline for the same prior tokens and initial noise."""

import dataclasses

import numpy as np
import torch

from glm_image_core import ar
from glm_image_core.pipeline import generate, initial_noise

HEIGHT, WIDTH, STEPS, SEED = 512, 768, 3, 7
PROMPT = 'A shop sign that reads "OPEN" and \u201cDaily\u201d, with 「你好」 below'


def test_text_to_image_equals_glm_image_pipeline(core_models, reference_pipeline):
    ours = np.asarray(generate(core_models, PROMPT, HEIGHT, WIDTH, steps=STEPS, seed=SEED), dtype=np.float32)

    # The same tokens (our AR with the same seed) and the same noise through the reference.
    inputs = ar.build_ar_inputs(core_models.processor, PROMPT, HEIGHT, WIDTH)
    tokens = ar.generate_prior_tokens(core_models.ar_model, inputs, [torch.Generator().manual_seed(SEED)])
    expected = reference_pipeline(
        prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=1.5,
        prior_token_ids=tokens.prior_token_ids, latents=initial_noise(1, HEIGHT, WIDTH, SEED), output_type="np",
    ).images[0]  # fmt: skip
    assert ours.shape == (HEIGHT, WIDTH, 3)
    diff = np.abs(ours - np.round(expected * 255)).max()
    assert diff <= 1, diff  # uint8 rounding of values equal to float tolerance
    assert ours.std() > 1  # a real picture, not a constant


def test_offloaded_stages_hold_either_the_ar_or_the_dit_and_give_the_same_image(core_models):
    """With offload, each stage works on copies of its own models only; the CPU weights are never replaced."""
    staged = dataclasses.replace(core_models, offload=True, device=torch.device("cpu"))
    originals = {name: next(getattr(core_models, name).parameters()) for name in ("ar_model", "dit", "glyph_encoder")}
    original_storage = {name: p.data_ptr() for name, p in originals.items()}

    def lent(name):
        return originals[name].data_ptr() != original_storage[name]

    seen = set()

    def on_token(step, total, ids):
        seen.add(("ar", lent("ar_model"), lent("dit"), lent("glyph_encoder")))

    def on_step(step, total, latent):
        seen.add(("dit", lent("ar_model"), lent("dit"), lent("glyph_encoder")))

    image = generate(staged, PROMPT, 512, 512, steps=2, seed=SEED, on_token=on_token, on_step=on_step)
    assert seen == {("ar", True, False, False), ("dit", False, True, False)}
    assert not any(lent(name) for name in originals)
    resident = np.asarray(generate(core_models, PROMPT, 512, 512, steps=2, seed=SEED), dtype=np.float32)
    assert np.abs(np.asarray(image, dtype=np.float32) - resident).max() <= 1  # copies may round differently on CPU
