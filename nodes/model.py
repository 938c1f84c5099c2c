"""The GLM-Image DiT as a real ComfyUI MODEL: model config, BaseModel, model sampling and the conds it understands.

How a GLM-Image conditioning reaches the DiT (see docs/how-it-works.md, How the pack plugs into ComfyUI):
- the CONDITIONING tensor is the glyph embedding; its dict carries `glm_prior_token_ids` (long [1 or B, N]),
  `glm_empty_glyph` (the glyph encoding of "", the unconditional text) and, for editing, `glm_references`;
- `extra_conds` runs once per sampling run. The branch comes from `prompt_type`, not from the wiring: the negative
  is always GLM's unconditional branch (empty glyph, every prior token dropped, no references), whether the user
  wires our negative output, a ConditioningZeroOut or another encode;
- glyph sequences of different lengths are batched by zero padding plus a real attention mask (`GlyphCond`), never
  by repeating tokens;
- reference-image keys/values are computed in `extra_conds`, once per sampling run, and read on every step.
"""

from __future__ import annotations

import math

import comfy.conds
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils
import torch
from comfy.ldm.modules.attention import optimized_attention_masked

from ..glm_image_core.comfy_quant import MARKER_SUFFIX as COMFY_QUANT_MARKER
from ..glm_image_core.defaults import DEFAULT_SIDE, VAE_SCALE
from ..glm_image_core.dit import GlmImageTransformer2DModel, ReferenceKV, attention_layout, text_groups_for_lengths
from ..glm_image_core.errors import InvalidInputError
from ..glm_image_core.glyph import pad_glyphs
from ..glm_image_core.scaled_fp8 import SCALED_FP8_MARKER
from ..glm_image_core.schedule import compute_mu
from .latent_format import GlmImageLatentFormat


class GlmImageModelSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """Flow sampling with GLM's resolution shift. The DiT is conditioned on the UNSHIFTED time, so `timestep()` is
    the inverse of `sigma()` (stock FLOW feeds the shifted sigma * 1000, which drifts colours)."""

    def timestep(self, sigma):
        # float32, never float64: the sigmas are on the model's device already, and MPS has no float64
        s = sigma.float()
        t = s / (self.shift - (self.shift - 1) * s) * self.multiplier
        # float32 sigmas carry ~1e-4 of noise in t; the reference's grid is integers (exact in float32), so snap
        # values that close
        nearest = t.round()
        return torch.where((t - nearest).abs() < 1e-3, nearest, t).to(sigma.dtype)


def model_sampling_for_size(width: int, height: int) -> GlmImageModelSampling:
    sampling = GlmImageModelSampling()
    sampling.set_parameters(shift=compute_mu(height, width), multiplier=1000)
    return sampling


def comfy_attention(q, k, v, key_mask, transformer_options=None):
    """The core's attention through ComfyUI's dispatch (sage/xformers/flash/SDPA/sub-quad). One module-level function,
    so a compiled model sees the same function on every call; the per-call transformer_options (attention overrides,
    block index) come in as an argument."""
    mask = None
    if key_mask is not None:  # additive form: every ComfyUI backend accepts it
        mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~key_mask, -torch.finfo(q.dtype).max)[:, None, None, :]
    return optimized_attention_masked(
        q, k, v, q.shape[1], mask, skip_reshape=True, skip_output_reshape=True,
        transformer_options=transformer_options or {},
    )  # fmt: skip


class ComfyGlmImageDiT(GlmImageTransformer2DModel):
    """The core DiT behind ComfyUI's diffusion_model call convention, open to what ComfyUI attaches to native DiTs:

    - wrappers: the forward runs inside the DIFFUSION_MODEL wrapper executor (EasyCache, TorchCompileModel, ...);
    - transformer_options reach every block's attention, with `block_index`, `total_blocks` and `block_type`
      ("double") set as Qwen-Image and Flux set them, beside ComfyUI's own `sigmas`, `cond_or_uncond`, `uuids`;
    - `patches_replace["dit"][("double_block", i)]` replaces block i. GLM's blocks are one stream of joint blocks
      (image and text tokens with their own modulations, like Qwen-Image's), so they use Qwen-Image's key:
      args {"img", "txt", "vec", "pe", "transformer_options"} -> {"img", "txt"};
    - `patches["double_block"]` run after each block with {"img", "txt", "x", "block_index", "transformer_options"}.

    The reference-image pass (`encode_reference`, once per sampling run) runs the core forward directly: no wrapper or
    patch sees it, so step caches never replay it. `control` (ControlNet residuals) is accepted and unused: there is
    no GLM-Image ControlNet.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs, attention=comfy_attention)

    def forward(self, x, timestep, context=None, glyph=None, prior_token_id=None, prior_token_drop=None,
                reference_kv=None, control=None, transformer_options=None, **kwargs):  # fmt: skip
        transformer_options = {} if transformer_options is None else transformer_options
        wrappers = comfy.patcher_extension.get_all_wrappers(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options
        )
        if wrappers:
            # Stock EasyCache adds its cached difference to this input in place; when the model computes in float32,
            # x is the very tensor BaseModel later turns into denoised = x - v * sigma, which that would corrupt.
            x = x.clone()
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, glyph, prior_token_id, prior_token_drop, reference_kv, control, transformer_options,
            **kwargs,
        )  # fmt: skip

    def _forward(self, x, timestep, context, glyph, prior_token_id, prior_token_drop, reference_kv, control,
                 transformer_options, **kwargs):  # fmt: skip
        """x: [B, 16, h, w]; timestep: [B]; glyph: GlyphCond.concat's [embeds [B, T, C], mask [B, T], text groups]."""
        embeds, mask, *layout = glyph
        b, _, h, w = x.shape
        target = torch.tensor([[h * VAE_SCALE, w * VAE_SCALE]], dtype=torch.float32, device=x.device).expand(b, 2)
        img, txt, temb, rope = self.embed(
            x, embeds, prior_token_id, prior_token_drop, timestep, target, torch.zeros_like(target)
        )
        key_mask, text_groups = attention_layout(mask.bool(), img.shape[1], txt.shape[1], *layout)
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        block_patches = transformer_options.get("patches", {}).get("double_block", [])
        transformer_options["total_blocks"] = len(self.transformer_blocks)
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            reference = None if reference_kv is None else reference_kv.layers[i]

            def original_block(args, block=block, reference=reference):
                img, txt = block(
                    args["img"], args["txt"], args["vec"], args["pe"], key_mask, self.attention, reference,
                    text_groups=text_groups, attention_options={"transformer_options": args["transformer_options"]},
                )  # fmt: skip
                return {"img": img, "txt": txt}

            args = {"img": img, "txt": txt, "vec": temb, "pe": rope, "transformer_options": transformer_options}
            if ("double_block", i) in blocks_replace:
                out = blocks_replace[("double_block", i)](args, {"original_block": original_block})
            else:
                out = original_block(args)
            img, txt = out["img"], out["txt"]
            for patch in block_patches:
                out = patch(
                    {"img": img, "txt": txt, "x": x, "block_index": i, "transformer_options": transformer_options}
                )
                img, txt = out["img"], out["txt"]
        return self.unembed(img, temb, h, w)


class GlyphCond(comfy.conds.CONDRegular):
    """Glyph embeddings [1, T, C]. Conds of any length batch together: zero padding plus a mask (long, so that
    ComfyUI moves it without casting it to the model dtype), and the padding layout (text groups) worked out from
    the conds' shapes on the host, so the DiT never reads the mask back from the device."""

    def can_concat(self, other):
        return self.cond.shape[2] == other.cond.shape[2] and self.cond.device == other.cond.device

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        embeds, mask = pad_glyphs(conds)
        lengths = [c.shape[1] for c in conds for _ in range(c.shape[0])]
        return [embeds, mask.long(), text_groups_for_lengths(lengths)]


class ReferenceKVCond:
    """Reference keys/values for the conditional branch; shared by every sample of the batch."""

    def __init__(self, kv: ReferenceKV):
        self.cond = kv

    def process_cond(self, batch_size, **kwargs):
        return self

    def can_concat(self, other):
        return other.cond is self.cond

    def concat(self, others):
        return self.cond

    def size(self):
        """[B_ref, L_ref]: the reference tokens every conditional attention also reads (see GlmImageModel's memory)."""
        k = self.cond.layers[0][0]  # [B_ref, heads, L_ref, head_dim]
        return [k.shape[0], k.shape[2]]


class GlmImageModel(comfy.model_base.BaseModel):
    """Memory, as ComfyUI estimates it for a sampling run (`memory_required`, from `extra_conds_shapes` before
    sampling and from the conds' `size()` to batch conds): the latent, plus the glyph tokens and the reference tokens
    each sample attends to, counted as latent area (one token = one patch of latent cells); plus, before sampling,
    the reference K/V that `extra_conds` will store for the whole run (2 x layers x tokens x width numbers; ~1.9 GiB
    in bf16 per 1024x1024 reference for the published DiT)."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ComfyGlmImageDiT)
        self.model_sampling = GlmImageModelSampling(model_config)
        patch_area = self.diffusion_model.patch_size**2
        self.memory_usage_factor_conds = ("glyph", "reference_kv")
        tokens_as_latent = lambda shape: [shape[0], 1, shape[1] * patch_area]  # noqa: E731  [B, tokens, ...]
        self.memory_usage_shape_process = {"glyph": tokens_as_latent, "reference_kv": tokens_as_latent}

    def extra_conds_shapes(self, **kwargs):
        """Per conditioning, before sampling: glyph [1, T, C], reference tokens [1, L_ref] and the K/V numbers."""
        out = {}
        if kwargs.get("cross_attn") is not None:
            out["glyph"] = list(kwargs["cross_attn"].shape)
        references = kwargs.get("glm_references")
        if references:
            dit = self.diffusion_model
            latents = [ref["latent"].shape for ref in references]  # [B, 16, h, w]
            out["reference_kv"] = [1, sum(b * (h // dit.patch_size) * (w // dit.patch_size) for b, _, h, w in latents)]
            out["reference_kv_stored"] = [sum(b * dit.reference_kv_elements(h, w) for b, _, h, w in latents)]
        return out

    def memory_required(self, input_shape, cond_shapes={}):  # noqa: B006 (ComfyUI's signature)
        stored = sum(math.prod(shape) for shape in cond_shapes.get("reference_kv_stored", []))
        dtype = self.manual_cast_dtype or self.get_dtype()
        return super().memory_required(input_shape, cond_shapes) + stored * comfy.model_management.dtype_size(dtype)

    def process_timestep(self, timestep, **kwargs):
        return timestep - 1.0  # the reference feeds the DiT t - 1

    def extra_conds(self, **kwargs):
        noise = kwargs["noise"]
        prior = kwargs.get("glm_prior_token_ids")
        if prior is None:
            raise InvalidInputError(
                "This conditioning has no GLM-Image visual tokens: connect the output of 'GLM-Image Encode' "
                "(or a ConditioningZeroOut of it) to the sampler."
            )
        check_prior_matches_latent(prior, noise, kwargs.get("glm_image_size"))
        check_whole_image_area(kwargs.get("area"), noise)
        self.check_model_sampling(noise)
        negative = kwargs.get("prompt_type") == "negative"
        glyph = kwargs.get("glm_empty_glyph") if negative else kwargs.get("cross_attn")
        if glyph is None:
            raise InvalidInputError(
                "The GLM-Image conditioning lacks its glyph embedding; re-create it with 'GLM-Image Encode'."
            )
        out = {
            "glyph": GlyphCond(glyph),
            "prior_token_id": comfy.conds.CONDRegular(prior),
            "prior_token_drop": comfy.conds.CONDRegular(torch.full((1, 1), int(negative), dtype=torch.long)),
        }
        references = kwargs.get("glm_references")
        if references and not negative:
            out["reference_kv"] = ReferenceKVCond(self.encode_references(references, kwargs["device"]))
        return out

    def encode_references(self, references, device) -> ReferenceKV:
        """One DiT pass per reference image (raw VAE latent + its prior ids), joined along the sequence."""
        dtype = self.manual_cast_dtype or self.get_dtype()
        parts = []
        for ref in references:
            latent = self.process_latent_in(ref["latent"]).to(device, dtype)
            ids = ref["prior_token_ids"].to(device)
            parts.append(self.diffusion_model.encode_reference(latent, ids, ref["image_size"]))
        return ReferenceKV.concat(parts)

    def check_model_sampling(self, noise):
        """Refuse what would silently give another image than GLM-Image's: a stock model sampling
        (ModelSamplingAuraFlow, SD3, Flux, ... feed the DiT the shifted time) or GLM's sampling with the shift of
        another image size (a model straight from the loader is set for 1024x1024). The sigmas are already made from
        the model's sampling when this runs, so it cannot be corrected here."""
        width, height = noise.shape[3] * VAE_SCALE, noise.shape[2] * VAE_SCALE
        sampling, fix = self.model_sampling, f"'ModelSampling GLM-Image' set to {width}x{height} (or given the tokens)"
        if not isinstance(sampling, GlmImageModelSampling):
            raise InvalidInputError(
                f"This GLM-Image model samples with {type(sampling).__name__}, set by a stock ModelSampling node: it "
                f"feeds the DiT another time than GLM-Image's sampling and makes a different image. Remove that node "
                f"and put {fix} between the GLM-Image DiT loader and the sampler."
            )
        mu = compute_mu(height, width)
        if abs(sampling.shift - mu) > 1e-3:
            raise InvalidInputError(
                f"This GLM-Image model's shift {sampling.shift:.3f} is for another image size than this "
                f"{width}x{height} latent (GLM-Image samples it with shift {mu:.3f}; a model straight from the "
                f"loader is set for 1024x1024). Put {fix} between the GLM-Image DiT loader and the sampler."
            )


def check_prior_matches_latent(prior: torch.Tensor, noise: torch.Tensor, image_size=None) -> None:
    """prior: long [1 or B, N]; noise: [B, C, h, w]; image_size: (height, width) px the tokens were generated for
    (from GLM-Image Encode). The token count alone cannot tell 512x768 from 768x512."""
    batch, _, h, w = noise.shape
    expected = (h // 2) * (w // 2)
    wrong_size = image_size is not None and tuple(image_size) != (h * VAE_SCALE, w * VAE_SCALE)
    if prior.shape[1] != expected or h % 4 or w % 4 or wrong_size:
        made_for = f"{image_size[1]}x{image_size[0]}" if image_size is not None else f"{prior.shape[1]} prior tokens"
        raise InvalidInputError(
            f"The visual tokens are for a different image size ({made_for}) than this {w * VAE_SCALE}x{h * VAE_SCALE} "
            "latent: the width/height of 'Generate visual tokens' and of the latent must be equal (connect the tokens to "
            "'Empty GLM-Image Latent')."
        )
    if prior.shape[0] not in (1, batch):
        raise InvalidInputError(
            f"{prior.shape[0]} token grids for a latent batch of {batch}: use one grid or one per latent."
        )


def check_whole_image_area(area, noise: torch.Tensor) -> None:
    """area: the cond's (h, w, y, x) in latent cells once ComfyUI resolved it, or None."""
    if area is not None and tuple(area) != (*noise.shape[2:], 0, 0):
        raise InvalidInputError(
            "GLM-Image conditioning cannot be limited to an area (ConditioningSetArea, or a mask with "
            "set_area_to_bounds): its visual tokens describe the whole image. Remove the area, or use a mask without "
            "set_area_to_bounds."
        )


class GlmImageConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}  # the base class would add num_heads/num_head_channels kwargs
    sampling_settings = {"shift": compute_mu(DEFAULT_SIDE, DEFAULT_SIDE), "multiplier": 1000}
    latent_format = GlmImageLatentFormat
    supported_inference_dtypes = [torch.bfloat16, torch.float32]
    memory_usage_factor = 2.0

    def get_model(self, state_dict, prefix="", device=None):
        return GlmImageModel(self, device=device)


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
    model_config = GlmImageConfig({k: v for k, v in config.items() if not k.startswith("_")})
    state_dict, quantisation = use_quantisation(model_config, state_dict, model_options)
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
    initial_device = mm.unet_inital_load_device(comfy.utils.calculate_parameters(state_dict), dtype)
    model = model_config.get_model(state_dict, "", device=initial_device)
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(model, load_device=load_device, offload_device=offload_device)
    assign = patcher.is_dynamic() if hasattr(patcher, "is_dynamic") else False
    if quantisation is None and "custom_operations" not in model_options:  # quantised layers take fp8 + scales as is
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


SCALED_OPS, MIXED_OPS = "scaled_fp8", "mixed_ops"
OPTIONAL_SCALES = (".scale_weight", ".scale_input")
MIXED_OPS_VERSION = "0.33"  # the ComfyUI with mixed-precision layers (comfy/quant_ops.py) the pack is tested with


def use_quantisation(model_config, state_dict: dict, model_options: dict) -> tuple[dict, str | None]:
    """Set up ComfyUI's layers for a quantised file, as comfy.sd.load_diffusion_model_state_dict does. ComfyUI with
    mixed-precision layers (comfy.utils.convert_old_quants) turns a scaled-fp8 file (`scaled_fp8` marker,
    per-Linear `scale_weight`) into per-layer `comfy_quant` configs and runs those, in every format it knows; ComfyUI
    0.3.x builds scaled-fp8 Linear layers from the marker and cannot read per-layer files. Returns the state dict to
    load and which of the two applies (None: not quantised). Custom operations (a GGUF-style loader) get the state
    dict as it is."""
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
