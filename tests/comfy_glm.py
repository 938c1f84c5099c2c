"""The tiny GLM-Image DiT as a ComfyUI MODEL and GLM-Image conditionings for it: what the host tests of wrappers,
patches, caching, LoRA, compile, weight formats and memory share. Import after `comfy_host.require_comfyui()`."""

from __future__ import annotations

import contextlib
import json
import shutil

import comfy.sample
import numpy as np
import torch

from glm_image_core.loading import read_state_dict
from glm_image_core.pipeline import generate
from tests import comfy_host
from tests.prompt_graphs import example_prompt

dit_loading = comfy_host.import_pack_module("nodes.dit_loading")
model_sampling = comfy_host.import_pack_module("nodes.model_sampling")


def generate_tokens(node_classes, ar_model, prompt: str, size: int, seed: int, batch_size: int = 1, **references):
    """GLM-Image Generate Visual Tokens at size x size with the sampling of the templates, as the executor runs it;
    ``references``: its reference_1 .. reference_N images."""
    with torch.inference_mode():
        return node_classes["GLMImageGenerateTokens"].execute(
            ar_model=ar_model,
            prompt=prompt,
            width=size,
            height=size,
            seed=seed,
            temperature=0.9,
            top_p=0.75,
            top_k=0,
            batch_size=batch_size,
            **references,
        )[0]


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


def folder_text_to_image(folder: str, dit: str, size: int, steps: int, seed: int, capture: str) -> dict:
    """The text-to-image example on a downloaded folder (its AR, glyph encoder and VAE; ``dit`` in Load GLM-Image
    DiT), fp32 on the CPU, at ``size`` x 2 with KSampler's noise seed equal to the AR seed (as in the core's
    `generate`); its image and latent captured under ``capture`` by tests.test_nodes_edit.CaptureOutputs."""
    graph = example_prompt(
        "text_to_image",
        size * 2,
        size * 2,
        steps,
        GLMImageARModelLoader={"model_folder": folder},
        GLMImageGenerateTokens={"prompt": FOLDER_PROMPT, "seed": seed},
        GLMImageGlyphEncoderLoader={"encoder": folder},
        GLMImageDiTLoader={"dit": dit},
        KSampler={"seed": seed},
        GLMImageVAELoader={"vae": folder},
    )
    graph["11"] = {
        "class_type": "GLMImageTestCapture",
        "inputs": {"key": capture, "image": ["10", 0], "latent": ["8", 0]},
    }
    return graph


FOLDER_PROMPT = 'A sign that reads "OPEN"'


def core_text_to_image(models, size: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last latent, the image as [1, H, W, 3] floats of 0..255) of the core pipeline for ``folder_text_to_image``."""
    latents = []
    image = generate(
        models, FOLDER_PROMPT, size * 2, size * 2, steps=steps, seed=seed, on_step=lambda *a: latents.append(a[2])
    )
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))[None]
    return models.vae.denormalize(latents[-1]), pixels


@contextlib.contextmanager
def pack_with_downloaded_folder(model_dir, diffusion_models, links: dict[str, object]):
    """The pack in ComfyUI (its node classes), with ``model_dir`` under a glm_image root and each of ``links`` (name:
    target) linked in under the ``diffusion_models`` root, and the capture node of tests.test_nodes_edit."""
    import folder_paths

    import nodes
    from tests.test_nodes_edit import CaptureOutputs

    node_classes = comfy_host.load_pack()
    for name, target in links.items():
        (diffusion_models / name).symlink_to(target, target_is_directory=True)
    added = {"glm_image": str(model_dir.parent), "diffusion_models": str(diffusion_models)}
    for name, folder in added.items():
        folder_paths.add_model_folder_path(name, folder)
    nodes.NODE_CLASS_MAPPINGS["GLMImageTestCapture"] = CaptureOutputs
    try:
        yield node_classes
    finally:
        del nodes.NODE_CLASS_MAPPINGS["GLMImageTestCapture"]
        for name, folder in added.items():
            folder_paths.folder_names_and_paths[name][0].remove(folder)


def refusal_of_edited_quantisation(graph: dict, model_dir, tmp_path, component: str, node: str, **changes) -> str:
    """Queues ``graph`` with its AR loader ("1") or DiT loader ("5") on a copy of the folder ``model_dir`` whose
    ``component`` has ``changes`` in its config's quantization_config; asserts that validation refused that node
    before any node ran; its error, as text."""
    import folder_paths

    root = tmp_path / f"{model_dir.name}-edited"
    shutil.copytree(model_dir, root, symlinks=True)
    config_file = root / component / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"].update(changes)
    config_file.write_text(json.dumps(config))
    graph[node]["inputs"]["dit" if node == "5" else "model_folder"] = root.name
    folder_paths.add_model_folder_path("glm_image", str(tmp_path))
    try:
        run = comfy_host.run_prompt(graph)
    finally:
        folder_paths.folder_names_and_paths["glm_image"][0].remove(str(tmp_path))
    assert not run.success and not run.messages  # refused by validation: no node ran
    assert set(run.node_errors) == {node}
    return json.dumps(run.node_errors[node])


def with_sampler_custom_advanced(graph: dict, scheduler: dict) -> dict:
    """An API graph with its KSampler (node "8") replaced by SamplerCustomAdvanced (node "8" too) with the GLM-Image
    Scheduler's sigmas; `scheduler`: that node's inputs."""
    graph = dict(graph)
    ksampler = graph.pop("8")["inputs"]
    graph.update(
        {
            "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
            "21": {
                "class_type": "CFGGuider",
                "inputs": {
                    "model": ksampler["model"],
                    "positive": ksampler["positive"],
                    "negative": ksampler["negative"],
                    "cfg": 1.5,
                },
            },
            "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "23": {"class_type": "GLMImageScheduler", "inputs": scheduler},
            "8": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["20", 0],
                    "guider": ["21", 0],
                    "sampler": ["22", 0],
                    "sigmas": ["23", 0],
                    "latent_image": ksampler["latent_image"],
                },
            },
        }
    )
    return graph
