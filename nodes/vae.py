"""The GLM-Image VAE as a stock `comfy.sd.VAE`, so VAEDecode / VAEEncode and their tiled variants work unchanged.

ComfyUI's VAE object runs the core `glm_image_core.vae.AutoencoderKL` (published key names, built from ComfyUI's
`operations`): `GlmImageVAE` is a `comfy.sd.VAE` built through its `config=` path, with the one class that path
instantiates bound to our module for the duration of the constructor. Everything else the constructor does (dtype
choice, weight loading, the model patcher, dynamic VRAM where the host has it) is ComfyUI's own code, on any version.

The VAE does not normalise latents: `GlmImageLatentFormat` does that on the model side (see latent_format.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import comfy.model_management
import comfy.ops
import comfy.sd
import torch
from torch import nn

from ..glm_image_core.errors import InvalidInputError, ModelFilesError
from ..glm_image_core.vae import AutoencoderKL

# comfy.sd.VAE's memory estimates (bytes per latent pixel * 64 for decode, per image pixel for encode, times the dtype
# size) are fitted to the SD VAE (ch 128, ch_mult [1, 2, 4, 4]). Peak activation memory measured on CPU, fp32,
# 512x512, GLM-Image geometry vs SD geometry: decode 1706 / 968 MB (x1.76: the decoder upsamples 512 channels to full
# resolution where SD has 256), encode 521 / 521 MB (both peak at full resolution with 128 channels). So decode scales
# by 1.8 and encode keeps ComfyUI's constant.
DECODE_BYTES_PER_LATENT_PIXEL = int(1.8 * 2178) * 64
ENCODE_BYTES_PER_PIXEL = 1767


class FirstStage(nn.Module):
    """`VAE.first_stage_model`: the core VAE under `vae.`, with the `encode` / `decode` calls ComfyUI makes.

    The prefix keeps the published key names away from comfy.sd.VAE's diffusers-format detection, which would
    rename them to ComfyUI's LDM names."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def encode(self, pixels: torch.Tensor, **_) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> the posterior mode [B, C, H/8, W/8]."""
        return self.vae.encode(pixels)

    def decode(self, latent: torch.Tensor, **_) -> torch.Tensor:
        """[B, C, h, w] raw VAE latent -> [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.vae.decode(latent)


@contextlib.contextmanager
def _config_path_builds(module: nn.Module):
    """comfy.sd.VAE(config=...) builds `comfy.sd.AutoencoderKL(**config["params"])`; return `module` instead."""
    stock = comfy.sd.AutoencoderKL
    comfy.sd.AutoencoderKL = lambda **_: module
    try:
        yield
    finally:
        comfy.sd.AutoencoderKL = stock


def _working_dtype(device, dtype: torch.dtype | None) -> torch.dtype:
    """bf16 or fp32: the GLM-Image VAE overflows in fp16, so fp16 (e.g. from --fp16-vae) is never used."""
    allowed = [torch.bfloat16, torch.float32]
    if dtype is None:
        dtype = comfy.model_management.vae_dtype(device, allowed)
    if dtype not in allowed:
        fallback = torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float32
        logging.warning(f"GLM-Image VAE: {dtype} overflows in this VAE; using {fallback} instead")
        dtype = fallback
    return dtype


def _build(config: Mapping, dtype: torch.dtype) -> AutoencoderKL:
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        return AutoencoderKL(**kwargs, dtype=dtype, operations=comfy.ops.disable_weight_init).eval()
    except InvalidInputError as e:
        raise ModelFilesError(f"vae/config.json does not describe GLM-Image's VAE: {e}") from e


def _check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or reshaped:
        raise ModelFilesError(
            "GLM-Image VAE weights do not match vae/config.json: "
            f"missing {missing[:4]} ({len(missing)} in all), unexpected {unexpected[:4]} ({len(unexpected)} in all), "
            f"wrong shape {reshaped[:4]} ({len(reshaped)} in all); check that the vae/ folder is complete and that "
            "its config.json belongs to it"
        )


class GlmImageVAE(comfy.sd.VAE):
    """A stock VAE object whose first stage is the core GLM-Image VAE; its geometry is set after the base
    constructor, as the base's own branches set theirs."""

    def __init__(self, model: AutoencoderKL, state_dict: Mapping[str, torch.Tensor], device, dtype: torch.dtype):
        prefixed = {f"vae.{k}": v for k, v in state_dict.items()}  # no tensor is copied
        with _config_path_builds(FirstStage(model)):
            super().__init__(sd=prefixed, device=device, config={"params": {}}, dtype=dtype)
        self.latent_channels = model.latent_channels
        self.downscale_ratio = self.upscale_ratio = model.scale_factor
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.memory_used_decode = lambda shape, dtype: (
            DECODE_BYTES_PER_LATENT_PIXEL * shape[2] * shape[3] * comfy.model_management.dtype_size(dtype)
        )
        self.memory_used_encode = lambda shape, dtype: (
            ENCODE_BYTES_PER_PIXEL * shape[2] * shape[3] * comfy.model_management.dtype_size(dtype)
        )

    def get_sd(self):
        """The published key names (what the GLM-Image VAE loader reads back)."""
        return self.first_stage_model.vae.state_dict()


def check_glm_image_vae(vae, where: str) -> None:
    """Refuse a VAE that is not GLM-Image's: only 'Load GLM-Image VAE' builds one (its first stage is `FirstStage`
    over the core VAE, whose config was checked when it loaded; the stock VAELoader cannot build GLM-Image's
    geometry). Other 16-channel VAEs (Flux, SD3) pass every shape check but encode into another latent space."""
    first_stage = getattr(vae, "first_stage_model", None)
    if isinstance(first_stage, FirstStage):
        return
    found = f"a {getattr(vae, 'latent_channels', '?')}-channel {type(first_stage or vae).__name__}"
    raise InvalidInputError(
        f"The VAE at {where} is not GLM-Image's: it is {found}, another model's VAE (Flux's and SD3's have 16 "
        "channels too, in another latent space), so the DiT could not read what it encodes. Connect the VAE of "
        "'Load GLM-Image VAE' (the GLM-Image folder's vae/) instead."
    )


def load_glm_image_vae(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> comfy.sd.VAE:
    """A `comfy.sd.VAE` for the GLM-Image VAE from its state dict (published key names) and `vae/config.json` dict.

    Raises ModelFilesError when the config describes another architecture or when any weight is missing, left over
    or of another shape.
    """
    if device is None:
        device = comfy.model_management.vae_device()
    dtype = _working_dtype(device, dtype)
    model = _build(config, dtype)
    _check_keys(model, state_dict)
    return GlmImageVAE(model, state_dict, device, dtype)
