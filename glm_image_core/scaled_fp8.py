"""Quantised weights: ComfyUI's scaled-fp8 single files (the format ComfyUI 0.3.x reads) are read and written,
ComfyUI's per-layer files (`comfy_quant`) go to ``comfy_quant``; other quantisations are refused by name, with what
they are."""

from __future__ import annotations

from typing import Protocol

import torch

from . import comfy_quant, w4a16
from .checkpoint import WeightFiles
from .errors import ModelFilesError


class ComponentFiles(Protocol):
    """What the quantisation check reads of a component's files (``components.ComponentFiles``)."""

    config: dict
    config_source: str
    weights: WeightFiles


# A scaled-fp8 file: the `scaled_fp8` marker tensor, each Linear weight in fp8 with a float32 `scale_weight` (the
# weight is fp8 * scale) and possibly a `scale_input`; everything else as in the bf16 files.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
FP8_MAX = 448.0  # the largest float8_e4m3fn
COMFY_QUANT = "comfy_quant"  # check_quantisation's name for ComfyUI's per-layer files
FOREIGN_QUANTISATIONS = {  # a key suffix -> the format it belongs to
    ".absmax": "bitsandbytes 4-bit",
    ".SCB": "bitsandbytes 8-bit",
    ".qweight": "GPTQ/AWQ",
}


def is_quantisation_key(key: str, expected) -> bool:
    """The scaled-fp8 marker, or a scale or marker of a layer whose weight the model has (either format)."""
    if key == SCALED_FP8_MARKER:
        return True
    if key.endswith(SCALE_SUFFIXES) and f"{key.rsplit('.', 1)[0]}.weight" in expected:
        return True
    return comfy_quant.is_quantisation_key(key, expected)


def check_quantisation(files: ComponentFiles) -> str | None:
    """SCALED_FP8_MARKER for a ComfyUI scaled-fp8 file, COMFY_QUANT for a per-layer one, ``w4a16.W4A16`` for an
    AutoRound/GPTQ 4-bit folder, None for plain (bf16/fp32/fp8) weights; a ModelFilesError naming the format for
    quantisations this loader cannot use."""
    refuse = None
    if w4a16.read_format(files.config, files.config_source) is not None:
        if not w4a16.packed_layers(files.weights.shapes):
            refuse = f"{files.config_source} describes 4-bit weights, but {files.weights.where} holds no packed layer"
        else:
            return w4a16.W4A16
    elif comfy_quant.marked_layers(files.weights.shapes, files.weights.metadata, files.weights.where):
        return COMFY_QUANT
    else:
        for key in files.weights.shapes:
            fmt = next((f for suffix, f in FOREIGN_QUANTISATIONS.items() if key.endswith(suffix)), None)
            if fmt is not None:
                refuse = f"{files.weights.where} holds {fmt} weights (e.g. {key})"
                break
    if refuse:
        raise ModelFilesError(
            f"{refuse}; this loader reads bf16/fp32/fp8 weights, AutoRound/GPTQ 4-bit folders with their config and "
            "ComfyUI's quantised files (scaled-fp8, comfy_quant). Use the files of zai-org/GLM-Image, or make a "
            "quantised file from them with save_single_file(..., quant='int8_tensorwise')."
        )
    return SCALED_FP8_MARKER if SCALED_FP8_MARKER in files.weights.shapes else None


def dequantise_scaled_fp8(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A scaled-fp8 state dict as plain weights: each Linear weight = fp8 * scale_weight (in float32), then ``dtype``
    (None: float32 for them, the others as stored)."""
    out = {}
    for key, tensor in state_dict.items():
        if key == SCALED_FP8_MARKER or key.endswith(SCALE_SUFFIXES):
            continue
        scale = state_dict.get(f"{key.rsplit('.', 1)[0]}.scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            tensor = tensor.float() * scale.float()
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def quantise_scaled_fp8(state_dict: dict[str, torch.Tensor], linear_layers) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 layout: the weight of every layer in ``linear_layers`` (module names) in float8_e4m3fn
    with one float32 ``scale_weight`` per layer (its largest magnitude / 448), the rest as given, plus the marker."""
    out = dict(state_dict)
    for name in linear_layers:
        weight = state_dict[f"{name}.weight"].float()
        scale = (weight.abs().max() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        out[f"{name}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
        out[f"{name}.scale_weight"] = scale.reshape(())
    out[SCALED_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out
