"""Load GLM-Image LoRA: LoRAs in diffusers/PEFT key names (and ComfyUI's) on the GLM-Image MODEL. Load GLM-Image AR
LoRA: PEFT adapters for the AR model (glm_image_core.ar_lora), applied beside its decoder's projections for each run.

ComfyUI's key map (comfy.lora.model_lora_keys_unet) knows diffusers LoRA names only for the model classes it lists,
with no hook for a custom model, so the stock LoraLoaderModelOnly reads ComfyUI/kohya LoRAs (`diffusion_model.*`,
`lora_unet_*`) of this model but not diffusers/PEFT ones (`transformer.*.lora_A/lora_B`). This node uses ComfyUI's
map plus ours, and ComfyUI's own LoRA machinery (comfy.lora.load_lora, ModelPatcher.add_patches).
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.lora
import comfy.lora_convert
import comfy.utils
from comfy_api.latest import io

from ..glm_image_core import ar_lora, formats
from ..glm_image_core.errors import InvalidInputError
from ..glm_image_core.lora import diffusers_lora_names, layers_changed, unmatched_lora_keys
from . import paths
from .common import file_input, schema
from .types import GlmARModel


def glm_lora_key_map(model) -> dict[str, str]:
    """ComfyUI's LoRA key map for this BaseModel plus the diffusers/PEFT names of the DiT's layers."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    weights = model.diffusion_model.state_dict().keys()
    key_map.update({name: f"diffusion_model.{key}" for name, key in diffusers_lora_names(weights).items()})
    return key_map


def apply_lora(patcher, lora: dict, strength: float, source: str = "this LoRA"):
    """A clone of ``patcher`` with the LoRA added at ``strength``. Refuses a LoRA none of whose keys name a layer of
    the DiT, and one that changes layers the DiT holds in 4 bits; warns with the names of the keys it cannot place."""
    check_no_packed_layers(patcher.model.diffusion_model, lora, source)
    key_map = glm_lora_key_map(patcher.model)
    unmatched = unmatched_lora_keys(lora, key_map)
    if unmatched and len(unmatched) == len(lora):
        raise InvalidInputError(
            f"{source} matches no layer of the GLM-Image DiT ({len(lora)} keys, e.g. {', '.join(unmatched[:3])}): it "
            "is for another model. GLM-Image LoRAs name layers as diffusers does (transformer.transformer_blocks.0."
            "attn1.to_q.lora_A.weight) or as ComfyUI does (lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight)."
        )
    if unmatched:
        logging.warning(
            "GLM-Image LoRA: %d of the %d keys of %s match no layer of the DiT and are ignored: %s",
            len(unmatched),
            len(lora),
            source,
            ", ".join(unmatched[:10]),
        )
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    patched = patcher.clone()
    patched.add_patches(patches, strength)
    return patched


def check_no_packed_layers(diffusion_model, lora: dict, source: str) -> None:
    """InvalidInputError when the LoRA changes a layer this DiT holds in 4 bits (AutoRound/GPTQ): a packed weight
    cannot take a patch (ComfyUI's patcher would find no `.weight` for it), and applying the rest of the LoRA would
    give an image the LoRA was never trained for."""
    packed = [name for name, m in diffusion_model.named_modules() if formats.of_layer(m) is formats.W4A16]
    changed = layers_changed(lora, packed)
    if changed:
        raise InvalidInputError(
            f"{source} changes {len(changed)} layers that this GLM-Image DiT holds in 4 bits (e.g. "
            f"{', '.join(changed[:3])}), and a LoRA cannot be applied to 4-bit (AutoRound/GPTQ) weights. Use it with "
            "the bf16 DiT or an 8-bit file made from it (Weight formats in the README). The stock "
            "LoraLoaderModelOnly would skip these layers ('lora key not loaded') and apply only the rest."
        )


class LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageLoraLoader",
            display_name="Load GLM-Image LoRA",
            category="GLM-Image",
            search_aliases=["lora"],
            description="A LoRA for the GLM-Image DiT, in diffusers/PEFT key names (transformer.*.lora_A/lora_B, as "
            "diffusers-based trainers write them) or ComfyUI's (which the stock LoraLoaderModelOnly also reads).",
            inputs=[
                io.Model.Input("model", tooltip="The GLM-Image MODEL (from Load GLM-Image DiT, or after other LoRAs)."),
                file_input(
                    "lora_name",
                    paths.LORAS,
                    "A .safetensors LoRA in models/loras, diffusers/PEFT or ComfyUI key names.",
                ),
                io.Float.Input(
                    "strength_model",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Scales the LoRA's change of every weight; 0 leaves the model as it is.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with the LoRA applied (the input stays unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return paths.validate(paths.LORAS, lora_name)

    @classmethod
    def execute(cls, model, lora_name, strength_model) -> io.NodeOutput:
        path = paths.resolve(paths.LORAS, lora_name)
        if strength_model == 0:
            return io.NodeOutput(model)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        return io.NodeOutput(apply_lora(model, lora, strength_model, lora_name))


class ARLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            search_aliases=["ar lora", "peft", "fine-tune", "AR 微调"],
            node_id="GLMImageARLoraLoader",
            display_name="Load GLM-Image AR LoRA",
            category="GLM-Image",
            description="A PEFT LoRA adapter for the AR model (GLM-Image's fine-tuning path): its updates of the "
            "decoder's projections are applied beside them for each Generate Visual Tokens run, in every weight "
            "format (full, int8, 4-bit).",
            inputs=[
                GlmARModel.Input("ar_model", tooltip="From Load GLM-Image AR Model (or after other AR LoRAs)."),
                file_input(
                    "lora_name",
                    paths.AR_LORAS,
                    "A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or a .safetensors "
                    "file in models/loras.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Scales the adapter's update of every weight; 0 leaves the AR model as it is.",
                ),
            ],
            outputs=[
                GlmARModel.Output(
                    display_name="ar_model", tooltip="The AR model with the adapter (the input stays unchanged)."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return paths.validate(paths.AR_LORAS, lora_name)

    @classmethod
    def execute(cls, ar_model, lora_name, strength) -> io.NodeOutput:
        path = paths.resolve(paths.AR_LORAS, lora_name)
        paths.AR_LORAS.check(path)
        if strength == 0:
            return io.NodeOutput(ar_model)
        layers = ar_lora.read_adapter(path)
        ar_lora.check_fits(ar_model.decoder.hf_model, layers, lora_name)
        lora = ar_lora.ArLora(layers, strength, lora_name)
        return io.NodeOutput(dataclasses.replace(ar_model, loras=(*ar_model.loras, lora)))
