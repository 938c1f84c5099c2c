"""The GLM-Image VAE as a stock `comfy.sd.VAE`, so VAEDecode / VAEEncode and their tiled variants work unchanged.

The published VAE is diffusers' `AutoencoderKL` with block_out [128, 512, 1024, 1024], 3 resnets per encoder block,
no mid-block attention and no quant convs. ComfyUI's own VAE detection cannot load it (it hard-codes ch_mult
[1, 2, 4, 4], 2 resnets per block and a mid attention), so this module follows comfyui-notes §5.4 option 1:
rename the diffusers keys to ComfyUI's LDM names here, build the VAE through the `config=` path, then swap the
modules GLM-Image does not have for `nn.Identity` and fix the attributes the config path leaves at SD defaults.

The VAE does not normalise latents: `GlmImageLatentFormat` does that on the model side (see latent_format.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import comfy.ldm.models.autoencoder
import comfy.model_management
import comfy.sd
import torch
from torch import nn

from ..glm_image_core.errors import ModelFilesError

# ComfyUI's Encoder/Decoder build every GroupNorm as `Normalize(channels)`, whose num_groups is fixed at 32.
COMFY_GROUPNORM_GROUPS = 32

# Modules the LDM AutoencoderKL always builds and GLM-Image does not have; they become nn.Identity.
REPLACED_MODULES = ("encoder.mid.attn_1", "decoder.mid.attn_1", "quant_conv", "post_quant_conv")

# comfy.sd.VAE's memory estimates (bytes per latent pixel * 64 for decode, per image pixel for encode, times the dtype
# size) are fitted to the SD VAE (ch 128, ch_mult [1, 2, 4, 4]). Peak activation memory of ComfyUI's Encoder/Decoder
# measured on CPU, fp32, 512x512, GLM-Image geometry vs SD geometry: decode 1706 / 968 MB (x1.76: the decoder
# upsamples 512 channels to full resolution where SD has 256), encode 521 / 521 MB (both peak at full resolution with
# 128 channels). So decode scales by 1.8 and encode keeps ComfyUI's constant.
DECODE_BYTES_PER_LATENT_PIXEL = int(1.8 * 2178) * 64
ENCODE_BYTES_PER_PIXEL = 1767


def geometry_from_config(config: Mapping) -> dict:
    """The LDM `ddconfig` for a diffusers AutoencoderKL `config.json`, after checking that the config describes the
    architecture this loader reproduces. Missing keys take diffusers' defaults, as diffusers itself would."""
    block_out = list(config["block_out_channels"])
    unsupported = {
        "mid_block_add_attention": (config.get("mid_block_add_attention", True), False),
        "use_quant_conv": (config.get("use_quant_conv", True), False),
        "use_post_quant_conv": (config.get("use_post_quant_conv", True), False),
        "act_fn": (config.get("act_fn", "silu"), "silu"),
        "down_block_types": (list(config.get("down_block_types", [])), ["DownEncoderBlock2D"] * len(block_out)),
        "up_block_types": (list(config.get("up_block_types", [])), ["UpDecoderBlock2D"] * len(block_out)),
    }
    for key, (found, expected) in unsupported.items():
        if found != expected:
            raise ModelFilesError(f"vae/config.json: {key} is {found!r}; the GLM-Image VAE loader expects {expected!r}")
    ch = block_out[0]
    if any(c % ch for c in block_out):
        raise ModelFilesError(f"vae/config.json: block_out_channels {block_out} are not multiples of {ch}")
    groups = config.get("norm_num_groups", 32)
    bad = [c for c in block_out if c % COMFY_GROUPNORM_GROUPS or c % groups]
    if bad:
        raise ModelFilesError(
            f"vae/config.json: block_out_channels {block_out} must all be multiples of {COMFY_GROUPNORM_GROUPS} "
            f"(ComfyUI builds its VAE GroupNorms with {COMFY_GROUPNORM_GROUPS} groups before they are set to "
            f"norm_num_groups={groups}); {bad} are not"
        )
    return {
        "double_z": True,
        "z_channels": config["latent_channels"],
        "resolution": config.get("sample_size", 1024),
        "in_channels": config.get("in_channels", 3),
        "out_ch": config.get("out_channels", 3),
        "ch": ch,
        "ch_mult": [c // ch for c in block_out],
        "num_res_blocks": config["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def _rename(key: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL key -> the LDM name. Unknown keys are returned unchanged (and then reported as
    unexpected by the strict key check)."""

    def up_level(i: str) -> int:  # diffusers numbers decoder blocks from the lowest resolution, LDM from the highest
        return num_levels - 1 - int(i)

    key = key.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
    rules = (
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{up_level(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up_level(m[1])}.upsample."),
    )
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def convert_diffusers_vae_state_dict(state_dict: Mapping[str, torch.Tensor], num_levels: int) -> dict:
    """diffusers AutoencoderKL keys -> ComfyUI LDM keys, for any number of resnets per block (ComfyUI's own
    converter stops at 2 encoder / 3 decoder resnets). Tensors are not copied."""
    return {_rename(k, num_levels): v for k, v in state_dict.items()}


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


def load_glm_image_vae(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> comfy.sd.VAE:
    """Build a `comfy.sd.VAE` for the GLM-Image VAE from its diffusers state dict and `vae/config.json` dict.

    Raises ModelFilesError when the config describes another architecture or when any weight is missing or left
    over (apart from the modules GLM-Image does not have, which never appear in its checkpoint).
    """
    ddconfig = geometry_from_config(config)
    z = ddconfig["z_channels"]
    vae_config = {"params": {"embed_dim": z, "ddconfig": ddconfig}}
    sd = convert_diffusers_vae_state_dict(state_dict, len(ddconfig["ch_mult"]))

    # comfy.sd.VAE loads the weights itself and warns about every key it misses. Give it zero-size-in-memory
    # placeholders for the modules that are replaced below, with their shapes read from a meta-device build of the
    # same ComfyUI class, so a correct checkpoint loads without a misleading "Missing VAE keys" warning.
    with torch.device("meta"):
        skeleton = comfy.ldm.models.autoencoder.AutoencoderKL(**vae_config["params"])
    expected = skeleton.state_dict()
    placeholders = {
        k: torch.zeros((), dtype=v.dtype).expand(v.shape)
        for k, v in expected.items()
        if k.startswith(tuple(m + "." for m in REPLACED_MODULES))
    }
    kept = set(expected) - set(placeholders)
    missing, unexpected = sorted(kept - set(sd)), sorted(set(sd) - kept)
    reshaped = sorted(k for k in kept & set(sd) if sd[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise ModelFilesError(
            "GLM-Image VAE weights do not match vae/config.json (keys in ComfyUI's naming): "
            f"missing {missing[:4]} ({len(missing)} in all), unexpected {unexpected[:4]} ({len(unexpected)} in all), "
            f"wrong shape {reshaped[:4]} ({len(reshaped)} in all); check that the vae/ folder is complete and that "
            "its config.json belongs to it"
        )

    if device is None:
        device = comfy.model_management.vae_device()
    vae = comfy.sd.VAE(sd={**placeholders, **sd}, config=vae_config, device=device, dtype=_working_dtype(device, dtype))

    model = vae.first_stage_model
    for name in REPLACED_MODULES:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    groups = config.get("norm_num_groups", 32)
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.num_groups = groups

    vae.latent_channels = z  # the config path leaves 4; tiled encode allocates this many channels
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(ddconfig["ch_mult"]) - 1)
    vae.working_dtypes = [torch.bfloat16, torch.float32]
    vae.memory_used_decode = lambda shape, dtype: (
        DECODE_BYTES_PER_LATENT_PIXEL * shape[2] * shape[3] * comfy.model_management.dtype_size(dtype)
    )
    vae.memory_used_encode = lambda shape, dtype: (
        ENCODE_BYTES_PER_PIXEL * shape[2] * shape[3] * comfy.model_management.dtype_size(dtype)
    )
    vae.patcher.size = 0  # recomputed from the module on next use, now without the replaced modules
    return vae
