"""LoRA key names for the GLM-Image DiT.

Our module names are diffusers' (`transformer_blocks.0.attn1.to_q`, ...), so a LoRA trained with diffusers or PEFT
names its layers as we do, behind the prefix its trainer wrote: `transformer.` (diffusers' save_lora_weights),
`base_model.model.` (PEFT's save_pretrained) or none (get_peft_model_state_dict). Each layer's tensors are
`<layer>.lora_A.weight` (down, [rank, in]), `<layer>.lora_B.weight` (up, [out, rank]) and optionally `<layer>.alpha`;
the update is W + strength * alpha / rank * B @ A (alpha = rank when absent).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DIFFUSERS_LORA_PREFIXES = ("transformer.", "base_model.model.", "")


def diffusers_lora_names(weight_keys: Iterable[str]) -> dict[str, str]:
    """{LoRA layer name: model weight key} for each ``<module>.weight`` of the DiT's state dict, under every prefix
    diffusers-based trainers write."""
    names = {}
    for key in weight_keys:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            for prefix in DIFFUSERS_LORA_PREFIXES:
                names[prefix + module] = key
    return names


def lora_layer_of(key: str, known: Mapping[str, str] | set[str]) -> str | None:
    """The known layer name a LoRA tensor key belongs to (``a.b.lora_A.weight``, ``a_b.lora_down.weight``,
    ``a.b.alpha``, ``a.b_lora.up.weight`` ...), or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:end])
        for candidate in (name, name.removesuffix("_lora")):
            if candidate in known:
                return candidate
    return None


def unmatched_lora_keys(lora_keys: Iterable[str], known: Mapping[str, str] | set[str]) -> list[str]:
    """The LoRA tensor keys that belong to no known layer (a LoRA for another model, or other key names)."""
    return [key for key in lora_keys if lora_layer_of(key, known) is None]
