"""The GLM-Image DiT as a real ComfyUI MODEL: the BaseModel with its memory rules and input checks, and the model config
(ComfyUI's supported-model entry). The parts it is made of: `dit` (the diffusion_model), `conds`, `model_sampling`;
how it is built from files: `dit_loading`.

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
import comfy.supported_models_base
import torch

from ..glm_image_core.defaults import DEFAULT_SIDE, VAE_SCALE
from ..glm_image_core.dit import ReferenceKV
from ..glm_image_core.errors import InvalidInputError
from ..glm_image_core.schedule import compute_mu, glm_schedule_shift
from .conds import GlyphCond, ReferenceKVCond
from .dit import ComfyGlmImageDiT
from .latent_format import GlmImageLatentFormat
from .model_sampling import GlmImageModelSampling


class GlmImageModel(comfy.model_base.BaseModel):
    """Memory, as ComfyUI estimates it for a sampling run (`memory_required`, from `extra_conds_shapes` before
    sampling and from the conds' `size()` to batch conds): the latent, plus the glyph tokens and the reference tokens
    each sample attends to, counted as latent area (one token = one patch of latent cells); plus, before sampling,
    the reference K/V that `extra_conds` will store for the whole run (2 x layers x tokens x width numbers; ~1.9 GiB
    in bf16 per 1024x1024 reference for the published DiT); plus what the largest layer's LoRA applied in the forward
    allocates (Load GLM-Image LoRA sets it for the sampler's preparation: `lora_nodes.with_in_forward_lora_memory`).
    The negative conds are estimated as the unconditional branch reads them (`with_negative_as_unconditional`): no
    references, the empty glyph, whatever is wired."""

    in_forward_lora_bytes = 0

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ComfyGlmImageDiT)
        # Inference only, as ComfyUI 0.33's BaseModel sets it: 0.3.x leaves modules in training mode, where comfy.ops'
        # fp8 layers skip torch._scaled_mm (fp8_e4m3fn_fast ran the slower cast path on an H200).
        self.diffusion_model.eval()
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
        extra = stored * comfy.model_management.dtype_size(dtype) + self.in_forward_lora_bytes
        return super().memory_required(input_shape, cond_shapes) + extra

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


def unconditional_view(cond: dict) -> dict:
    """A cond of the sampler's negative as GLM's unconditional branch reads it (`extra_conds`): the empty glyph and no
    reference images. A ConditioningZeroOut of the positive still carries the positive's references and a glyph of its
    length; extra_conds ignores both, so the sampler's memory estimate must too."""
    view = {k: v for k, v in cond.items() if k != "glm_references"}
    if cond.get("glm_empty_glyph") is not None:
        view["cross_attn"] = cond["glm_empty_glyph"]
    return view


def with_negative_as_unconditional(executor, model, noise_shape, conds, *args, **kwargs):
    """A PREPARE_SAMPLING wrapper (set by the DiT's loader): ComfyUI estimates the run's memory from the conds'
    `extra_conds_shapes` without telling which branch each cond is for, so the negative conds are given to it as the
    unconditional branch reads them (`unconditional_view`): each reference image is counted once, for the positive
    that computes its K/V, whatever the negative is. The run samples with these same conds (extra_conds reads them
    alike)."""
    if conds.get("negative"):
        conds = {**conds, "negative": [unconditional_view(cond) for cond in conds["negative"]]}
    return executor(model, noise_shape, conds, *args, **kwargs)


def check_sigmas_match_latent(sigmas: torch.Tensor, noise: torch.Tensor, model_sampling) -> None:
    """Refuse GLM-Image's schedule made for another image size than the latent (the GLM-Image Scheduler with its
    widgets left at another size and no tokens connected): the run would give another image, silently.
    sigmas: [steps + 1]; noise: [B, C, h, w]. Only where the model's own sampling is GLM-Image's for this latent:
    otherwise `GlmImageModel.check_model_sampling` refuses the run with its own fix, as the sampler starts."""
    width, height = noise.shape[-1] * VAE_SCALE, noise.shape[-2] * VAE_SCALE
    mu = compute_mu(height, width)
    if not isinstance(model_sampling, GlmImageModelSampling) or not math.isclose(
        model_sampling.shift, mu, rel_tol=1e-3
    ):
        return
    shift = glm_schedule_shift(sigmas)
    if shift is None or math.isclose(shift, mu, rel_tol=1e-3):
        return
    side = round((shift - 0.25) / 0.75 * 16) * 16  # compute_mu's inverse for a square image
    raise InvalidInputError(
        f"These sigmas are GLM-Image's schedule for another image size (shift {shift:.3f}, as for {side}x{side}) "
        f"than this {width}x{height} latent (shift {mu:.3f}); they would give another image than GLM-Image's. Connect "
        f"the tokens to the 'GLM-Image Scheduler' (their size decides) or set its width and height to {width}x{height}."
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


class GlmImageDiTConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}  # the base class would add num_heads/num_head_channels kwargs
    sampling_settings = {"shift": compute_mu(DEFAULT_SIDE, DEFAULT_SIDE), "multiplier": 1000}
    latent_format = GlmImageLatentFormat
    supported_inference_dtypes = [torch.bfloat16, torch.float32]
    memory_usage_factor = 2.0

    def get_model(self, state_dict, prefix="", device=None):
        return GlmImageModel(self, device=device)
