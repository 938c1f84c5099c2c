"""What travels between GLM-Image nodes besides the stock MODEL / VAE / CONDITIONING / LATENT types."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import torch
from comfy_api.latest import io

from ..glm_image_core.tokens import Reference, VisualTokens  # noqa: F401 (what GLM_TOKENS carries)

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
    hf_model: torch.nn.Module  # the whole transformers model

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
        return self.hf_model


@dataclass
class ARModel:
    """The AR model as two managed parts that take turns on the device: the text decoder (every run) and the vision
    encoder + VQ (only for reference images)."""

    decoder: ManagedHFModel  # GlmImageForConditionalGeneration: its text decoder and lm_head
    processor: object  # GlmImageProcessor
    preview_palette: torch.Tensor  # [16384, 3] uint8 live-preview colours (preview.model_palette), made at load
    vision: ManagedHFModel | None = None  # the same model: its ViT and VQ model
    loras: tuple = ()  # glm_image_core.lora.Lora each, applied unmerged for each run (Load AR LoRA)


@dataclass
class GlyphEncoder:
    model: ManagedHFModel  # T5EncoderModel (Glyph-ByT5)
    tokenizer: object  # ByT5Tokenizer
