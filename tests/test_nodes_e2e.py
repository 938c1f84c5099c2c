"""The text-to-image graph (our loaders, stock KSampler euler/simple, CFG 1.5, stock VAEDecode) run by ComfyUI's own
executor gives the same image as diffusers' GlmImagePipeline for the same prior tokens and initial noise."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import comfy_host
from tests.prompt_graphs import example_prompt

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import folder_paths  # noqa: E402
from diffusers import GlmImagePipeline  # noqa: E402

from glm_image_core import ar  # noqa: E402
from glm_image_core.loading import load_ar_model, load_ar_processor  # noqa: E402

HEIGHT, WIDTH, STEPS, AR_SEED, NOISE_SEED = 512, 768, 4, 7, 11


@pytest.fixture(scope="module")
def comfy_models(tiny_model_dir, tmp_path_factory):
    """The pack loaded into ComfyUI, the tiny folder under a glm_image root, output to a temp folder."""
    comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    output = tmp_path_factory.mktemp("output")
    folder_paths.set_output_directory(str(output))
    return output


def small_text_to_image(prompt: str) -> dict:
    """The text-to-image example at a CPU-friendly size and step count, fp32 on the CPU."""
    return example_prompt(
        "text_to_image",
        WIDTH,
        HEIGHT,
        STEPS,
        GLMImageGenerateTokens={"prompt": prompt, "seed": AR_SEED},
        KSampler={"seed": NOISE_SEED},
    )


def saved_image(run, output: Path) -> np.ndarray:
    (image,) = run.outputs["11"]["images"]
    return np.asarray(Image.open(output / image["subfolder"] / image["filename"]), dtype=np.float32)


def test_text_to_image_graph_equals_glm_image_pipeline(comfy_models, tiny_model_dir):
    prompt = 'A neon sign "BAR" and \u201cOPEN\u201d over 「夜」'
    run = comfy_host.run_prompt(small_text_to_image(prompt))
    assert run.success, run.execution_error()
    ours = saved_image(run, comfy_models)

    model = load_ar_model(tiny_model_dir, dtype=torch.float32)
    inputs = ar.build_ar_inputs(load_ar_processor(tiny_model_dir), prompt, HEIGHT, WIDTH)
    tokens = ar.generate_prior_tokens(model, inputs, [torch.Generator().manual_seed(AR_SEED)])
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(NOISE_SEED))
    pipe = GlmImagePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    expected = pipe(
        prompt=prompt,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=1.5,
        prior_token_ids=tokens.prior_token_ids,
        latents=noise,
        output_type="np",
    ).images[0]
    diff = np.abs(ours - np.floor(expected * 255)).max()  # SaveImage truncates to uint8
    assert diff <= 1, diff
    assert ours.std() > 1


def test_the_graph_with_a_dit_lora_and_an_ar_lora_gives_the_core_pipelines_image_with_them(
    comfy_models, tiny_model_dir, tmp_path
):
    """Load GLM-Image LoRA (ComfyUI's LoRA code, merged into the float32 weights) and Load GLM-Image AR LoRA in the
    graph; load_models(loras=..., ar_loras=...) in the core (applied beside the layers): the same image."""
    from glm_image_core.loading import load_transformer
    from glm_image_core.pipeline import generate, load_models
    from tests.test_ar_lora import ADAPTERS, make_adapter
    from tests.test_pipeline import dit_lora_file

    dit_lora_file(load_transformer(tiny_model_dir, dtype=torch.float32), tmp_path / "glm_style.safetensors")
    make_adapter(
        load_ar_model(tiny_model_dir, dtype=torch.float32),
        tmp_path / "glm_ar_style",
        **ADAPTERS["attention, a list, dropout"],
    )
    prompt = 'A neon sign "BAR"'
    graph = small_text_to_image(prompt)
    graph["20"] = {
        "class_type": "GLMImageARLoraLoader",
        "inputs": {"ar_model": ["1", 0], "lora_name": "glm_ar_style", "strength": 0.6},
    }
    graph["21"] = {
        "class_type": "GLMImageLoraLoader",
        "inputs": {"model": ["5", 0], "lora_name": "glm_style.safetensors", "strength_model": 0.8},
    }
    graph["2"]["inputs"]["ar_model"] = ["20", 0]
    graph["8"]["inputs"]["seed"] = AR_SEED  # the core pipeline draws the noise from the AR's seed
    graph["6"]["inputs"]["model"] = ["21", 0]
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    try:
        run = comfy_host.run_prompt(graph)
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))
    assert run.success, run.execution_error()
    ours = saved_image(run, comfy_models)

    models = load_models(
        tiny_model_dir,
        dtype=torch.float32,
        loras=[(tmp_path / "glm_style.safetensors", 0.8)],
        ar_loras=[(tmp_path / "glm_ar_style", 0.6)],
    )
    expected = np.asarray(generate(models, prompt, HEIGHT, WIDTH, steps=STEPS, seed=AR_SEED), dtype=np.float32)
    assert np.abs(ours - expected).max() <= 1
