"""VAE loader: the GLM-Image VAE as a stock ComfyUI VAE (VAEDecode, VAEEncode and the tiled nodes work on it)."""

from __future__ import annotations

from comfy_api.latest import io

from ..glm_image_core import loading
from . import paths
from .vae import load_glm_image_vae


class VAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GLMImageVAELoader",
            display_name="Load GLM-Image VAE",
            category="GLM-Image",
            description="The 16-channel GLM-Image VAE (the stock VAELoader cannot build its geometry). Runs in bf16 "
            "or fp32, never fp16 (it overflows).",
            inputs=[
                io.Combo.Input(
                    "vae", options=paths.choices("vae", "vae"),
                    tooltip="A GLM-Image folder (models/glm_image) or one .safetensors in models/vae.",
                )
            ],
            outputs=[io.Vae.Output()],
        )  # fmt: skip

    @classmethod
    def execute(cls, vae) -> io.NodeOutput:
        config, state_dict = loading.read_checked_weights(paths.resolve(vae, "vae"), loading.VAE)
        return io.NodeOutput(load_glm_image_vae(state_dict, config))
