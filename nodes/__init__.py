"""The ComfyUI layer of the GLM-Image pack: thin V3 nodes over glm_image_core."""

import logging

from comfy_api.latest import ComfyExtension, io

from ..glm_image_core import dependencies
from . import ar_nodes, cache_nodes, dit_nodes, encode_nodes, lora_nodes, paths, vae_nodes

NODES: list[type[io.ComfyNode]] = [
    ar_nodes.ARModelLoader,
    ar_nodes.GenerateTokens,
    ar_nodes.SaveTokens,
    ar_nodes.LoadTokens,
    encode_nodes.GlyphEncoderLoader,
    encode_nodes.Encode,
    dit_nodes.DiTLoader,
    dit_nodes.ModelSampling,
    dit_nodes.EmptyLatent,
    dit_nodes.Scheduler,
    cache_nodes.EasyCache,
    lora_nodes.LoraLoader,
    lora_nodes.ARLoraLoader,
    vae_nodes.VAELoader,
]


class GlmImageExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> GlmImageExtension:
    paths.register_model_folder()
    problem = dependencies.transformers_problem()
    if problem is not None:  # every node still loads: only the AR loader refuses, with the same message
        logging.warning(problem)
    return GlmImageExtension()
