"""VAE loader: the GLM-Image VAE as a stock ComfyUI VAE (VAEDecode, VAEEncode and the tiled nodes work on it)."""

from __future__ import annotations

from comfy_api.latest import io

from ..glm_image_core import loading
from . import paths
from .common import file_input, schema
from .vae import load_glm_image_vae


class VAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageVAELoader",
            display_name="Load GLM-Image VAE",
            category="GLM-Image",
            search_aliases=["vae"],
            description="The 16-channel GLM-Image VAE (the stock VAELoader cannot build its geometry). Runs in bf16 "
            "or fp32, never fp16 (it overflows).",
            inputs=[
                file_input(
                    "vae",
                    paths.VAE,
                    "A GLM-Image folder (models/glm_image) or one .safetensors in models/vae.",
                )
            ],
            outputs=[io.Vae.Output(tooltip="A stock VAE: for VAEDecode, VAEEncode (and tiled) and GLM-Image Encode.")],
        )

    @classmethod
    def validate_inputs(cls, vae=None):
        return paths.validate(paths.VAE, vae)

    @classmethod
    def execute(cls, vae) -> io.NodeOutput:
        weights = loading.read_checked_weights(paths.resolve(paths.VAE, vae), loading.VAE, as_stored=False)
        return io.NodeOutput(load_glm_image_vae(weights.state_dict, weights.config))
