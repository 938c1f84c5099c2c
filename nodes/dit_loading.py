"""How the GLM-Image MODEL is built from a state dict, as ComfyUI builds a native diffusion model: the weight dtype,
ComfyUI's quantised layers (scaled fp8, per-layer `comfy_quant`), AutoRound/GPTQ 4-bit layers, the patcher of the
running version."""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch

from ..glm_image_core import w4a16
from ..glm_image_core.comfy_quant import MARKER_SUFFIX as COMFY_QUANT_MARKER
from ..glm_image_core.errors import InvalidInputError
from ..glm_image_core.scaled_fp8 import SCALED_FP8_MARKER
from .model import GlmImageDiTConfig

WEIGHT_DTYPES = {
    "default": (None, False),
    "fp8_e4m3fn": (torch.float8_e4m3fn, False),
    "fp8_e4m3fn_fast": (torch.float8_e4m3fn, True),
    "fp8_e5m2": (torch.float8_e5m2, False),
}


def cast_to_model_dtypes(model: torch.nn.Module, state_dict: dict, dtype: torch.dtype) -> dict:
    """Each floating tensor in the dtype its parameter is built with (the weight dtype). Without dynamic VRAM,
    load_state_dict copies into parameters of that dtype and so casts; with it (ComfyUI 0.33+, comfy-aimdo), comfy.ops
    layers are built empty and keep the loaded tensors as they are: an fp8 choice would keep bf16 weights and a bf16
    file under an fp32 model would meet fp32 activations."""
    built = dict(model.named_parameters())  # empty comfy.ops layers list none; their intended dtype is kept as
    cast = {}  # `<name>_comfy_model_dtype` on the layer
    for key, tensor in state_dict.items():
        target = built[key].dtype if key in built else None
        if target is None:
            module_name, _, attribute = key.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:  # not a key of this model: load_state_dict reports it
                module = None
            target = getattr(module, f"{attribute}_comfy_model_dtype", None) or dtype
        cast[key] = tensor.to(target) if tensor.is_floating_point() else tensor
    return cast


def load_dit_patcher(
    state_dict: dict, config: dict, weight_dtype: str = "default", model_options: dict | None = None
) -> comfy.model_patcher.ModelPatcher:
    """The DiT under ComfyUI's model management, as UNETLoader would build it. `config`: the published
    transformer/config.json keys. `model_options` as comfy.sd.load_diffusion_model_state_dict takes them ("dtype",
    "custom_operations", "fp8_optimizations", "load_device", "offload_device"); they win over `weight_dtype`. A ComfyUI scaled-fp8 file (the
    `scaled_fp8` marker) loads with ComfyUI's scaled-fp8 layers."""
    model_options = model_options or {}
    mm = comfy.model_management
    load_device = model_options.get("load_device", mm.get_torch_device())
    offload_device = model_options.get("offload_device", mm.unet_offload_device())
    dtype, fp8_fast = WEIGHT_DTYPES[weight_dtype]
    dtype = model_options.get("dtype", dtype)
    packing = w4a16.read_format(config, "the DiT's config")
    model_config = GlmImageDiTConfig(
        {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    )
    state_dict, quantisation = use_quantisation(model_config, state_dict, model_options, packing)
    if dtype is None:
        dtype = mm.unet_dtype(
            model_params=comfy.utils.calculate_parameters(state_dict),
            supported_dtypes=model_config.supported_inference_dtypes,
            weight_dtype=None if quantisation else comfy.utils.weight_dtype(state_dict),
        )
    model_config.set_inference_dtype(
        dtype,
        mm.unet_manual_cast(
            None if quantisation == MIXED_OPS else dtype, load_device, model_config.supported_inference_dtypes
        ),
    )
    model_config.optimizations["fp8"] = fp8_fast or model_options.get("fp8_optimizations", False)
    model_config.custom_operations = model_options.get("custom_operations", model_config.custom_operations)
    # As ComfyUI builds a native model: straight onto the GPU when it fits (never under dynamic VRAM), its patcher
    # the running version's core class (ModelPatcherDynamic when comfy-aimdo is on), whose dynamic weights are the
    # loaded tensors themselves (assign: no second copy in host RAM while loading).
    parameters = comfy.utils.calculate_parameters(state_dict)
    if quantisation == W4A16:  # what the 4-bit tensors weigh, in parameters of the model's dtype
        parameters = sum(t.nbytes for t in state_dict.values()) // mm.dtype_size(dtype)
    initial_device = mm.unet_inital_load_device(parameters, dtype)
    model = model_config.get_model(state_dict, "", device=initial_device)
    if quantisation == W4A16:
        # The packed layers replace the Linear modules ComfyUI built, before the patcher (ComfyUI 0.3.x measures
        # the model's size when it is made) and before loading, rather than entering as
        # model_options["custom_operations"]: an operations class builds every Linear alike and cannot tell which
        # the checkpoint packs, and that seam stays free for the user's own (GGUF-style) operations.
        w4a16.swap_linears(model.diffusion_model, state_dict, packing, dtype, "meta", ComfyW4A16Linear)
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(model, load_device=load_device, offload_device=offload_device)
    assign = patcher.is_dynamic() if hasattr(patcher, "is_dynamic") else False
    if quantisation == W4A16 and not assign:  # as comfy.ops layers: empty tensors the file's are copied into
        for layer in model.diffusion_model.modules():
            if isinstance(layer, ComfyW4A16Linear):
                layer.to_empty(device=initial_device)
    if quantisation in (None, W4A16) and "custom_operations" not in model_options:
        # quantised layers of ComfyUI take fp8 + scales as is; 4-bit layers keep their int32 codes and float16 scales
        state_dict = cast_to_model_dtypes(model.diffusion_model, state_dict, dtype)
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False, assign=assign)
    missing = [k for k in missing if not k.endswith(OPTIONAL_SCALES)]  # absent scales are 1
    if missing or unexpected:
        raise InvalidInputError(
            f"GLM-Image DiT weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_STATE, release_run_state)
    if initial_device != offload_device and not mm.is_device_cpu(initial_device):
        mm.load_models_gpu([patcher], force_full_load=True)  # ComfyUI's bookkeeping of a model loaded in place
    return patcher


RUN_STATE = "glm_image_run_state"  # the key of release_run_state among the patcher's wrappers


def release_run_state(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: when a sampling run stops with an error or an interrupt, drop the conds the guider made
    for it (`extra_conds`' output: the reference K/V of an edit, up to 7.5 GiB, among them). CFGGuider.sample
    deletes them only when the run completes, and SamplerCustomAdvanced's guider stays in the executor's cache."""
    try:
        return executor(*args, **kwargs)
    except BaseException:
        executor.class_obj.__dict__.pop("conds", None)
        raise


class ComfyW4A16Linear(w4a16.W4A16Linear):
    """A 4-bit layer (AutoRound/GPTQ packing, glm_image_core.w4a16) as ComfyUI's ModelPatcher handles comfy.ops
    layers. `comfy_cast_weights` marks it as a layer whose tensors may stay on the offload device when a partial
    (low-VRAM) load does not fit them: its forward reads the packed tensors and the bias on the input's device at each
    call and leaves the parameters where ComfyUI put them. `weight_function`/`bias_function` are where the patcher hangs
    low-VRAM patches; only a bias can be patched (LoRA keys for the weight find no `.weight` and are not loaded), and
    `weight = None` is what the patchers of ComfyUI 0.33 find when they look up `<layer>.weight`. The forward
    dequantises (the DiT is compute-bound; and torch's int4 matmul would move the packed tensors itself, which is
    ComfyUI's to do)."""

    comfy_cast_weights = False
    weight = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_int4pack = False
        self.weight_function = []
        self.bias_function = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(x)
        if self.bias is None:
            return out
        # a copy when patched, as comfy.ops casts: the patches (comfy.lora.calculate_weight) work in place
        bias = self.bias.to(x.device, x.dtype, copy=bool(self.bias_function))
        for patch in self.bias_function:
            bias = patch(bias)
        return out + bias


SCALED_OPS, MIXED_OPS, W4A16 = "scaled_fp8", "mixed_ops", w4a16.W4A16
OPTIONAL_SCALES = (".scale_weight", ".scale_input")
MIXED_OPS_VERSION = "0.33"  # the ComfyUI with mixed-precision layers (comfy/quant_ops.py) the pack is tested with


def use_quantisation(
    model_config, state_dict: dict, model_options: dict, packing: w4a16.W4A16Format | None = None
) -> tuple[dict, str | None]:
    """Set up ComfyUI's layers for a quantised file, as comfy.sd.load_diffusion_model_state_dict does. ComfyUI with
    mixed-precision layers (comfy.utils.convert_old_quants) turns a scaled-fp8 file (`scaled_fp8` marker,
    per-Linear `scale_weight`) into per-layer `comfy_quant` configs and runs those, in every format it knows; ComfyUI
    0.3.x builds scaled-fp8 Linear layers from the marker and cannot read per-layer files. A 4-bit checkpoint
    (`packing`, from its config's quantization_config) gets our 4-bit layers on every version. Returns the state dict
    to load and which applies (None: not quantised). Custom operations (a GGUF-style loader) get the state dict as it
    is, beside the 4-bit layers."""
    if packing is not None:
        return state_dict, W4A16
    if "custom_operations" in model_options:
        return state_dict, None
    if hasattr(comfy.utils, "convert_old_quants"):
        state_dict, _ = comfy.utils.convert_old_quants(state_dict, "", metadata={})
        model_config.quant_config = comfy.utils.detect_layer_quantization(state_dict, "")
        return state_dict, MIXED_OPS if model_config.quant_config else None
    layer = next((k.removesuffix(COMFY_QUANT_MARKER) for k in state_dict if k.endswith(COMFY_QUANT_MARKER)), None)
    if layer is not None:
        raise InvalidInputError(
            f"This DiT file is in ComfyUI's per-layer quantised format (comfy_quant markers, e.g. on {layer}), which "
            f"needs ComfyUI's mixed-precision layers: this ComfyUI ({comfyui_version()}) has none. Update ComfyUI to "
            f"{MIXED_OPS_VERSION} or newer, or load the bf16 weights or a scaled-fp8 file "
            "(save_single_file(..., scaled_fp8=True)), which this ComfyUI reads."
        )
    if SCALED_FP8_MARKER not in state_dict:
        return state_dict, None
    marker = state_dict.pop(SCALED_FP8_MARKER)
    model_config.scaled_fp8 = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype
    return state_dict, SCALED_OPS


def comfyui_version() -> str:
    try:
        from comfyui_version import __version__
    except ImportError:  # a checkout without the generated file
        return "version unknown"
    return __version__
