"""The GLM-Image pipeline in code (docs/how-it-works.md): AR tokens -> glyph embeddings -> DiT sampling -> VAE decode.

Each stage is a function of its own so callers (the CLI, tests, the ComfyUI nodes) can run, replace or cache them
one by one; `generate` strings them together.

Memory: the AR model (~19 GB in bf16, ~11 GB with int8 decoder weights) and the DiT (~13 GB) need not share the
GPU. With ``offload`` the models stay on the CPU and each stage borrows the GPU for its own models only (the AR's
vision encoder, for edits; the AR's text decoder with the code rows of its embedding; the glyph encoder; the VAE
encoding references, for edits; the DiT; the VAE decoding),
so the peak is the largest stage, not the sum (``memory`` lists the parts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import ar, ar_lora, formats, glyph, loading, lora, memory
from .defaults import DEFAULT_SIDE, GUIDANCE, LATENT_CHANNELS, PATCH_STRIDE, STEPS, VAE_SCALE
from .dit import GlmImageTransformer2DModel, ReferenceKV
from .sampling import DitCondition, denoise
from .schedule import glm_schedule
from .sizes import check_image_size
from .vae import AutoencoderKL


@dataclass
class GlmImageModels:
    ar_model: torch.nn.Module  # transformers GlmImageForConditionalGeneration
    processor: object  # transformers GlmImageProcessor
    glyph_encoder: torch.nn.Module  # transformers T5EncoderModel
    glyph_tokenizer: object  # transformers ByT5Tokenizer
    dit: GlmImageTransformer2DModel
    vae: AutoencoderKL
    device: torch.device | None = None  # where the stages run when offloading (None: where each model is)
    offload: bool = False  # models live on the CPU; each stage copies its models to `device` and drops them after
    dit_loras: tuple[lora.Lora, ...] = ()  # applied beside the DiT's layers for each generation (``lora``)
    ar_loras: tuple[lora.Lora, ...] = ()  # applied beside the AR decoder's projections for each generation


LoraChoice = tuple[str | Path, float]  # a LoRA file (or AR adapter folder) and its strength


def load_models(
    folder: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    offload: bool | None = None,
    ar_quantisation: str | None = None,
    ar_path: str | Path | None = None,
    loras: Sequence[LoraChoice] = (),
    ar_loras: Sequence[LoraChoice] = (),
) -> GlmImageModels:
    """Every component from the published GLM-Image folder. The VAE runs in float32 when dtype is float16.

    offload: keep the models on the CPU and move each stage's models to ``device`` only for that stage (AR vision
    encoder for edits, AR decoder, glyph encoder, VAE encode for edits, DiT, VAE decode). None (default): on a CUDA device whose free memory
    cannot hold all the weights at once (plus a margin for activations); never on the CPU.
    ar_quantisation: "int8" for 8-bit decoder weights (``loading.load_ar_model``); ar_path: the AR from this
    folder or exported 8-bit file instead of ``folder``. The AR's embedding is always trimmed to its code rows on
    the device (``loading.trim_embedding``). loras / ar_loras: (file, strength) of LoRAs for the DiT (diffusers/PEFT,
    ComfyUI or kohya key names) and PEFT adapters for the AR, checked against the models here and applied unmerged
    for each generation (``lora``: on every weight format, the weights never changed).
    """
    device = torch.device(device)
    if offload is None:
        offload = device.type == "cuda" and not _fits_at_once(folder, dtype, device, ar_quantisation == "int8")
    load_device = "cpu" if offload else device
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    ar_model = loading.load_ar_model(
        folder if ar_path is None else ar_path, dtype=dtype, device=load_device, quantisation=ar_quantisation, trim=True
    )
    dit = loading.load_transformer(folder, dtype=dtype, device=load_device)
    return GlmImageModels(
        ar_model=ar_model,
        processor=loading.load_ar_processor(folder),
        glyph_encoder=loading.load_glyph_encoder(folder, dtype=dtype, device=load_device),
        glyph_tokenizer=loading.load_glyph_tokenizer(folder),
        dit=dit,
        vae=loading.load_vae(folder, dtype=vae_dtype, device=load_device),
        device=device,
        offload=offload,
        dit_loras=tuple(lora.Lora(lora.read_dit_lora(path, dit), strength, str(path)) for path, strength in loras),
        ar_loras=tuple(read_ar_lora(ar_model, path, strength) for path, strength in ar_loras),
    )


def read_ar_lora(ar_model, path: str | Path, strength: float) -> lora.Lora:
    """An AR adapter, checked against the model, as Load GLM-Image AR LoRA reads it."""
    layers = ar_lora.read_adapter(path)
    ar_lora.check_fits(ar_model, layers, Path(path).name)
    return lora.Lora(layers, strength, str(path))


ACTIVATION_MARGIN = 6 * 2**30  # bytes kept free for activations, caches and the CUDA context (2048x2048, CFG)


def _fits_at_once(folder: str | Path, dtype: torch.dtype, device: torch.device, ar_int8: bool = False) -> bool:
    """Whether all weights (their file sizes, scaled to ``dtype``; the files are bf16 except the fp32 glyph encoder,
    which is counted as if bf16 too; an int8 AR as about half its files) and a margin fit the device's free memory."""
    files = list(Path(folder).rglob("*.safetensors"))
    ar_files = [f for f in files if f.parent.name == loading.AR_MODEL.subfolder]
    size = sum(f.stat().st_size for f in files) - (0.45 * sum(f.stat().st_size for f in ar_files) if ar_int8 else 0)
    needed = size * dtype.itemsize / 2 + ACTIVATION_MARGIN
    free, _ = torch.cuda.mem_get_info(device)
    return needed <= free


@contextlib.contextmanager
def stage(models: GlmImageModels, *modules: torch.nn.Module) -> Iterator[None]:
    """Run a pipeline stage with ``modules`` on ``models.device`` (only when ``models.offload``).

    Parameters and buffers are copied to the device for the stage and simply dropped after it: the CPU tensors are
    kept, so nothing is copied back and leaving a stage is free. Inference only: in-place changes made on the
    device are not kept.
    """
    if not models.offload:
        yield
        return
    kept = []
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            kept.append((tensor, tensor.data))
            tensor.data = tensor.data.to(models.device, copy=True)
    try:
        yield
    finally:
        for tensor, data in kept:
            tensor.data = data
        del kept
        for module in modules:
            formats.release_device_copies(module)  # what the stage's layers made for themselves there
        if models.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the stage's memory back before the next stage allocates


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """A reference image as the VAE takes it: resized (Lanczos) to height x width, [1, 3, H, W] in [-1, 1]."""
    image = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """VAE output [B, 3, H, W] in about [-1, 1] -> PIL images."""
    array = ((pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in array]


@torch.no_grad()
def reference_latents(vae: AutoencoderKL, images: Sequence[Image.Image], tokens: ar.ARResult) -> list[torch.Tensor]:
    """Each reference image's VAE mode latent, normalised, [1, 16, h, w] on the VAE's device. The latent size is set
    by the AR's grid for that image (stride 16 px per DiT token)."""
    latents = []
    device = next(vae.parameters()).device
    for image, (gh, gw) in zip(images, tokens.reference_grid_sizes):
        pixels = image_to_tensor(image, gh * PATCH_STRIDE, gw * PATCH_STRIDE).to(device, vae.dtype or torch.float32)
        latents.append(vae.normalize(vae.encode(pixels).float()))
    return latents


@torch.no_grad()
def encode_references(
    dit: GlmImageTransformer2DModel, latents: Sequence[torch.Tensor], tokens: ar.ARResult
) -> ReferenceKV | None:
    """The reference K/V of every reference latent (``reference_latents``) with its own prior ids: one DiT pass each,
    joined."""
    if not latents:
        return None
    device = next(dit.parameters()).device
    parts = []
    for latent, ids in zip(latents, tokens.reference_prior_ids):
        size = (latent.shape[2] * VAE_SCALE, latent.shape[3] * VAE_SCALE)
        latent = latent.to(device, dit.dtype or torch.float32)
        parts.append(dit.encode_reference(latent, ids[None].to(device), size))
    return ReferenceKV.concat(parts)


def glyph_conditions(
    models: GlmImageModels, glyph_source: str | Sequence[str], prior_token_ids: torch.Tensor, reference_kv=None
) -> tuple[DitCondition, DitCondition]:
    """(cond, uncond): the prompt's glyphs + prior tokens (+ references) and GLM's unconditional branch (glyphs of
    "", every prior token dropped, no references)."""

    def encode(source):
        return glyph.encode_glyphs(source, models.glyph_encoder, models.glyph_tokenizer)

    cond = DitCondition(encode(glyph_source), prior_token_ids, reference_kv=reference_kv)
    uncond = DitCondition(encode(""), prior_token_ids, drop_prior=True)
    return cond, uncond


def initial_noise(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Gaussian latent noise from its own CPU generator (device-independent, never the global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE, generator=generator)


@torch.no_grad()
def generate(
    models: GlmImageModels,
    prompt: str,
    height: int = DEFAULT_SIDE,
    width: int = DEFAULT_SIDE,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    seed: int = 0,
    references: Sequence[Image.Image] = (),
    glyph_texts: Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    on_token: Callable[[int, int, torch.Tensor], None] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> Image.Image:
    """Text-to-image, or editing when `references` are given. `glyph_texts` overrides the quoted spans. With
    ``models.offload`` the AR, the glyph encoder, the DiT and the VAE take turns on the GPU (see ``stage``)."""
    check_image_size(height, width)
    inputs = ar.build_ar_inputs(models.processor, prompt, height, width, list(references))
    tokens = ar.generate_staged(
        models.ar_model,
        inputs,
        [seed],
        vision_stage=lambda working: stage(models, *memory.ar_vision_modules(models.ar_model)),
        decoder_stage=lambda working: stage(models, *memory.ar_decode_modules(models.ar_model)),
        loras=models.ar_loras,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        callback=on_token,
    )
    with stage(models, models.glyph_encoder):
        cond, uncond = glyph_conditions(models, prompt if glyph_texts is None else glyph_texts, tokens.prior_token_ids)
    # The VAE and the DiT take turns too: the decode's activations (~4.5 GiB at 1024x1024) never meet the DiT's weights.
    latents = []
    if references:
        with stage(models, models.vae):
            latents = reference_latents(models.vae, list(references), tokens)
    with stage(models, models.dit):
        dit_device = next(models.dit.parameters()).device
        with lora.hooked(models.dit, lora.projection_updates(models.dit_loras, dit_device)):
            reference_kv = encode_references(models.dit, latents, tokens)
            cond, uncond = (_to(c, dit_device) for c in (cond, uncond))
            cond.reference_kv = reference_kv
            sigmas, timesteps = glm_schedule(steps, height, width)
            noise = initial_noise(1, height, width, seed).to(dit_device)
            latent = denoise(models.dit, noise, sigmas.to(dit_device), timesteps, cond, uncond, guidance, on_step)
    with stage(models, models.vae):
        vae_device = next(models.vae.parameters()).device
        pixels = models.vae.decode(models.vae.denormalize(latent.to(vae_device)).to(models.vae.dtype or torch.float32))
    return tensor_to_images(pixels)[0]


def _to(condition: DitCondition, device: torch.device) -> DitCondition:
    """The condition's tensors on ``device`` (glyphs come from the glyph encoder's device, ids from the AR's)."""
    return DitCondition(
        condition.glyph.to(device),
        condition.prior_token_id.to(device),
        condition.drop_prior,
        None if condition.glyph_mask is None else condition.glyph_mask.to(device),
        condition.reference_kv,
    )
