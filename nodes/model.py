"""The GLM-Image DiT as a real ComfyUI MODEL: model config, BaseModel, model sampling and the conds it understands.

How a GLM-Image conditioning reaches the DiT (see comfyui-notes §2-3):
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

import comfy.conds
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.supported_models_base
import comfy.utils
import torch
from comfy.ldm.modules.attention import optimized_attention_masked

from ..glm_image_core.dit import GlmImageTransformer2DModel, ReferenceKV
from ..glm_image_core.errors import InvalidInputError
from ..glm_image_core.glyph import pad_glyphs
from ..glm_image_core.schedule import compute_mu
from .latent_format import GlmImageLatentFormat


class GlmImageModelSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """Flow sampling with GLM's resolution shift. The DiT is conditioned on the UNSHIFTED time, so `timestep()` is
    the inverse of `sigma()` (stock FLOW feeds the shifted sigma * 1000, which drifts colours)."""

    def timestep(self, sigma):
        s = sigma.double()
        t = s / (self.shift - (self.shift - 1) * s) * self.multiplier
        # float32 sigmas carry ~1e-4 of noise in t; the reference's grid is integers, so snap values that close
        nearest = t.round()
        return torch.where((t - nearest).abs() < 1e-3, nearest, t).to(sigma.dtype)


def model_sampling_for_size(width: int, height: int) -> GlmImageModelSampling:
    sampling = GlmImageModelSampling()
    sampling.set_parameters(shift=compute_mu(height, width), multiplier=1000)
    return sampling


def comfy_attention(transformer_options):
    """The core's attention(q, k, v, key_mask) through ComfyUI's dispatch (sage/xformers/flash/SDPA/sub-quad)."""

    def attention(q, k, v, key_mask):
        mask = None
        if key_mask is not None:  # additive form: every ComfyUI backend accepts it
            mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~key_mask, -torch.finfo(q.dtype).max)[:, None, None, :]
        return optimized_attention_masked(
            q, k, v, q.shape[1], mask, skip_reshape=True, skip_output_reshape=True,
            transformer_options=transformer_options,
        )  # fmt: skip

    return attention


class ComfyGlmImageDiT(GlmImageTransformer2DModel):
    """The core DiT behind ComfyUI's diffusion_model call convention."""

    def forward(
        self, x, timestep, context=None, glyph=None, prior_token_id=None, prior_token_drop=None, reference_kv=None,
        transformer_options=None, **kwargs,
    ):  # fmt: skip
        embeds, mask = glyph
        b, _, h, w = x.shape
        target = torch.tensor([[h * 8, w * 8]], dtype=torch.float32, device=x.device).expand(b, 2)
        return super().forward(
            x,
            embeds,
            prior_token_id,
            prior_token_drop,
            timestep,
            target,
            torch.zeros_like(target),
            encoder_attention_mask=mask.bool(),
            reference_kv=reference_kv,
            attention=comfy_attention(transformer_options or {}),
        )


class GlyphCond(comfy.conds.CONDRegular):
    """Glyph embeddings [1, T, C]. Conds of any length batch together: zero padding plus a mask (long, so that
    ComfyUI moves it without casting it to the model dtype)."""

    def can_concat(self, other):
        return self.cond.shape[2] == other.cond.shape[2] and self.cond.device == other.cond.device

    def concat(self, others):
        embeds, mask = pad_glyphs([self.cond] + [o.cond for o in others])
        return [embeds, mask.long()]


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
        return [1]


class GlmImageModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ComfyGlmImageDiT)
        self.model_sampling = GlmImageModelSampling(model_config)

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
        """Refuse what would silently give another image than GLM-Image's: a stock model sampling (ModelSamplingAuraFlow,
        SD3, Flux, ... feed the DiT the shifted time) or GLM's sampling with the shift of another image size (a model
        straight from the loader is set for 1024x1024). The sigmas are already made from the model's sampling when
        this runs, so it cannot be corrected here."""
        width, height = noise.shape[3] * 8, noise.shape[2] * 8
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
    wrong_size = image_size is not None and tuple(image_size) != (h * 8, w * 8)
    if prior.shape[1] != expected or h % 4 or w % 4 or wrong_size:
        made_for = f"{image_size[1]}x{image_size[0]}" if image_size is not None else f"{prior.shape[1]} prior tokens"
        raise InvalidInputError(
            f"The visual tokens are for a different image size ({made_for}) than this {w * 8}x{h * 8} latent: the "
            "width/height of 'Generate visual tokens' and of the latent must be equal (connect the tokens to "
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
    sampling_settings = {"shift": compute_mu(1024, 1024), "multiplier": 1000}
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


def load_dit_patcher(state_dict: dict, config: dict, weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    """The DiT under ComfyUI's model management, as UNETLoader would build it. `config`: the published
    transformer/config.json keys."""
    mm = comfy.model_management
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype, fp8_fast = WEIGHT_DTYPES[weight_dtype]
    model_config = GlmImageConfig({k: v for k, v in config.items() if not k.startswith("_")})
    if dtype is None:
        dtype = mm.unet_dtype(
            model_params=comfy.utils.calculate_parameters(state_dict),
            supported_dtypes=model_config.supported_inference_dtypes,
            weight_dtype=comfy.utils.weight_dtype(state_dict),
        )
    model_config.set_inference_dtype(
        dtype, mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    )
    model_config.optimizations["fp8"] = fp8_fast
    model = model_config.get_model(state_dict, "", device=offload_device)
    state_dict = cast_to_model_dtypes(model.diffusion_model, state_dict, dtype)
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise InvalidInputError(
            f"GLM-Image DiT weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
