"""Editing through ComfyUI: LoadImage -> GLM-Image Generate Visual Tokens (reference_1[, reference_2]) -> GLM-Image
Encode (with the VAE) -> stock KSampler euler/simple, CFG 1.5 -> stock VAEDecode, run by ComfyUI's executor, equals

- the reference math: GlmImagePipeline.__call__'s edit path written out with the pipeline's own blocks (diffusers'
  GlmImageTransformer2DModel with its GlmImageKVCache in write/read/skip modes, its AutoencoderKL, its
  FlowMatchEulerDiscreteScheduler with the pipeline's timesteps/sigmas/mu, its glyph embeds). The pipeline itself
  cannot be called for editing with transformers 5 (its generate_prior_tokens concatenates the per-image features
  before get_image_tokens, see test_ar), so the prior tokens and reference ids come from our AR with the same seed;
- our core pipeline (glm_image_core.pipeline.generate with references).

Each reference is VAE-encoded at the size its AR grid implies (ARResult.reference_grid_sizes * 16 px, Lanczos), which
is what the pipeline's DiT needs for the reference's latent and prior ids to line up. The 500x700 reference is not a
multiple of 32, so it is really resized (to 512x704).
"""

import numpy as np
import PIL.Image
import pytest
import torch

from tests import comfy_host
from tests.prompt_graphs import example_prompt

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import folder_paths  # noqa: E402
from diffusers import GlmImagePipeline  # noqa: E402
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache  # noqa: E402
from diffusers.pipelines.glm_image.pipeline_glm_image import (  # noqa: E402
    calculate_shift,
    retrieve_latents,
    retrieve_timesteps,
)

import nodes  # noqa: E402
from glm_image_core import ar  # noqa: E402
from glm_image_core.pipeline import generate, initial_noise  # noqa: E402

HEIGHT, WIDTH, STEPS, GUIDANCE, SEED = 512, 512, 4, 1.5, 5
PROMPT = "Make the sky 'blue' and add a sign that reads \u201cOPEN\u201d"
REFERENCES = {"one reference": ["wide.png"], "two references": ["wide.png", "square.png"]}
CAPTURED: dict[str, dict] = {}


class CaptureOutputs:
    """Test-only output node: keeps the IMAGE and LATENT it receives, in float32, under `key`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {}), "image": ("IMAGE",), "latent": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def capture(self, key, image, latent):
        CAPTURED[key] = {"image": image.clone(), "latent": latent["samples"].clone()}
        return ()


def reference_image(height: int, width: int, seed: int) -> PIL.Image.Image:
    """A smooth random picture (blocky noise, bilinearly enlarged): something Lanczos resizing visibly changes."""
    cells = np.random.default_rng(seed).integers(0, 256, (height // 50 + 2, width // 50 + 2, 3), dtype=np.uint8)
    return PIL.Image.fromarray(cells).resize((width, height), PIL.Image.BILINEAR)


@pytest.fixture(scope="module")
def comfy_edit(tiny_model_dir, tmp_path_factory):
    """The pack in ComfyUI, the tiny folder under a glm_image root, the reference images in the input folder, and
    the capture node registered for this module."""
    comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    inputs = tmp_path_factory.mktemp("input")
    reference_image(500, 700, seed=1).save(inputs / "wide.png")
    reference_image(512, 512, seed=2).save(inputs / "square.png")
    input_dir = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(inputs))
    nodes.NODE_CLASS_MAPPINGS["GLMImageTestCapture"] = CaptureOutputs
    yield inputs
    del nodes.NODE_CLASS_MAPPINGS["GLMImageTestCapture"]
    folder_paths.set_input_directory(input_dir)


def edit_graph(reference_files: list[str], key: str) -> dict:
    """The edit workflow in API format, fp32 on the CPU, with one LoadImage per file of ``reference_files`` and its
    image and latent captured under ``key``; KSampler's noise seed equals the AR seed (as in `generate`)."""
    graph = example_prompt(
        "edit_multi_reference",
        WIDTH,
        HEIGHT,
        STEPS,
        GLMImageGenerateTokens={"prompt": PROMPT, "seed": SEED},
        KSampler={"seed": SEED, "cfg": GUIDANCE},
    )
    tokens = graph["2"]["inputs"]
    for name in [name for name in tokens if name.startswith("reference_")]:
        del graph[tokens.pop(name)[0]]
    for i, name in enumerate(reference_files, start=1):
        graph[f"2{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        tokens[f"reference_{i}"] = [f"2{i}", 0]
    graph["11"] = {"class_type": "GLMImageTestCapture", "inputs": {"key": key, "image": ["10", 0], "latent": ["8", 0]}}
    return graph


def reference_edit(pipe: GlmImagePipeline, tokens: ar.ARResult, images: list, noise: torch.Tensor):
    """GlmImagePipeline.__call__'s edit path, step by step with the pipeline's own objects, fed our AR's tokens.
    Returns (the final latent in raw VAE space [1, 16, h, w], the decoded image [1, H, W, 3] in 0..1)."""
    transformer, vae, scheduler = pipe.transformer, pipe.vae, pipe.scheduler
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    cond_embeds, uncond_embeds = pipe.encode_prompt(PROMPT, True, device=torch.device("cpu"), dtype=torch.float32)

    kv_caches = GlmImageKVCache(num_layers=transformer.config.num_layers)
    kv_caches.set_mode("write")
    for image, ids, (grid_h, grid_w) in zip(images, tokens.reference_prior_ids, tokens.reference_grid_sizes):
        pixels = pipe.image_processor.preprocess(image, height=grid_h * 16, width=grid_w * 16)
        latent = (retrieve_latents(vae.encode(pixels), sample_mode="argmax") - mean) / std
        transformer(
            hidden_states=latent,
            encoder_hidden_states=cond_embeds[:1, :0],
            prior_token_id=ids[None],
            prior_token_drop=torch.zeros_like(ids[None], dtype=torch.bool),
            timestep=torch.zeros(1),
            target_size=torch.tensor([pixels.shape[-2:]]),
            crop_coords=torch.zeros(1, 2),
            kv_caches=kv_caches,
        )
    kv_caches.next_sample()

    timesteps = np.linspace(1000, 1.0, STEPS + 1)[:-1].astype(np.int64).astype(np.float32)
    mu = calculate_shift((HEIGHT // 16) * (WIDTH // 16), 256, 0.25, 0.75)
    timesteps, _ = retrieve_timesteps(scheduler, STEPS, "cpu", timesteps, timesteps / 1000, mu=mu)
    size = torch.tensor([[HEIGHT, WIDTH]], dtype=torch.float32)
    branch = dict(prior_token_id=tokens.prior_token_ids, target_size=size, crop_coords=torch.zeros(1, 2))
    latents = noise
    for t in timesteps:
        timestep = t.expand(1) - 1
        kv_caches.set_mode("read")
        v_cond = transformer(
            hidden_states=latents,
            encoder_hidden_states=cond_embeds,
            timestep=timestep,
            kv_caches=kv_caches,
            prior_token_drop=torch.zeros_like(tokens.prior_token_ids, dtype=torch.bool),
            return_dict=False,
            **branch,
        )[0].float()
        kv_caches.set_mode("skip")
        v_uncond = transformer(
            hidden_states=latents,
            encoder_hidden_states=uncond_embeds,
            timestep=timestep,
            kv_caches=kv_caches,
            prior_token_drop=torch.ones_like(tokens.prior_token_ids, dtype=torch.bool),
            return_dict=False,
            **branch,
        )[0].float()
        latents = scheduler.step(v_uncond + GUIDANCE * (v_cond - v_uncond), t, latents, return_dict=False)[0]
    raw = latents * std + mean
    image = pipe.image_processor.postprocess(vae.decode(raw, return_dict=False)[0], output_type="pt")
    return raw, image.permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def expected(comfy_edit, core_models, reference_pipeline):
    """The reference math per case (computed once): our AR's tokens for the same seed, then `reference_edit`."""
    results = {}

    def for_case(case):
        if case not in results:
            images = [PIL.Image.open(comfy_edit / name).convert("RGB") for name in REFERENCES[case]]
            inputs = ar.build_ar_inputs(core_models.processor, PROMPT, HEIGHT, WIDTH, images)
            tokens = ar.generate_prior_tokens(core_models.ar_model, inputs, [torch.Generator().manual_seed(SEED)])
            with torch.no_grad():
                results[case] = reference_edit(
                    reference_pipeline, tokens, images, initial_noise(1, HEIGHT, WIDTH, SEED)
                )
        return results[case]

    return for_case


@pytest.mark.parametrize("case", list(REFERENCES))
def test_edit_graph_equals_reference_math(comfy_edit, expected, case):
    run = comfy_host.run_prompt(edit_graph(REFERENCES[case], key=case))
    assert run.success, run.execution_error()
    ours = CAPTURED[case]
    latent, image = expected(case)

    latent_diff = (ours["latent"] - latent).abs().max().item()
    image_diff = (ours["image"] - image).abs().max().item()
    print(f"{case}: latent max diff {latent_diff:.2e} (|latent| max {latent.abs().max():.1f}), image {image_diff:.2e}")
    assert latent_diff <= 1e-4, latent_diff
    assert image_diff <= 1e-5, image_diff
    assert image.std() > 0.01  # a real picture, not a constant


@pytest.mark.parametrize("case", list(REFERENCES))
def test_core_edit_equals_reference_math(comfy_edit, core_models, expected, case):
    images = [PIL.Image.open(comfy_edit / name).convert("RGB") for name in REFERENCES[case]]
    steps = []
    ours = generate(
        core_models,
        PROMPT,
        HEIGHT,
        WIDTH,
        steps=STEPS,
        guidance=GUIDANCE,
        seed=SEED,
        references=images,
        on_step=lambda step, total, latent: steps.append(latent),
    )
    latent, image = expected(case)

    latent_diff = (core_models.vae.denormalize(steps[-1]) - latent).abs().max().item()
    image_diff = np.abs(np.asarray(ours, dtype=np.float32) - (image[0] * 255).round().numpy()).max()
    print(f"{case}: latent max diff {latent_diff:.2e}, image max diff {image_diff} (uint8)")
    assert latent_diff <= 1e-4, latent_diff
    assert image_diff <= 1, image_diff
