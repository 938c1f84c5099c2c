"""What travels between GLM-Image nodes besides the stock MODEL / VAE / CONDITIONING / LATENT types."""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import torch
from comfy_api.latest import io

GlmARModel = io.Custom("GLM_AR_MODEL")
GlmGlyphEncoder = io.Custom("GLM_GLYPH_ENCODER")
GlmTokens = io.Custom("GLM_TOKENS")


class HFModelHolder(torch.nn.Module):
    """A transformers model inside a plain module: ModelPatcher writes `.device`, a read-only property on HF models.

    With ``parts`` only those sub-modules are in the holder (what the patcher moves and counts); the model itself is
    then kept outside the module tree."""

    def __init__(self, model: torch.nn.Module, parts: list[torch.nn.Module] | None = None):
        super().__init__()
        if parts is None:
            self.model = model
        else:
            self.parts = torch.nn.ModuleList(parts)


@dataclass
class ManagedHFModel:
    """A transformers model (or some of its parts) under ComfyUI's model management: evicted/offloaded when others
    need the memory."""

    patcher: comfy.model_patcher.ModelPatcher
    model: torch.nn.Module  # the whole transformers model

    @classmethod
    def wrap(
        cls,
        model: torch.nn.Module,
        load_device: torch.device,
        offload_device: torch.device,
        parts: list[torch.nn.Module] | None = None,
    ) -> ManagedHFModel:
        holder = HFModelHolder(model, parts)
        return cls(comfy.model_patcher.ModelPatcher(holder, load_device, offload_device), model)

    def loaded(self, memory_required: int = 0) -> torch.nn.Module:
        """The model with its managed parts on the load device; ``memory_required``: bytes its run needs beside the
        weights (ComfyUI frees that much too). HF layers cannot be partially offloaded, hence a full load."""
        comfy.model_management.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
        return self.model


@dataclass
class ARModel:
    """The AR model as two managed parts that take turns on the device: the text decoder (every run) and the vision
    encoder + VQ (only for reference images)."""

    model: ManagedHFModel  # GlmImageForConditionalGeneration: its text decoder and lm_head
    processor: object  # GlmImageProcessor
    vision: ManagedHFModel | None = None  # the same model: its ViT and VQ model
    preview_palette: torch.Tensor | None = None  # [16384, 3] uint8 live-preview colours, set on first use
    loras: tuple = ()  # glm_image_core.ar_lora.ArLora each, merged into the decoder for each run (Load AR LoRA)


@dataclass
class GlyphEncoder:
    model: ManagedHFModel  # T5EncoderModel (Glyph-ByT5)
    tokenizer: object  # ByT5Tokenizer


@dataclass
class Reference:
    """One reference image of an edit: the pixels the VAE encodes and the AR's prior ids for it."""

    pixels: torch.Tensor  # [1, H, W, 3] in 0..1 at the size its prior grid implies (H, W multiples of 32)
    prior_token_ids: torch.Tensor  # long [1, (H/16)*(W/16)]


@dataclass
class VisualTokens:
    """The AR output for one prompt: one or several sampled grids, and what made them."""

    prior_token_ids: torch.Tensor  # long [N, (H/16)*(W/16)]: the target grid upsampled x2 (the DiT's input)
    target_ids: torch.Tensor  # long [N, (H/32)*(W/32)]
    preview_ids: torch.Tensor  # long [N, ph*pw] (text-to-image), [N, 0] for editing
    height: int
    width: int
    prompt: str
    seed: int
    references: list[Reference] = field(default_factory=list)
