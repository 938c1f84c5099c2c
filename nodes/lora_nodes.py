"""Load GLM-Image LoRA: LoRAs in diffusers/PEFT key names (and ComfyUI's) on the GLM-Image MODEL, in every weight
format. Load GLM-Image AR LoRA: PEFT adapters for the AR model (glm_image_core.ar_lora), applied beside its decoder's
projections for each run.

ComfyUI's key map (comfy.lora.model_lora_keys_unet) knows diffusers LoRA names only for the model classes it lists,
with no hook for a custom model, so the stock LoraLoaderModelOnly reads ComfyUI/kohya LoRAs (`diffusion_model.*`,
`lora_unet_*`) of this model but not diffusers/PEFT ones (`transformer.*.lora_A/lora_B`), nor the layers a 4-bit
checkpoint packs. This node uses ComfyUI's map plus ours, and ComfyUI's own LoRA machinery (comfy.lora.load_lora,
its patches): merged into plain weights as ComfyUI merges them; applied to the dequantised weight in the forward,
never rewriting the stored bits, where weights are quantised (fp8, ComfyUI's quantised files: a weight function, as
comfy.ops applies low-VRAM patches) or packed (4-bit, SDNQ: an object patch of the layer's LoRA patches,
`dit_loading.ComfyPackedLayer`).
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch
from comfy_api.latest import io

from ..glm_image_core import ar_lora, formats, lora
from ..glm_image_core.checkpoint import SAFETENSORS_DTYPES
from ..glm_image_core.file_checks import check_lora_alpha_values
from ..glm_image_core.lora import check_dit_lora, diffusers_lora_names
from . import paths
from .common import file_input, schema
from .types import GlmARModel

FULL_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
# What a LoRA applied in the forward allocates for one layer, in weights of its intermediate dtype: the dequantised
# weight, comfy.lora.calculate_weight's product up @ down and its scaled copy.
IN_FORWARD_COPIES = 3
MEMORY_WRAPPER_KEY = "glm_image_in_forward_lora_memory"


def glm_lora_key_map(model) -> dict[str, str]:
    """ComfyUI's LoRA key map for this BaseModel plus the diffusers/PEFT names of the DiT's layers, packed ones
    included."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    diffusion_model = model.diffusion_model
    weights = [*diffusion_model.state_dict().keys()]
    weights += [f"{n}.weight" for n, m in diffusion_model.named_modules() if formats.of_layer(m).packed]
    key_map.update({name: f"diffusion_model.{key}" for name, key in diffusers_lora_names(weights).items()})
    return key_map


def apply_lora(patcher, lora: dict, strength: float, source: str = "this LoRA"):
    """A clone of ``patcher`` with the LoRA added at ``strength``; the input stays as it was. Refuses a LoRA none of
    whose keys name a layer of the DiT, or whose tensors do not fit its layers (``glm_image_core.lora.check_dit_lora``:
    pairs complete, ranks agreeing, shapes those of the layers, alpha a scalar); warns with the count and names of
    the keys it cannot place (another model's, such as a text encoder's)."""
    key_map = glm_lora_key_map(patcher.model)
    diffusion_model = patcher.model.diffusion_model

    def features(name: str):
        """(out, in) of the layer a LoRA name is for: its logical size, packed layers included."""
        key = key_map[name]
        if not isinstance(key, str):
            return None
        layer = diffusion_model.get_submodule(key.removeprefix("diffusion_model.").rpartition(".")[0])
        return (layer.out_features, layer.in_features) if hasattr(layer, "in_features") else None

    shapes = {key: tuple(tensor.shape) for key, tensor in lora.items()}
    dtypes = {key: SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)) for key, tensor in lora.items()}
    parts, unmatched = check_dit_lora(source, shapes, dtypes, key_map, features)
    check_lora_alpha_values(source, {k.alpha: lora[k.alpha].item() for k in parts.values() if k.alpha})
    if unmatched:
        logging.warning(
            "GLM-Image LoRA: %d of the %d keys of %s match no layer of the DiT and are ignored: %s",
            len(unmatched),
            len(lora),
            source,
            ", ".join(unmatched[:10]),
        )
    patched = patcher.clone()
    merged = {}
    for key, adapter in comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map).items():
        layer_name, _, param = key.removeprefix("diffusion_model.").rpartition(".")
        layer = patched.model.diffusion_model.get_submodule(layer_name)
        # the patch as ModelPatcher.add_patches stores it, (strength, adapter, strength_model, offset, function), as
        # ComfyUI's low-VRAM loads apply it: to the weight the layer computes with (its convert_func: a scaled-fp8
        # layer's weight times its scale), then back into the layer's form (set_func) where it has one
        _, set_func, convert_func = comfy.model_patcher.get_key_weight(patched.model, key)
        if set_func is not None and hasattr(layer, "scale_weight"):
            set_func = divided_by_scale(layer)
        patch = {key: [(strength, adapter, 1.0, None, None)]}
        in_forward = comfy.model_patcher.LowVramPatch(key, patch, convert_func, set_func)
        if formats.of_layer(layer).packed and param == "weight":
            name = f"diffusion_model.{layer_name}.lora_patches"
            patched.add_object_patch(name, (*patched.object_patches.get(name, ()), in_forward))
        elif param == "weight" and stores_quantised(layer.weight):
            patched.add_weight_wrapper(key, in_forward)
        else:
            merged[key] = adapter
    patched.add_patches(merged, strength)
    if in_forward_lora_bytes(patched):
        kind = comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING
        patched.remove_wrappers_with_key(kind, MEMORY_WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, MEMORY_WRAPPER_KEY, with_in_forward_lora_memory)
    return patched


def in_forward_lora_bytes(patcher) -> int:
    """Device bytes of the largest layer's LoRA applied in the forward: packed layers dequantise in float32,
    ComfyUI's weight functions work in the compute dtype."""
    model = patcher.model
    compute_bytes = comfy.model_management.dtype_size(model.manual_cast_dtype or model.get_dtype())
    sizes = [0]
    for name, patches in patcher.object_patches.items():
        if name.endswith(".lora_patches") and patches:
            layer = comfy.utils.get_attr(model, name.removesuffix(".lora_patches"))
            sizes.append(layer.in_features * layer.out_features * 4)
    for key in patcher.weight_wrapper_patches:
        weight, *_ = comfy.model_patcher.get_key_weight(model, key)
        sizes.append(weight.numel() * compute_bytes)
    return IN_FORWARD_COPIES * max(sizes)


def with_in_forward_lora_memory(executor, model, *args, **kwargs):
    """A PREPARE_SAMPLING wrapper: the sampler's memory estimate (`GlmImageModel.memory_required`, asked before the
    patcher applies its object patches) counts the LoRAs applied in the forward, for the time of the preparation."""
    model.model.in_forward_lora_bytes = in_forward_lora_bytes(model)
    try:
        return executor(model, *args, **kwargs)
    finally:
        model.model.in_forward_lora_bytes = 0


def divided_by_scale(layer):
    """The set_func for a LoRA on a scaled-fp8 layer of ComfyUI 0.3.x: the layer multiplies by its scale after its
    weight functions run, so the patched weight goes back divided by it; its own set_weight would round it into the
    stored fp8 weight instead (and keep it there)."""

    def set_func(weight, **_):
        return weight / layer.scale_weight.to(weight.device, weight.dtype)

    return set_func


def stores_quantised(weight) -> bool:
    """Whether a comfy.ops layer's weight is stored in another form than it computes with (fp8; ComfyUI's quantised
    tensors), so a LoRA must reach the dequantised weight in the forward rather than be merged into the stored one."""
    return weight is not None and (weight.dtype not in FULL_PRECISION or hasattr(weight, "_layout_cls"))


class LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageLoraLoader",
            display_name="Load GLM-Image LoRA",
            category="GLM-Image",
            search_aliases=["lora"],
            description="A LoRA for the GLM-Image DiT, in diffusers/PEFT key names (transformer.*.lora_A/lora_B, as "
            "diffusers-based trainers write them) or ComfyUI's (which the stock LoraLoaderModelOnly also reads), on "
            "every weight format: merged into bf16 weights, applied to the dequantised weight at each step for fp8, "
            "ComfyUI's quantised files, 4-bit and SDNQ checkpoints.",
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
        paths.LORAS.check(path)  # as when queued: the file may have changed since
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
            "format (full, int8, 4-bit, SDNQ).",
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
        adapter = lora.Lora(layers, strength, lora_name)
        return io.NodeOutput(dataclasses.replace(ar_model, loras=(*ar_model.loras, adapter)))
