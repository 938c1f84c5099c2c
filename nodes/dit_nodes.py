"""DiT nodes: the loader (a real ComfyUI MODEL), its model sampling, the empty latent and the reference schedule."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..glm_image_core import loading
from ..glm_image_core.defaults import LATENT_CHANNELS, STEPS, VAE_SCALE
from ..glm_image_core.schedule import glm_schedule
from . import paths
from .common import file_input, schema, size_inputs, size_of, tokens_size_input, validate_size
from .dit_loading import WEIGHT_DTYPES, load_dit_patcher
from .model_sampling import model_sampling_for_size
from .types import GlmTokens


class DiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageDiTLoader",
            display_name="Load GLM-Image DiT",
            category="GLM-Image",
            search_aliases=["dit", "diffusion model", "unet", "扩散模型"],
            description="The 7B diffusion transformer as a ComfyUI MODEL for the stock KSampler / "
            "SamplerCustomAdvanced (use euler + simple for the reference schedule).",
            inputs=[
                file_input(
                    "dit",
                    paths.DIT,
                    "A GLM-Image folder (models/glm_image) or one .safetensors in models/diffusion_models.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=list(WEIGHT_DTYPES),
                    tooltip="As UNETLoader: fp8 halves the weights' memory; *_fast also uses fp8 matmuls.",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The DiT, set for 1024x1024: add ModelSampling GLM-Image for other sizes.")
            ],
        )

    @classmethod
    def validate_inputs(cls, dit=None):
        return paths.validate(paths.DIT, dit)

    @classmethod
    def execute(cls, dit, weight_dtype) -> io.NodeOutput:
        weights = loading.read_checked_weights(paths.resolve(paths.DIT, dit), loading.TRANSFORMER)
        return io.NodeOutput(load_dit_patcher(weights.state_dict, weights.config, weight_dtype, fmt=weights.format))


class ModelSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageModelSampling",
            display_name="ModelSampling GLM-Image",
            category="GLM-Image",
            search_aliases=["shift", "model sampling", "采样算法"],
            description="Sets the resolution-dependent shift (1024x1024: 3.25, 512x512: 1.75). Use this, not the "
            "stock ModelSampling nodes: they would feed the DiT the shifted time.",
            inputs=[
                io.Model.Input("model", tooltip="From Load GLM-Image DiT."),
                *size_inputs("The image size being sampled."),
                tokens_size_input(),
            ],
            outputs=[io.Model.Output(tooltip="The DiT with GLM-Image's sampling for this size, for the sampler.")],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        return validate_size(width, height)

    @classmethod
    def execute(cls, model, width, height, tokens=None) -> io.NodeOutput:
        width, height = size_of(width, height, tokens)
        patched = model.clone()
        patched.add_object_patch("model_sampling", model_sampling_for_size(width, height))
        return io.NodeOutput(patched)


class EmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageEmptyLatent",
            display_name="Empty GLM-Image Latent",
            category="GLM-Image",
            search_aliases=["empty latent", "空 Latent"],
            description="A 16-channel empty latent; with tokens connected, their size and grid count win.",
            inputs=[
                *size_inputs(),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Ignored when tokens hold several grids."),
                GlmTokens.Input("tokens", optional=True, tooltip="Take width/height (and batch) from these tokens."),
            ],
            outputs=[io.Latent.Output(tooltip="Zeros of the size the sampler needs (16 channels, 1/8 scale).")],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        return validate_size(width, height)

    @classmethod
    def execute(cls, width, height, batch_size, tokens=None) -> io.NodeOutput:
        width, height = size_of(width, height, tokens)
        if tokens is not None and tokens.prior_token_ids.shape[0] > 1:
            batch_size = tokens.prior_token_ids.shape[0]  # one latent per sampled grid
        shape = (batch_size, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)
        return io.NodeOutput({"samples": torch.zeros(shape, device=mm.intermediate_device())})


class Scheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageScheduler",
            display_name="GLM-Image Scheduler",
            category="GLM-Image",
            search_aliases=["sigmas", "scheduler", "调度器"],
            description="The reference pipeline's exact sigmas (integer timestep grid, resolution shift) for any step "
            "count, for SamplerCustomAdvanced. KSampler's 'simple' equals it when 1000 is divisible by the steps. "
            "Connect the tokens so their size decides: the sampler refuses sigmas made for another size than its "
            "latent.",
            inputs=[
                io.Int.Input(
                    "steps", default=STEPS, min=1, max=1000, tooltip=f"Denoising steps (the reference uses {STEPS})."
                ),
                *size_inputs("The image size being sampled."),
                tokens_size_input(),
            ],
            outputs=[io.Sigmas.Output(tooltip="For SamplerCustomAdvanced's sigmas input.")],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        return validate_size(width, height)

    @classmethod
    def execute(cls, steps, width, height, tokens=None) -> io.NodeOutput:
        width, height = size_of(width, height, tokens)
        sigmas, _ = glm_schedule(steps, height, width)
        return io.NodeOutput(sigmas)
