"""How the GLM-Image MODEL is built from a state dict, as ComfyUI builds a native diffusion model: the weight dtype,
the layers of the state dict's weight format (``glm_image_core.formats``): ComfyUI's own quantised layers for its
files (scaled fp8, per-layer `comfy_quant`), ours for AutoRound/GPTQ 4-bit; the patcher of the running version."""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch

from ..glm_image_core import formats
from ..glm_image_core.checkpoint import in_memory
from ..glm_image_core.errors import InvalidInputError
from ..glm_image_core.formats import comfy_quant, scaled_fp8, sdnq, w4a16
from .model import GlmImageDiTConfig, check_sigmas_match_latent, with_negative_as_unconditional

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
    state_dict: dict,
    config: dict,
    weight_dtype: str = "default",
    model_options: dict | None = None,
    fmt: formats.WeightFormat | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """The DiT under ComfyUI's model management, as UNETLoader would build it. `config`: the published
    transformer/config.json keys; `fmt`: the state dict's weight format (``loading.read_checked_weights`` gives it;
    recognised from the tensors when None). `model_options` as comfy.sd.load_diffusion_model_state_dict takes them
    ("dtype", "custom_operations", "fp8_optimizations", "load_device", "offload_device"); they win over
    `weight_dtype`. Custom operations (a GGUF-style loader) get the state dict as it is, beside 4-bit layers."""
    model_options = model_options or {}
    mm = comfy.model_management
    load_device = model_options.get("load_device", mm.get_torch_device())
    offload_device = model_options.get("offload_device", mm.unet_offload_device())
    dtype, fp8_fast = WEIGHT_DTYPES[weight_dtype]
    dtype = model_options.get("dtype", dtype)
    fmt = fmt or formats.detect(in_memory(state_dict, config, "transformer"))
    model_config = GlmImageDiTConfig(
        {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    )
    layers = HostLayers(fmt, in_memory(state_dict, config, "transformer"), "custom_operations" in model_options)
    state_dict = layers.prepare(model_config, state_dict)
    if dtype is None:
        dtype = mm.unet_dtype(
            model_params=comfy.utils.calculate_parameters(state_dict),
            supported_dtypes=model_config.supported_inference_dtypes,
            weight_dtype=None if layers.quantised else comfy.utils.weight_dtype(state_dict),
        )
    model_config.set_inference_dtype(
        dtype,
        mm.unet_manual_cast(
            None if layers.mixed_precision else dtype, load_device, model_config.supported_inference_dtypes
        ),
    )
    fp8 = fp8_fast or model_options.get("fp8_optimizations", False) or model_config.optimizations.get("fp8", False)
    model_config.optimizations["fp8"] = fp8
    model_config.custom_operations = model_options.get("custom_operations", model_config.custom_operations)
    # As ComfyUI builds a native model: straight onto the GPU when it fits (never under dynamic VRAM), its patcher
    # the running version's core class (ModelPatcherDynamic when comfy-aimdo is on), whose dynamic weights are the
    # loaded tensors themselves (assign: no second copy in host RAM while loading).
    parameters = comfy.utils.calculate_parameters(state_dict)
    if layers.packed:  # what the packed tensors weigh, in parameters of the model's dtype
        parameters = sum(t.nbytes for t in state_dict.values()) // mm.dtype_size(dtype)
    initial_device = mm.unet_inital_load_device(parameters, dtype)
    model = layers.build(model_config, state_dict, dtype, initial_device)
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(model, load_device=load_device, offload_device=offload_device)
    assign = patcher.is_dynamic() if hasattr(patcher, "is_dynamic") else False
    if layers.packed and not assign:  # as comfy.ops layers: empty tensors the file's are copied into
        allocate_meta_tensors(model.diffusion_model, initial_device)
    state_dict = layers.cast(model.diffusion_model, state_dict, dtype)
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False, assign=assign)
    missing = [k for k in missing if not k.endswith(scaled_fp8.SCALE_SUFFIXES)]  # absent scales are 1
    if missing or unexpected:
        raise InvalidInputError(
            f"GLM-Image DiT weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_STATE, release_run_state)
    patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, UNCONDITIONAL_VIEW, with_negative_as_unconditional
    )
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, SCHEDULE_CHECK, check_schedule)
    if initial_device != offload_device and not mm.is_device_cpu(initial_device):
        mm.load_models_gpu([patcher], force_full_load=True)  # ComfyUI's bookkeeping of a model loaded in place
    return patcher


RUN_STATE = "glm_image_run_state"  # the key of release_run_state among the patcher's wrappers
UNCONDITIONAL_VIEW = "glm_image_unconditional_view"  # the key of model.with_negative_as_unconditional


def release_run_state(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: when a sampling run stops with an error or an interrupt, drop the conds the guider made
    for it (`extra_conds`' output: the reference K/V of an edit, up to 7.5 GiB, among them). CFGGuider.sample
    deletes them only when the run completes, and SamplerCustomAdvanced's guider stays in the executor's cache."""
    try:
        return executor(*args, **kwargs)
    except BaseException:
        executor.class_obj.__dict__.pop("conds", None)
        raise


SCHEDULE_CHECK = "glm_image_schedule_check"  # the key of check_schedule among the patcher's wrappers


def check_schedule(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """OUTER_SAMPLE wrapper: before the first step, refuse GLM-Image sigmas made for another size than the latent."""
    check_sigmas_match_latent(sigmas, noise, executor.class_obj.model_patcher.get_model_object("model_sampling"))
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)


class ComfyPackedLayer:
    """What ComfyUI's patchers need of a layer whose weight is packed (4-bit, and the like: a format module's layer
    with ``project(x)`` and ``dequantise(dtype, device)``), mixed into that layer's class.

    `comfy_cast_weights` marks it as a layer whose tensors may stay on the offload device when a partial (low-VRAM)
    load does not fit them: its forward reads the packed tensors and the bias on the input's device at each call and
    leaves the parameters where ComfyUI put them. `weight = None` is what ComfyUI's patchers find when they look up
    `<layer>.weight`: they have nothing to patch or page there. So the weight's LoRA patches come in as an object
    patch of the patcher (`lora_patches`, set by Load GLM-Image LoRA, restored on unpatching: every patcher applies
    object patches, dynamic VRAM's too): the forward dequantises the weight in float32, applies each patch to it
    (ComfyUI's LowVramPatch: comfy.lora.calculate_weight, whatever the adapter's kind) and multiplies; the packed bits
    never change. The bias is patched where comfy.ops layers read it (`bias_lowvram_function`, set by ComfyUI 0.33's
    dynamic VRAM, then the `bias_function` list). Under dynamic VRAM the packed tensors are loaded whole (they are no
    comfy.ops weights that comfy-aimdo could stream)."""

    comfy_cast_weights = False
    weight = None
    lora_patches: tuple = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_function = []
        self.bias_function = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_patches:
            weight = self.dequantise(torch.float32, x.device)
            for patch in self.lora_patches:
                weight = patch(weight)
            out = torch.nn.functional.linear(x, weight.to(x.dtype))
        else:
            out = self.project(x)
        if self.bias is None:
            return out
        patches = [getattr(self, "bias_lowvram_function", None), *self.bias_function]  # comfy.ops' order
        patches = [patch for patch in patches if patch is not None]
        # a copy when patched, as comfy.ops casts: the patches (comfy.lora.calculate_weight) work in place
        bias = self.bias.to(x.device, x.dtype, copy=bool(patches))
        for patch in patches:
            bias = patch(bias)
        return out + bias


class ComfyW4A16Linear(ComfyPackedLayer, w4a16.W4A16Linear):
    """A 4-bit layer (AutoRound/GPTQ packing, ``formats.w4a16``) under ComfyUI's patchers. It dequantises for every
    matmul (the DiT is compute-bound; and torch's int4 matmul would move the packed tensors itself, which is
    ComfyUI's to do)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_int4pack = False


class ComfySdnqLinear(ComfyPackedLayer, sdnq.SDNQLinear):
    """An SDNQ layer (``formats.sdnq``) under ComfyUI's patchers. Its codes read from the checkpoint's `weight` are
    held, and given in its state dict, as `codes`: ComfyUI looks for no weight there (no cast, no patch, no LoRA key
    of the stock loaders: Load GLM-Image LoRA reaches it)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)


PACKED_LAYERS = {formats.W4A16: ComfyW4A16Linear, formats.SDNQ: ComfySdnqLinear}  # a packed format's host layer


MIXED_OPS_VERSION = "0.33"  # the ComfyUI with mixed-precision layers (comfy/quant_ops.py) the pack is tested with


class HostLayers:
    """Which ComfyUI layers a weight format's tensors are loaded into, and what that asks of the loader. One place
    per format of ``glm_image_core.formats`` that ComfyUI runs with other layers than its plain ones:

    - plain: comfy.ops' layers for the weight dtype;
    - scaled_fp8 and comfy_quant: ComfyUI's own quantised layers, as comfy.sd sets them up for its files (0.33's
      mixed-precision layers run both; 0.3.x has scaled-fp8 layers only, and refuses per-layer files);
    - packed formats (4-bit, SDNQ): their host layer (``PACKED_LAYERS``) in place of the Linear modules the files
      pack, its tensors in the dtypes the format keeps them in.
    A GGUF-style loader's custom operations take the state dict as it is, beside packed layers."""

    def __init__(self, fmt: formats.WeightFormat, files, custom: bool):
        self.format, self.files, self.custom = fmt, files, custom
        self.packed = fmt.packed
        self.mixed_precision = False  # ComfyUI 0.33's mixed-precision layers (they cast for themselves)

    @property
    def quantised(self) -> bool:
        return self.format is not formats.PLAIN and not self.custom

    def prepare(self, model_config, state_dict: dict) -> dict:
        """Set up ``model_config`` for these layers, as comfy.sd does for ComfyUI's own files; the state dict to
        load."""
        if self.custom or self.format is formats.PLAIN or self.packed:
            return state_dict
        if hasattr(comfy.utils, "convert_old_quants"):  # per-layer configs for both of ComfyUI's formats
            state_dict, _ = comfy.utils.convert_old_quants(state_dict, "", metadata={})
            model_config.quant_config = comfy.utils.detect_layer_quantization(state_dict, "")
            self.mixed_precision = bool(model_config.quant_config)
            return state_dict
        if self.format is formats.COMFY_QUANT:
            layer = next(k for k in state_dict if k.endswith(comfy_quant.MARKER_SUFFIX))
            raise InvalidInputError(
                f"This DiT file is in ComfyUI's per-layer quantised format (comfy_quant markers, e.g. on "
                f"{layer.removesuffix(comfy_quant.MARKER_SUFFIX)}), which needs ComfyUI's mixed-precision layers: this "
                f"ComfyUI ({comfyui_version()}) has none. Update ComfyUI to {MIXED_OPS_VERSION} or newer, or load the "
                "bf16 weights or a scaled-fp8 file (save_single_file(..., scaled_fp8=True)), which this ComfyUI reads."
            )
        marker = state_dict.pop(scaled_fp8.MARKER)  # as comfy.model_detection reads it
        model_config.scaled_fp8 = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype
        model_config.optimizations["fp8"] = not scaled_fp8.weight_only(marker)
        return state_dict

    def build(self, model_config, state_dict: dict, dtype: torch.dtype, device):
        """The BaseModel with these layers, its weights not loaded yet. A packed DiT is built on the meta device and
        its packed layers are swapped in there, before anything is allocated: no full-precision weight of a packed
        layer is ever made. They replace the Linear modules ComfyUI built, before the patcher (ComfyUI 0.3.x
        measures the model's size when it is made), rather than entering as model_options["custom_operations"]: an
        operations class builds every Linear alike and cannot tell which the checkpoint packs, and that seam stays
        free for the user's own (GGUF-style) operations."""
        if not self.packed:
            return model_config.get_model(state_dict, "", device=device)
        model = model_config.get_model(state_dict, "", device="meta")
        model.device = device
        self.format.build_layers(model.diffusion_model, self.files, dtype, PACKED_LAYERS[self.format])
        return model

    def cast(self, diffusion_model, state_dict: dict, dtype: torch.dtype) -> dict:
        """The tensors in the dtypes the built layers take: ComfyUI's quantised layers and custom operations take
        them as they are; a packed format's own tensors stay as the format keeps them, the rest in the weight dtype."""
        if self.custom or self.format not in (formats.PLAIN, *PACKED_LAYERS):
            return state_dict
        if self.packed:
            state_dict = self.format.cast(self.files, state_dict, dtype)
            kept = {k: t for k, t in state_dict.items() if is_of_packed_layer(diffusion_model, k)}
            return (
                cast_to_model_dtypes(diffusion_model, {k: t for k, t in state_dict.items() if k not in kept}, dtype)
                | kept
            )
        return cast_to_model_dtypes(diffusion_model, state_dict, dtype)


def allocate_meta_tensors(model: torch.nn.Module, device) -> None:
    """Empty tensors on ``device`` for the parameters and buffers still on the meta device (``to_empty`` for those
    alone: a layer's computed buffers, such as an SDNQ layer's code values, keep their values)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device=device), False)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def is_of_packed_layer(model, key: str) -> bool:
    """Whether ``key`` is a packed layer's own tensor (its codes, scales, ...; not its bias)."""
    module_name, _, attribute = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return attribute != "bias" and formats.of_layer(module).packed


def comfyui_version() -> str:
    try:
        from comfyui_version import __version__
    except ImportError:  # a checkout without the generated file
        return "version unknown"
    return __version__
